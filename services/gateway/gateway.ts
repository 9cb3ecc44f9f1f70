// The gateway's core, independent of any wire API: it connects to the draft and target services, checks
// that they form a usable pair, validates requests, runs each through the PEARL loop (pearl_loop.ts) and
// hands out the committed tokens as an async stream. The gRPC server (server.ts) and the REST API sit on
// top of it.
import { randomInt, randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { FinishReason, type ServiceInfo, type TokenLogprobs } from "../../proto/gen/pearl/v1/common.js";
import type { GatewayConfig } from "../../lib/config.js";
import { type DecodingModeName, isDecodingModeName } from "../../lib/decoding_modes.js";
import { errorMessage, type Logger } from "../../lib/logging.js";
import type { Registry } from "../../lib/metrics.js";
import { modelPairDifferences } from "../../lib/model_pair.js";
import {
  clientSampling,
  samplingProblem,
  temperatureProblem,
  topLogprobsProblem,
} from "../../lib/sampling_params.js";
import { grpcClientCredentials } from "../../lib/tls.js";
import { TextTokenizer } from "../../lib/tokenizer.js";
import { AbandonedError, Admission, ShuttingDownError } from "./admission.js";
import { AsyncQueue } from "./async_queue.js";
import { DraftLink, TargetLink } from "./links.js";
import { MAX_TOP_LOGPROBS, sliceLogprobs } from "./logprobs.js";
import { type GatewayMetrics, gatewayMetrics } from "./metrics.js";
import { PearlLoop, type RequestUsage, type ResolvedRequest } from "./pearl_loop.js";
import { StopStringMatcher } from "./stop_strings.js";
import { TargetHealth } from "./target_health.js";
import { Tuner } from "./tuner.js";

/** A request as a client states it; anything unset takes the server's default. */
export interface GenerateInput {
  /** Names the request in the logs of all three services; one is made up when unset or empty. */
  requestId?: string;
  /** Exactly one of prompt (needs a tokenizer) and promptTokenIds. */
  prompt?: string;
  promptTokenIds?: number[];
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  seed?: number;
  mode?: DecodingModeName;
  draftTemperature?: number;
  /** The output ends before the first of these strings (needs a tokenizer); the request then finishes
   * with reason stop. */
  stop?: string[];
  /** Set (0 to 20): every chunk scores its tokens, with this many most likely tokens' beside. */
  topLogprobs?: number;
  /** The first chunk scores the prompt too. */
  promptLogprobs?: boolean;
}

export interface GenerateChunk {
  tokenIds: number[];
  /** Their text, when the gateway has a tokenizer. */
  text: string;
  /** The target's scores of tokenIds, when the request asked for them. */
  logprobs?: TokenLogprobs;
  /** On the first chunk, when the request asked for them: the prompt's tokens from the second on. */
  promptLogprobs?: TokenLogprobs;
  /** Set on the last chunk only, with usage. */
  finishReason?: FinishReason;
  usage?: RequestUsage & { seed: number };
}

/** The request is wrong; the message says what. */
export class InvalidRequestError extends Error {
  /**
   * @param param the field at fault, as the API that received it names it (OpenAI's `param`)
   * @param code OpenAI's machine-readable code, where one applies
   */
  constructor(
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(message);
  }
}

/** Bounds of the gRPC API's stop strings (the OpenAI API allows 4): the matcher's work grows with both. */
export const MAX_STOP_STRINGS = 64;
export const MAX_STOP_STRING_LENGTH = 1024;

/**
 * The checks every API makes of a tokenized prompt: ids inside the vocabulary, at least one token, and
 * room left in the context for one generated token. `param` is what the caller's API calls the prompt.
 */
export function checkPromptTokens(
  promptTokenIds: readonly number[],
  vocabSize: number,
  contextLength: number,
  param: string,
): void {
  const bad = promptTokenIds.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= vocabSize);
  if (bad >= 0) {
    throw new InvalidRequestError(
      `${param}[${bad}] = ${promptTokenIds[bad]} is outside the vocabulary [0, ${vocabSize})`,
      param,
    );
  }
  if (promptTokenIds.length === 0) throw new InvalidRequestError(`the ${param} encode to no tokens`, param);
  if (promptTokenIds.length >= contextLength) {
    throw new InvalidRequestError(
      `this model's maximum context length is ${contextLength} tokens, and the ${param} take ` +
        `${promptTokenIds.length}: shorten them to leave room for at least one generated token`,
      param,
      "context_length_exceeded",
    );
  }
}
/** A service the request needs cannot be reached. */
export class UnavailableError extends Error {}
export class CancelledError extends Error {}

