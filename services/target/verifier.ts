// The target service's engine loop. Each step takes every session that has something to do and runs ONE
// batched forward over all of them:
//   - a session still prefilling gets its next chunk of the prompt (a per-step budget keeps long prompts
//     from stalling everyone else's verification); its last chunk yields the first token;
//   - a session with proposed tokens gets them verified, up to its verify window, whatever number has
//     arrived (pre-verify: the first draft token does not wait for the rest; post-verify: tokens that
//     arrive during a step are verified by the next one);
//   - a session in autoregressive mode (or with a single token left to emit) decodes on its own.
// Every step answers each of its sessions with a verdict. The target alone decides what is emitted and
// when a session ends (emission.ts).
//
// A session's committed tokens are its prompt and everything emitted; the KV holds all of them but the
// last, which is fed in front of the next proposals ([b, d1..dk], as the engine's verify step expects).
import { FinishReason, type TokenDistribution } from "../../proto/gen/pearl/v1/common.js";
import type { TargetOpen, TargetPropose, Verdict } from "../../proto/gen/pearl/v1/target.js";
import type { TargetServiceConfig } from "../../lib/config.js";
import { errorMessage, type Logger } from "../../lib/logging.js";
import { Counter, type Registry } from "../../lib/metrics.js";
import type { EngineMetrics, SequenceIds } from "../../lib/model_service.js";
import type { DraftDistribution, Engine, SamplingParams, StepItem, StepResult } from "../../lib/native.js";
import type { StepTimes } from "../../lib/step_times.js";
import { decideEmission } from "./emission.js";

export interface TargetEventSink {
  verdict(verdict: Verdict): void;
  failed(sessionId: number, message: string): void;
}

interface Proposal {
  token: number;
  epoch: number;
  /** A sampled draft's q; absent for a greedy draft. */
  distribution?: DraftDistribution;
}

interface TargetSession {
  readonly sink: TargetEventSink;
  readonly sessionId: number;
  readonly seqId: number;
  /** The prompt, then every emitted token. */
  readonly tokens: number[];
  readonly promptLength: number;
  /** Session length cap: prompt + max_tokens, or the context length if smaller. */
  readonly maxLength: number;
  readonly sampling: SamplingParams;
  /** Tokens in the KV: the prefill's progress, then tokens.length - 1. */
  kvLength: number;
  /** Proposals for the positions after the last committed token, in order. */
  pending: Proposal[];
  /** Proposals of an epoch below this are stale: they continue a draft that went astray. */
  minEpoch: number;
  autoregressive: boolean;
  verifyWindow: number;
  state: "opening" | "active" | "closing";
  inEngine: boolean;
}

type Work =
  | { kind: "prefill"; session: TargetSession; item: StepItem; last: boolean }
  | { kind: "verify"; session: TargetSession; item: StepItem; proposals: Proposal[] };

export class Verifier {
  private readonly sessions = new Map<TargetEventSink, Map<number, TargetSession>>();
  private readonly eos: Set<number>;
  private wakeRequested = false;
  private wakeUp: (() => void) | undefined;
  private stopping = false;
  private loopDone: Promise<void> | undefined;
  private readonly proposalsDropped: Counter;
  private readonly proposed: Counter;
  private readonly accepted: Counter;
  private readonly verifySteps: Counter;

  constructor(
    private readonly engine: Engine,
    private readonly config: TargetServiceConfig,
    private readonly ids: SequenceIds,
    private readonly stepTimes: StepTimes,
    private readonly metrics: EngineMetrics,
    registry: Registry,
    private readonly logger: Logger,
  ) {
    this.eos = new Set(engine.info.eosTokenIds);
    this.proposalsDropped = new Counter({
      name: "pearl_target_proposals_dropped_tokens_total",
      help: "Proposed tokens dropped before verification, by reason",
      labelNames: ["reason"],
      registers: [registry],
    });
    this.proposed = new Counter({
      name: "pearl_target_proposed_tokens_total",
      help: "Proposed tokens verified",
      registers: [registry],
    });
    this.accepted = new Counter({
      name: "pearl_target_accepted_tokens_total",
      help: "Proposed tokens accepted",
      registers: [registry],
    });
    this.verifySteps = new Counter({
      name: "pearl_target_verify_steps_total",
      help: "Per-session verifications of at least one proposed token",
      registers: [registry],
    });
  }

  start(): void {
    this.loopDone = this.loop().catch((error: unknown) => {
      this.logger.error("target loop stopped", { error: errorMessage(error) });
    });
  }

  async stop(): Promise<void> {
    this.stopping = true;
    this.wake();
    await this.loopDone;
  }

