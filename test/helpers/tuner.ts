// A Tuner outside the gateway, for tests that drive it by hand.
import type { Logger } from "../../lib/logging.js";
import { type GatewayConfig, gatewayDefaults } from "../../lib/config.js";
import { Gauge, type Registry } from "../../lib/metrics.js";
import type { ServiceInfo } from "../../proto/gen/pearl/v1/common.js";
import { Tuner } from "../../services/gateway/tuner.js";

/** A tuner on the gateway's defaults overridden by `config`, its gauges in `registry`. */
export function makeTuner(config: Partial<GatewayConfig>, logger: Logger, registry: Registry): Tuner {
  const gauge = (name: string) => new Gauge({ name, help: name, registers: [registry] });
  return new Tuner({ ...gatewayDefaults(), ...config }, logger, {
    lookahead: gauge("lookahead"),
    verifyWindow: gauge("verify_window"),
    gamma: gauge("gamma"),
    acceptance: gauge("acceptance"),
  });
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
