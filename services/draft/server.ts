// The draft service: the draft model behind a gRPC API (proto/pearl/v1/draft.proto), plus /metrics and
// /health over HTTP.
import { GrpcStatus, type ServiceRegistration, startGrpcServer } from "../../lib/grpc.js";
import { type DraftServiceConfig } from "../../lib/config.js";
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
  type DraftEvent,
  type DraftRequest,
  DraftServiceService,
  type DraftServiceServer,
} from "../../proto/gen/pearl/v1/draft.js";
import { type DraftEventSink, Drafter } from "./drafter.js";

export async function startDraftService(
  config: DraftServiceConfig,
  logger?: Logger,
): Promise<RunningService> {
  const log = logger ?? createLogger("draft", config.logLevel);
  const registry = createRegistry("draft");
  const { engine, modelId, stepTimes, ids } = await prepareModelService(config, "draft", log, registry);

  // Scraped only after start-up, when the drafter exists.
  const metrics = new EngineMetrics(registry, engine, (): number => drafter.activeSessions);
  const drafter = new Drafter(engine, config, ids, stepTimes, metrics, log);
  const sessionsOpened = new Counter({
    name: "pearl_draft_sessions_opened_total",
    help: "Draft sessions opened",
    registers: [registry],
  });
  const corrections = new Counter({
    name: "pearl_draft_corrections_total",
    help: "Corrections received from gateways",
    registers: [registry],
  });

  const implementation: DraftServiceServer = {
    session: (call) =>
      serveSessionStream<DraftRequest, DraftEvent>(call, log, (send) => {
        const sink: DraftEventSink = {
          tokens: (tokens) => send({ tokens }),
          failed: (sessionId, message) => send({ failed: { sessionId, message } }),
        };
        return {
          onRequest(request) {
            if (request.open) {
              sessionsOpened.inc();
              drafter.open(sink, request.open);
            } else if (request.advance) {
              const { sessionId, verifiedLength, lookahead } = request.advance;
              drafter.advance(sink, sessionId, verifiedLength, lookahead);
            } else if (request.correct) {
              corrections.inc();
              const { sessionId, position, tokenIds, epoch, lookahead } = request.correct;
              drafter.correct(sink, sessionId, position, tokenIds, epoch, lookahead);
            } else if (request.close) {
              drafter.close(sink, request.close.sessionId);
            }
          },
          onClosed: () => drafter.closeStream(sink),
        };
      }),
    info: (_call, callback) => {
      engine.cacheStats().then(
        (stats) =>
          callback(null, {
            model: modelInfoProto(engine.info, modelId),
            stepTimes: stepTimes.toProto(),
            cache: cacheStatsProto(stats),
            activeSessions: drafter.activeSessions,
          }),
        (error: unknown) => callback({ code: GrpcStatus.INTERNAL, details: errorMessage(error) }),
      );
    },
  };

  drafter.start();
  const registration: ServiceRegistration = {
    name: "pearl.v1.DraftService",
    protoFile: "pearl/v1/draft.proto",
    definition: DraftServiceService,
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
            drafter.failure !== undefined ? `engine loop stopped: ${drafter.failure}` : null,
        })
      : undefined;
  announceListening("draft", { modelId, grpcPort: grpc.port, httpPort: http?.port ?? -1 });

  return {
    grpcPort: grpc.port,
    httpPort: http?.port ?? -1,
    async close() {
      await grpc.shutdown();
      await http?.close();
      await drafter.stop();
      await engine.close();
      log.info("stopped", { role: "draft" });
    },
  };
}