/** The HTTP header (REST) and metadata key (gRPC) that carries a request's id. */
export const REQUEST_ID_HEADER = "x-request-id";
const REQUEST_ID_PATTERN = /^[\x21-\x7e]{1,128}$/;

/** Whether a client's request id can go into logs and headers as it is: 1 to 128 visible ASCII
 * characters. */
export function isValidRequestId(id: string): boolean {
  return REQUEST_ID_PATTERN.test(id);
}

const DRAFT_PROBE_INTERVAL_MS = 1000;
const DRAFT_GRACE_MS = 5000;
/** After the shutdown timeout cancelled what was left, how long those requests get to say so. */
const CANCELLED_REQUESTS_GRACE_MS = 1000;

export class Gateway {
  private readonly target: TargetLink;
  private readonly draft: DraftLink;
  private draftInfo: ServiceInfo | undefined;
  private draftAvailable = false;
  private probeTimer: NodeJS.Timeout | undefined;
  private closed = false;
  private shuttingDown = false;
  private nextSessionId = 1;
  private readonly admission: Admission;
  /** Ends a request in flight with an error (the server is shutting down). */
  private readonly inFlight = new Set<(error: Error) => void>();
  /** Longest prompt, in tokens. */
  private readonly promptTokenLimit: number;
  private readonly tuner: Tuner;
  private readonly metrics: GatewayMetrics;
  private readonly eosTokenIds: ReadonlySet<number>;

  private constructor(
    private readonly config: GatewayConfig,
    private readonly logger: Logger,
    registry: Registry,
    private readonly targetInfo: ServiceInfo,
    /** The model name clients of the OpenAI API give and get back. */
    readonly servedModelName: string,
    readonly tokenizer: TextTokenizer | undefined,
    target: TargetLink,
    draft: DraftLink,
    private readonly targetHealth: TargetHealth,
  ) {
    this.target = target;
    this.draft = draft;
    this.eosTokenIds = new Set(targetInfo.model?.eosTokenIds ?? []);
    const contextLimit = targetInfo.model!.maxPositionEmbeddings - 1;
    this.promptTokenLimit =
      config.maxPromptTokens > 0 ? Math.min(config.maxPromptTokens, contextLimit) : contextLimit;
    this.metrics = gatewayMetrics(registry);
    this.admission = new Admission(config.maxNumSeqs, config.maxWaiting, {
      waiting: this.metrics.waiting,
      rejected: this.metrics.rejected,
    });
    this.tuner = new Tuner(config, logger, this.metrics.tuner);
  }

