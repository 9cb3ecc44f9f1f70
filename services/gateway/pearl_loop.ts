// THE PEARL LOOP: one request's life between the gateway, the draft service and the target service.
//
// PEARL (Parallel spEculative decoding with Adaptive daRft Length, ICLR 2025) runs the draft and the target
// at the same time instead of taking turns. Here each model lives in its own service; this file is the
// whole protocol between them (docs/design.md §2), seen from one request:
//
//   1. start     Open the session on the target and on the draft; both prefill the prompt at once.
//   2. draft     The draft streams tokens (position, tokens, epoch) as it drafts them, up to `lookahead`
//                tokens past the last verified position. In mode pearl every token goes straight on to
//                the target; in mode sd the gateway waits for a full window of gamma tokens first.
//   3. verify    The target verifies whatever has arrived (up to its verify window) in its next batched
//                step and answers with a verdict: the tokens it emits, i.e. the accepted proposals and
//                then its own token (a correction on a rejection, a bonus when all were accepted).
//   4. commit    The verdict's tokens are committed and streamed to the client.
//   5. sync      If the draft had guessed every emitted token, it is told to advance and never stopped
//                drafting: that is PEARL's gain. Otherwise it is corrected: it rolls back to the
//                committed tokens and drafts on from there under a new epoch, and whatever it sent under
//                the old epoch is dropped when it arrives.
//   6. finish    The target alone decides the end (EOS, max_tokens, context length) and frees its side;
//                the gateway closes the draft side. A cancelled request closes both.
//
// Mode ar opens the target alone and lets it decode on its own every step. If the draft service fails or
// disappears mid-request, the request continues exactly that way ("falls back to ar"): the target's
// output does not depend on the draft, only its speed does, so the output is the same. A pearl request
// also runs that way when the tuner (tuner.ts) finds that drafting does not pay: at the present batch
// size, or for this request, whose draft agrees too rarely; from its start, or from the verdict after
// the tuner changed its mind (it does not start drafting again mid-request; requests that start later
// do). Each verdict asks the tuner for this request's plan, so its window follows its own acceptance.
//
// Why the output equals ar's: the target emits, at every position, its own token, and the engine's
// acceptance rule (docs/design.md §4, exactness) makes "accepted draft token" and "the target's own token" the same
// distribution; with a greedy draft and seeded sampling they are even the same token, because sampling is
// a pure function of (seed, position).
import { FinishReason } from "../../proto/gen/pearl/v1/common.js";
import type { DraftEvent, DraftTokens } from "../../proto/gen/pearl/v1/draft.js";
import type { TokenDistribution, TokenLogprobs } from "../../proto/gen/pearl/v1/common.js";
import type { TargetEvent, Verdict } from "../../proto/gen/pearl/v1/target.js";
import type { DecodingModeName } from "../../lib/decoding_modes.js";
import type { Logger } from "../../lib/logging.js";
import type { SamplingParams } from "../../lib/native.js";
import type { DraftLink, TargetLink } from "./links.js";
import type { LoopMetrics } from "./metrics.js";
import type { DecodingPlan, SessionTuning, Tuner } from "./tuner.js";

/** A request as the loop runs it: checked, the server's defaults filled in (Gateway.resolve). */
export interface ResolvedRequest {
  requestId: string;
  promptTokenIds: number[];
  maxTokens: number;
  sampling: SamplingParams;
  mode: DecodingModeName;
  draftTemperature: number;
  /** Size of a sampled draft's sparse distribution q. */
  draftTopK: number;
  /** Set: the target scores every committed token, with this many most likely tokens' beside. */
  topLogprobs?: number;
  /** The first tokens come with the prompt's scores. */
  promptLogprobs?: boolean;
}

