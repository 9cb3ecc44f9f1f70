// The draft service: the draft model behind a gRPC API (proto/pearl/v1/draft.proto), plus /metrics and
// /health over HTTP.
import { type DraftServiceConfig } from "../../lib/config.js";
import type { Logger } from "../../lib/logging.js";
import { type RunningService, startModelService } from "../../lib/model_service.js";
import { DraftServiceService } from "../../proto/gen/pearl/v1/draft.js";
import { type DraftEventSink, Drafter } from "./drafter.js";
import { draftMetrics } from "./metrics.js";

export function startDraftService(config: DraftServiceConfig, logger?: Logger): Promise<RunningService> {
  return startModelService(
    config,
    {
      role: "draft",
      grpc: {
        name: "pearl.v1.DraftService",
        protoFile: "pearl/v1/draft.proto",
        definition: DraftServiceService,
      },
      createCore: (parts) => new Drafter(parts, config),
      sink: (send): DraftEventSink => ({
        tokens: (tokens) => send({ tokens }),
        failed: (sessionId, message) => send({ failed: { sessionId, message } }),
      }),
      sessionIdOf: (request) =>
        (request.open ?? request.advance ?? request.correct ?? request.close)?.sessionId,
      requestHandler(drafter, registry) {
        const metrics = draftMetrics(registry);
        return (sink, request) => {
          if (request.advance) {
            const { sessionId, verifiedLength, lookahead } = request.advance;
            drafter.advance(sink, sessionId, verifiedLength, lookahead);
          } else if (request.correct) {
            metrics.corrections.inc();
            const { sessionId, position, tokenIds, epoch, lookahead } = request.correct;
            drafter.correct(sink, sessionId, position, tokenIds, epoch, lookahead);
          }
        };
      },
    },
    logger,
  );
}