  /**
   * Connects to both services (waiting up to the connect timeout for them to come up) and refuses a
   * draft whose vocabulary or special tokens differ from the target's. A draft that is not there yet is
   * used as soon as it answers.
   */
  static async connect(config: GatewayConfig, logger: Logger, registry: Registry): Promise<Gateway> {
    const linkCredentials = grpcClientCredentials({
      ca: config.linkTlsCa,
      cert: config.linkTlsCert,
      key: config.linkTlsKey,
      flags: { ca: "--link-tls-ca", cert: "--link-tls-cert", key: "--link-tls-key" },
    });
    let targetHealth: TargetHealth | undefined;
    const target = new TargetLink(config.targetAddress, logger, linkCredentials, (error) =>
      targetHealth?.lost(error),
    );
    const draft = new DraftLink(config.draftAddress, logger, linkCredentials);
    try {
      const deadline = Date.now() + config.connectTimeoutSeconds * 1000;
      // The draft is optional: once the target answers, it gets a short grace, not the whole timeout.
      let draftDeadline = deadline;
      const draftAnswer = waitForInfo(
        () => draft.info(),
        () => draftDeadline,
        `draft service at ${config.draftAddress}`,
      ).catch((error: unknown) => {
        logger.warn("draft service unavailable: requests run in ar until it answers", {
          error: errorMessage(error),
        });
        return undefined;
      });
      const targetInfo = await waitForInfo(
        () => target.info(),
        () => deadline,
        `target service at ${config.targetAddress}`,
      ).catch(async (error: unknown) => {
        draftDeadline = 0;
        await draftAnswer;
        throw error;
      });
      draftDeadline = Math.min(deadline, Date.now() + DRAFT_GRACE_MS);
      const draftInfo = await draftAnswer;
      if (draftInfo) {
        const differences = modelPairDifferences(draftInfo.model!, targetInfo.model!);
        if (differences.length > 0) {
          throw new Error(
            `refusing the model pair: draft "${draftInfo.model!.modelId}" and target ` +
              `"${targetInfo.model!.modelId}" differ in ${differences.join("; ")}`,
          );
        }
      }
      const tokenizer = config.tokenizerDir !== "" ? TextTokenizer.load(config.tokenizerDir) : undefined;
      if (config.tokenizerDir !== "" && !tokenizer) {
        throw new Error(`no tokenizer.json in ${config.tokenizerDir} (--tokenizer)`);
      }
      const servedModelName =
        config.servedModelName !== "" ? config.servedModelName : targetInfo.model!.modelId;
      targetHealth = new TargetHealth(
        config.targetAddress,
        targetInfo.model!,
        (deadlineMs) => target.info(deadlineMs),
        logger,
      );
      const gateway = new Gateway(
        config,
        logger,
        registry,
        targetInfo,
        servedModelName,
        tokenizer,
        target,
        draft,
        targetHealth,
      );
      if (draftInfo) gateway.useDraft(draftInfo);
      else gateway.scheduleDraftProbe();
      gateway.tuner.seed(draftInfo, targetInfo);
      logger.info("connected", {
        target: config.targetAddress,
        targetModel: targetInfo.model?.modelId,
        servedModelName,
        draft: config.draftAddress,
        draftModel: draftInfo?.model?.modelId ?? null,
        defaultMode: config.defaultMode,
        tokenizer: tokenizer !== undefined,
      });
      return gateway;
    } catch (error) {
      targetHealth?.stop();
      target.shutdown();
      draft.shutdown();
      throw error;
    }
  }

  get hasTokenizer(): boolean {
    return this.tokenizer !== undefined;
  }

  get isDraftAvailable(): boolean {
    return this.draftAvailable;
  }

  /** null while the target service is reachable (without a draft requests still run, in ar). */
  unhealthyReason(): string | null {
    if (this.shuttingDown) return "the gateway is shutting down";
    return this.targetHealth.unhealthyReason;
  }

  /** Counts a request refused before it reached the gateway's core (authentication). */
  countRejected(reason: "unauthenticated"): void {
    this.metrics.rejected.inc({ reason });
  }

  /** Text to prompt tokens. A text longer than any text of promptTokenLimit tokens can be is refused
   * without tokenizing it: tokenizing megabytes blocks the event loop, every stream with it, for seconds. */
  encodePrompt(text: string, param: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    const tokenizer = this.tokenizer;
    if (!tokenizer) throw new InvalidRequestError("this server has no tokenizer", param);
    const maxLength = tokenizer.maxTextLength(this.promptTokenLimit);
    if (text.length > maxLength) {
      throw new InvalidRequestError(
        `the ${param} are ${text.length} characters long, more than any prompt of at most ` +
          `${this.promptTokenLimit} tokens (the limit) can be`,
        param,
        "prompt_too_long",
      );
    }
    return tokenizer.encode(text, options);
  }

  /** checkPromptTokens, and the configured limit (--max-prompt-tokens). */
  checkPrompt(promptTokenIds: readonly number[], param: string): void {
    const model = this.targetInfo.model!;
    checkPromptTokens(promptTokenIds, model.vocabSize, model.maxPositionEmbeddings, param);
    if (promptTokenIds.length > this.promptTokenLimit) {
      throw new InvalidRequestError(
        `the ${param} take ${promptTokenIds.length} tokens, more than the limit of ${this.promptTokenLimit}`,
        param,
        "prompt_too_long",
      );
    }
  }

