// The OpenAI-compatible REST API on the gateway's HTTP server: POST /v1/completions, POST
// /v1/chat/completions (both with `stream` as server-sent events) and GET /v1/models. Requests become
// Gateway.generate() calls, one per choice of each prompt (openai_choices.ts); every usage object adds
// pearl's speculative-decoding counters. Errors use OpenAI's body {error: {message, type, param, code}} so
// that OpenAI clients report them as such.
import { randomUUID } from "node:crypto";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { FinishReason, type TokenLogprobs } from "../../proto/gen/pearl/v1/common.js";
import { ChatTemplate, ChatTemplateError } from "../../lib/chat_template.js";
import { errorMessage, type Logger } from "../../lib/logging.js";
import type { TextTokenizer } from "../../lib/tokenizer.js";
import { OverloadedError } from "./admission.js";
import {
  CancelledError,
  type Gateway,
  type GenerateChunk,
  type GenerateInput,
  InvalidRequestError,
  isValidRequestId,
  REQUEST_ID_HEADER,
  UnavailableError,
} from "./gateway.js";
import {
  choiceSeed,
  collectRuns,
  cumulativeLogprob,
  type RunChunk,
  type RunPlan,
  runChoices,
} from "./openai_choices.js";
import {
  chatLogprobs,
  completionLogprobs,
  type LogprobsFormat,
  type ScoredToken,
  scoredPrompt,
  scoredTokens,
} from "./openai_logprobs.js";
import {
  type GenerationFields,
  invalidRequest,
  OpenAIError,
  parseChatCompletionRequest,
  parseCompletionRequest,
} from "./openai_schema.js";
import { detokenize, type TokenizeContext, tokenize, version } from "./openai_tokenize.js";

export interface OpenAIApiOptions {
  gateway: Gateway;
  logger: Logger;
  /** The folder with tokenizer_config.json (the chat template); "" when the gateway has no tokenizer. */
  tokenizerDir: string;
  /** Larger bodies are refused with 413 before they are parsed (--max-body-bytes). */
  maxBodyBytes: number;
}

interface ServedModel {
  id: string;
  contextLength: number;
  vocabSize: number;
  /** Unix seconds: when this gateway started serving it. */
  created: number;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  draft_tokens: number;
  accepted_tokens: number;
  target_steps: number;
  mean_accepted_length: number;
}

type OpenAIFinishReason = "stop" | "length";

/** What differs between the two generation endpoints' responses. `logprobs` is the choice's (or the
 * piece's) logprobs object, or null when the request did not ask for them. */
interface ResponseShape {
  idPrefix: string;
  object: string;
  chunkObject: string;
  choice(
    index: number,
    text: string,
    finishReason: OpenAIFinishReason,
    logprobs: unknown,
  ): Record<string, unknown>;
  /** The first streamed piece of a choice (chat announces the role), or undefined when none is due. */
  openingChunkChoice(index: number): Record<string, unknown> | undefined;
  textChunkChoice(index: number, text: string, logprobs: unknown): Record<string, unknown>;
  finishChunkChoice(index: number, finishReason: OpenAIFinishReason): Record<string, unknown>;
  logprobsFormat(tokenizer: TextTokenizer): LogprobsFormat;
}

const COMPLETION_SHAPE: ResponseShape = {
  idPrefix: "cmpl-",
  object: "text_completion",
  chunkObject: "text_completion",
  choice: (index, text, finishReason, logprobs) => ({ index, text, logprobs, finish_reason: finishReason }),
  openingChunkChoice: () => undefined,
  textChunkChoice: (index, text, logprobs) => ({ index, text, logprobs, finish_reason: null }),
  finishChunkChoice: (index, finishReason) => ({
    index,
    text: "",
    logprobs: null,
    finish_reason: finishReason,
  }),
  logprobsFormat: completionLogprobs,
};

