// The draft service's own metrics; those of its engine are lib/engine_metrics.ts's.
import { metricsOn, type Registry } from "../../lib/metrics.js";

export type DraftMetrics = ReturnType<typeof draftMetrics>;

export function draftMetrics(registry: Registry) {
  const metric = metricsOn(registry);
  return {
    corrections: metric.counter("pearl_draft_corrections_total", "Corrections received from gateways"),
  };
}
