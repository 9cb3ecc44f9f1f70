// The gateway service: the Generate API over gRPC (proto/pearl/v1/gateway.proto), plus /metrics and
// /health over HTTP, where the OpenAI-compatible REST API (openai.ts) joins them.
import { randomUUID } from "node:crypto";
import { Metadata, type ServerWritableStream } from "@grpc/grpc-js";
import { FinishReason } from "../../proto/gen/pearl/v1/common.js";
import {
  DecodingMode,
  type GatewayServer,
  GatewayService,
  type GenerateRequest,
  type GenerateResponse,
} from "../../proto/gen/pearl/v1/gateway.js";
import type { GatewayConfig } from "../../lib/config.js";
import { modeFromProto, PROTO_MODES } from "../../lib/decoding_modes.js";
import { GrpcStatus, startGrpcServer } from "../../lib/grpc.js";
import { startHttpServer } from "../../lib/http.js";
import { announceListening, createLogger, errorMessage, type Logger } from "../../lib/logging.js";
import { createRegistry } from "../../lib/metrics.js";
import type { RunningService } from "../../lib/model_service.js";
import {
  CancelledError,
  Gateway,
  type GenerateChunk,
  InvalidRequestError,
  isValidRequestId,
  REQUEST_ID_HEADER,
  UnavailableError,
} from "./gateway.js";
import { registerOpenAIApi } from "./openai.js";

export interface RunningGateway extends RunningService {
  gateway: Gateway;
}

function toResponse(chunk: GenerateChunk): GenerateResponse {
  return {
    tokenIds: chunk.tokenIds,
    text: chunk.text,
    finishReason: chunk.finishReason ?? FinishReason.FINISH_REASON_UNSPECIFIED,
    logprobs: chunk.logprobs,
    promptLogprobs: chunk.promptLogprobs,
    usage: chunk.usage && {
      promptTokens: chunk.usage.promptTokens,
      completionTokens: chunk.usage.completionTokens,
      draftTokens: chunk.usage.draftTokens,
      acceptedTokens: chunk.usage.acceptedTokens,
      targetSteps: chunk.usage.targetSteps,
      meanAcceptedLength: chunk.usage.meanAcceptedLength,
      mode: PROTO_MODES[chunk.usage.mode],
      draftFallback: chunk.usage.draftFallback,
      seed: chunk.usage.seed,
    },
  };
}

/** The request's id: the request_id field, else the x-request-id metadata entry, else a new one. */
function requestIdOf(call: ServerWritableStream<GenerateRequest, GenerateResponse>): string {
  const [fromMetadata] = call.metadata.get(REQUEST_ID_HEADER);
  const given = call.request.requestId || (typeof fromMetadata === "string" ? fromMetadata : "");
  if (given === "") return randomUUID();
  if (!isValidRequestId(given)) {
    throw new InvalidRequestError(
      `the request id (request_id or ${REQUEST_ID_HEADER} metadata) must be 1 to 128 visible ASCII characters`,
    );
  }
  return given;
}

/** Streams one request's tokens. A client that cancels, or whose deadline passes (grpc-js then ends the
 * call with DEADLINE_EXCEEDED and reports it cancelled), cancels the generation on both services. */
async function serveGenerate(
  gateway: Gateway,
  call: ServerWritableStream<GenerateRequest, GenerateResponse>,
  logger: Logger,
): Promise<void> {
  const request = call.request;
  const abort = new AbortController();
  let finished = false;
  // grpc-js reports "cancelled" even after a normal end: only an unfinished call is a cancellation.
  call.on("cancelled", () => {
    if (!finished) abort.abort();
  });
  try {
    const requestId = requestIdOf(call);
    const metadata = new Metadata();
    metadata.set(REQUEST_ID_HEADER, requestId);
    call.sendMetadata(metadata);
    const mode = modeFromProto(request.mode);
    if (request.mode !== DecodingMode.DECODING_MODE_UNSPECIFIED && mode === undefined) {
      throw new InvalidRequestError(`unknown mode ${request.mode}`);
    }
    const chunks = gateway.generate(
      {
        requestId,
        prompt: request.prompt,
        promptTokenIds: request.promptTokenIds,
        maxTokens: request.maxTokens,
        temperature: request.temperature,
        topP: request.topP,
        topK: request.topK,
        seed: request.seed,
        mode,
        draftTemperature: request.draftTemperature,
        stop: request.stop,
        topLogprobs: request.topLogprobs,
        promptLogprobs: request.promptLogprobs,
      },
      abort.signal,
    );
    for await (const chunk of chunks) call.write(toResponse(chunk));
    finished = true;
    call.end();
  } catch (error) {
    finished = true;
    if (error instanceof CancelledError) return;
    const code =
      error instanceof InvalidRequestError
        ? GrpcStatus.INVALID_ARGUMENT
        : error instanceof UnavailableError
          ? GrpcStatus.UNAVAILABLE
          : GrpcStatus.INTERNAL;
    if (code === GrpcStatus.INTERNAL) logger.error("generate failed", { error: errorMessage(error) });
    call.emit("error", { code, details: errorMessage(error) });
  }
}

export async function startGatewayService(config: GatewayConfig, logger?: Logger): Promise<RunningGateway> {
  const log = logger ?? createLogger("gateway", config.logLevel);
  const registry = createRegistry("gateway");
  const gateway = await Gateway.connect(config, log, registry);

  const implementation: GatewayServer = {
    generate: (call) => void serveGenerate(gateway, call, log),
    info: (_call, callback) => {
      gateway.info().then(
        (info) =>
          callback(null, {
            draft: info.draft,
            target: info.target,
            defaultMode: PROTO_MODES[config.defaultMode],
            draftAvailable: info.draftAvailable,
            hasTokenizer: gateway.hasTokenizer,
            lookahead: info.lookahead,
            verifyWindow: info.verifyWindow,
            sdGamma: info.sdGamma,
            servedModelName: gateway.servedModelName,
          }),
        (error: unknown) => callback({ code: GrpcStatus.UNAVAILABLE, details: errorMessage(error) }),
      );
    },
  };

  let grpc;
  let http;
  try {
    grpc = await startGrpcServer(config.host, config.grpcPort, [
      {
        name: "pearl.v1.Gateway",
        protoFile: "pearl/v1/gateway.proto",
        definition: GatewayService,
        implementation,
      },
    ]);
    http =
      config.httpPort >= 0
        ? await startHttpServer({
            host: config.host,
            port: config.httpPort,
            registry,
            unhealthyReason: () => gateway.unhealthyReason(),
            configure: (app) =>
              registerOpenAIApi(app, { gateway, logger: log, tokenizerDir: config.tokenizerDir }),
          })
        : undefined;
  } catch (error) {
    await grpc?.shutdown(0);
    gateway.close();
    throw error;
  }
  announceListening("gateway", { grpcPort: grpc.port, httpPort: http?.port ?? -1 });
  const grpcServer = grpc;
  const httpServer = http;

  return {
    gateway,
    grpcPort: grpcServer.port,
    httpPort: httpServer?.port ?? -1,
    async close() {
      await grpcServer.shutdown();
      await httpServer?.close();
      gateway.close();
      log.info("stopped", { role: "gateway" });
    },
  };
}