const CHAT_SHAPE: ResponseShape = {
  idPrefix: "chatcmpl-",
  object: "chat.completion",
  chunkObject: "chat.completion.chunk",
  choice: (index, text, finishReason, logprobs) => ({
    index,
    message: { role: "assistant", content: text },
    logprobs,
    finish_reason: finishReason,
  }),
  openingChunkChoice: (index) => ({
    index,
    delta: { role: "assistant", content: "" },
    logprobs: null,
    finish_reason: null,
  }),
  textChunkChoice: (index, text, logprobs) => ({
    index,
    delta: { content: text },
    logprobs,
    finish_reason: null,
  }),
  finishChunkChoice: (index, finishReason) => ({
    index,
    delta: {},
    logprobs: null,
    finish_reason: finishReason,
  }),
  logprobsFormat: chatLogprobs,
};

/** A prompt as the request is served: its tokens, and the text echo returns. */
interface ServedPrompt {
  tokenIds: number[];
  text: string;
}

/** How a request's choices are made and reported, beyond its generation fields. */
interface ChoiceOptions {
  /** Completions: the text and the scores start with the prompt's. */
  echo: boolean;
  /** Completions: runs per prompt, of which the n of the highest cumulative log-probability are returned. */
  bestOf: number | undefined;
}

/** What every piece of a response needs to know. */
interface ResponseContext {
  body: GenerationFields;
  prompts: ServedPrompt[];
  plans: RunPlan[];
  options: ChoiceOptions;
  shape: ResponseShape;
  tokenizer: TextTokenizer;
  header: { id: string; created: number; model: string };
  /** max_tokens 0 (with echo): the prompt alone is returned; the one token each run makes is dropped. */
  promptOnly: boolean;
  /** Runs per prompt: n, or best_of, which then ranks them. */
  runsPerPrompt: number;
}

export async function registerOpenAIApi(app: FastifyInstance, options: OpenAIApiOptions): Promise<void> {
  const api = await OpenAIApi.create(options);
  await app.register(
    async (scope) => {
      useStrictJson(scope, options.maxBodyBytes);
      scope.addHook("onRequest", async (request, reply) => api.assignRequestId(request, reply));
      scope.setErrorHandler((error, request, reply) => api.sendError(request, reply, error));
      scope.setNotFoundHandler((request, reply) =>
        api.sendError(
          request,
          reply,
          new OpenAIError(404, `unknown endpoint: ${request.method} ${request.url}`, "invalid_request_error"),
        ),
      );
      scope.get("/models", async () => api.modelList());
      scope.get<{ Params: { model: string } }>("/models/:model", async (request) =>
        api.modelObject(request.params.model),
      );
      scope.post("/completions", { bodyLimit: options.maxBodyBytes }, (request, reply) =>
        api.completions(request, reply),
      );
      scope.post("/chat/completions", { bodyLimit: options.maxBodyBytes }, (request, reply) =>
        api.chatCompletions(request, reply),
      );
    },
    { prefix: "/v1" },
  );
  // vLLM serves these at the root, beside /health and /metrics.
  await app.register(async (scope) => {
    useStrictJson(scope, options.maxBodyBytes);
    scope.addHook("onRequest", async (request, reply) => api.assignRequestId(request, reply));
    scope.setErrorHandler((error, request, reply) => api.sendError(request, reply, error));
    scope.post("/tokenize", { bodyLimit: options.maxBodyBytes }, async (request) =>
      tokenize(jsonBody(request.body), api.tokenizeContext()),
    );
    scope.post("/detokenize", { bodyLimit: options.maxBodyBytes }, async (request) =>
      detokenize(jsonBody(request.body), api.tokenizeContext()),
    );
    scope.get("/version", async () => version());
  });
}

class OpenAIApi {
  private readonly requestIds = new WeakMap<FastifyRequest, string>();

  private constructor(
    private readonly gateway: Gateway,
    private readonly logger: Logger,
    private readonly model: ServedModel,
    private readonly chatTemplate: ChatTemplate | undefined,
    private readonly maxBodyBytes: number,
  ) {}

