// The metrics both model services have: their engine's batched steps, the sessions they hold and their KV
// cache. The engine loop observes the steps; the registry reads the gauges on every scrape.
import { BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_SECONDS, metricsOn, type Registry } from "./metrics.js";
import type { Engine } from "./native.js";

export type EngineMetrics = ReturnType<typeof engineMetrics>;

export function engineMetrics(
  registry: Registry,
  role: "draft" | "target",
  engine: Engine,
  sessionCount: () => number,
) {
  const metric = metricsOn(registry);
  return {
    stepSeconds: metric.histogram(
      "pearl_engine_step_duration_seconds",
      "Duration of one batched engine step",
      LATENCY_BUCKETS_SECONDS,
    ),
    batchSize: metric.histogram(
      "pearl_engine_step_batch_size_sequences",
      "Sequences in one batched engine step",
      BATCH_SIZE_BUCKETS,
    ),
    stepTokens: metric.counter("pearl_engine_step_tokens_total", "Tokens appended by engine steps, by kind", [
      "kind",
    ]),
    sessionsOpened: metric.counter(
      `pearl_${role}_sessions_opened_total`,
      `${role === "draft" ? "Draft" : "Target"} sessions opened`,
    ),
    sessions: metric.gauge("pearl_sessions_active_sessions", "Sessions open on this service", {
      collect: (gauge) => gauge.set(sessionCount()),
    }),
    kvCacheUsage: metric.gauge(
      "pearl_kv_cache_usage_ratio",
      "Fraction of KV cache blocks referenced by a sequence",
      {
        collect: async (gauge) => {
          const stats = await engine.cacheStats();
          gauge.set(stats.blocksTotal > 0 ? stats.blocksUsed / stats.blocksTotal : 0);
        },
      },
    ),
    kvCacheBlocks: metric.gauge("pearl_kv_cache_blocks", "KV cache blocks by state (used, free, cached)", {
      labelNames: ["state"],
      collect: async (gauge) => {
        const stats = await engine.cacheStats();
        gauge.set({ state: "used" }, stats.blocksUsed);
        gauge.set({ state: "free" }, stats.blocksFree);
        gauge.set({ state: "cached" }, stats.blocksCached);
      },
    }),
  };
}
