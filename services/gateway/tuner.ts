// How far the draft runs ahead and how many tokens the target verifies per step, and whether pearl
// requests draft at all, chosen from what the services measure while they run.
//
// PEARL's draft length is gamma = t_target_step / t_draft_step: the draft finishes the next window just
// when the target finishes verifying the current one. That formula assumes a verify step costs the same
// whatever its window; on a CPU, or at a large batch on a GPU, it does not, and the formula then feeds on
// itself (longer windows, slower steps, longer windows). So the tuner models what it measures:
//
//   - a step's time as a line in the tokens it carries, ms = fixed + perToken * tokens, for the draft and
//     for the target, fitted to recent steps (exponentially weighted; the services' start-up profile seeds
//     it) at whatever batch sizes they run now;
//   - the acceptance rate a of draft tokens (recent verdicts).
//
// A window of g drafts yields E(g) = (1 - a^(g+1)) / (1 - a) tokens per target step (Leviathan et al.).
// In pearl the draft drafts the next window while the target verifies this one, so a cycle lasts
// max(T(g), g * D): the tuner picks the g >= 1 with the most tokens per millisecond. When verification is
// flat in g and a is near 1 this is exactly PEARL's t_target / t_draft.
//
// Whether to draft at all (g = 0: the target decoding alone) that ideal model cannot tell: it knows
// nothing of windows the draft has not filled yet, of waiting for the draft after a rejection, of the
// gateway's round trip per verify step, or of a draft that shares the target's cores, and on a 2-core CPU
// it promised pearl at 8 requests twice what it delivered. So the tuner measures what sessions get:
// milliseconds per token between a session's verdicts, as a line in the load (sessions open on the
// target), one line for sessions that draft and one for sessions on the target alone. The start-up
// profile seeds the second (a decode step per token), the ideal model the first: being optimistic, it
// gets drafting tried at a load where it was never measured. Drafting stops when the target alone
// delivers SWITCH_GAIN times more at the present load, and starts again when drafting would (the load
// dropped, say). New pearl requests then run on the target alone (reported as finished in ar, like any
// request without the draft) and running ones stop drafting; they do not start again mid-request.
//
// While nobody drafts, nothing measures the draft, its acceptance rate or what drafting delivers: they
// keep their last values, and the line's slope (measured over the loads it saw, or the model's) carries
// them to other loads. Pins (--lookahead, --verify-window) and --min-gamma >= 1 keep drafting on; mode sd
// always drafts.
import type { ServiceInfo, StepReport } from "../../proto/gen/pearl/v1/common.js";
import type { GatewayConfig } from "../../lib/config.js";
import type { DecodingModeName } from "../../lib/decoding_modes.js";
import type { Logger } from "../../lib/logging.js";
import type { TunerGauges } from "./metrics.js";

export interface DecodingPlan {
  /** false: the tuner found that drafting does not pay now; the request runs on the target alone (and
   * lookahead and verifyWindow are 0). */
  speculate: boolean;
  /** Draft tokens allowed past the last verified position. */
  lookahead: number;
  /** Most proposed tokens per verify step. */
  verifyWindow: number;
}

/** Weight of the newest step in the step-time fits. */
const STEP_DECAY = 0.02;
/** Weight of the newest token in the delivered-time fits (memory of some hundreds of tokens). */
const TOKEN_DECAY = 0.003;
/** Tokens' worth of belief in each delivered-time line's seed. */
const SEED_TOKENS = 20;
/** Loads change with every request that starts or ends: plan for their recent average. */
const BATCH_SMOOTHING = 0.05;
/** A new draft length must promise this much more throughput than the current one to replace it. */
const SWITCH_GAIN = 1.1;
/** Until verdicts say otherwise, assume a draft that is right this often, worth this many observations. */
const PRIOR_ACCEPTANCE = 0.6;
const PRIOR_TRIALS = 20;