  static async create(options: OpenAIApiOptions): Promise<OpenAIApi> {
    const target = (await options.gateway.info()).target.model;
    if (!target) throw new Error("the target service did not describe its model");
    const chatTemplate = options.tokenizerDir !== "" ? ChatTemplate.load(options.tokenizerDir) : undefined;
    if (chatTemplate && !chatTemplate.available) {
      options.logger.warn("chat completions unavailable", { reason: chatTemplate.unavailableReason });
    }
    return new OpenAIApi(
      options.gateway,
      options.logger,
      {
        id: options.gateway.servedModelName,
        contextLength: target.maxPositionEmbeddings,
        vocabSize: target.vocabSize,
        created: Math.floor(Date.now() / 1000),
      },
      chatTemplate,
      options.maxBodyBytes,
    );
  }

  // ---- request ids and errors -------------------------------------------------------------------------

  assignRequestId(request: FastifyRequest, reply: FastifyReply): void {
    const given = request.headers[REQUEST_ID_HEADER];
    const requestId = typeof given === "string" && isValidRequestId(given) ? given : randomUUID();
    this.requestIds.set(request, requestId);
    void reply.header(REQUEST_ID_HEADER, requestId);
    if (given !== undefined && given !== requestId) {
      throw invalidRequest(
        `the ${REQUEST_ID_HEADER} header must be 1 to 128 visible ASCII characters`,
        REQUEST_ID_HEADER,
      );
    }
  }

  private requestId(request: FastifyRequest): string {
    return this.requestIds.get(request) ?? randomUUID();
  }

  sendError(request: FastifyRequest, reply: FastifyReply, error: unknown): FastifyReply {
    const openAIError = toOpenAIError(error, this.maxBodyBytes);
    const fields = {
      requestId: this.requestId(request),
      method: request.method,
      url: request.url,
      status: openAIError.status,
      error: openAIError.message,
    };
    if (openAIError.status >= 500) this.logger.error("request failed", fields);
    else this.logger.info("request rejected", fields);
    reply.code(openAIError.status);
    // As HTTP says of 429 (and OpenAI's clients obey): when to try again.
    if (error instanceof OverloadedError) void reply.header("retry-after", String(error.retryAfterSeconds));
    if (openAIError.code === "request_too_large")
      return sendAfterDraining(request, reply, openAIError.body());
    return reply.send(openAIError.body());
  }

  // ---- models -------------------------------------------------------------------------------------------

  modelList(): { object: "list"; data: Record<string, unknown>[] } {
    return { object: "list", data: [this.modelEntry()] };
  }

  modelObject(id: string): Record<string, unknown> {
    if (id !== this.model.id) {
      throw new OpenAIError(
        404,
        `the model \`${id}\` does not exist: this server serves \`${this.model.id}\``,
        "invalid_request_error",
        "model",
        "model_not_found",
      );
    }
    return this.modelEntry();
  }

  private modelEntry(): Record<string, unknown> {
    return {
      id: this.model.id,
      object: "model",
      created: this.model.created,
      owned_by: "pearl",
      max_model_len: this.model.contextLength,
    };
  }

  tokenizeContext(): TokenizeContext {
    return {
      tokenizer: this.requireTokenizer(),
      chatTemplate: this.chatTemplate,
      contextLength: this.model.contextLength,
      vocabSize: this.model.vocabSize,
      checkModel: (id) => this.checkModel(id),
    };
  }

  /** A generation request naming another model is a bad request (the endpoint exists), hence 400. */
  private checkModel(id: string): void {
    if (id !== this.model.id) {
      throw invalidRequest(
        `the model \`${id}\` does not exist: this server serves \`${this.model.id}\``,
        "model",
        "model_not_found",
      );
    }
  }

  // ---- generation endpoints -----------------------------------------------------------------------------

  async completions(request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const body = parseCompletionRequest(jsonBody(request.body));
    this.checkModel(body.model);
    const tokenizer = this.requireTokenizer();
    const prompts = body.prompts.map((prompt) => {
      const tokenIds = typeof prompt === "string" ? this.gateway.encodePrompt(prompt, "prompt") : prompt;
      this.checkPrompt(tokenIds, body, "prompt");
      return { tokenIds, text: typeof prompt === "string" ? prompt : tokenizer.decode(tokenIds) };
    });
    await this.respond(request, reply, body, prompts, COMPLETION_SHAPE, {
      echo: body.echo,
      bestOf: body.bestOf,
    });
  }