export interface RequestUsage {
  promptTokens: number;
  completionTokens: number;
  draftTokens: number;
  acceptedTokens: number;
  targetSteps: number;
  meanAcceptedLength: number;
  /** The mode the request finished in. */
  mode: DecodingModeName;
  /** The draft failed or was unavailable: the request went on in ar. */
  draftFallback: boolean;
  /** The tuner found that drafting does not pay at the present load: the request went on in ar. */
  speculationOff: boolean;
}

/** Where the loop reports to (the gateway turns it into a response stream). */
export interface LoopOutput {
  /** `logprobs` when the request asked for them; `promptLogprobs` with the first tokens, when asked. */
  tokens(tokenIds: number[], logprobs?: TokenLogprobs, promptLogprobs?: TokenLogprobs): void;
  finished(finishReason: FinishReason, usage: RequestUsage): void;
  failed(error: Error): void;
}

export interface LoopContext {
  target: TargetLink;
  /** Absent when the draft service is unavailable (the request then runs in ar). */
  draft: DraftLink | undefined;
  targetContextLength: number;
  draftContextLength: number;
  eosTokenIds: ReadonlySet<number>;
  tuner: Tuner;
  metrics: LoopMetrics;
  logger: Logger;
  /** The draft stream broke: the gateway stops using the draft until it answers again. */
  draftLost(error: Error): void;
}

/** A drafted token the gateway holds: the draft's guess at one position after the committed tokens. */
interface DraftToken {
  token: number;
  distribution: TokenDistribution | undefined;
}

/**
 * One request's PEARL loop: it opens the request's session on both services (one session id names it on
 * both streams), relays between them and reports what the target commits.
 */
export class PearlLoop {
  /** The prompt, then every committed token. */
  private readonly committed: number[];
  private readonly promptLength: number;
  /** The session ends at this length at the latest (max_tokens or the target's context). */
  private readonly maxLength: number;
  /** The draft never drafts at a position >= draftLimit: the target cannot use it there. */
  private readonly draftLimit: number;
  private mode: DecodingModeName;
  private plan: DecodingPlan = { speculate: false, lookahead: 0, verifyWindow: 0 };
  /** This session's part in the tuning, from start until the session is over on both services. */
  private tuning: SessionTuning | undefined;
  private draftActive = false;
  private draftFallback = false;
  private speculationOff = false;
  /** Counts corrections; the draft tags every token with the epoch it was drafted in. */
  private epoch = 0;
  /** The current epoch's drafted tokens, for positions committed.length, committed.length + 1, ... */
  private drafts: DraftToken[] = [];
  /** How many of `drafts` the target has already been sent. */
  private forwarded = 0;
  private done = false;
  private lastVerdictAt: number | undefined;
  private draftTokens = 0;
  private acceptedTokens = 0;
  private targetSteps = 0;

  constructor(
    private readonly sessionId: number,
    private readonly request: ResolvedRequest,
    private readonly context: LoopContext,
    private readonly output: LoopOutput,
  ) {
    this.committed = [...request.promptTokenIds];
    this.promptLength = request.promptTokenIds.length;
    this.maxLength = Math.min(this.promptLength + request.maxTokens, context.targetContextLength);
    this.draftLimit = Math.min(this.maxLength - 1, context.draftContextLength);
    this.mode = request.mode;
  }

  // ---- 1. start ---------------------------------------------------------------------------------------