/** Exponentially weighted least squares of y against x. */
class Line {
  private weight = 0;
  private sumX = 0;
  private sumY = 0;
  private sumXX = 0;
  private sumXY = 0;
  /** Observations that all had about the same x cannot separate the intercept from the slope: the slope
   * then keeps the value it had when they last varied enough (0 before). A target that nobody drafts
   * for sees only plain decode steps, and must not conclude from them that a longer step would cost
   * nothing more. */
  private slope = 0;

  constructor(private readonly decay: number) {}

  add(x: number, y: number, weight = 1): void {
    const keep = Math.pow(1 - this.decay, weight);
    this.weight = this.weight * keep + weight;
    this.sumX = this.sumX * keep + weight * x;
    this.sumY = this.sumY * keep + weight * y;
    this.sumXX = this.sumXX * keep + weight * x * x;
    this.sumXY = this.sumXY * keep + weight * x * y;
    const meanX = this.sumX / this.weight;
    const variance = this.sumXX / this.weight - meanX * meanX;
    if (variance > 0.25) {
      this.slope = Math.max(0, (this.sumXY / this.weight - meanX * (this.sumY / this.weight)) / variance);
    }
  }

  /** The expected y at x; undefined before any observation. */
  at(x: number): number | undefined {
    if (this.weight === 0) return undefined;
    const intercept = Math.max(0, (this.sumY - this.slope * this.sumX) / this.weight);
    return intercept + this.slope * x;
  }
}

export class Tuner {
  /** Step ms against the tokens in the step. */
  private readonly target = new Line(STEP_DECAY);
  private readonly draft = new Line(STEP_DECAY);
  /** A session's ms per token against the load, drafting (pearl) and on the target alone. */
  private readonly deliveredDrafting = new Line(TOKEN_DECAY);
  private readonly deliveredAlone = new Line(TOKEN_DECAY);
  private lastTargetStep = -1;
  private lastDraftStep = -1;
  private targetBatch = 1;
  private draftBatch = 1;
  private openSessions = 0;
  private draftingSessions = 0;
  /** Sessions open on the target, smoothed. */
  private load = 1;
  private accepted = PRIOR_ACCEPTANCE * PRIOR_TRIALS;
  private trials = PRIOR_TRIALS;
  /** Pearl's draft length; 0: no drafting. */
  private gamma: number;
  private readonly pinned: boolean;
  /** The shortest draft length pearl may choose; 0 lets it stop drafting. */
  private readonly minGamma: number;

  constructor(
    private readonly config: GatewayConfig,
    private readonly logger: Logger,
    private readonly gauges: TunerGauges,
  ) {
    if (config.minGamma > config.maxGamma) {
      throw new Error(`--min-gamma (${config.minGamma}) must not exceed --max-gamma (${config.maxGamma})`);
    }
    this.pinned = config.lookahead > 0 || config.verifyWindow > 0;
    this.minGamma = this.pinned ? Math.max(1, config.minGamma) : config.minGamma;
    // Until something is measured, draft as mode sd would.
    this.gamma = Math.max(1, this.minGamma, Math.min(config.sdGamma, config.maxGamma));
    this.publish();
  }

  /** Starts from the decode step times the services measured at start-up (one token per sequence). */
  seed(draft: ServiceInfo | undefined, target: ServiceInfo): void {
    for (const timing of target.stepTimes)
      this.target.add(timing.batchSize, timing.meanMs, Math.min(timing.samples, 5));
    for (const timing of draft?.stepTimes ?? [])
      this.draft.add(timing.batchSize, timing.meanMs, Math.min(timing.samples, 5));
    for (const { batchSize, meanMs } of target.stepTimes) {
      // A decode step of the whole batch per token, and what the ideal model promises drafting there.
      this.deliveredAlone.add(batchSize, meanMs, SEED_TOKENS);
      const gamma = this.bestDraftLength("pearl", batchSize, batchSize);
      if (gamma !== undefined) {
        const rate = this.rate("pearl", gamma, batchSize, batchSize)!;
        this.deliveredDrafting.add(batchSize, 1 / rate, SEED_TOKENS);
      }
    }
    this.retune(true);
  }

