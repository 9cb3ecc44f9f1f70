// What the draft and target services share: loading the engine, measuring step times, reporting the
// model and its KV cache, and starting the service (gRPC, HTTP, shutdown).
import { basename, resolve } from "node:path";
import type { handleBidiStreamingCall, handleUnaryCall, MethodDefinition } from "@grpc/grpc-js";
import type {
  CacheStats as CacheStatsProto,
  InfoRequest,
  ModelInfo as ModelInfoProto,
  ServiceInfo,
} from "../proto/gen/pearl/v1/common.js";
import type { ModelServiceConfig } from "./config.js";
import { type EngineLoopParts, SequenceIds, type SessionCore } from "./engine_loop.js";
import { engineMetrics } from "./engine_metrics.js";
import { GrpcStatus, type ServiceRegistration, startGrpcServer } from "./grpc.js";
import { startHttpServer } from "./http.js";
import { announceListening, createLogger, errorMessage, type Logger } from "./logging.js";
import { createRegistry, type Registry } from "./metrics.js";
import { type CacheStats, Engine, type EngineOptions, type ModelInfo } from "./native.js";
import { serveSessionStream } from "./service_streams.js";
import { StepTimes } from "./step_times.js";
import { grpcServerCredentials, loadServerTls } from "./tls.js";

export async function loadEngine(config: ModelServiceConfig, role: string, logger: Logger): Promise<Engine> {
  if (config.modelDir === "") {
    throw new Error(`no ${role} model: pass --model <dir> (or set PEARL_${role.toUpperCase()}_MODEL)`);
  }
  const started = performance.now();
  const options: EngineOptions = {
    modelDir: resolve(config.modelDir),
    backend: config.backend,
    blockSize: config.blockSize,
    numBlocks: config.numBlocks,
    numThreads: config.numThreads,
    devices: config.devices,
    deterministic: config.deterministic,
  };
  const engine = await Engine.load(options);
  logger.info("model loaded", {
    modelDir: config.modelDir,
    architecture: engine.info.architecture,
    backend: engine.info.backend,
    devices: options.devices,
    deterministic: options.deterministic,
    dtype: engine.info.dtype,
    parameters: engine.info.numParameters,
    loadSeconds: Number(((performance.now() - started) / 1000).toFixed(3)),
  });
  return engine;
}

export function modelIdOf(config: ModelServiceConfig): string {
  return config.modelId !== "" ? config.modelId : basename(resolve(config.modelDir));
}

export function modelInfoProto(info: ModelInfo, modelId: string): ModelInfoProto {
  return {
    modelId,
    architecture: info.architecture,
    modelType: info.modelType,
    vocabSize: info.vocabSize,
    hiddenSize: info.hiddenSize,
    numLayers: info.numLayers,
    maxPositionEmbeddings: info.maxPositionEmbeddings,
    eosTokenIds: [...info.eosTokenIds],
    bosTokenId: info.bosTokenId,
    dtype: info.dtype,
    backend: info.backend,
    numParameters: info.numParameters,
  };
}

export function cacheStatsProto(stats: CacheStats): CacheStatsProto {
  return { ...stats };
}

const PROFILE_PROMPT_TOKENS = 8;
const PROFILE_STEPS = 6;

/**
 * Measures decode steps at each batch size on throw-away sequences, so that the first requests already
 * find step-time figures (the gateway derives its draft length from them). Online measurements refine
 * them afterwards.
 */
export async function profileStepTimes(
  engine: Engine,
  batchSizes: number[],
  times: StepTimes,
  ids: SequenceIds,
): Promise<void> {
  const vocab = engine.info.vocabSize;
  for (const batchSize of batchSizes) {
    const seqIds = Array.from({ length: batchSize }, () => ids.allocate());
    try {
      for (const seqId of seqIds) await engine.addSequence(seqId);
      let results = await engine.step(
        seqIds.map((seqId, row) => ({
          seqId,
          tokens: Int32Array.from(
            { length: PROFILE_PROMPT_TOKENS },
            (_, i) => (row * 31 + i * 7 + 3) % vocab,
          ),
          commit: false,
        })),
      );
      for (let step = 0; step < PROFILE_STEPS; step++) {
        const started = performance.now();
        results = await engine.step(
          results.map((result) => ({
            seqId: result.seqId,
            tokens: Int32Array.of(result.nextToken),
            commit: false,
          })),
        );
        // The first decode step pays one-time costs (page faults, thread start-up).
        if (step > 0) times.record(batchSize, performance.now() - started);
      }
    } finally {
      for (const seqId of seqIds) await engine.release(seqId).catch(() => undefined);
    }
  }
}

/** A started service, in-process. */
export interface RunningService {
  grpcPort: number;
  /** -1 when the HTTP server is off. */
  httpPort: number;
  close(): Promise<void>;
}

export interface ModelServiceParts {
  engine: Engine;
  modelId: string;
  stepTimes: StepTimes;
  ids: SequenceIds;
  registry: Registry;
  logger: Logger;
}

