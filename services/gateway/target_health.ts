// Whether the target service answers, for /health and the gRPC health service: probed with Info every
// few seconds while it does, and every quarter second once it did not (a session stream that breaks says
// so at once), so that a target that comes back is noticed quickly. The gateway needs no restart: its
// channel reconnects by itself and the next session opens a new stream.
import type { ModelInfo, ServiceInfo } from "../../proto/gen/pearl/v1/common.js";
import { errorMessage, type Logger } from "../../lib/logging.js";

const HEALTHY_PROBE_INTERVAL_MS = 2000;
const UNHEALTHY_PROBE_INTERVAL_MS = 250;
/** An engine thread busy with a long step answers Info late, not never. */
const PROBE_DEADLINE_MS = 2000;

export class TargetHealth {
  private failure: string | null = null;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private probing = false;

  constructor(
    private readonly address: string,
    private readonly model: ModelInfo,
    private readonly info: (deadlineMs: number) => Promise<ServiceInfo>,
    private readonly logger: Logger,
  ) {
    this.schedule(HEALTHY_PROBE_INTERVAL_MS);
  }

  /** null while the target answers with the model the gateway started with. */
  get unhealthyReason(): string | null {
    return this.failure;
  }

  /** A session stream to the target broke. */
  lost(error: Error): void {
    this.markUnhealthy(`the target service at ${this.address} is unreachable: ${error.message}`);
    this.schedule(UNHEALTHY_PROBE_INTERVAL_MS);
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private schedule(delayMs: number): void {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.probe(), delayMs);
    this.timer.unref();
  }

  private async probe(): Promise<void> {
    if (this.probing) return;
    this.probing = true;
    try {
      const info = await this.info(PROBE_DEADLINE_MS);
      const mismatch = this.mismatch(info.model);
      if (mismatch) this.markUnhealthy(mismatch);
      else this.markHealthy();
    } catch (error) {
      this.markUnhealthy(`the target service at ${this.address} is unreachable: ${errorMessage(error)}`);
    } finally {
      this.probing = false;
    }
    this.schedule(this.failure === null ? HEALTHY_PROBE_INTERVAL_MS : UNHEALTHY_PROBE_INTERVAL_MS);
  }

  /** A target restarted with another model would make the gateway's tokenizer and checks wrong. */
  private mismatch(model: ModelInfo | undefined): string | null {
    const same =
      model !== undefined &&
      model.modelId === this.model.modelId &&
      model.vocabSize === this.model.vocabSize &&
      model.maxPositionEmbeddings === this.model.maxPositionEmbeddings;
    return same
      ? null
      : `the target service at ${this.address} now serves "${model?.modelId}", not "${this.model.modelId}"`;
  }

  private markUnhealthy(reason: string): void {
    if (this.failure === null) this.logger.warn("target service unhealthy", { reason });
    this.failure = reason;
  }

  private markHealthy(): void {
    if (this.failure !== null) this.logger.info("target service healthy again", { target: this.address });
    this.failure = null;
  }
}