  get activeSessions(): number {
    let count = 0;
    for (const streamSessions of this.sessions.values()) count += streamSessions.size;
    return count;
  }

  // ---- messages from the gateway ----------------------------------------------------------------------

  open(sink: TargetEventSink, request: TargetOpen): void {
    const streamSessions = this.streamSessions(sink);
    if (streamSessions.has(request.sessionId)) {
      sink.failed(request.sessionId, `session ${request.sessionId} is already open on this stream`);
      return;
    }
    const problem = this.checkOpen(request);
    if (problem) {
      sink.failed(request.sessionId, problem);
      return;
    }
    const prompt = request.promptTokenIds;
    const contextLength = this.engine.info.maxPositionEmbeddings;
    streamSessions.set(request.sessionId, {
      sink,
      sessionId: request.sessionId,
      seqId: this.ids.allocate(),
      tokens: [...prompt],
      promptLength: prompt.length,
      maxLength: Math.min(prompt.length + request.maxTokens, contextLength),
      sampling: {
        temperature: request.sampling?.temperature ?? 0,
        topK: request.sampling?.topK ?? 0,
        topP: request.sampling?.topP || 1,
        seed: request.sampling?.seed ?? 0,
      },
      kvLength: 0,
      pending: [],
      minEpoch: 0,
      autoregressive: request.autoregressive,
      verifyWindow: this.windowOf(request.verifyWindow),
      state: "opening",
      inEngine: false,
    });
    this.wake();
  }

  propose(sink: TargetEventSink, request: TargetPropose): void {
    const session = this.lookup(sink, request.sessionId);
    if (!session) return;
    const { epoch, position, tokenIds, distributions } = request;
    if (epoch < session.minEpoch) {
      this.proposalsDropped.inc({ reason: "stale_epoch" }, tokenIds.length);
      return;
    }
    if (distributions.length !== 0 && distributions.length !== tokenIds.length) {
      this.fail(session, `${tokenIds.length} proposed tokens came with ${distributions.length} distributions`);
      return;
    }
    const badToken = tokenIds.find((token) => !this.inVocabulary(token));
    if (badToken !== undefined) {
      this.fail(session, `proposed token ${badToken} is outside the vocabulary of ${this.engine.info.vocabSize}`);
      return;
    }
    const committed = session.tokens.length;
    const chainLength = committed + session.pending.length;
    if (position < session.promptLength || position > chainLength) {
      // A gap: tokens that followed were dropped (stale), so these cannot be placed.
      this.proposalsDropped.inc({ reason: "not_contiguous" }, tokenIds.length);
      return;
    }
    // Tokens that overlap what the session holds must agree with it.
    let first = 0;
    for (; first < tokenIds.length && position + first < chainLength; first++) {
      const at = position + first;
      const held = at < committed ? session.tokens[at] : session.pending[at - committed]!.token;
      if (tokenIds[first] === held) continue;
      if (at < committed) {
        // The draft guessed a committed position wrong: everything this epoch drafted after it is stale.
        session.minEpoch = Math.max(session.minEpoch, epoch + 1);
        this.proposalsDropped.inc({ reason: "contradicts_committed" }, tokenIds.length);
        return;
      }
      if (epoch <= session.pending[at - committed]!.epoch) {
        this.proposalsDropped.inc({ reason: "contradicts_pending" }, tokenIds.length);
        return;
      }
      // A newer epoch rewrites pending proposals from here on.
      session.pending.length = at - committed;
      break;
    }
    for (let i = first; i < tokenIds.length; i++) {
      const distribution = distributions[i];
      session.pending.push({
        token: tokenIds[i]!,
        epoch,
        distribution: distribution ? nativeDistribution(distribution) : undefined,
      });
    }
    this.wake();
  }

  update(sink: TargetEventSink, sessionId: number, autoregressive: boolean, verifyWindow: number): void {
    const session = this.lookup(sink, sessionId);
    if (!session) return;
    session.autoregressive = autoregressive;
    session.verifyWindow = this.windowOf(verifyWindow);
    this.wake();
  }

  close(sink: TargetEventSink, sessionId: number): void {
    const session = this.lookup(sink, sessionId);
    if (!session) return;
    session.state = "closing";
    this.wake();
  }

  closeStream(sink: TargetEventSink): void {
    const streamSessions = this.sessions.get(sink);
    if (!streamSessions) return;
    for (const session of streamSessions.values()) session.state = "closing";
    this.wake();
  }

  // ---- the loop ---------------------------------------------------------------------------------------