/** Loads the model and measures its step times before the service takes requests. */
export async function prepareModelService(
  config: ModelServiceConfig,
  role: "draft" | "target",
  logger: Logger,
  registry: Registry,
): Promise<ModelServiceParts> {
  const engine = await loadEngine(config, role, logger);
  const stepTimes = new StepTimes();
  const ids = new SequenceIds();
  try {
    const started = performance.now();
    await profileStepTimes(engine, config.profileBatchSizes, stepTimes, ids);
    if (config.profileBatchSizes.length > 0) {
      logger.info("step times measured", {
        seconds: Number(((performance.now() - started) / 1000).toFixed(3)),
        stepTimes: stepTimes
          .toProto()
          .map((t) => ({ batchSize: t.batchSize, ms: Number(t.meanMs.toFixed(3)) })),
      });
    }
  } catch (error) {
    await engine.close();
    throw error;
  }
  return { engine, modelId: modelIdOf(config), stepTimes, ids, registry, logger };
}

/** The requests every model service's session stream carries; each service adds its own. */
export interface SessionRequest<Open> {
  open?: Open | undefined;
  close?: { sessionId: number } | undefined;
}

/** A model service's gRPC service, as generated from its proto: a Session stream and Info. */
export type ModelServiceDefinition<Request, Event> = ServiceRegistration["definition"] & {
  session: MethodDefinition<Request, Event>;
  info: MethodDefinition<InfoRequest, ServiceInfo>;
};

/** What makes a model service the draft or the target service. */
export interface ModelServiceRole<
  Core extends SessionCore<Sink, Open>,
  Sink,
  Open,
  Request extends SessionRequest<Open>,
  Event,
> {
  role: "draft" | "target";
  grpc: Omit<ServiceRegistration, "definition" | "implementation"> & {
    definition: ModelServiceDefinition<Request, Event>;
  };
  /** The engine loop that serves the sessions (typed so that Sink and Open are read off its class). */
  createCore(parts: EngineLoopParts): Core & SessionCore<Sink, Open>;
  /** Where the core sends one stream's events: into that stream. */
  sink(send: (event: Event) => void): Sink;
  /** The session a request names. */
  sessionIdOf(request: Request): number | undefined;
  /**
   * Called once, before the service takes requests: returns what handles a stream's requests other than
   * open and close, which every model service handles alike.
   */
  requestHandler(core: Core, registry: Registry): (sink: Sink, request: Request) => void;
}

/**
 * Starts a draft or target service: loads the model, measures its step times, starts the engine loop,
 * then serves gRPC (Session and Info) and, unless it is off, HTTP (/metrics, /health).
 */
export async function startModelService<
  Core extends SessionCore<Sink, Open>,
  Sink,
  Open,
  Request extends SessionRequest<Open>,
  Event,
>(
  config: ModelServiceConfig,
  service: ModelServiceRole<Core, Sink, Open, Request, Event>,
  logger?: Logger,
): Promise<RunningService> {
  const { role } = service;
  const log = logger ?? createLogger(role, config.logLevel);
  // Before the model loads: a bad certificate file is a start-up error that should not wait for it.
  const tls = loadServerTls({
    cert: config.tlsCert,
    key: config.tlsKey,
    clientCa: config.tlsClientCa,
    flags: { cert: "--tls-cert", key: "--tls-key", clientCa: "--tls-client-ca" },
  });
  const registry = createRegistry(role);
  const parts = await prepareModelService(config, role, log, registry);
  const { engine, modelId, stepTimes } = parts;

  // Scraped only after start-up, when the core exists.
  const metrics = engineMetrics(registry, role, engine, (): number => core.activeSessions);
  const core = service.createCore({ ...parts, metrics });
  const handleRequest = service.requestHandler(core, registry);

  const session: handleBidiStreamingCall<Request, Event> = (call) =>
    serveSessionStream(call, log, (send) => {
      const sink = service.sink(send);
      return {
        onRequest(request) {
          if (request.open) {
            metrics.sessionsOpened.inc();
            core.open(sink, request.open);
          } else if (request.close) {
            core.close(sink, request.close.sessionId);
          } else {
            handleRequest(sink, request);
          }
        },
        onRequestFailed(request, message) {
          const sessionId = service.sessionIdOf(request);
          if (sessionId !== undefined) core.failSession(sink, sessionId, message);
        },
        onClosed: () => core.closeStream(sink),
      };
    });
  const info: handleUnaryCall<InfoRequest, ServiceInfo> = (_call, callback) => {
    engine.cacheStats().then(
      (stats) =>
        callback(null, {
          model: modelInfoProto(engine.info, modelId),
          stepTimes: stepTimes.toProto(),
          cache: cacheStatsProto(stats),
          activeSessions: core.activeSessions,
        }),
      (error: unknown) => callback({ code: GrpcStatus.INTERNAL, details: errorMessage(error) }),
    );
  };

  core.start();
  const grpc = await startGrpcServer(
    config.host,
    config.grpcPort,
    [{ ...service.grpc, implementation: { session, info } }],
    { credentials: grpcServerCredentials(tls) },
  );
  const http =
    config.httpPort >= 0
      ? await startHttpServer({
          host: config.host,
          port: config.httpPort,
          registry,
          unhealthyReason: () => (core.failure !== undefined ? `engine loop stopped: ${core.failure}` : null),
        })
      : undefined;
  announceListening(role, { modelId, grpcPort: grpc.port, httpPort: http?.port ?? -1 });

  return {
    grpcPort: grpc.port,
    httpPort: http?.port ?? -1,
    async close() {
      await grpc.shutdown();
      await http?.close();
      await core.stop();
      await engine.close();
      log.info("stopped", { role });
    },
  };
}