  /** Runs one request; the stream ends after the chunk that carries the finish reason. Breaking out of
   * the iteration (or aborting the signal) cancels the request on both services. */
  async *generate(input: GenerateInput, signal?: AbortSignal): AsyncGenerator<GenerateChunk> {
    const request = this.resolve(input);
    const stopMatcher = this.stopMatcher(input.stop);
    if (signal?.aborted) throw new CancelledError("cancelled before it started");
    const started = performance.now();
    const release = await this.admit(signal);
    const admitted = performance.now();
    const queue = new AsyncQueue<GenerateChunk>();
    const decoder = this.tokenizer?.streamDecoder();
    let firstTokenAt: number | undefined;
    let lastTokenAt: number | undefined;
    let outcome: { finishReason: FinishReason; usage: RequestUsage } | undefined;
    let failure: Error | undefined;

    const loop = new PearlLoop(this.nextSessionId++, request, this.loopContext(), {
      tokens: (tokenIds, logprobs, promptLogprobs) => {
        this.metrics.generationTokens.inc(tokenIds.length);
        const now = performance.now();
        if (lastTokenAt === undefined) {
          firstTokenAt = now;
          this.metrics.timeToFirstToken.observe((now - started) / 1000);
        } else this.metrics.interTokenLatency.observe((now - lastTokenAt) / 1000);
        lastTokenAt = now;
        if (!stopMatcher || !decoder) {
          queue.push({ tokenIds, text: decoder?.push(tokenIds) ?? "", logprobs, promptLogprobs });
          return;
        }
        // Token by token, so that the output ends with the token that completed the stop string,
        // however many tokens this step committed.
        let text = "";
        for (let i = 0; i < tokenIds.length; i++) {
          const scan = stopMatcher.push(decoder.push(tokenIds.slice(i, i + 1)));
          text += scan.text;
          if (scan.stopped) {
            queue.push({
              tokenIds: tokenIds.slice(0, i + 1),
              text,
              logprobs: logprobs && sliceLogprobs(logprobs, 0, i + 1),
              promptLogprobs,
            });
            loop.finishAtStopString(tokenIds.length - i - 1);
            return;
          }
        }
        queue.push({ tokenIds, text, logprobs, promptLogprobs });
      },
      finished: (reason, usage) => {
        let text = decoder?.flush() ?? "";
        let finishReason = reason;
        if (stopMatcher) {
          const scan = stopMatcher.push(text);
          text = scan.text + stopMatcher.flush();
          if (scan.stopped) finishReason = FinishReason.FINISH_REASON_STOP;
        }
        outcome = { finishReason, usage };
        queue.push({
          tokenIds: [],
          text,
          finishReason,
          usage: { ...usage, seed: request.sampling.seed },
        });
        queue.end();
      },
      failed: (error) => {
        failure = error;
        queue.fail(new UnavailableError(error.message));
      },
    });
    const onAbort = (): void => {
      loop.cancel();
      queue.fail(new CancelledError("cancelled by the client"));
    };
    const terminate = (error: Error): void => {
      if (outcome || failure) return;
      failure = error;
      loop.cancel();
      queue.fail(error);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    this.inFlight.add(terminate);
    this.metrics.running.inc();
    this.metrics.promptTokens.inc(request.promptTokenIds.length);
    try {
      loop.start();
      yield* queue;
    } finally {
      signal?.removeEventListener("abort", onAbort);
      this.inFlight.delete(terminate);
      // Still running when the consumer stopped listening: nobody wants the rest.
      if (!outcome && !failure) loop.cancel();
      this.metrics.running.dec();
      release();
      const seconds = (performance.now() - started) / 1000;
      const finishReason = outcome ? finishReasonName(outcome.finishReason) : failure ? "error" : "cancelled";
      this.metrics.requests.inc({ mode: outcome?.usage.mode ?? request.mode, finish_reason: finishReason });
      if (outcome) this.metrics.requestLatency.observe(seconds);
      this.logger.info("request", {
        requestId: request.requestId,
        mode: request.mode,
        finishedIn: outcome?.usage.mode ?? null,
        finishReason,
        promptTokens: request.promptTokenIds.length,
        completionTokens: outcome?.usage.completionTokens ?? null,
        draftTokens: outcome?.usage.draftTokens ?? null,
        acceptedTokens: outcome?.usage.acceptedTokens ?? null,
        targetSteps: outcome?.usage.targetSteps ?? null,
        meanAcceptedLength: outcome ? Number(outcome.usage.meanAcceptedLength.toFixed(3)) : null,
        draftFallback: outcome?.usage.draftFallback ?? null,
        speculationOff: outcome?.usage.speculationOff ?? null,
        ttftSeconds: firstTokenAt === undefined ? null : Number(((firstTokenAt - started) / 1000).toFixed(4)),
        queuedSeconds: Number(((admitted - started) / 1000).toFixed(4)),
        seconds: Number(seconds.toFixed(4)),
        ...(failure ? { error: failure.message } : {}),
      });
    }
  }

  async info(): Promise<{
    draft: ServiceInfo | undefined;
    target: ServiceInfo;
    draftAvailable: boolean;
    lookahead: number;
    verifyWindow: number;
    sdGamma: number;
  }> {
    const [target, draft] = await Promise.all([
      this.target.info(),
      this.draftAvailable ? this.draft.info().catch(() => undefined) : Promise.resolve(undefined),
    ]);
    const plan = this.tuner.plan("pearl");
    return {
      draft,
      target,
      draftAvailable: this.draftAvailable,
      lookahead: plan.lookahead,
      verifyWindow: plan.verifyWindow,
      sdGamma: this.config.sdGamma,
    };
  }

  /**
   * Graceful shutdown: from now on requests are refused (503 / UNAVAILABLE) and /health says so; the ones
   * in flight get up to `timeoutMs` to finish, then are ended with an error, which closes their sessions
   * on both services and so frees their KV. Resolves with how many finished and how many were cancelled.
   */
  async shutdown(timeoutMs: number): Promise<{ finished: number; cancelled: number }> {
    this.shuttingDown = true;
    this.admission.stopAccepting();
    const inFlight = this.inFlight.size;
    const timeout = new AbortController();
    const drained = await Promise.race([
      this.admission.idle().then(() => true),
      sleep(timeoutMs, false, { signal: timeout.signal }).catch(() => false),
    ]);
    timeout.abort();
    if (drained) return { finished: inFlight, cancelled: 0 };
    const left = [...this.inFlight];
    for (const terminate of left) {
      terminate(
        new UnavailableError(
          `the server is shutting down: the request was cancelled after the ${timeoutMs / 1000} s ` +
            "shutdown timeout",
        ),
      );
    }
    const grace = new AbortController();
    await Promise.race([
      this.admission.idle(),
      sleep(CANCELLED_REQUESTS_GRACE_MS, undefined, { signal: grace.signal }).catch(() => undefined),
    ]);
    grace.abort();
    return { finished: inFlight - left.length, cancelled: left.length };
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.probeTimer);
    this.targetHealth.stop();
    this.target.shutdown();
    this.draft.shutdown();
  }

