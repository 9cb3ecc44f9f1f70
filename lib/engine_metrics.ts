// The engine-level metrics of a draft or target service: its batched steps, the sessions it holds and its
// KV cache. The engine loop observes the steps; the registry reads the gauges on every scrape.
import {
  BATCH_SIZE_BUCKETS,
  Counter,
  Gauge,
  Histogram,
  LATENCY_BUCKETS_SECONDS,
  type Registry,
} from "./metrics.js";
import type { Engine } from "./native.js";

/** Engine-level metrics of a draft or target service. */
export class EngineMetrics {
  readonly stepSeconds: Histogram;
  readonly batchSize: Histogram;
  readonly stepTokens: Counter;
  readonly sessions: Gauge;

  constructor(registry: Registry, engine: Engine, sessionCount: () => number) {
    this.stepSeconds = new Histogram({
      name: "pearl_engine_step_duration_seconds",
      help: "Duration of one batched engine step",
      buckets: LATENCY_BUCKETS_SECONDS,
      registers: [registry],
    });
    this.batchSize = new Histogram({
      name: "pearl_engine_step_batch_size_sequences",
      help: "Sequences in one batched engine step",
      buckets: BATCH_SIZE_BUCKETS,
      registers: [registry],
    });
    this.stepTokens = new Counter({
      name: "pearl_engine_step_tokens_total",
      help: "Tokens appended by engine steps, by kind",
      labelNames: ["kind"],
      registers: [registry],
    });
    this.sessions = new Gauge({
      name: "pearl_sessions_active_sessions",
      help: "Sessions open on this service",
      registers: [registry],
      collect() {
        this.set(sessionCount());
      },
    });
    // Registered gauges are read by the registry on every scrape.
    new Gauge({
      name: "pearl_kv_cache_usage_ratio",
      help: "Fraction of KV cache blocks referenced by a sequence",
      registers: [registry],
      async collect() {
        const stats = await engine.cacheStats();
        this.set(stats.blocksTotal > 0 ? stats.blocksUsed / stats.blocksTotal : 0);
      },
    });
    new Gauge({
      name: "pearl_kv_cache_blocks",
      help: "KV cache blocks by state (used, free, cached)",
      labelNames: ["state"],
      registers: [registry],
      async collect() {
        const stats = await engine.cacheStats();
        this.set({ state: "used" }, stats.blocksUsed);
        this.set({ state: "free" }, stats.blocksFree);
        this.set({ state: "cached" }, stats.blocksCached);
      },
    });
  }

  observeStep(batchSize: number, seconds: number): void {
    this.stepSeconds.observe(seconds);
    this.batchSize.observe(batchSize);
  }
}