  start(): void {
    if (this.mode !== "ar" && !this.context.draft) {
      this.noteFallback("draft_unavailable", "the draft service is unavailable");
      this.mode = "ar";
    }
    // With a single token to generate (or a draft context already full) there is nothing to draft.
    if (this.mode !== "ar" && this.draftLimit <= this.promptLength) this.mode = "ar";
    const tuning = this.context.tuner.openSession(this.mode, this.request.requestId);
    this.tuning = tuning;
    this.plan = tuning.plan();
    if (this.mode !== "ar" && !this.plan.speculate) {
      tuning.draftingStopped();
      this.speculationOff = true;
      this.mode = "ar";
      this.context.logger.debug("request runs on the target alone: drafting does not pay now", {
        requestId: this.request.requestId,
      });
    }
    this.context.target.open(
      {
        sessionId: this.sessionId,
        requestId: this.request.requestId,
        promptTokenIds: this.request.promptTokenIds,
        sampling: this.request.sampling,
        maxTokens: this.request.maxTokens,
        autoregressive: this.mode === "ar",
        verifyWindow: this.plan.verifyWindow,
        topLogprobs: this.request.topLogprobs,
        promptLogprobs: this.request.promptLogprobs,
      },
      { onEvent: (event) => this.onTargetEvent(event), onLinkLost: (error) => this.onTargetLost(error) },
    );
    const draft = this.context.draft;
    if (this.mode === "ar" || !draft) return;
    this.draftActive = true;
    draft.open(
      {
        sessionId: this.sessionId,
        requestId: this.request.requestId,
        promptTokenIds: this.request.promptTokenIds,
        sampling: {
          temperature: this.request.draftTemperature,
          topK: 0,
          topP: 1,
          // The draft's random draws must not be the target's: derive its own seed.
          seed: (this.request.sampling.seed + 0x9e3779b9) % Number.MAX_SAFE_INTEGER,
        },
        distributionTopK: this.request.draftTopK,
        lookahead: this.plan.lookahead,
        maxPosition: this.draftLimit,
      },
      { onEvent: (event) => this.onDraftEvent(event), onLinkLost: (error) => this.onDraftLost(error) },
    );
  }

  /** The gateway found a stop string in the output, `unusedTokens` tokens before the last committed one:
   * the request finishes (reason stop) without those, and both services drop the session. */
  finishAtStopString(unusedTokens: number): void {
    if (this.done) return;
    this.context.target.close(this.sessionId);
    this.committed.length -= unusedTokens;
    this.finish(FinishReason.FINISH_REASON_STOP);
  }

  /** The client went away: close the session on both services, which free its KV. */
  cancel(): void {
    if (this.done) return;
    this.done = true;
    this.context.target.close(this.sessionId);
    this.release();
  }

  // ---- 2. draft: tokens arrive from the draft service -------------------------------------------------

  private onDraftEvent(event: DraftEvent): void {
    if (this.done || !this.draftActive) return;
    if (event.tokens) this.onDraftTokens(event.tokens);
    else if (event.failed) this.fallBackToAr("draft_failed", event.failed.message);
  }

  private onDraftTokens(event: DraftTokens): void {
    this.context.tuner.observeDraftStep(event.step);
    // Drafted before the latest correction: it continues tokens that were not committed.
    if (event.epoch !== this.epoch) {
      this.context.metrics.staleDraftTokens.inc(event.tokenIds.length);
      return;
    }
    // Within an epoch the draft's tokens arrive in order and without gaps; anything else is a bug worth
    // hearing about, and ignoring it keeps the output right (only speed is lost).
    const expected = this.committed.length + this.drafts.length;
    if (event.position !== expected) {
      this.context.logger.warn("draft tokens out of place", {
        requestId: this.request.requestId,
        position: event.position,
        expected,
      });
      return;
    }
    event.tokenIds.forEach((token, i) => this.drafts.push({ token, distribution: event.distributions[i] }));
    this.forwardDrafts();
  }

  /** Sends drafted tokens on to the target: at once in pearl, a full window at a time in sd. */
  private forwardDrafts(): void {
    if (!this.draftActive || this.forwarded >= this.drafts.length) return;
    if (this.mode === "sd") {
      // Vanilla speculative decoding: the target verifies only complete windows, one at a time.
      if (this.forwarded > 0) return;
      const wanted = Math.min(this.plan.verifyWindow, this.draftLimit - this.committed.length);
      const endsInEos = this.isEos(this.drafts[this.drafts.length - 1]!.token);
      if (this.drafts.length < wanted && !endsInEos) return;
    }
    const fresh = this.drafts.slice(this.forwarded);
    this.context.target.propose({
      sessionId: this.sessionId,
      epoch: this.epoch,
      position: this.committed.length + this.forwarded,
      tokenIds: fresh.map((d) => d.token),
      distributions: fresh.every((d) => d.distribution !== undefined)
        ? fresh.map((d) => d.distribution!)
        : [],
    });
    this.forwarded = this.drafts.length;
  }

