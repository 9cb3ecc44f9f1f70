// The target service: the target model behind a gRPC API (proto/pearl/v1/target.proto), plus /metrics and
// /health over HTTP.
import type { TargetServiceConfig } from "../../lib/config.js";
import type { Logger } from "../../lib/logging.js";
import { type ModelServiceRole, type RunningService, startModelService } from "../../lib/model_service.js";
import {
  type TargetEvent,
  type TargetOpen,
  type TargetRequest,
  TargetServiceService,
} from "../../proto/gen/pearl/v1/target.js";
import { type TargetEventSink, Verifier } from "./verifier.js";

export type TargetServiceRole = ModelServiceRole<
  Verifier,
  TargetEventSink,
  TargetOpen,
  TargetRequest,
  TargetEvent
>;

/** What makes a model service the target service: its gRPC API and its engine loop (the Verifier). */
export function targetServiceRole(config: TargetServiceConfig): TargetServiceRole {
  return {
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
    sessionIdOf: (request) => (request.open ?? request.propose ?? request.update ?? request.close)?.sessionId,
    requestHandler: (verifier) => (sink, request) => {
      if (request.propose) {
        verifier.propose(sink, request.propose);
      } else if (request.update) {
        const { sessionId, autoregressive, verifyWindow } = request.update;
        verifier.update(sink, sessionId, autoregressive, verifyWindow);
      }
    },
  };
}

export function startTargetService(config: TargetServiceConfig, logger?: Logger): Promise<RunningService> {
  return startModelService(config, targetServiceRole(config), logger);
}
