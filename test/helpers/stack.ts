// The three services as child processes (`pearl draft|target|gateway`, exactly as deployed) on ephemeral
// loopback ports, and a gRPC client of the gateway.
import {
  type ChannelCredentials,
  Client,
  credentials,
  type ClientReadableStream,
  type MethodDefinition,
  type ServiceDefinition,
} from "@grpc/grpc-js";
import { loadSync } from "@grpc/proto-loader";
import { protoPath as healthProtoPath } from "grpc-health-check";
import { CHANNEL_OPTIONS } from "../../lib/grpc.js";
import { sampleValue } from "../../lib/metrics.js";
import { type ServiceProcess, spawnService } from "../../lib/service_process.js";
import { FinishReason, type ServiceInfo } from "../../proto/gen/pearl/v1/common.js";
import { DraftServiceClient } from "../../proto/gen/pearl/v1/draft.js";
import {
  DecodingMode,
  GatewayClient,
  type GenerateRequest,
  type GenerateResponse,
  type Usage,
} from "../../proto/gen/pearl/v1/gateway.js";
import { TargetServiceClient } from "../../proto/gen/pearl/v1/target.js";

export interface RunningChild {
  process: ServiceProcess;
  grpcPort: number;
  httpPort: number;
  address: string;
}

/** Two cores: each engine gets one thread, and only the batch sizes the tests use are profiled. */
const MODEL_SERVICE_ARGS = [
  "--port",
  "0",
  "--http-port",
  "0",
  "--threads",
  "1",
  "--profile",
  "1,8",
  "--log-level",
  "warn",
];

/** Pearl requests always draft: what the tests of speculation check must not hang on whether the tuner
 * finds, on this machine at this moment, that drafting pays. A test of that decision passes
 * `--min-gamma 0` after these (the last flag wins). */
export const ALWAYS_DRAFT = ["--min-gamma", "1"];

export interface StackOptions {
  draftModel: string;
  targetModel: string;
  draftArgs?: string[];
  targetArgs?: string[];
  gatewayArgs?: string[];
  /** How the test reaches the gateway's gRPC port, and the draft and target (default: plaintext). */
  gatewayCredentials?: ChannelCredentials;
  serviceCredentials?: ChannelCredentials;
}

export class Stack {
  readonly logs: string[] = [];
  draft!: RunningChild;
  target!: RunningChild;
  gateway!: RunningChild;
  client!: GatewayClient;

  private constructor(private readonly options: StackOptions) {}

  static async start(options: StackOptions): Promise<Stack> {
    const stack = new Stack(options);
    try {
      [stack.draft, stack.target] = await Promise.all([
        stack.startChild([
          "draft",
          "--model",
          options.draftModel,
          ...MODEL_SERVICE_ARGS,
          ...(options.draftArgs ?? []),
        ]),
        stack.startChild([
          "target",
          "--model",
          options.targetModel,
          ...MODEL_SERVICE_ARGS,
          ...(options.targetArgs ?? []),
        ]),
      ]);
      stack.gateway = await stack.startChild([
        "gateway",
        ...["--port", "0", "--http-port", "0", "--log-level", "warn", "--connect-timeout", "20"],
        ...["--draft", stack.draft.address, "--target", stack.target.address],
        ...ALWAYS_DRAFT,
        ...(options.gatewayArgs ?? []),
      ]);
      stack.client = new GatewayClient(
        stack.gateway.address,
        options.gatewayCredentials ?? credentials.createInsecure(),
        CHANNEL_OPTIONS,
      );
      return stack;
    } catch (error) {
      await stack.stop();
      throw new Error(
        `${(error as Error).message}\n--- service logs ---\n${stack.logs.slice(-40).join("\n")}`,
      );
    }
  }

  async startChild(args: string[]): Promise<RunningChild> {
    const service = spawnService(args, { onLine: (line) => this.logs.push(line), stderr: "pipe" });
    service.child.stderr?.on("data", (chunk: Buffer) => this.logs.push(chunk.toString().trimEnd()));
    const ports = await service.ready;
    return { process: service, ...ports, address: `127.0.0.1:${ports.grpcPort}` };
  }

  /** Starts the draft service again on its old port (after it was killed). */
  async restartDraft(): Promise<void> {
    this.draft = await this.startChild([
      "draft",
      "--model",
      this.options.draftModel,
      ...MODEL_SERVICE_ARGS,
      ...(this.options.draftArgs ?? []),
      "--port",
      String(this.draft.grpcPort),
    ]);
  }

  /** Starts the target service again on its old port (after it was killed). */
  async restartTarget(): Promise<void> {
    this.target = await this.startChild([
      "target",
      "--model",
      this.options.targetModel,
      ...MODEL_SERVICE_ARGS,
      ...(this.options.targetArgs ?? []),
      "--port",
      String(this.target.grpcPort),
    ]);
  }

  /** The gateway's REST base, http://127.0.0.1:port. */
  get gatewayUrl(): string {
    return `http://127.0.0.1:${this.gateway.httpPort}`;
  }

  async stop(): Promise<void> {
    this.client?.close();
    const children = [this.gateway, this.draft, this.target].filter((child) => child !== undefined);
    for (const child of children) child.process.child.kill("SIGTERM");
    await Promise.all(children.map((child) => child.process.exited));
  }

