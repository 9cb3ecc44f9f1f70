// A Tuner outside the gateway, for tests that drive it by hand.
import type { Logger } from "../../lib/logging.js";
import { type GatewayConfig, gatewayDefaults } from "../../lib/config.js";
import type { Registry } from "../../lib/metrics.js";
import type { ServiceInfo } from "../../proto/gen/pearl/v1/common.js";
import { gatewayMetrics } from "../../services/gateway/metrics.js";
import { Tuner } from "../../services/gateway/tuner.js";

/** A tuner on the gateway's defaults overridden by `config`, the gateway's metrics (its gauges among
 * them) in `registry`. */
export function makeTuner(config: Partial<GatewayConfig>, logger: Logger, registry: Registry): Tuner {
  return new Tuner({ ...gatewayDefaults(), ...config }, logger, gatewayMetrics(registry).tuner);
}

/** A service's start-up profile: decode steps at batch 1, 2, 4 and 8 taking `ms(batch)`. */
export function startupProfile(ms: (batchSize: number) => number): ServiceInfo {
  return {
    model: undefined,
    cache: undefined,
    activeSessions: 0,
    stepTimes: [1, 2, 4, 8].map((batchSize) => ({ batchSize, meanMs: ms(batchSize), samples: 5 })),
  };
}