  async chatCompletions(request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const body = parseChatCompletionRequest(jsonBody(request.body));
    this.checkModel(body.model);
    this.requireTokenizer();
    if (!this.chatTemplate)
      throw invalidRequest("this server has no tokenizer, so no chat template", "messages");
    const prompt = this.chatTemplate.render(body.messages);
    // The template already wrote the special tokens (a BOS, say) where the model expects them.
    const promptTokenIds = this.gateway.encodePrompt(prompt, "messages", { addSpecialTokens: false });
    this.checkPrompt(promptTokenIds, body, "messages");
    await this.respond(request, reply, body, [{ tokenIds: promptTokenIds, text: prompt }], CHAT_SHAPE, {
      echo: false,
      bestOf: undefined,
    });
  }

  private requireTokenizer(): TextTokenizer {
    const tokenizer = this.gateway.tokenizer;
    if (!tokenizer) {
      throw invalidRequest(
        "this gateway runs without a tokenizer (--tokenizer), and the OpenAI API speaks text: " +
          "use the gRPC Generate API with token ids",
      );
    }
    return tokenizer;
  }

  private checkPrompt(
    promptTokenIds: number[],
    body: GenerationFields,
    promptParam: "prompt" | "messages",
  ): void {
    const context = this.model.contextLength;
    this.gateway.checkPrompt(promptTokenIds, promptParam);
    // OpenAI refuses what the gRPC API would cut short: a completion that cannot fit.
    if (body.maxTokens !== undefined && promptTokenIds.length + body.maxTokens > context) {
      throw invalidRequest(
        `this model's maximum context length is ${context} tokens; you requested ` +
          `${promptTokenIds.length + body.maxTokens} (${promptTokenIds.length} in the ${promptParam}, ` +
          `${body.maxTokens} in the completion): lower max_tokens to at most ` +
          `${context - promptTokenIds.length}`,
        "max_tokens",
        "context_length_exceeded",
      );
    }
  }

  private async respond(
    request: FastifyRequest,
    reply: FastifyReply,
    body: GenerationFields,
    prompts: ServedPrompt[],
    shape: ResponseShape,
    options: ChoiceOptions,
  ): Promise<void> {
    const requestId = this.requestId(request);
    const promptOnly = body.maxTokens === 0;
    const runsPerPrompt = options.bestOf ?? body.n;
    // best_of ranks the runs by their scores, which are then computed even when not returned.
    const topLogprobs = body.logprobs ?? (runsPerPrompt > body.n ? 0 : undefined);
    const plans = prompts.flatMap((prompt, promptIndex) =>
      Array.from({ length: runsPerPrompt }, (_, choice): RunPlan => {
        const input: GenerateInput = {
          requestId,
          promptTokenIds: prompt.tokenIds,
          // One token is the least a generation makes; a prompt-only request drops it.
          maxTokens: promptOnly ? 1 : body.maxTokens,
          temperature: body.temperature,
          topP: body.topP,
          topK: body.topK,
          seed: body.seed === undefined ? undefined : choiceSeed(body.seed, choice),
          mode: body.mode,
          stop: body.stop,
          topLogprobs,
          // The prompt's scores are the same for every choice: the first run alone computes them.
          promptLogprobs: options.echo && body.logprobs !== undefined && choice === 0,
        };
        return { prompt: promptIndex, choice, input };
      }),
    );
    const disconnect = abortOnDisconnect(reply);
    const runs = runChoices(this.gateway, plans, disconnect.signal);
    const context: ResponseContext = {
      body,
      prompts,
      plans,
      options,
      shape,
      tokenizer: this.requireTokenizer(),
      header: {
        id: `${shape.idPrefix}${requestId}`,
        created: Math.floor(Date.now() / 1000),
        model: this.model.id,
      },
      promptOnly,
      runsPerPrompt,
    };
    try {
      if (body.stream) await this.stream(reply, runs, context, requestId);
      else await this.complete(reply, runs, context);
    } catch (error) {
      // The client went away: there is no one to answer.
      if (error instanceof CancelledError) {
        if (!reply.sent) reply.hijack();
        return;
      }
      throw error;
    }
  }

