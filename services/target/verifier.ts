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
//
// KV room: new sessions queue until the cache has room for them; when a step's new blocks do not fit,
// the most recently admitted session gives its KV back and queues to be recomputed from its committed
// tokens. Its output does not change: logits do not depend on the batch, and sampling depends only on the
// seed and the position.
//
// Log-probabilities (TargetOpen.top_logprobs) come from the rows that chose the emitted tokens: in a verify
// window row i holds the target's distribution at the position of the i-th emitted token, bit for bit the
// row plain decoding computes there, so the scores are the same in every mode.
import {
  FinishReason,
  type StepReport,
  type TokenDistribution,
  type TokenLogprobs,
} from "../../proto/gen/pearl/v1/common.js";
import type { TargetOpen, TargetPropose, Verdict } from "../../proto/gen/pearl/v1/target.js";
import type { TargetServiceConfig } from "../../lib/config.js";
import {
  type EngineLoopParts,
  fedTokens,
  type LoopSession,
  SessionLoop,
  type SessionSink,
  type StepOutcome,
} from "../../lib/engine_loop.js";
import type { DraftDistribution, Logprobs, SamplingParams, StepItem } from "../../lib/native.js";
import { samplingParamsOf, samplingProblem, topLogprobsProblem } from "../../lib/sampling_params.js";
import { decideEmission } from "./emission.js";
import { type TargetMetrics, targetMetrics } from "./metrics.js";

export interface TargetEventSink extends SessionSink {
  verdict(verdict: Verdict): void;
}

interface Proposal {
  token: number;
  epoch: number;
  /** A sampled draft's q; absent for a greedy draft. */
  distribution?: DraftDistribution;
}

interface TargetSession extends LoopSession<TargetEventSink> {
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
  /** waiting: queued for KV room (new, or preempted); running: holds KV and takes part in steps. */
  state: "waiting" | "running" | "closing";
  /** Order of admission: the most recently admitted running session is the first to be preempted. */
  admittedAt: number;
  /** Proposals this session had verified, and of those the ones accepted (as its verdicts said). */
  proposedTokens: number;
  acceptedTokens: number;
  preemptions: number;
  /** Set: verdicts score their tokens, with this many most likely tokens' beside. */
  readonly topLogprobs: number | undefined;
  /** The prompt's scores gathered chunk by chunk, while the first verdict, which carries them, is due. */
  promptScores: TokenLogprobs | undefined;
}

type Work =
  | { kind: "prefill"; session: TargetSession; item: StepItem; last: boolean }
  | { kind: "verify"; session: TargetSession; item: StepItem; proposals: Proposal[] };

export class Verifier extends SessionLoop<TargetEventSink, TargetSession, TargetOpen, Work> {
  /** Sessions queued for KV room, first come first served (preempted ones go back to the front). */
  private readonly waiting: TargetSession[] = [];
  private admissions = 0;
  private readonly targetMetrics: TargetMetrics;

  constructor(
    parts: EngineLoopParts,
    private readonly config: TargetServiceConfig,
  ) {
    super("target", parts);
    this.targetMetrics = targetMetrics(parts.registry, () => this.waiting.length);
  }

  // ---- messages from the gateway ----------------------------------------------------------------------

  /** A new session queues for KV room behind those already waiting. */
  override open(sink: TargetEventSink, request: TargetOpen): TargetSession | undefined {
    const session = super.open(sink, request);
    if (session) this.waiting.push(session);
    return session;
  }

  protected override checkOpen(request: TargetOpen): string | undefined {
    const promptProblem = this.checkPrompt(request.promptTokenIds);
    if (promptProblem) return promptProblem;
    if (!Number.isInteger(request.maxTokens) || request.maxTokens < 1) {
      return `max_tokens must be at least 1, got ${request.maxTokens}`;
    }
    // Any count up to the vocabulary is served here; the gateway's APIs allow 20.
    const topLogprobs = topLogprobsProblem(request.topLogprobs, this.engine.info.vocabSize);
    if (topLogprobs) return topLogprobs;
    return samplingProblem(samplingParamsOf(request.sampling))?.message;
  }

  protected override createSession(sink: TargetEventSink, request: TargetOpen): TargetSession {
    const prompt = request.promptTokenIds;
    const contextLength = this.engine.info.maxPositionEmbeddings;
    return {
      sink,
      sessionId: request.sessionId,
      requestId: request.requestId,
      seqId: this.ids.allocate(),
      openedAt: performance.now(),
      tokens: [...prompt],
      promptLength: prompt.length,
      maxLength: Math.min(prompt.length + request.maxTokens, contextLength),
      sampling: samplingParamsOf(request.sampling),
      kvLength: 0,
      pending: [],
      minEpoch: 0,
      autoregressive: request.autoregressive,
      verifyWindow: this.windowOf(request.verifyWindow),
      state: "waiting",
      inEngine: false,
      admittedAt: 0,
      proposedTokens: 0,
      acceptedTokens: 0,
      preemptions: 0,
      topLogprobs: request.topLogprobs,
      promptScores: request.promptLogprobs ? emptyScores(request.topLogprobs ?? 0) : undefined,
    };
  }

