// The target service: the target model behind a gRPC API (proto/pearl/v1/target.proto), plus /metrics and
// /health over HTTP.
import type { TargetServiceConfig } from "../../lib/config.js";
import { GrpcStatus, type ServiceRegistration, startGrpcServer } from "../../lib/grpc.js";
import { startHttpServer } from "../../lib/http.js";
import { announceListening, createLogger, errorMessage, type Logger } from "../../lib/logging.js";
import { Counter, createRegistry } from "../../lib/metrics.js";
import {
  cacheStatsProto,
  EngineMetrics,
  modelInfoProto,
  prepareModelService,
  type RunningService,
} from "../../lib/model_service.js";
import { serveSessionStream } from "../../lib/service_streams.js";
import {
  type TargetEvent,
  type TargetRequest,
  TargetServiceService,
  type TargetServiceServer,
} from "../../proto/gen/pearl/v1/target.js";
import { type TargetEventSink, Verifier } from "./verifier.js";

export async function startTargetService(
  config: TargetServiceConfig,
  logger?: Logger,
): Promise<RunningService> {
  const log = logger ?? createLogger("target", config.logLevel);
  const registry = createRegistry("target");
  const { engine, modelId, stepTimes, ids } = await prepareModelService(config, "target", log, registry);

  // Scraped only after start-up, when the verifier exists.
  const metrics = new EngineMetrics(registry, engine, (): number => verifier.activeSessions);
  const verifier = new Verifier(engine, config, ids, stepTimes, metrics, registry, log);
  const sessionsOpened = new Counter({
    name: "pearl_target_sessions_opened_total",
    help: "Target sessions opened",
    registers: [registry],
  });

  const implementation: TargetServiceServer = {
    session: (call) =>
      serveSessionStream<TargetRequest, TargetEvent>(call, log, (send) => {
        const sink: TargetEventSink = {
          verdict: (verdict) => send({ verdict }),
          failed: (sessionId, message) => send({ failed: { sessionId, message } }),
        };
        return {
          onRequest(request) {
            if (request.open) {
              sessionsOpened.inc();
              verifier.open(sink, request.open);
            } else if (request.propose) {
              verifier.propose(sink, request.propose);
            } else if (request.update) {
              const { sessionId, autoregressive, verifyWindow } = request.update;
              verifier.update(sink, sessionId, autoregressive, verifyWindow);
            } else if (request.close) {
              verifier.close(sink, request.close.sessionId);
            }
          },
          onClosed: () => verifier.closeStream(sink),
        };
      }),
    info: (_call, callback) => {
      engine.cacheStats().then(
        (stats) =>
          callback(null, {
            model: modelInfoProto(engine.info, modelId),
            stepTimes: stepTimes.toProto(),
            cache: cacheStatsProto(stats),
            activeSessions: verifier.activeSessions,
          }),
        (error: unknown) => callback({ code: GrpcStatus.INTERNAL, details: errorMessage(error) }),
      );
    },
  };

  verifier.start();
  const registration: ServiceRegistration = {
    name: "pearl.v1.TargetService",
    protoFile: "pearl/v1/target.proto",
    definition: TargetServiceService,
    implementation,
  };
  const grpc = await startGrpcServer(config.host, config.grpcPort, [registration]);
  const http =
    config.httpPort >= 0
      ? await startHttpServer({
          host: config.host,
          port: config.httpPort,
          registry,
          unhealthyReason: () =>
            verifier.failure !== undefined ? `engine loop stopped: ${verifier.failure}` : null,
        })
      : undefined;
  announceListening("target", { modelId, grpcPort: grpc.port, httpPort: http?.port ?? -1 });

  return {
    grpcPort: grpc.port,
    httpPort: http?.port ?? -1,
    async close() {
      await grpc.shutdown();
      await http?.close();
      await verifier.stop();
      await engine.close();
      log.info("stopped", { role: "target" });
    },
  };
}