  private async complete(
    reply: FastifyReply,
    runs: AsyncGenerator<RunChunk>,
    context: ResponseContext,
  ): Promise<void> {
    const { body, prompts, shape, options, runsPerPrompt } = context;
    const results = await collectRuns(runs, context.plans.length);
    const choices = prompts.flatMap((prompt, promptIndex) => {
      const ofPrompt = results.slice(promptIndex * runsPerPrompt, (promptIndex + 1) * runsPerPrompt);
      const promptScores = ofPrompt[0]!.promptLogprobs;
      const returned =
        runsPerPrompt === body.n
          ? ofPrompt
          : [...ofPrompt].sort((a, b) => cumulativeLogprob(b) - cumulativeLogprob(a)).slice(0, body.n);
      return returned.map((result, rank) => {
        const text = (options.echo ? prompt.text : "") + (context.promptOnly ? "" : result.text);
        const scored = [
          ...(options.echo ? scoredPromptOf(prompt, promptScores) : []),
          ...(context.promptOnly || !result.logprobs ? [] : scoredTokens(result.logprobs)),
        ];
        const logprobs =
          body.logprobs === undefined ? null : shape.logprobsFormat(context.tokenizer).format(scored);
        return shape.choice(
          promptIndex * body.n + rank,
          text,
          finishReasonOf(result.last, context),
          logprobs,
        );
      });
    });
    reply.send({
      ...context.header,
      object: shape.object,
      choices,
      usage: usageOf(
        results.map((result) => result.last),
        context,
      ),
    });
  }

  /**
   * Server-sent events. The response starts only once the first tokens are there, so that a request the
   * gateway refuses or cannot run still gets an ordinary error status.
   */
  private async stream(
    reply: FastifyReply,
    runs: AsyncGenerator<RunChunk>,
    context: ResponseContext,
    requestId: string,
  ): Promise<void> {
    const { body, shape, header, tokenizer } = context;
    const includeUsage = body.includeUsage;
    const iterator = runs[Symbol.asyncIterator]();
    let next = await iterator.next();
    reply.hijack();
    const raw = reply.raw;
    raw.writeHead(200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      connection: "keep-alive",
      // Reverse proxies (nginx) would otherwise buffer the events.
      "x-accel-buffering": "no",
      [REQUEST_ID_HEADER]: requestId,
    });
    const send = (choices: Record<string, unknown>[], usage?: Usage): void => {
      const event = {
        ...header,
        object: shape.chunkObject,
        choices,
        ...(includeUsage ? { usage: usage ?? null } : {}),
      };
      raw.write(`data: ${JSON.stringify(event)}\n\n`);
    };
    // Per run: its logprobs format (text offsets run on from piece to piece) once it has begun, and its last
    // chunk once it has finished. A prompt's scores come with its first run's first chunk, which arrives
    // before any other run of the prompt has begun.
    const formats: (LogprobsFormat | undefined)[] = context.plans.map(() => undefined);
    const lasts: (GenerateChunk | undefined)[] = context.plans.map(() => undefined);
    const promptScores: (TokenLogprobs | undefined)[] = context.prompts.map(() => undefined);
    const scoresOf = (tokens: ScoredToken[], format: LogprobsFormat) =>
      body.logprobs === undefined ? null : format.format(tokens);
    try {
      for (; !next.done; next = await iterator.next()) {
        const { run, chunk } = next.value;
        const { prompt: promptIndex, choice } = context.plans[run]!;
        const index = promptIndex * body.n + choice;
        promptScores[promptIndex] ??= chunk.promptLogprobs;
        let format = formats[run];
        if (!format) {
          format = formats[run] = shape.logprobsFormat(tokenizer);
          const opening = shape.openingChunkChoice(index);
          if (opening) send([opening]);
          if (context.options.echo) {
            const prompt = context.prompts[promptIndex]!;
            const scored = scoredPromptOf(prompt, promptScores[promptIndex]);
            send([shape.textChunkChoice(index, prompt.text, scoresOf(scored, format))]);
          }
        }
        if (!context.promptOnly) {
          const scores =
            chunk.logprobs && chunk.tokenIds.length > 0
              ? scoresOf(scoredTokens(chunk.logprobs), format)
              : null;
          if (chunk.text !== "" || scores !== null) send([shape.textChunkChoice(index, chunk.text, scores)]);
        }
        if (chunk.finishReason === undefined) continue;
        lasts[run] = chunk;
        send([shape.finishChunkChoice(index, finishReasonOf(chunk, context))]);
      }
      if (includeUsage) send([], usageOf(lasts, context));
    } catch (error) {
      if (error instanceof CancelledError) throw error;
      const openAIError = toOpenAIError(error, this.maxBodyBytes);
      this.logger.error("stream failed", { requestId, error: openAIError.message });
      raw.write(`data: ${JSON.stringify(openAIError.body())}\n\n`);
    } finally {
      if (!raw.destroyed) raw.end("data: [DONE]\n\n");
    }
  }
}