  /** A place to run, or the reason there is none (OverloadedError passes through: 429). */
  private async admit(signal: AbortSignal | undefined): Promise<() => void> {
    try {
      return await this.admission.admit(signal);
    } catch (error) {
      if (error instanceof AbandonedError) throw new CancelledError(error.message);
      if (error instanceof ShuttingDownError) throw new UnavailableError(error.message);
      throw error;
    }
  }

  // ---- requests -----------------------------------------------------------------------------------------

  private resolve(input: GenerateInput): ResolvedRequest {
    if (input.requestId && !isValidRequestId(input.requestId)) {
      throw new InvalidRequestError("a request id must be 1 to 128 visible ASCII characters");
    }
    const hasText = input.prompt !== undefined && input.prompt !== "";
    const hasIds = input.promptTokenIds !== undefined && input.promptTokenIds.length > 0;
    if (hasText === hasIds) {
      throw new InvalidRequestError("give exactly one of prompt (text) and prompt_token_ids");
    }
    let promptTokenIds: number[];
    if (hasText) {
      if (!this.tokenizer) {
        throw new InvalidRequestError(
          "this server has no tokenizer: send prompt_token_ids instead of prompt",
        );
      }
      promptTokenIds = this.encodePrompt(input.prompt!, "prompt");
    } else {
      promptTokenIds = input.promptTokenIds!;
    }
    this.checkPrompt(promptTokenIds, hasText ? "prompt" : "prompt_token_ids");
    const maxTokens =
      input.maxTokens === undefined || input.maxTokens === 0 ? this.config.defaultMaxTokens : input.maxTokens;
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      throw new InvalidRequestError(`max_tokens must be a positive integer, got ${maxTokens}`);
    }
    const sampling = clientSampling(input, () => randomInt(0, 2 ** 48 - 1));
    const samplingError = samplingProblem(sampling);
    if (samplingError) throw new InvalidRequestError(samplingError.message, samplingError.param);
    const mode = input.mode ?? this.config.defaultMode;
    if (!isDecodingModeName(mode)) throw new InvalidRequestError(`unknown mode ${String(mode)}`);
    const topLogprobs = input.topLogprobs;
    const topLogprobsError = topLogprobsProblem(topLogprobs, MAX_TOP_LOGPROBS);
    if (topLogprobsError) throw new InvalidRequestError(topLogprobsError, "top_logprobs");
    const draftTemperature = input.draftTemperature ?? this.config.draftTemperature;
    const draftTemperatureError = temperatureProblem(draftTemperature, "draft_temperature");
    if (draftTemperatureError) throw new InvalidRequestError(draftTemperatureError, "draft_temperature");
    return {
      requestId: input.requestId || randomUUID(),
      promptTokenIds,
      maxTokens,
      sampling,
      mode,
      draftTemperature,
      draftTopK: this.config.draftTopK,
      topLogprobs,
      promptLogprobs: input.promptLogprobs,
    };
  }

  private stopMatcher(stop: string[] | undefined): StopStringMatcher | undefined {
    if (stop === undefined || stop.length === 0) return undefined;
    if (stop.length > MAX_STOP_STRINGS) {
      throw new InvalidRequestError(`at most ${MAX_STOP_STRINGS} stop strings, got ${stop.length}`, "stop");
    }
    if (stop.some((text) => text.length > MAX_STOP_STRING_LENGTH)) {
      throw new InvalidRequestError(
        `stop strings must be at most ${MAX_STOP_STRING_LENGTH} characters`,
        "stop",
      );
    }
    if (!this.tokenizer) throw new InvalidRequestError("stop strings need a tokenizer: this server has none");
    if (stop.some((text) => text === "")) throw new InvalidRequestError("stop strings must not be empty");
    return new StopStringMatcher(stop);
  }

  private loopContext() {
    return {
      target: this.target,
      draft: this.draftAvailable ? this.draft : undefined,
      targetContextLength: this.targetInfo.model!.maxPositionEmbeddings,
      draftContextLength: this.draftInfo?.model?.maxPositionEmbeddings ?? 0,
      eosTokenIds: this.eosTokenIds,
      tuner: this.tuner,
      metrics: this.metrics.loop,
      logger: this.logger,
      draftLost: (error: Error) => this.draftLost(error),
    };
  }

  // ---- draft availability ---------------------------------------------------------------------------

  private useDraft(info: ServiceInfo): void {
    this.draftInfo = info;
    this.draftAvailable = true;
  }

  private draftLost(error: Error): void {
    if (!this.draftAvailable) return;
    this.draftAvailable = false;
    this.logger.warn("draft service lost: new requests run in ar until it answers again", {
      error: error.message,
    });
    this.scheduleDraftProbe();
  }

  /** Asks the draft service for its info until it answers, then checks the pair again before using it. */
  private scheduleDraftProbe(): void {
    if (this.closed) return;
    clearTimeout(this.probeTimer);
    this.probeTimer = setTimeout(() => {
      this.draft.info(DRAFT_PROBE_INTERVAL_MS).then(
        (info) => {
          if (this.closed) return;
          const differences = modelPairDifferences(info.model!, this.targetInfo.model!);
          if (differences.length > 0) {
            this.logger.error("refusing the draft service: it does not match the target", {
              differences,
            });
            this.scheduleDraftProbe();
            return;
          }
          this.useDraft(info);
          this.logger.info("draft service available", { draftModel: info.model?.modelId });
        },
        () => this.scheduleDraftProbe(),
      );
    }, DRAFT_PROBE_INTERVAL_MS);
    this.probeTimer.unref();
  }
}

async function waitForInfo(
  ask: () => Promise<ServiceInfo>,
  deadline: () => number,
  what: string,
): Promise<ServiceInfo> {
  let lastError: unknown;
  do {
    try {
      return await ask();
    } catch (error) {
      lastError = error;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  } while (Date.now() < deadline());
  throw new Error(`the ${what} did not answer: ${errorMessage(lastError)}`);
}

export function finishReasonName(reason: FinishReason): string {
  switch (reason) {
    case FinishReason.FINISH_REASON_STOP:
      return "stop";
    case FinishReason.FINISH_REASON_LENGTH:
      return "length";
    default:
      return "unspecified";
  }
}
