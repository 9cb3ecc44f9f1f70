// How far the draft runs ahead and how many tokens the target verifies per step, derived from measured
// step times. PEARL's draft length is gamma = t_target_step / t_draft_step: the draft finishes the next
// window exactly when the target finishes verifying the current one. Both times are measured at the batch
// sizes the services report right now, and the figures are moving averages updated on every step
// (never frozen by the first request).
import type { ServiceInfo } from "../../proto/gen/pearl/v1/common.js";
import type { DecodingMode, GatewayConfig } from "../../lib/config.js";
import type { Logger } from "../../lib/logging.js";
import type { Gauge } from "../../lib/metrics.js";
import { StepTimes } from "../../lib/step_times.js";

export interface DecodingPlan {
  /** Draft tokens allowed past the last verified position. */
  lookahead: number;
  /** Most proposed tokens per verify step. */
  verifyWindow: number;
}

// gamma moves only when the measured ratio is this far from it, so that noise does not flap it between
// two neighbours.
const HYSTERESIS = 0.75;

export class Tuner {
  private draftTimes = new StepTimes();
  private targetTimes = new StepTimes();
  private draftBatch = 1;
  private targetBatch = 1;
  private gamma: number;

  constructor(
    private readonly config: GatewayConfig,
    private readonly logger: Logger,
    private readonly gauges: { lookahead: Gauge; verifyWindow: Gauge; gamma: Gauge },
  ) {
    this.gamma = Math.min(config.sdGamma, config.maxGamma);
    this.publish();
  }

  /** Starts from the step times the services measured at start-up. */
  seed(draft: ServiceInfo | undefined, target: ServiceInfo): void {
    if (draft) this.draftTimes = StepTimes.fromProto(draft.stepTimes);
    this.targetTimes = StepTimes.fromProto(target.stepTimes);
    this.retune(true);
  }

  observeDraft(stepMs: number, batchSize: number): void {
    if (batchSize <= 0) return;
    this.draftTimes.record(batchSize, stepMs);
    this.draftBatch = batchSize;
    this.retune(false);
  }

  observeTarget(stepMs: number, batchSize: number): void {
    if (batchSize <= 0) return;
    this.targetTimes.record(batchSize, stepMs);
    this.targetBatch = batchSize;
    this.retune(false);
  }

  plan(mode: DecodingMode): DecodingPlan {
    if (mode === "sd") return { lookahead: this.config.sdGamma, verifyWindow: this.config.sdGamma };
    const verifyWindow = this.config.verifyWindow > 0 ? this.config.verifyWindow : this.gamma;
    // The target verifies one window while the draft drafts the next: two windows in flight.
    const lookahead = this.config.lookahead > 0 ? this.config.lookahead : 2 * this.gamma;
    return { lookahead, verifyWindow };
  }

  get currentGamma(): number {
    return this.gamma;
  }

  private retune(force: boolean): void {
    const draftMs = this.draftTimes.estimate(this.draftBatch);
    const targetMs = this.targetTimes.estimate(this.targetBatch);
    if (draftMs === undefined || targetMs === undefined || draftMs <= 0) return;
    const ratio = targetMs / draftMs;
    if (!force && Math.abs(ratio - this.gamma) < HYSTERESIS) return;
    const gamma = Math.max(1, Math.min(this.config.maxGamma, Math.round(ratio)));
    if (gamma === this.gamma && !force) return;
    this.gamma = gamma;
    this.publish();
    const plan = this.plan("pearl");
    this.logger.info("draft length tuned", {
      gamma,
      lookahead: plan.lookahead,
      verifyWindow: plan.verifyWindow,
      pinned: this.config.lookahead > 0 || this.config.verifyWindow > 0,
      draftStepMs: Number(draftMs.toFixed(3)),
      targetStepMs: Number(targetMs.toFixed(3)),
      draftBatch: this.draftBatch,
      targetBatch: this.targetBatch,
    });
  }

  private publish(): void {
    const plan = this.plan("pearl");
    this.gauges.gamma.set(this.gamma);
    this.gauges.lookahead.set(plan.lookahead);
    this.gauges.verifyWindow.set(plan.verifyWindow);
  }
}
