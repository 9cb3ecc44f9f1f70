// How far the draft runs ahead and how many tokens the target verifies per step, chosen from what the
// services measure while they run.
//
// PEARL's draft length is gamma = t_target_step / t_draft_step: the draft finishes the next window just
// when the target finishes verifying the current one. That formula assumes a verify step costs the same
// whatever its window; on a CPU, or at a large batch on a GPU, it does not, and the formula then feeds on
// itself (longer windows, slower steps, longer windows). So the tuner models what it measures:
//
//   - a step's time as a line in the tokens it carries, ms = fixed + perToken * tokens, for the target and
//     for the draft, fitted to recent steps (exponentially weighted; the services' start-up profile seeds
//     it) at whatever batch sizes they run now;
//   - the acceptance rate a of draft tokens (recent verdicts).
//
// A window of g drafts yields E(g) = (1 - a^(g+1)) / (1 - a) tokens per target step (Leviathan et al.).
// In pearl the draft drafts the next window while the target verifies this one, so a cycle lasts
// max(T(g), g * D): the tuner picks the g in [1, maxGamma] with the most tokens per millisecond. When
// verification is flat in g and a is near 1 this is exactly PEARL's t_target / t_draft.
import type { ServiceInfo, StepReport } from "../../proto/gen/pearl/v1/common.js";
import type { DecodingMode, GatewayConfig } from "../../lib/config.js";
import type { Logger } from "../../lib/logging.js";
import type { Gauge } from "../../lib/metrics.js";

export interface DecodingPlan {
  /** Draft tokens allowed past the last verified position. */
  lookahead: number;
  /** Most proposed tokens per verify step. */
  verifyWindow: number;
}

/** Weight of the newest observation in the moving fits. */
const DECAY = 0.02;
/** Batch sizes change with every request that starts or ends: plan for their recent average. */
const BATCH_SMOOTHING = 0.05;
/** A new draft length must promise this much more throughput than the current one to replace it. */
const SWITCH_GAIN = 1.1;
/** Until verdicts say otherwise, assume a draft that is right this often, worth this many observations. */
const PRIOR_ACCEPTANCE = 0.6;
const PRIOR_TRIALS = 20;

/** Exponentially weighted least squares of ms against tokens. */
class StepCost {
  private weight = 0;
  private sumX = 0;
  private sumY = 0;
  private sumXX = 0;
  private sumXY = 0;

  add(tokens: number, ms: number, weight = 1): void {
    const keep = Math.pow(1 - DECAY, weight);
    this.weight = this.weight * keep + weight;
    this.sumX = this.sumX * keep + weight * tokens;
    this.sumY = this.sumY * keep + weight * ms;
    this.sumXX = this.sumXX * keep + weight * tokens * tokens;
    this.sumXY = this.sumXY * keep + weight * tokens * ms;
  }

  /** Expected ms of a step carrying `tokens`; undefined before any observation. */
  estimate(tokens: number): number | undefined {
    if (this.weight === 0) return undefined;
    const meanX = this.sumX / this.weight;
    const meanY = this.sumY / this.weight;
    const variance = this.sumXX / this.weight - meanX * meanX;
    // Steps that all carried about the same tokens cannot separate the fixed cost from the per-token
    // cost: take the step time as flat.
    const perToken = variance > 0.25 ? Math.max(0, (this.sumXY / this.weight - meanX * meanY) / variance) : 0;
    const fixed = Math.max(0, meanY - perToken * meanX);
    return fixed + perToken * tokens;
  }
}

export class Tuner {
  private readonly target = new StepCost();
  private readonly draft = new StepCost();
  private lastTargetStep = -1;
  private lastDraftStep = -1;
  private targetBatch = 1;
  private draftBatch = 1;
  private accepted = PRIOR_ACCEPTANCE * PRIOR_TRIALS;
  private trials = PRIOR_TRIALS;
  private gamma: number;

  constructor(
    private readonly config: GatewayConfig,
    private readonly logger: Logger,
    private readonly gauges: { lookahead: Gauge; verifyWindow: Gauge; gamma: Gauge; acceptance: Gauge },
  ) {
    this.gamma = Math.max(1, Math.min(config.sdGamma, config.maxGamma));
    this.publish();
  }