  private async loop(): Promise<void> {
    while (!this.stopping) {
      this.wakeRequested = false;
      await this.settleSessions();
      const work = this.collectWork();
      if (work.length === 0) {
        await this.idle();
        continue;
      }
      await this.runStep(work);
    }
    for (const streamSessions of this.sessions.values()) {
      for (const session of streamSessions.values()) session.state = "closing";
    }
    await this.settleSessions();
  }

  private async settleSessions(): Promise<void> {
    for (const [sink, streamSessions] of this.sessions) {
      for (const session of [...streamSessions.values()]) {
        if (session.state === "closing") {
          streamSessions.delete(session.sessionId);
          if (session.inEngine) await this.engine.release(session.seqId);
        } else if (!session.inEngine) {
          await this.engine.addSequence(session.seqId);
          session.inEngine = true;
          session.state = "active";
        }
      }
      if (streamSessions.size === 0) this.sessions.delete(sink);
    }
  }

  private collectWork(): Work[] {
    const work: Work[] = [];
    let prefillBudget = this.config.prefillChunk;
    for (const streamSessions of this.sessions.values()) {
      for (const session of streamSessions.values()) {
        if (work.length >= this.config.maxBatch) return work;
        if (session.state !== "active") continue;
        if (session.kvLength < session.promptLength) {
          if (prefillBudget === 0) continue;
          const count = Math.min(prefillBudget, session.promptLength - session.kvLength);
          prefillBudget -= count;
          const last = session.kvLength + count === session.promptLength;
          work.push({
            kind: "prefill",
            session,
            last,
            item: {
              seqId: session.seqId,
              tokens: Int32Array.from(session.tokens.slice(session.kvLength, session.kvLength + count)),
              output: last ? "sample" : "none",
              sampling: session.sampling,
            },
          });
          continue;
        }
        const proposals = this.window(session);
        const remaining = session.maxLength - session.tokens.length;
        if (proposals.length === 0 && !session.autoregressive && remaining > 1) continue;
        const withDistributions = proposals.length > 0 && proposals[0]!.distribution !== undefined;
        work.push({
          kind: "verify",
          session,
          proposals,
          item: {
            seqId: session.seqId,
            tokens: Int32Array.from([session.tokens[session.tokens.length - 1]!, ...proposals.map((p) => p.token)]),
            numDraft: proposals.length,
            draftDists: withDistributions ? proposals.map((p) => p.distribution!) : undefined,
            output: "sample",
            sampling: session.sampling,
          },
        });
      }
    }
    return work;
  }

  /** The proposals the next step verifies: as many as have arrived, up to the window and what may still
   * be emitted (k proposals emit up to k + 1 tokens). Greedy and sampled proposals are never mixed. */
  private window(session: TargetSession): Proposal[] {
    const remaining = session.maxLength - session.tokens.length;
    const size = Math.min(session.pending.length, session.verifyWindow, remaining - 1);
    const proposals = session.pending.slice(0, Math.max(0, size));
    const sampled = proposals[0]?.distribution !== undefined;
    const sameKind = proposals.findIndex((p) => (p.distribution !== undefined) !== sampled);
    return sameKind < 0 ? proposals : proposals.slice(0, sameKind);
  }

  private async runStep(work: Work[]): Promise<void> {
    const started = performance.now();
    let results: (StepResult | Error)[];
    let batched = true;
    try {
      results = await this.engine.step(work.map((w) => w.item));
    } catch (error) {
      // The engine rejects a whole batch without changing anything; stepping each item alone tells the
      // sessions at fault from the rest, which go on.
      batched = false;
      this.logger.warn("batched target step failed; retrying items one by one", { error: errorMessage(error) });
      results = [];
      for (const w of work) {
        results.push(await this.engine.step([w.item]).then((r) => r[0]!, (e: unknown) => new Error(errorMessage(e))));
      }
    }
    const ms = performance.now() - started;
    if (batched) {
      this.stepTimes.record(work.length, ms);
      this.metrics.observeStep(work.length, ms / 1000);
    }

    for (let i = 0; i < work.length; i++) {
      const w = work[i]!;
      const result = results[i]!;
      const session = w.session;
      if (session.state === "closing") continue;
      if (result instanceof Error) {
        this.fail(session, result.message);
        continue;
      }
      session.kvLength = result.length;
      if (w.kind === "prefill") {
        this.metrics.stepTokens.inc({ kind: "prefill" }, w.item.tokens.length);
        if (w.last) this.emit(session, [result.nextToken], 0, 0, ms, work.length);
        continue;
      }
      const proposed = w.proposals.length;
      this.metrics.stepTokens.inc({ kind: proposed > 0 ? "verify" : "decode" }, w.item.tokens.length);
      if (proposed > 0) {
        this.verifySteps.inc();
        this.proposed.inc(proposed);
        this.accepted.inc(result.accepted);
      }
      const candidates = [...w.proposals.slice(0, result.accepted).map((p) => p.token), result.nextToken];
      this.emit(session, candidates, proposed, result.accepted, ms, work.length);
    }
  }

