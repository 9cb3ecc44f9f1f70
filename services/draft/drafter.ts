// The draft service's engine loop. Every open session drafts ahead of its last verified position; ONE
// engine step advances all of them together (continuous batching: sessions join and leave between steps).
//
// Each session holds the token sequence as the draft sees it: committed tokens (prompt and verified
// output) followed by its own drafted tokens. The engine's KV holds a prefix of that sequence; a step
// feeds the tokens after that prefix and samples the next draft token. Corrections from the gateway
// rewrite the tail of the sequence; the KV is truncated to the part that still matches before the
// session's next step.
//
// Only the loop touches the engine. Messages from the gateway change session state and wake the loop;
// they may arrive while a step is running, which is why every step result is checked against what
// happened to its session in the meantime.
//
// A session the KV cache cannot hold fails; the gateway then finishes its request without the draft.
import type { DraftOpen, DraftTokens } from "../../proto/gen/pearl/v1/draft.js";
import type { StepReport, TokenDistribution } from "../../proto/gen/pearl/v1/common.js";
import type { DraftServiceConfig } from "../../lib/config.js";
import {
  type EngineLoopParts,
  fedTokens,
  type LoopSession,
  SessionLoop,
  type SessionSink,
  type StepOutcome,
} from "../../lib/engine_loop.js";
import type { SamplingParams, StepItem } from "../../lib/native.js";
import { samplingParamsOf, samplingProblem } from "../../lib/sampling_params.js";

/** Where a session's events go: the gateway stream that opened it. */
export interface DraftEventSink extends SessionSink {
  tokens(event: DraftTokens): void;
}

interface DraftSession extends LoopSession<DraftEventSink> {
  readonly promptLength: number;
  /** Committed tokens, then drafted ones. */
  tokens: number[];
  /** The sparse q each drafted token was sampled from (sampled drafts only), aligned with tokens. */
  distributions: (TokenDistribution | undefined)[];
  /** Tokens in the engine's KV, as of the last finished step. */
  kvLength: number;
  /** First position whose KV entry no longer matches `tokens` (Infinity: all match). */
  dirtyFrom: number;
  /** Counts rollbacks: a step result is used only if its session was not rolled back meanwhile. */
  rollbacks: number;
  /** Tokens drafted over the session's life, those later rolled back included. */
  drafted: number;
  /** tokens[0, verifiedLength) are committed. */
  verifiedLength: number;
  /** tokens[0, sentLength) are known to the gateway in the current epoch. */
  sentLength: number;
  epoch: number;
  lookahead: number;
  /** Never draft a token at a position >= maxPosition. */
  maxPosition: number;
  sampling: SamplingParams;
  distributionTopK: number;
  state: "opening" | "active" | "closing";
}

interface Work {
  session: DraftSession;
  item: StepItem;
  rollbacks: number;
}

export class Drafter extends SessionLoop<DraftEventSink, DraftSession, DraftOpen, Work> {
  private lastStep: StepReport = { step: 0, ms: 0, batchSize: 0, tokens: 0 };

  constructor(
    parts: EngineLoopParts,
    private readonly config: DraftServiceConfig,
  ) {
    super("draft", parts);
  }

  // ---- messages from the gateway ----------------------------------------------------------------------

  protected override checkOpen(request: DraftOpen): string | undefined {
    const promptProblem = this.checkPrompt(request.promptTokenIds);
    if (promptProblem) return promptProblem;
    const problem = samplingProblem(samplingParamsOf(request.sampling));
    return problem && `the draft's sampling parameters: ${problem.message}`;
  }

  protected override createSession(sink: DraftEventSink, request: DraftOpen): DraftSession {
    const prompt = request.promptTokenIds;
    return {
      sink,
      sessionId: request.sessionId,
      requestId: request.requestId,
      seqId: this.ids.allocate(),
      openedAt: performance.now(),
      promptLength: prompt.length,
      tokens: [...prompt],
      distributions: prompt.map(() => undefined),
      kvLength: 0,
      dirtyFrom: Infinity,
      rollbacks: 0,
      drafted: 0,
      verifiedLength: prompt.length,
      sentLength: prompt.length,
      epoch: 0,
      lookahead: Math.max(1, request.lookahead),
      maxPosition: request.maxPosition > 0 ? request.maxPosition : this.engine.info.maxPositionEmbeddings,
      sampling: samplingParamsOf(request.sampling),
      distributionTopK: Math.max(1, request.distributionTopK || 16),
      state: "opening",
      inEngine: false,
    };
  }