  // ---- 3 + 4. verify and commit: a verdict arrives from the target ------------------------------------

  private onTargetEvent(event: TargetEvent): void {
    if (this.done) return;
    if (event.verdict) this.onVerdict(event.verdict);
    else if (event.failed) this.fail(new Error(`target: ${event.failed.message}`), false);
  }

  private onVerdict(verdict: Verdict): void {
    const position = this.committed.length;
    if (verdict.position !== position) {
      this.fail(new Error(`target verdict for position ${verdict.position}, expected ${position}`), true);
      return;
    }
    const emitted = verdict.tokenIds;
    this.committed.push(...emitted);
    this.countStep(verdict);
    const now = performance.now();
    // What this session got since its previous verdict (the first one also waited for the prefill); sd's
    // sequential cycles say nothing about pearl's.
    if (this.lastVerdictAt !== undefined && this.mode !== "sd") {
      this.tuning?.observeCycle(emitted.length, now - this.lastVerdictAt);
    }
    this.lastVerdictAt = now;
    this.context.tuner.observeTargetStep(verdict.step);
    if (emitted.length > 0) this.output.tokens(emitted, verdict.logprobs, verdict.promptLogprobs);
    // The gateway may have ended the request on these tokens (a stop string).
    if (this.done) return;

    if (verdict.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) {
      // The target has already freed its side of the session.
      this.context.target.forget(this.sessionId);
      this.finish(verdict.finishReason);
      return;
    }
    if (this.draftActive) this.syncDraft(position, emitted);
    if (
      this.draftActive &&
      this.committed.length >= this.draftLimit &&
      this.committed.length < this.maxLength - 1
    ) {
      // The draft's context ends before the target's: the target finishes on its own.
      this.stopDrafting("the draft's context is full");
    }
    this.retune();
  }

  private countStep(verdict: Verdict): void {
    const metrics = this.context.metrics;
    this.targetSteps += 1;
    metrics.targetSteps.inc();
    if (verdict.proposed === 0) return;
    this.tuning?.observeVerification(verdict.proposed, verdict.accepted);
    this.draftTokens += verdict.proposed;
    this.acceptedTokens += verdict.accepted;
    metrics.verifySteps.inc();
    metrics.draftTokens.inc(verdict.proposed);
    metrics.acceptedTokens.inc(verdict.accepted);
    for (let i = 1; i <= verdict.accepted; i++) metrics.acceptedPerPosition.inc({ position: String(i) });
  }

  // ---- 5. sync: tell the draft what was committed -----------------------------------------------------

  private syncDraft(position: number, emitted: number[]): void {
    const draft = this.context.draft;
    if (!draft) return;
    let agreeing = 0;
    while (
      agreeing < emitted.length &&
      agreeing < this.drafts.length &&
      this.drafts[agreeing]!.token === emitted[agreeing]
    ) {
      agreeing += 1;
    }
    if (agreeing === emitted.length) {
      // The draft guessed every emitted token, the target's own one included: it drafts on undisturbed,
      // and the tokens it drafted past them (some perhaps at the target already) stay valid.
      this.drafts = this.drafts.slice(emitted.length);
      this.forwarded = Math.max(0, this.forwarded - emitted.length);
      draft.advance(this.sessionId, this.committed.length, this.plan.lookahead);
    } else {
      // The draft guessed wrong at position + agreeing (or has not got there yet): it rolls back to the
      // committed tokens under a new epoch. The target drops the stale proposals it holds by itself.
      this.epoch += 1;
      this.drafts = [];
      this.forwarded = 0;
      draft.correct({
        sessionId: this.sessionId,
        position: position + agreeing,
        tokenIds: emitted.slice(agreeing),
        epoch: this.epoch,
        lookahead: this.plan.lookahead,
      });
    }
    this.forwardDrafts();
  }

