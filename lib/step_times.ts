// Measured step time per batch size: an exponential moving average per size, so that the figure follows
// the machine's current load and is never frozen by the first requests.
import type { StepTiming } from "../proto/gen/pearl/v1/common.js";

const SMOOTHING = 0.2;

export class StepTimes {
  private readonly bySize = new Map<number, { meanMs: number; samples: number }>();

  record(batchSize: number, ms: number): void {
    const entry = this.bySize.get(batchSize);
    if (entry) {
      entry.meanMs += SMOOTHING * (ms - entry.meanMs);
      entry.samples += 1;
    } else {
      this.bySize.set(batchSize, { meanMs: ms, samples: 1 });
    }
  }

  /**
   * The expected step time at a batch size: measured when there is a figure for it, else interpolated
   * linearly between the nearest measured sizes (extrapolated flat beyond them); undefined when nothing
   * has been measured.
   */
  estimate(batchSize: number): number | undefined {
    const exact = this.bySize.get(batchSize);
    if (exact) return exact.meanMs;
    let below: [number, number] | undefined;
    let above: [number, number] | undefined;
    for (const [size, { meanMs }] of this.bySize) {
      if (size < batchSize && (!below || size > below[0])) below = [size, meanMs];
      if (size > batchSize && (!above || size < above[0])) above = [size, meanMs];
    }
    if (below && above) {
      const fraction = (batchSize - below[0]) / (above[0] - below[0]);
      return below[1] + fraction * (above[1] - below[1]);
    }
    return (below ?? above)?.[1];
  }

  toProto(): StepTiming[] {
    return [...this.bySize.entries()]
      .sort(([a], [b]) => a - b)
      .map(([batchSize, { meanMs, samples }]) => ({ batchSize, meanMs, samples }));
  }

  static fromProto(timings: StepTiming[]): StepTimes {
    const times = new StepTimes();
    for (const timing of timings) {
      times.bySize.set(timing.batchSize, { meanMs: timing.meanMs, samples: timing.samples });
    }
    return times;
  }
}