  advance(sink: DraftEventSink, sessionId: number, verifiedLength: number, lookahead: number): void {
    const session = this.lookup(sink, sessionId);
    if (!session) return;
    if (verifiedLength > session.tokens.length) {
      this.fail(
        session,
        `advance to ${verifiedLength} is past the ${session.tokens.length} tokens the draft holds`,
      );
      return;
    }
    session.verifiedLength = Math.max(session.verifiedLength, verifiedLength);
    session.sentLength = Math.max(session.sentLength, session.verifiedLength);
    if (lookahead > 0) session.lookahead = lookahead;
    this.loop.wake();
  }

  correct(
    sink: DraftEventSink,
    sessionId: number,
    position: number,
    tokens: number[],
    epoch: number,
    lookahead: number,
  ): void {
    const session = this.lookup(sink, sessionId);
    if (!session) return;
    if (position < 1 || position > session.tokens.length) {
      this.fail(
        session,
        `correction at position ${position}, but the draft holds ${session.tokens.length} tokens`,
      );
      return;
    }
    const vocabularyProblem = this.checkVocabulary(tokens, "correction token");
    if (vocabularyProblem) {
      this.fail(session, vocabularyProblem);
      return;
    }
    // Keep whatever the draft already holds that agrees with the correction: when the draft guessed the
    // corrected tokens, nothing is rolled back and the tokens it drafted after them stay useful.
    let firstDifference = -1;
    for (let i = 0; i < tokens.length; i++) {
      if (session.tokens[position + i] !== tokens[i]) {
        firstDifference = position + i;
        break;
      }
    }
    if (firstDifference >= 0) {
      session.tokens.length = firstDifference;
      session.distributions.length = firstDifference;
      for (let i = firstDifference - position; i < tokens.length; i++) {
        session.tokens.push(tokens[i]!);
        session.distributions.push(undefined);
      }
      session.dirtyFrom = Math.min(session.dirtyFrom, firstDifference);
      session.rollbacks += 1;
    }
    session.epoch = epoch;
    session.verifiedLength = position + tokens.length;
    // Tokens drafted past the correction are resent under the new epoch.
    session.sentLength = session.verifiedLength;
    if (lookahead > 0) session.lookahead = lookahead;
    this.flush(session);
    this.loop.wake();
  }

  // ---- the loop ---------------------------------------------------------------------------------------

  /** Engine bookkeeping between steps: new sessions get a sequence, closed ones free theirs, rolled-back
   * ones lose the KV entries that no longer match. */
  protected override async settleSessions(): Promise<void> {
    for (const session of this.sessions.all()) {
      if (session.state === "closing") {
        await this.remove(session);
        continue;
      }
      if (!session.inEngine) {
        await this.engine.addSequence(session.seqId);
        session.inEngine = true;
        // A close that came during the await stands (the cast undoes TypeScript's narrowing, which
        // cannot know): the next bookkeeping frees the sequence.
        if ((session.state as DraftSession["state"]) === "closing") continue;
        session.state = "active";
      }
      const valid = Math.min(session.kvLength, session.dirtyFrom);
      session.dirtyFrom = Infinity;
      if (valid < session.kvLength) {
        session.kvLength = valid;
        await this.engine.truncate(session.seqId, valid);
      }
    }
  }

  protected override collectWork(): Work[] {
    const work: Work[] = [];
    let prefillBudget = this.config.prefillChunk;
    for (const session of this.sessions.all()) {
      if (work.length >= this.config.maxBatch) return work;
      // A rollback that arrived during bookkeeping is settled first.
      if (session.state !== "active" || session.dirtyFrom < session.kvLength) continue;
      const unfed = session.tokens.length - session.kvLength;
      const mayDraft = this.mayDraft(session);
      const fedPastVerified = session.kvLength + unfed > session.verifiedLength;
      if (mayDraft && (unfed === 1 || unfed <= prefillBudget)) {
        if (unfed > 1) prefillBudget -= unfed;
        work.push(this.workItem(session, unfed, "sample", !fedPastVerified));
      } else if (unfed > 1 && prefillBudget > 0) {
        // Prefill (or a long correction) in chunks; the last token stays unfed for the sampling step.
        const count = Math.min(prefillBudget, unfed - 1);
        prefillBudget -= count;
        work.push(this.workItem(session, count, "none", session.kvLength + count <= session.verifiedLength));
      }
    }
    return work;
  }

