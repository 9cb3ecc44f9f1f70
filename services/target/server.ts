// The target service: the target model behind a gRPC API (proto/pearl/v1/target.proto), plus /metrics and
// /health over HTTP.
import type { TargetServiceConfig } from "../../lib/config.js";
import type { Logger } from "../../lib/logging.js";
import { type RunningService, startModelService } from "../../lib/model_service.js";
import { TargetServiceService } from "../../proto/gen/pearl/v1/target.js";
import { type TargetEventSink, Verifier } from "./verifier.js";

export function startTargetService(config: TargetServiceConfig, logger?: Logger): Promise<RunningService> {
  return startModelService(
    config,
    {
      role: "target",
      grpc: {
        name: "pearl.v1.TargetService",
        protoFile: "pearl/v1/target.proto",
        definition: TargetServiceService,
      },
      createCore: (parts) => new Verifier(parts, config),
      sink: (send): TargetEventSink => ({
        verdict: (verdict) => send({ verdict }),
        failed: (sessionId, message) => send({ failed: { sessionId, message } }),
      }),
      requestHandler: (verifier) => (sink, request) => {
        if (request.propose) {
          verifier.propose(sink, request.propose);
        } else if (request.update) {
          const { sessionId, autoregressive, verifyWindow } = request.update;
          verifier.update(sink, sessionId, autoregressive, verifyWindow);
        }
      },
    },
    logger,
  );
}
