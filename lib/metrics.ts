// Prometheus metrics. Every process owns one registry (several services may share a process in tests);
// names start with pearl_ and end in their unit.
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";

export { Counter, Gauge, Histogram, Registry };

export function createRegistry(service: string, withProcessMetrics = true): Registry {
  const registry = new Registry();
  registry.setDefaultLabels({ service });
  if (withProcessMetrics) collectDefaultMetrics({ register: registry });
  return registry;
}

/** Seconds buckets from 0.5 ms to 30 s: engine steps on a tiny CPU model to a long request. */
export const LATENCY_BUCKETS_SECONDS = [
  0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
];

export const BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256];

export const TOKENS_BUCKETS = [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16];
