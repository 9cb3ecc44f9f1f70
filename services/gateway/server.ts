// The gateway service: the Generate API over gRPC (proto/pearl/v1/gateway.proto), plus /metrics and
// /health over HTTP, where the OpenAI-compatible REST API (openai.ts) joins them.
import { randomUUID } from "node:crypto";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Metadata, type ServerWritableStream } from "@grpc/grpc-js";
import { FinishReason, InfoRequest } from "../../proto/gen/pearl/v1/common.js";
import {
  DecodingMode,
  type GatewayServer,
  GatewayService,
  GenerateRequest,
  type GenerateResponse,
} from "../../proto/gen/pearl/v1/gateway.js";
import type { GatewayConfig } from "../../lib/config.js";
import { modeFromProto, PROTO_MODES } from "../../lib/decoding_modes.js";
import { GrpcStatus, startGrpcServer } from "../../lib/grpc.js";
import { startHttpServer } from "../../lib/http.js";
import { announceListening, createLogger, errorMessage, type Logger } from "../../lib/logging.js";
import { createRegistry } from "../../lib/metrics.js";
import type { RunningService } from "../../lib/model_service.js";
import { grpcServerCredentials, loadServerTls } from "../../lib/tls.js";
import { OverloadedError } from "./admission.js";
import { ApiKeys, type AuthOptions, grpcAuthentication, restAuthentication } from "./auth.js";
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
import { OpenAIError } from "./openai_schema.js";

const HEALTH_SYNC_INTERVAL_MS = 250;

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

/** A request message that did not decode: answered INVALID_ARGUMENT by the handler (grpc-js itself would
 * answer a deserializer's exception with INTERNAL, a server error, for what is the client's mistake). */
class MalformedRequest {
  constructor(readonly reason: string) {}
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** Decodes strictly: proto3 strings must be valid UTF-8, and a string that is not is refused rather than
 * patched with U+FFFD. */
function strictDecoder<Message>(type: {
  decode(reader: BinaryReader): Message;
}): (bytes: Buffer) => Message | MalformedRequest {
  return (bytes) => {
    try {
      return type.decode(new BinaryReader(bytes, (data) => strictUtf8.decode(data)));
    } catch (error) {
      return new MalformedRequest(errorMessage(error));
    }
  };
}

const GATEWAY_DEFINITION = {
  ...GatewayService,
  generate: { ...GatewayService.generate, requestDeserialize: strictDecoder(GenerateRequest) },
  info: { ...GatewayService.info, requestDeserialize: strictDecoder(InfoRequest) },
} as typeof GatewayService;

function malformed(request: unknown): { code: GrpcStatus; details: string } | undefined {
  return request instanceof MalformedRequest
    ? { code: GrpcStatus.INVALID_ARGUMENT, details: `the request message does not decode: ${request.reason}` }
    : undefined;
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
  const invalid = malformed(request);
  if (invalid) {
    call.emit("error", invalid);
    return;
  }
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
    if (error instanceof OverloadedError) {
      // gRPC's retry-after convention (A6 retry throttling reads grpc-retry-pushback-ms).
      const trailers = new Metadata();
      trailers.set("retry-after", String(error.retryAfterSeconds));
      trailers.set("grpc-retry-pushback-ms", String(error.retryAfterSeconds * 1000));
      logger.info("request rejected", { error: error.message });
      call.emit("error", { code: GrpcStatus.RESOURCE_EXHAUSTED, details: error.message, metadata: trailers });
      return;
    }
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
  // Certificates first: a bad file is a start-up error before anything connects.
  const tls = loadServerTls({
    cert: config.tlsCert,
    key: config.tlsKey,
    clientCa: config.tlsClientCa,
    flags: { cert: "--tls-cert", key: "--tls-key", clientCa: "--tls-client-ca" },
  });
  const registry = createRegistry("gateway");
  const gateway = await Gateway.connect(config, log, registry);
  const keys = new ApiKeys(config.apiKeys);
  const auth: AuthOptions = {
    keys,
    exempt: new Set(config.apiKeyExempt),
    logger: log,
    rejected: () => gateway.countRejected("unauthenticated"),
  };

  const implementation: GatewayServer = {
    generate: (call) => void serveGenerate(gateway, call, log),
    info: (call, callback) => {
      const invalid = malformed(call.request);
      if (invalid) {
        callback(invalid);
        return;
      }
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
    grpc = await startGrpcServer(
      config.host,
      config.grpcPort,
      [
        {
          name: "pearl.v1.Gateway",
          protoFile: "pearl/v1/gateway.proto",
          definition: GATEWAY_DEFINITION,
          implementation,
        },
      ],
      {
        credentials: grpcServerCredentials(tls),
        interceptors: keys.enabled ? [grpcAuthentication(auth)] : [],
        maxReceiveBytes: config.maxBodyBytes,
      },
    );
    http =
      config.httpPort >= 0
        ? await startHttpServer({
            host: config.host,
            port: config.httpPort,
            registry,
            unhealthyReason: () => gateway.unhealthyReason(),
            tls,
            onRequest: keys.enabled ? restAuthentication(auth) : undefined,
            requestTimeoutMs: config.bodyTimeoutSeconds * 1000,
            errorBody: (status, message) => new OpenAIError(status, message, "invalid_request_error").body(),
            configure: (app) =>
              registerOpenAIApi(app, {
                gateway,
                logger: log,
                tokenizerDir: config.tokenizerDir,
                maxBodyBytes: config.maxBodyBytes,
              }),
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
  // The gRPC health service says what /health says: NOT_SERVING while the target is unreachable. Set on
  // changes only: every setStatus call is pushed to the Watch streams.
  let serving = true;
  const healthSync = setInterval(() => {
    const healthy = gateway.unhealthyReason() === null;
    if (healthy === serving) return;
    serving = healthy;
    grpcServer.health.setStatus("", healthy ? "SERVING" : "NOT_SERVING");
    grpcServer.health.setStatus("pearl.v1.Gateway", healthy ? "SERVING" : "NOT_SERVING");
  }, HEALTH_SYNC_INTERVAL_MS);
  healthSync.unref();

  return {
    gateway,
    grpcPort: grpcServer.port,
    httpPort: httpServer?.port ?? -1,
    async close() {
      clearInterval(healthSync);
      const health = grpcServer.health;
      health.setStatus("", "NOT_SERVING");
      health.setStatus("pearl.v1.Gateway", "NOT_SERVING");
      log.info("shutting down", { timeoutSeconds: config.shutdownTimeoutSeconds });
      const { finished, cancelled } = await gateway.shutdown(config.shutdownTimeoutSeconds * 1000);
      await grpcServer.shutdown();
      await httpServer?.close();
      gateway.close();
      log.info("stopped", { role: "gateway", finished, cancelled });
    },
  };
}