  /** Starts from the decode step times the services measured at start-up (one token per sequence). */
  seed(draft: ServiceInfo | undefined, target: ServiceInfo): void {
    for (const timing of target.stepTimes)
      this.target.add(timing.batchSize, timing.meanMs, Math.min(timing.samples, 5));
    for (const timing of draft?.stepTimes ?? [])
      this.draft.add(timing.batchSize, timing.meanMs, Math.min(timing.samples, 5));
    this.retune(true);
  }

  observeTargetStep(report: StepReport | undefined): void {
    // Every session in a step reports it: count each step once.
    if (!report || report.step === this.lastTargetStep) return;
    this.lastTargetStep = report.step;
    this.target.add(report.tokens, report.ms);
    this.targetBatch += BATCH_SMOOTHING * (report.batchSize - this.targetBatch);
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
    const keep = Math.pow(1 - DECAY, trials);
    this.accepted = this.accepted * keep + accepted;
    this.trials = this.trials * keep + trials;
    this.gauges.acceptance.set(this.acceptanceRate);
  }

  plan(mode: DecodingMode): DecodingPlan {
    if (mode === "sd") {
      const gamma = this.config.sdGamma > 0 ? this.config.sdGamma : (this.best("sd") ?? this.gamma);
      return { lookahead: gamma, verifyWindow: gamma };
    }
    const verifyWindow = this.config.verifyWindow > 0 ? this.config.verifyWindow : this.gamma;
    // The target verifies one window while the draft drafts the next: two windows in flight.
    const lookahead = this.config.lookahead > 0 ? this.config.lookahead : 2 * this.gamma;
    return { lookahead, verifyWindow };
  }

  get acceptanceRate(): number {
    return this.accepted / this.trials;
  }

  /** Tokens per millisecond one session gets from draft length g (undefined before any measurement). */
  private rate(mode: "pearl" | "sd", gamma: number): number | undefined {
    const verify = this.target.estimate(this.targetBatch * (gamma + 1));
    const draftStep = this.draft.estimate(this.draftBatch);
    if (verify === undefined || draftStep === undefined) return undefined;
    const a = Math.min(0.999, Math.max(0.001, this.acceptanceRate));
    const tokensPerCycle = (1 - Math.pow(a, gamma + 1)) / (1 - a);
    const cycle = mode === "pearl" ? Math.max(verify, gamma * draftStep) : verify + gamma * draftStep;
    return tokensPerCycle / Math.max(cycle, 1e-6);
  }

  private best(mode: "pearl" | "sd"): number | undefined {
    let best: number | undefined;
    let bestRate = 0;
    for (let gamma = 1; gamma <= this.config.maxGamma; gamma++) {
      const rate = this.rate(mode, gamma);
      if (rate !== undefined && rate > bestRate) {
        best = gamma;
        bestRate = rate;
      }
    }
    return best;
  }

  private retune(force: boolean): void {
    const candidate = this.best("pearl");
    if (candidate === undefined || candidate === this.gamma) return;
    const current = this.rate("pearl", this.gamma) ?? 0;
    if (!force && this.rate("pearl", candidate)! < SWITCH_GAIN * current) return;
    this.gamma = candidate;
    this.publish();
    const plan = this.plan("pearl");
    this.logger.info("draft length tuned", {
      gamma: candidate,
      lookahead: plan.lookahead,
      verifyWindow: plan.verifyWindow,
      pinned: this.config.lookahead > 0 || this.config.verifyWindow > 0,
      acceptanceRate: Number(this.acceptanceRate.toFixed(3)),
      targetVerifyMs: Number(this.target.estimate(this.targetBatch * (candidate + 1))!.toFixed(3)),
      draftStepMs: Number(this.draft.estimate(this.draftBatch)!.toFixed(3)),
      targetBatch: Number(this.targetBatch.toFixed(2)),
      draftBatch: Number(this.draftBatch.toFixed(2)),
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