  draftInfo(): Promise<ServiceInfo> {
    const client = new DraftServiceClient(this.draft.address, this.serviceCredentials());
    return new Promise((resolve, reject) =>
      client.info({}, (error, info) => {
        client.close();
        if (error) reject(error);
        else resolve(info);
      }),
    );
  }

  targetInfo(): Promise<ServiceInfo> {
    const client = new TargetServiceClient(this.target.address, this.serviceCredentials());
    return new Promise((resolve, reject) =>
      client.info({}, (error, info) => {
        client.close();
        if (error) reject(error);
        else resolve(info);
      }),
    );
  }

  private serviceCredentials(): ChannelCredentials {
    return this.options.serviceCredentials ?? credentials.createInsecure();
  }

  /**
   * Waits until neither service holds a session or a KV block (cached prefix blocks aside); rejects after
   * `withinMs`. Resolves with how long it took.
   */
  async kvReleased(withinMs: number): Promise<number> {
    const started = performance.now();
    for (;;) {
      const [draft, target] = await Promise.all([this.draftInfo(), this.targetInfo()]);
      const held = [draft, target].filter(
        (info) => info.cache!.blocksUsed > 0 || info.cache!.sequences > 0 || info.activeSessions > 0,
      );
      const elapsed = performance.now() - started;
      if (held.length === 0) return elapsed;
      if (elapsed > withinMs) {
        throw new Error(
          `KV still held after ${withinMs} ms: ${JSON.stringify([draft.cache, target.cache])}, ` +
            `sessions ${draft.activeSessions} / ${target.activeSessions}`,
        );
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  /** The Prometheus text of one service. */
  async metrics(service: "draft" | "target" | "gateway"): Promise<string> {
    const response = await fetch(`http://127.0.0.1:${this[service].httpPort}/metrics`);
    return response.text();
  }

  generate(request: Partial<GenerateRequest>): Promise<Generated> {
    return collect(this.client.generate(generateRequest(request)));
  }

  stream(request: Partial<GenerateRequest>): ClientReadableStream<GenerateResponse> {
    return this.client.generate(generateRequest(request));
  }
}

export interface Generated {
  tokenIds: number[];
  finishReason: FinishReason;
  usage: Usage;
  responses: number;
}

export function generateRequest(request: Partial<GenerateRequest>): GenerateRequest {
  return {
    requestId: "",
    prompt: "",
    promptTokenIds: [],
    maxTokens: 0,
    mode: DecodingMode.DECODING_MODE_UNSPECIFIED,
    stop: [],
    ...request,
  };
}

export function collect(call: ClientReadableStream<GenerateResponse>): Promise<Generated> {
  return new Promise((resolve, reject) => {
    const tokenIds: number[] = [];
    let finishReason = FinishReason.FINISH_REASON_UNSPECIFIED;
    let usage: Usage | undefined;
    let responses = 0;
    call.on("data", (response: GenerateResponse) => {
      responses += 1;
      tokenIds.push(...response.tokenIds);
      if (response.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) {
        finishReason = response.finishReason;
        usage = response.usage;
      }
    });
    call.on("error", reject);
    call.on("end", () => {
      if (!usage) reject(new Error("the stream ended without a finish reason"));
      else resolve({ tokenIds, finishReason, usage, responses });
    });
  });
}

/** Runs tasks with at most `limit` in flight, keeping results in order. */
export async function inParallel<T, R>(
  items: T[],
  limit: number,
  run: (item: T, index: number) => Promise<R>,
): Promise<R[]> {
  const results: R[] = new Array<R>(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const index = next++;
      results[index] = await run(items[index]!, index);
    }
  });
  await Promise.all(workers);
  return results;
}

/** Seeded prompts of random token ids (avoiding the special ids 0-2). */
export function randomPrompts(count: number, minLength: number, maxLength: number, seed: number): number[][] {
  let state = seed >>> 0 || 1;
  const next = (): number => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 4294967296;
  };
  return Array.from({ length: count }, () => {
    const length = minLength + Math.floor(next() * (maxLength - minLength + 1));
    return Array.from({ length }, () => 3 + Math.floor(next() * 509));
  });
}

/** The value of a Prometheus sample (summed over the label sets that include `labels`). */
export const metricValue = sampleValue;

const healthCheck = (
  loadSync(healthProtoPath, { enums: String })["grpc.health.v1.Health"] as ServiceDefinition
).Check as MethodDefinition<{ service: string }, { status: string }>;

/** grpc.health.v1.Health/Check of the server's overall status ("SERVING", "NOT_SERVING", ...). */
export async function grpcHealthStatus(
  address: string,
  channelCredentials: ChannelCredentials = credentials.createInsecure(),
): Promise<string> {
  const client = new Client(address, channelCredentials);
  try {
    return await new Promise((resolve, reject) =>
      client.makeUnaryRequest(
        healthCheck.path,
        healthCheck.requestSerialize,
        healthCheck.responseDeserialize,
        { service: "" },
        (error, response) => (error ? reject(error) : resolve(response!.status)),
      ),
    );
  } finally {
    client.close();
  }
}