  propose(sink: TargetEventSink, request: TargetPropose): void {
    const session = this.lookup(sink, request.sessionId);
    if (!session) return;
    const { epoch, position, tokenIds, distributions } = request;
    if (epoch < session.minEpoch) {
      this.targetMetrics.proposalsDropped.inc({ reason: "stale_epoch" }, tokenIds.length);
      return;
    }
    if (distributions.length !== 0 && distributions.length !== tokenIds.length) {
      this.fail(
        session,
        `${tokenIds.length} proposed tokens came with ${distributions.length} distributions`,
      );
      return;
    }
    const vocabularyProblem = this.checkVocabulary(tokenIds, "proposed token");
    if (vocabularyProblem) {
      this.fail(session, vocabularyProblem);
      return;
    }
    const committed = session.tokens.length;
    const chainLength = committed + session.pending.length;
    if (position < session.promptLength || position > chainLength) {
      // A gap: tokens that followed were dropped (stale), so these cannot be placed.
      this.targetMetrics.proposalsDropped.inc({ reason: "not_contiguous" }, tokenIds.length);
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
        this.targetMetrics.proposalsDropped.inc({ reason: "contradicts_committed" }, tokenIds.length);
        return;
      }
      if (epoch <= session.pending[at - committed]!.epoch) {
        this.targetMetrics.proposalsDropped.inc({ reason: "contradicts_pending" }, tokenIds.length);
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
    this.loop.wake();
  }

  update(sink: TargetEventSink, sessionId: number, autoregressive: boolean, verifyWindow: number): void {
    const session = this.lookup(sink, sessionId);
    if (!session) return;
    session.autoregressive = autoregressive;
    session.verifyWindow = this.windowOf(verifyWindow);
    this.loop.wake();
  }

  // ---- the loop ---------------------------------------------------------------------------------------

  protected override async settleSessions(): Promise<void> {
    for (const session of this.sessions.all()) {
      if (session.state === "closing") {
        const queued = this.waiting.indexOf(session);
        if (queued >= 0) this.waiting.splice(queued, 1);
        await this.remove(session);
      } else if (session.state === "running" && session.kvLength > this.prefillEnd(session)) {
        // A step that emitted no token of the target's own left the last committed token in the KV;
        // it is fed again in front of the next proposals.
        session.kvLength = this.prefillEnd(session);
        await this.engine.truncate(session.seqId, session.kvLength);
      }
    }
    await this.admitWaiting();
  }

  /** Admits queued sessions while the KV cache has room for what they hold plus a verify window. */
  private async admitWaiting(): Promise<void> {
    if (this.waiting.length === 0) return;
    const stats = await this.engine.cacheStats();
    let free = stats.blocksFree;
    while (this.waiting.length > 0) {
      const session = this.waiting[0]!;
      if (session.state !== "waiting") {
        this.waiting.shift();
        continue;
      }
      const need = this.blocksFor(session.tokens.length + session.verifyWindow + 1);
      if (need > stats.blocksTotal) {
        this.waiting.shift();
        this.fail(session, `the session needs ${need} KV blocks; the cache holds ${stats.blocksTotal}`);
        continue;
      }
      if (need > free && this.runningSessions().length > 0) return;
      this.waiting.shift();
      await this.engine.addSequence(session.seqId);
      session.inEngine = true;
      // A close that came during the await stands (the cast undoes TypeScript's narrowing, which
      // cannot know): the next bookkeeping frees the sequence.
      if ((session.state as TargetSession["state"]) === "closing") continue;
      session.state = "running";
      session.admittedAt = ++this.admissions;
      free -= need;
    }
  }

  /** Before a step: while its new KV blocks do not fit, the most recently admitted session gives its
   * KV back and queues to be recomputed (its output does not change: sampling depends on the seed and
   * the position only). */
  private async makeRoom(work: Work[]): Promise<Work[]> {
    for (;;) {
      const need = work.reduce((sum, w) => sum + this.newBlocks(w), 0);
      // Most decode and verify steps stay inside their sessions' last blocks: no need to ask the engine.
      if (need === 0) return work;
      const stats = await this.engine.cacheStats();
      const running = this.runningSessions();
      if (need <= stats.blocksFree || running.length <= 1) return work;
      const victim = running.reduce((a, b) => (a.admittedAt > b.admittedAt ? a : b));
      this.targetMetrics.preemptions.inc();
      victim.preemptions += 1;
      this.logger.debug("session preempted", {
        requestId: victim.requestId,
        sessionId: victim.sessionId,
        blocksNeeded: need,
        free: stats.blocksFree,
      });
      victim.state = "waiting";
      victim.inEngine = false;
      victim.kvLength = 0;
      // Prompt scores not yet sent are gathered again as the prompt is recomputed.
      if (victim.promptScores) victim.promptScores = emptyScores(victim.promptScores.topK);
      this.waiting.unshift(victim);
      await this.engine.release(victim.seqId);
      work = work.filter((w) => w.session !== victim);
    }
  }

  private newBlocks(w: Work): number {
    const before = w.session.kvLength;
    return this.blocksFor(before + w.item.tokens.length) - this.blocksFor(before);
  }

  private blocksFor(tokens: number): number {
    return Math.ceil(tokens / this.config.blockSize);
  }

  /** The KV a running session must hold before it can verify: its prompt when new (the prefill's last
   * chunk yields the first token), every committed token but the last once it has emitted some. */
  private prefillEnd(session: TargetSession): number {
    return session.tokens.length > session.promptLength ? session.tokens.length - 1 : session.promptLength;
  }

  private runningSessions(): TargetSession[] {
    return this.sessions.all().filter((session) => session.state === "running");
  }

  protected override collectWork(): Work[] {
    const work: Work[] = [];
    let prefillBudget = this.config.prefillChunk;
    for (const session of this.sessions.all()) {
      if (work.length >= this.config.maxBatch) return work;
      if (session.state !== "running") continue;
      const prefillEnd = this.prefillEnd(session);
      if (session.kvLength < prefillEnd) {
        if (prefillBudget === 0) continue;
        const count = Math.min(prefillBudget, prefillEnd - session.kvLength);
        prefillBudget -= count;
        // Only a new session's prompt ends in a sample (its first token); a recomputed one has it already.
        const last =
          session.kvLength + count === prefillEnd && session.tokens.length === session.promptLength;
        const end = session.kvLength + count;
        work.push({
          kind: "prefill",
          session,
          last,
          item: {
            seqId: session.seqId,
            tokens: Int32Array.from(session.tokens.slice(session.kvLength, end)),
            output: last ? "sample" : "none",
            sampling: session.sampling,
            logprobs: last ? session.topLogprobs : undefined,
            // Each row scores the token after it; the row ending a chunk scores the next chunk's first.
            ...(session.promptScores
              ? { promptLogprobs: session.promptScores.topK, nextPromptToken: session.tokens[end] }
              : {}),
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
          tokens: Int32Array.from([
            session.tokens[session.tokens.length - 1]!,
            ...proposals.map((p) => p.token),
          ]),
          numDraft: proposals.length,
          draftDists: withDistributions ? proposals.map((p) => p.distribution!) : undefined,
          output: "sample",
          sampling: session.sampling,
          logprobs: session.topLogprobs,
        },
      });
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

  /** Steps the work that fits the KV cache (makeRoom); autoregressive sessions decode pipelined. */
  protected override async runStep(work: Work[]): Promise<void> {
    const fitting = await this.makeRoom(work);
    if (fitting.length === 0) return;
    await this.stepPipelined(fitting);
  }

  /**
   * The decode step after `work`, queued before `work`'s results are known, when `work` is all decodes of
   * autoregressive sessions that go on: each feeds the token its session's step emits. Any other kind of
   * work (a prefill's last chunk, a verification, a session about to finish) ends the pipeline, so that the
   * next turn collects every session with work again. A session that finishes on the fed token (an end of
   * sequence) is closing by the time the queued step's results come back, which are then dropped.
   */
  protected override continuation(work: Work[]): Work[] {
    const next: Work[] = [];
    for (const w of work) {
      const session = w.session;
      const decodes = w.kind === "verify" && w.proposals.length === 0 && session.autoregressive;
      // After its step the session holds one more token; the next step must have one left to emit.
      if (!decodes || session.state !== "running" || session.maxLength - session.tokens.length < 2) return [];
      next.push({
        kind: "verify",
        session,
        proposals: [],
        item: {
          seqId: session.seqId,
          tokens: new Int32Array(0),
          feedNextToken: true,
          numDraft: 0,
          output: "sample",
          sampling: session.sampling,
          logprobs: session.topLogprobs,
        },
      });
    }
    return next;
  }

  /** Takes in a step's results: each session's KV, and what it emits. */
  protected override apply(work: Work[], { results, report: step }: StepOutcome): void {
    for (const [w, result] of this.succeeded(work, results)) {
      const session = w.session;
      session.kvLength = result.length;
      if (w.kind === "prefill") {
        this.metrics.stepTokens.inc({ kind: "prefill" }, w.item.tokens.length);
        if (session.promptScores && result.promptLogprobs) {
          appendScores(session.promptScores, result.promptLogprobs);
        }
        if (w.last) this.emit(session, [result.nextToken], 0, 0, step, result.logprobs);
        continue;
      }
      const proposed = w.proposals.length;
      this.metrics.stepTokens.inc({ kind: proposed > 0 ? "verify" : "decode" }, fedTokens(w.item));
      if (proposed > 0) {
        this.targetMetrics.verifySteps.inc();
        this.targetMetrics.proposed.inc(proposed);
        this.targetMetrics.accepted.inc(result.accepted);
      }
      const candidates = w.proposals.slice(0, result.accepted).map((p) => p.token);
      // With a sampled draft, a bonus token would be a plain sample where a verification would have
      // decided had the window been one longer, and window lengths depend on timing: emitting it would
      // make seeded requests irreproducible. The next step verifies the draft's token there instead.
      const sampledDraft = w.item.draftDists !== undefined;
      if (!(sampledDraft && result.accepted === proposed)) candidates.push(result.nextToken);
      this.emit(session, candidates, proposed, result.accepted, step, result.logprobs);
    }
  }

  /** Commits what the step may emit, answers the gateway, and ends a finished session. */
  private emit(
    session: TargetSession,
    candidates: number[],
    proposed: number,
    accepted: number,
    step: StepReport,
    scores: Logprobs | undefined,
  ): void {
    const position = session.tokens.length;
    const emission = decideEmission(candidates, accepted, this.eos, session.maxLength - position);
    session.tokens.push(...emission.tokens);
    session.proposedTokens += proposed;
    session.acceptedTokens += emission.accepted;
    this.consumePending(session, emission.tokens);
    const promptScores = session.promptScores;
    session.promptScores = undefined;
    session.sink.verdict({
      sessionId: session.sessionId,
      position,
      tokenIds: emission.tokens,
      proposed,
      accepted: emission.accepted,
      finishReason: emission.finishReason,
      step,
      logprobs: scores && scoresOf(scores, emission.tokens.length),
      promptLogprobs: promptScores,
    });
    if (emission.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) this.end(session, "finished");
  }

  /** Pending proposals for the positions just emitted are used up when they equal what was emitted; the
   * first that differs, and everything drafted after it, is stale. */
  private consumePending(session: TargetSession, emitted: number[]): void {
    for (let i = 0; i < emitted.length && i < session.pending.length; i++) {
      const proposal = session.pending[i]!;
      if (proposal.token !== emitted[i]) {
        session.minEpoch = Math.max(session.minEpoch, proposal.epoch + 1);
        this.targetMetrics.proposalsDropped.inc({ reason: "rejected" }, session.pending.length - i);
        session.pending = [];
        return;
      }
    }
    session.pending = session.pending.slice(emitted.length);
  }

  protected override summary(session: TargetSession): Record<string, unknown> {
    return {
      promptTokens: session.promptLength,
      outputTokens: session.tokens.length - session.promptLength,
      proposedTokens: session.proposedTokens,
      acceptedTokens: session.acceptedTokens,
      preemptions: session.preemptions,
    };
  }

  // ---- helpers ----------------------------------------------------------------------------------------

  private windowOf(requested: number): number {
    return requested > 0 ? Math.min(requested, this.config.maxVerifyWindow) : this.config.maxVerifyWindow;
  }
}

function emptyScores(topK: number): TokenLogprobs {
  return { tokenIds: [], logprobs: [], topK, topTokenIds: [], topLogprobs: [] };
}

/** The first `count` tokens' scores. */
function scoresOf(scores: Logprobs, count: number): TokenLogprobs {
  const top = count * scores.topK;
  return {
    tokenIds: Array.from(scores.tokens.subarray(0, count)),
    logprobs: Array.from(scores.logprobs.subarray(0, count)),
    topK: scores.topK,
    topTokenIds: Array.from(scores.topTokens.subarray(0, top)),
    topLogprobs: Array.from(scores.topLogprobs.subarray(0, top)),
  };
}

/** A prompt's scores can outgrow what a spread call takes as arguments: appended one by one. */
function appendScores(into: TokenLogprobs, scores: Logprobs): void {
  for (const token of scores.tokens) into.tokenIds.push(token);
  for (const logprob of scores.logprobs) into.logprobs.push(logprob);
  for (const token of scores.topTokens) into.topTokenIds.push(token);
  for (const logprob of scores.topLogprobs) into.topLogprobs.push(logprob);
}

function nativeDistribution(distribution: TokenDistribution): DraftDistribution {
  return { tokens: Int32Array.from(distribution.tokenIds), probs: Float32Array.from(distribution.probs) };
}