/** Aborts when the client closes the connection before the response is complete. */
function abortOnDisconnect(reply: FastifyReply): AbortController {
  const controller = new AbortController();
  reply.raw.on("close", () => {
    if (!reply.raw.writableFinished) controller.abort();
  });
  return controller;
}

/** A client still uploading a body we refused would see the connection reset (EPIPE) instead of the
 * answer if we replied and closed at once: read the rest (and drop it) up to a bound, then reply. */
const DRAIN_LIMIT_BYTES = 64 * 1024 * 1024;

function sendAfterDraining(request: FastifyRequest, reply: FastifyReply, body: unknown): FastifyReply {
  const upload = request.raw;
  if (upload.readableEnded || upload.destroyed) return reply.send(body);
  let drained = 0;
  const send = (): void => {
    upload.removeListener("data", onData);
    if (!reply.sent) reply.send(body);
  };
  const onData = (chunk: Buffer): void => {
    drained += chunk.length;
    if (drained > DRAIN_LIMIT_BYTES) {
      send();
      upload.destroy();
    }
  };
  upload.on("data", onData);
  upload.once("end", send);
  upload.once("error", send);
  upload.resume();
  return reply;
}

/** JSON bodies in `scope` up to `maxBodyBytes`, parsed by strictJsonParser. */
function useStrictJson(scope: FastifyInstance, maxBodyBytes: number): void {
  scope.removeContentTypeParser("application/json");
  scope.addContentTypeParser(
    "application/json",
    { parseAs: "buffer", bodyLimit: maxBodyBytes },
    strictJsonParser(scope.getDefaultJsonParser("error", "error")),
  );
}

type JsonParser = (
  request: FastifyRequest,
  body: string,
  done: (error: Error | null, value?: unknown) => void,
) => void;

/**
 * JSON as fastify parses it (refusing __proto__ and constructor keys), but only from valid UTF-8 and
 * without lone UTF-16 surrogates ("\ud800"): either would reach the tokenizer as text that no client
 * meant, where a Python server (vLLM) refuses the body.
 */
function strictJsonParser(parseJson: JsonParser) {
  const decoder = new TextDecoder("utf-8", { fatal: true });
  return (
    request: FastifyRequest,
    body: Buffer,
    done: (error: Error | null, value?: unknown) => void,
  ): void => {
    let text: string;
    try {
      text = decoder.decode(body);
    } catch {
      done(invalidRequest("the request body is not valid UTF-8", null, "invalid_json"));
      return;
    }
    parseJson(request, text, (error, value) => {
      if (error) done(error);
      else if (!wellFormed(value)) {
        done(
          invalidRequest(
            "the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff escape)",
            null,
            "invalid_json",
          ),
        );
      } else done(null, value);
    });
  };
}

/** A high surrogate not followed by a low one, or a low one not preceded by a high one. */
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/** Every string in a parsed JSON value (keys included) is well-formed Unicode. Iterative: a body may
 * nest deeper than the stack. */
function wellFormed(value: unknown): boolean {
  const pending: unknown[] = [value];
  while (pending.length > 0) {
    const item = pending.pop();
    if (typeof item === "string") {
      if (LONE_SURROGATE.test(item)) return false;
    } else if (Array.isArray(item)) {
      for (const entry of item) pending.push(entry);
    } else if (typeof item === "object" && item !== null) {
      for (const [key, entry] of Object.entries(item)) {
        if (LONE_SURROGATE.test(key)) return false;
        pending.push(entry);
      }
    }
  }
  return true;
}