  // ---- what the sessions tell it ----------------------------------------------------------------------

  /** A session opened on the target, with a draft (pearl or sd) or without. */
  sessionOpened(drafting: boolean): void {
    this.openSessions += 1;
    if (drafting) this.draftingSessions += 1;
  }

  /** A session stopped drafting and goes on on the target alone. */
  draftingStopped(): void {
    this.draftingSessions -= 1;
  }

  /** A session ended (after it stopped drafting, if it did). */
  sessionClosed(): void {
    this.openSessions -= 1;
  }

  /** A session's tokens from one verdict and the milliseconds since its previous verdict. `drafting`: a
   * pearl session that drafts; false: one on the target alone (sd sessions do not report). */
  observeCycle(drafting: boolean, tokens: number, ms: number): void {
    if (tokens === 0 || ms <= 0) return;
    const load = Math.max(1, this.openSessions);
    if (drafting) this.deliveredDrafting.add(load, ms / tokens, tokens);
    // Beside drafting sessions a session on the target alone waits for their verify steps.
    else if (this.draftingSessions === 0) this.deliveredAlone.add(load, ms / tokens, tokens);
  }

  observeTargetStep(report: StepReport | undefined): void {
    // Every session in a step reports it: count each step once.
    if (!report || report.step === this.lastTargetStep) return;
    this.lastTargetStep = report.step;
    this.target.add(report.tokens, report.ms);
    this.targetBatch += BATCH_SMOOTHING * (report.batchSize - this.targetBatch);
    this.load += BATCH_SMOOTHING * (Math.max(1, this.openSessions) - this.load);
    // Nobody drafts: the sessions that would are the target's.
    if (this.draftingSessions === 0) this.draftBatch = this.targetBatch;
    this.retune(false);
  }

  observeDraftStep(report: StepReport | undefined): void {
    if (!report || report.step === this.lastDraftStep) return;
    this.lastDraftStep = report.step;
    this.draft.add(report.tokens, report.ms);
    this.draftBatch += BATCH_SMOOTHING * (report.batchSize - this.draftBatch);
  }

  /** One verify step's outcome: `accepted` of `proposed` drafts. Drafts after the first rejection were
   * never judged, so the trials are the accepted ones plus that rejection. */
  observeVerification(proposed: number, accepted: number): void {
    if (proposed === 0) return;
    const trials = accepted + (accepted < proposed ? 1 : 0);
    const keep = Math.pow(1 - STEP_DECAY, trials);
    this.accepted = this.accepted * keep + accepted;
    this.trials = this.trials * keep + trials;
    this.gauges.acceptance.set(this.acceptanceRate);
  }

  // ---- what it tells them -----------------------------------------------------------------------------

  plan(mode: DecodingModeName): DecodingPlan {
    if (mode === "sd") {
      // Vanilla speculative decoding is asked for by name: it always drafts.
      const gamma =
        this.config.sdGamma > 0
          ? this.config.sdGamma
          : (this.bestDraftLength("sd") ?? Math.max(1, this.gamma));
      return { speculate: true, lookahead: gamma, verifyWindow: gamma };
    }
    if (this.gamma === 0) return { speculate: false, lookahead: 0, verifyWindow: 0 };
    const verifyWindow = this.config.verifyWindow > 0 ? this.config.verifyWindow : this.gamma;
    // The target verifies one window while the draft drafts the next: two windows in flight.
    const lookahead = this.config.lookahead > 0 ? this.config.lookahead : 2 * this.gamma;
    return { speculate: true, lookahead, verifyWindow };
  }

  get acceptanceRate(): number {
    return this.accepted / this.trials;
  }