  /** Commits what the step may emit, answers the gateway, and ends a finished session. */
  private emit(
    session: TargetSession,
    candidates: number[],
    proposed: number,
    accepted: number,
    stepMs: number,
    batchSize: number,
  ): void {
    const position = session.tokens.length;
    const emission = decideEmission(candidates, accepted, this.eos, session.maxLength - position);
    session.tokens.push(...emission.tokens);
    this.consumePending(session, emission.tokens);
    session.sink.verdict({
      sessionId: session.sessionId,
      position,
      tokenIds: emission.tokens,
      proposed,
      accepted: emission.accepted,
      finishReason: emission.finishReason,
      stepMs,
      batchSize,
    });
    if (emission.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) {
      session.state = "closing";
      this.wake();
    }
  }

  /** Pending proposals for the positions just emitted are used up when they equal what was emitted; the
   * first that differs, and everything drafted after it, is stale. */
  private consumePending(session: TargetSession, emitted: number[]): void {
    for (let i = 0; i < emitted.length && i < session.pending.length; i++) {
      const proposal = session.pending[i]!;
      if (proposal.token !== emitted[i]) {
        session.minEpoch = Math.max(session.minEpoch, proposal.epoch + 1);
        this.proposalsDropped.inc({ reason: "rejected" }, session.pending.length - i);
        session.pending = [];
        return;
      }
    }
    session.pending = session.pending.slice(emitted.length);
  }

  // ---- helpers ----------------------------------------------------------------------------------------

  private checkOpen(request: TargetOpen): string | undefined {
    const prompt = request.promptTokenIds;
    const contextLength = this.engine.info.maxPositionEmbeddings;
    if (prompt.length === 0) return "empty prompt";
    const badToken = prompt.find((token) => !this.inVocabulary(token));
    if (badToken !== undefined) {
      return `prompt token ${badToken} is outside the vocabulary of ${this.engine.info.vocabSize}`;
    }
    if (prompt.length >= contextLength) {
      return `prompt of ${prompt.length} tokens leaves no room in the target's context of ${contextLength}`;
    }
    if (!Number.isInteger(request.maxTokens) || request.maxTokens < 1) {
      return `max_tokens must be at least 1, got ${request.maxTokens}`;
    }
    const sampling = request.sampling;
    if (sampling) {
      if (!(sampling.temperature >= 0) || !Number.isFinite(sampling.temperature)) {
        return `temperature must be >= 0, got ${sampling.temperature}`;
      }
      if (!(sampling.topP >= 0 && sampling.topP <= 1)) return `top_p must be in (0, 1], got ${sampling.topP}`;
      if (sampling.topK < 0) return `top_k must be >= 0, got ${sampling.topK}`;
    }
    return undefined;
  }

  private windowOf(requested: number): number {
    return requested > 0 ? Math.min(requested, this.config.maxVerifyWindow) : this.config.maxVerifyWindow;
  }

  private inVocabulary(token: number): boolean {
    return Number.isInteger(token) && token >= 0 && token < this.engine.info.vocabSize;
  }

  private streamSessions(sink: TargetEventSink): Map<number, TargetSession> {
    let streamSessions = this.sessions.get(sink);
    if (!streamSessions) {
      streamSessions = new Map();
      this.sessions.set(sink, streamSessions);
    }
    return streamSessions;
  }

  private lookup(sink: TargetEventSink, sessionId: number): TargetSession | undefined {
    const session = this.sessions.get(sink)?.get(sessionId);
    return session && session.state !== "closing" ? session : undefined;
  }

  private fail(session: TargetSession, message: string): void {
    this.logger.warn("target session failed", { sessionId: session.sessionId, error: message });
    session.state = "closing";
    session.sink.failed(session.sessionId, message);
    this.wake();
  }

  private wake(): void {
    this.wakeRequested = true;
    const wakeUp = this.wakeUp;
    this.wakeUp = undefined;
    wakeUp?.();
  }

  private async idle(): Promise<void> {
    if (this.wakeRequested || this.stopping) return;
    await new Promise<void>((resolve) => {
      this.wakeUp = resolve;
    });
  }
}

function nativeDistribution(distribution: TokenDistribution): DraftDistribution {
  return { tokens: Int32Array.from(distribution.tokenIds), probs: Float32Array.from(distribution.probs) };
}