/** Fastify parses a body sent as text/plain into a string: say which content type JSON needs. */
function jsonBody(body: unknown): unknown {
  if (typeof body === "string") {
    throw invalidRequest("the request body must be JSON sent with Content-Type: application/json");
  }
  return body;
}

/** A prompt-only choice ends where max_tokens 0 puts it: at its length. */
function finishReasonOf(chunk: GenerateChunk, context: ResponseContext): OpenAIFinishReason {
  if (chunk.finishReason === undefined) throw new Error("the generation ended without a finish reason");
  return context.promptOnly || chunk.finishReason === FinishReason.FINISH_REASON_LENGTH ? "length" : "stop";
}

/** With echo, the prompt's tokens and their scores (when the request asked for logprobs). */
function scoredPromptOf(prompt: ServedPrompt, scores: TokenLogprobs | undefined): ScoredToken[] {
  return scores ? scoredPrompt(prompt.tokenIds, scores) : [];
}

/** The usage of the whole request: each prompt counted once, every run's generated tokens and counters
 * (best_of's unreturned runs included, as they cost as much). */
function usageOf(lasts: readonly (GenerateChunk | undefined)[], context: ResponseContext): Usage {
  let completionTokens = 0;
  let draftTokens = 0;
  let acceptedTokens = 0;
  let targetSteps = 0;
  for (const last of lasts) {
    const usage = last?.usage;
    if (!usage) throw new Error("a generation ended without its usage");
    completionTokens += context.promptOnly ? 0 : usage.completionTokens;
    draftTokens += usage.draftTokens;
    acceptedTokens += usage.acceptedTokens;
    targetSteps += usage.targetSteps;
  }
  const promptTokens = context.prompts.reduce((sum, prompt) => sum + prompt.tokenIds.length, 0);
  return {
    prompt_tokens: promptTokens,
    completion_tokens: completionTokens,
    total_tokens: promptTokens + completionTokens,
    draft_tokens: draftTokens,
    accepted_tokens: acceptedTokens,
    target_steps: targetSteps,
    mean_accepted_length: targetSteps > 0 ? completionTokens / targetSteps : 0,
  };
}

interface FastifyLikeError {
  statusCode?: number;
  code?: string;
}

export function toOpenAIError(error: unknown, maxBodyBytes: number): OpenAIError {
  if (error instanceof OpenAIError) return error;
  if (error instanceof OverloadedError) {
    return new OpenAIError(429, error.message, "requests", null, "rate_limit_exceeded");
  }
  if (error instanceof ChatTemplateError) return invalidRequest(error.message, "messages");
  if (error instanceof InvalidRequestError) return invalidRequest(error.message, error.param, error.code);
  if (error instanceof UnavailableError) {
    return new OpenAIError(503, error.message, "server_error", null, "service_unavailable");
  }
  const { statusCode, code } = error as FastifyLikeError;
  switch (code) {
    case "FST_ERR_CTP_BODY_TOO_LARGE":
      return new OpenAIError(
        413,
        `the request body is larger than the limit of ${maxBodyBytes} bytes`,
        "invalid_request_error",
        null,
        "request_too_large",
      );
    case "FST_ERR_CTP_INVALID_JSON_BODY":
    case "FST_ERR_CTP_EMPTY_JSON_BODY":
      return invalidRequest(
        `the request body is not valid JSON: ${errorMessage(error)}`,
        null,
        "invalid_json",
      );
    case "FST_ERR_CTP_INVALID_MEDIA_TYPE":
      return new OpenAIError(
        415,
        "the request body must be JSON sent with Content-Type: application/json",
        "invalid_request_error",
      );
  }
  if (statusCode !== undefined && statusCode >= 400 && statusCode < 500) {
    return new OpenAIError(statusCode, errorMessage(error), "invalid_request_error");
  }
  return new OpenAIError(500, `internal error: ${errorMessage(error)}`, "server_error");
}