  /** The ideal model's tokens per millisecond for one session with draft length g >= 1 when `batch`
   * sessions share the target's steps and `draftBatch` the draft's (undefined before any measurement). */
  private rate(
    mode: "pearl" | "sd",
    gamma: number,
    batch = this.targetBatch,
    draftBatch = this.draftBatch,
  ): number | undefined {
    const verify = this.target.at(batch * (gamma + 1));
    const draftStep = this.draft.at(draftBatch);
    if (verify === undefined || draftStep === undefined) return undefined;
    const a = Math.min(0.999, Math.max(0.001, this.acceptanceRate));
    const tokensPerCycle = (1 - Math.pow(a, gamma + 1)) / (1 - a);
    const cycle = mode === "pearl" ? Math.max(verify, gamma * draftStep) : verify + gamma * draftStep;
    return tokensPerCycle / Math.max(cycle, 1e-6);
  }

  private bestDraftLength(
    mode: "pearl" | "sd",
    batch = this.targetBatch,
    draftBatch = this.draftBatch,
  ): number | undefined {
    let best: number | undefined;
    let bestRate = 0;
    for (let gamma = Math.max(1, this.minGamma); gamma <= this.config.maxGamma; gamma++) {
      const rate = this.rate(mode, gamma, batch, draftBatch);
      if (rate !== undefined && rate > bestRate) {
        best = gamma;
        bestRate = rate;
      }
    }
    return best;
  }

  /** Tokens per millisecond a session gets at the present load, drafting and on the target alone. */
  private delivered(): { drafting: number; alone: number } | undefined {
    const drafting = this.deliveredDrafting.at(this.load);
    const alone = this.deliveredAlone.at(this.load);
    if (drafting === undefined || alone === undefined) return undefined;
    return { drafting: 1 / Math.max(drafting, 1e-6), alone: 1 / Math.max(alone, 1e-6) };
  }

  private retune(force: boolean): void {
    const draftLength = this.bestDraftLength("pearl");
    if (draftLength === undefined) return;
    let candidate = draftLength;
    const delivered = this.minGamma === 0 ? this.delivered() : undefined;
    if (delivered) {
      const drafting = this.gamma > 0;
      const stop = delivered.alone > (force ? 1 : SWITCH_GAIN) * delivered.drafting;
      const keepOff = !drafting && delivered.drafting <= (force ? 1 : SWITCH_GAIN) * delivered.alone;
      if (stop || keepOff) candidate = 0;
    }
    if (candidate === this.gamma) return;
    // Between draft lengths the model decides, and only for a clear gain.
    if (!force && candidate > 0 && this.gamma > 0) {
      const current = this.rate("pearl", this.gamma) ?? 0;
      if (this.rate("pearl", candidate)! < SWITCH_GAIN * current) return;
    }
    this.gamma = candidate;
    this.publish();
    const plan = this.plan("pearl");
    const rounded = (value: number | undefined, digits = 3): number | null =>
      value === undefined ? null : Number(value.toFixed(digits));
    this.logger.info("draft length tuned", {
      gamma: candidate,
      speculate: plan.speculate,
      lookahead: plan.lookahead,
      verifyWindow: plan.verifyWindow,
      pinned: this.pinned,
      acceptanceRate: rounded(this.acceptanceRate),
      // A verify step of this window (a plain decode step for 0).
      targetVerifyMs: rounded(this.target.at(this.targetBatch * (candidate + 1))),
      draftStepMs: rounded(this.draft.at(this.draftBatch)),
      targetBatch: rounded(this.targetBatch, 2),
      draftBatch: rounded(this.draftBatch, 2),
      load: rounded(this.load, 2),
      // Per session at this load, as measured: what drafting and the target alone deliver.
      draftingTokensPerMs: rounded(delivered?.drafting, 4),
      targetAloneTokensPerMs: rounded(delivered?.alone, 4),
    });
  }

  private publish(): void {
    const plan = this.plan("pearl");
    this.gauges.gamma.set(this.gamma);
    this.gauges.lookahead.set(plan.lookahead);
    this.gauges.verifyWindow.set(plan.verifyWindow);
    this.gauges.acceptance.set(this.acceptanceRate);
  }
}