  /** Follows the measured step times and this request's acceptance: a new verify window goes to the
   * target, a new lookahead rides on the next advance or correction; when drafting stops paying (at this
   * batch size, or for this request's draft), the request goes on without it. */
  private retune(): void {
    if (!this.draftActive || !this.tuning) return;
    const plan = this.tuning.plan();
    if (!plan.speculate) {
      this.speculationOff = true;
      this.stopDrafting("drafting does not pay for this request now");
      return;
    }
    if (plan.verifyWindow !== this.plan.verifyWindow) {
      this.context.target.update({
        sessionId: this.sessionId,
        autoregressive: false,
        verifyWindow: plan.verifyWindow,
      });
    }
    this.plan = plan;
  }

  // ---- failures: without a draft the request goes on in ar --------------------------------------------

  private onDraftLost(error: Error): void {
    this.context.draftLost(error);
    if (this.done || !this.draftActive) return;
    this.fallBackToAr("draft_lost", error.message);
  }

  private fallBackToAr(reason: string, message: string): void {
    this.noteFallback(reason, message);
    this.stopDrafting(message);
  }

  private noteFallback(reason: string, message: string): void {
    this.context.metrics.fallbacks.inc({ reason });
    // The gateway already warned once that the draft service is gone; every request need not repeat it.
    const level = reason === "draft_unavailable" ? "debug" : "warn";
    this.context.logger.log(level, "request continues without the draft", {
      requestId: this.request.requestId,
      reason,
      error: message,
    });
    this.draftFallback = true;
  }

  private stopDrafting(why: string): void {
    this.closeDraft();
    this.mode = "ar";
    this.drafts = [];
    this.forwarded = 0;
    // Proposals the target already holds are still verified; after them it decodes on its own.
    this.context.target.update({
      sessionId: this.sessionId,
      autoregressive: true,
      verifyWindow: this.plan.verifyWindow,
    });
    this.context.logger.debug("drafting stopped", { requestId: this.request.requestId, why });
  }

  private onTargetLost(error: Error): void {
    if (this.done) return;
    this.fail(new Error(`the target service is unavailable: ${error.message}`), false);
  }

  // ---- 6. finish --------------------------------------------------------------------------------------

  private finish(finishReason: FinishReason): void {
    this.done = true;
    this.release();
    const completionTokens = this.committed.length - this.promptLength;
    const meanAcceptedLength = this.targetSteps > 0 ? completionTokens / this.targetSteps : 0;
    if (this.targetSteps > 0) this.context.metrics.meanAcceptedLength.observe(meanAcceptedLength);
    this.output.finished(finishReason, {
      promptTokens: this.promptLength,
      completionTokens,
      draftTokens: this.draftTokens,
      acceptedTokens: this.acceptedTokens,
      targetSteps: this.targetSteps,
      meanAcceptedLength,
      mode: this.mode,
      draftFallback: this.draftFallback,
      speculationOff: this.speculationOff,
    });
  }

  private fail(error: Error, closeTarget: boolean): void {
    this.done = true;
    if (closeTarget) this.context.target.close(this.sessionId);
    else this.context.target.forget(this.sessionId);
    this.release();
    this.output.failed(error);
  }

  /** The session is over on both services. */
  private release(): void {
    this.closeDraft();
    this.tuning?.closed();
    this.tuning = undefined;
  }

  private closeDraft(): void {
    if (!this.draftActive) return;
    this.draftActive = false;
    this.tuning?.draftingStopped();
    this.context.draft?.close(this.sessionId);
  }

  private isEos(token: number): boolean {
    return this.context.eosTokenIds.has(token);
  }
}