  private workItem(session: DraftSession, count: number, output: "sample" | "none", commit: boolean): Work {
    const sampled = session.sampling.temperature > 0;
    return {
      session,
      rollbacks: session.rollbacks,
      item: {
        seqId: session.seqId,
        tokens: Int32Array.from(session.tokens.slice(session.kvLength, session.kvLength + count)),
        output,
        sampling: session.sampling,
        commit,
        returnTopK: sampled && output === "sample" ? session.distributionTopK : 0,
      },
    };
  }

  /**
   * The draft step after `work`, queued before `work`'s results are known, when `work` is all drafting
   * steps of sessions that may still draft once those tokens are in: each feeds the token its session's
   * step picks. Any other work (a prefill chunk, a session at its limit) ends the pipeline, so that the next
   * turn collects every session with work again. Whether a fed token ends the sequence is not known yet:
   * apply() drops what a queued step drafts after one.
   */
  protected override continuation(work: Work[]): Work[] {
    const next: Work[] = [];
    for (const { session, item, rollbacks } of work) {
      const goesOn =
        item.output === "sample" &&
        session.state === "active" &&
        session.rollbacks === rollbacks &&
        session.dirtyFrom === Infinity &&
        session.tokens.length + 1 < this.draftLimit(session);
      if (!goesOn) return [];
      // After its step the KV holds what the item feeds; the fed token goes next.
      const fedPosition = session.kvLength + fedTokens(item);
      next.push({
        session,
        rollbacks,
        item: {
          seqId: session.seqId,
          tokens: new Int32Array(0),
          feedNextToken: true,
          output: "sample",
          sampling: session.sampling,
          commit: fedPosition + 1 <= session.verifiedLength,
          returnTopK: item.returnTopK ?? 0,
        },
      });
    }
    return next;
  }

  /** Takes in a step's results: the KV each session now holds and the tokens that continue its draft. */
  protected override apply(work: Work[], { results, report }: StepOutcome): void {
    this.lastStep = report;
    for (const [{ session, item, rollbacks }, result] of this.succeeded(work, results)) {
      this.metrics.stepTokens.inc({ kind: item.output === "none" ? "prefill" : "draft" }, fedTokens(item));
      session.kvLength = result.length;
      // Rolled back while the step ran: the sampled token continues a sequence that no longer exists.
      if (session.rollbacks !== rollbacks || item.output === "none") continue;
      // A queued step drafted past an end-of-sequence token: its token goes (the token it fed, the end, is
      // the session's last and in the KV).
      if (!this.mayDraft(session)) continue;
      session.tokens.push(result.nextToken);
      session.drafted += 1;
      session.distributions.push(
        result.q ? { tokenIds: Array.from(result.q.tokens), probs: Array.from(result.q.probs) } : undefined,
      );
      this.flush(session);
    }
  }

  /** Positions a session may draft up to (exclusive). */
  private draftLimit(session: DraftSession): number {
    return Math.min(
      session.verifiedLength + session.lookahead,
      session.maxPosition,
      this.engine.info.maxPositionEmbeddings,
    );
  }

  /** Whether the session's next token is one to draft: below its limit, and not after an end-of-sequence. */
  private mayDraft(session: DraftSession): boolean {
    const lastToken = session.tokens[session.tokens.length - 1]!;
    return session.tokens.length < this.draftLimit(session) && !this.eos.has(lastToken);
  }

  protected override summary(session: DraftSession): Record<string, unknown> {
    return {
      promptTokens: session.promptLength,
      draftedTokens: session.drafted,
      rollbacks: session.rollbacks,
    };
  }

  /** Sends the tokens the gateway has not seen in the current epoch. */
  private flush(session: DraftSession): void {
    if (session.tokens.length <= session.sentLength) return;
    const from = session.sentLength;
    const distributions = session.distributions.slice(from);
    session.sink.tokens({
      sessionId: session.sessionId,
      epoch: session.epoch,
      position: from,
      tokenIds: session.tokens.slice(from),
      distributions: distributions.every((d): d is TokenDistribution => d !== undefined) ? distributions : [],
      step: this.lastStep,
    });
    session.sentLength = session.tokens.length;
  }
}
