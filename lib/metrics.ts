// Prometheus metrics. Every process owns one registry (several services may share a process in tests);
// names start with pearl_ and end in their unit. Each service declares its metrics in one module
// (lib/engine_metrics.ts for what both model services share, services/*/metrics.ts for the rest), all
// through metricsOn: one line per metric, registered on the service's registry as it is made.
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";

export { Registry };
export type { Counter, Gauge };

export function createRegistry(service: string, withProcessMetrics = true): Registry {
  const registry = new Registry();
  registry.setDefaultLabels({ service });
  if (withProcessMetrics) collectDefaultMetrics({ register: registry });
  return registry;
}

/** A gauge's value, read when the registry is scraped. */
export type GaugeCollector<Labels extends string> = (gauge: Gauge<Labels>) => void | Promise<void>;

/** Declares metrics on one registry. */
export function metricsOn(registry: Registry) {
  const registers = [registry];
  return {
    counter<Labels extends string = never>(
      name: string,
      help: string,
      labelNames: readonly Labels[] = [],
    ): Counter<Labels> {
      return new Counter({ name, help, labelNames, registers });
    },
    gauge<Labels extends string = never>(
      name: string,
      help: string,
      options: { labelNames?: readonly Labels[]; collect?: GaugeCollector<Labels> } = {},
    ): Gauge<Labels> {
      const { labelNames = [], collect } = options;
      return new Gauge({
        name,
        help,
        labelNames,
        registers,
        ...(collect && {
          collect(this: Gauge<Labels>) {
            return collect(this);
          },
        }),
      });
    },
    histogram<Labels extends string = never>(
      name: string,
      help: string,
      buckets: number[],
      labelNames: readonly Labels[] = [],
    ): Histogram<Labels> {
      return new Histogram({ name, help, buckets, labelNames, registers });
    },
  };
}

/** Seconds buckets from 0.5 ms to 30 s: engine steps on a tiny CPU model to a long request. */
export const LATENCY_BUCKETS_SECONDS = [
  0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
];

export const BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256];

export const TOKENS_BUCKETS = [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16];

/** The value of a sample in Prometheus text format, summed over the label sets that include `labels`. */
export function sampleValue(text: string, name: string, labels: Record<string, string> = {}): number {
  let total = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match || match[1] !== name) continue;
    const labelText = match[2] ?? "";
    if (Object.entries(labels).every(([key, value]) => labelText.includes(`${key}="${value}"`))) {
      total += Number(match[3]);
    }
  }
  return total;
}
