// The target service's own metrics; those of its engine are lib/engine_metrics.ts's.
import { metricsOn, type Registry } from "../../lib/metrics.js";

export type TargetMetrics = ReturnType<typeof targetMetrics>;

export function targetMetrics(registry: Registry, waitingCount: () => number) {
  const metric = metricsOn(registry);
  return {
    proposalsDropped: metric.counter(
      "pearl_target_proposals_dropped_tokens_total",
      "Proposed tokens dropped before verification, by reason",
      ["reason"],
    ),
    proposed: metric.counter("pearl_target_proposed_tokens_total", "Proposed tokens verified"),
    accepted: metric.counter("pearl_target_accepted_tokens_total", "Proposed tokens accepted"),
    waiting: metric.gauge("pearl_sessions_waiting_sessions", "Sessions queued for KV cache room", {
      collect: (gauge) => gauge.set(waitingCount()),
    }),
    preemptions: metric.counter(
      "pearl_target_preemptions_total",
      "Sessions that gave their KV back to make room, to be recomputed later",
    ),
    verifySteps: metric.counter(
      "pearl_target_verify_steps_total",
      "Per-session verifications of at least one proposed token",
    ),
  };
}
