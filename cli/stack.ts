// The whole stack as child processes: draft and target, then the gateway pointed at them. Used by
// `pearl serve`, and by `pearl generate --local` and `pearl bench --local` for a stack of their own.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import {
  DRAFT_SERVICE_OPTIONS,
  type DraftServiceConfig,
  GATEWAY_OPTIONS,
  type GatewayConfig,
  PLACEMENT_OPTIONS,
  readOptions,
  secretEnv,
  TARGET_SERVICE_OPTIONS,
  type TargetServiceConfig,
  toArgs,
} from "../lib/config.js";
import { clientAddress } from "../lib/grpc.js";
import { errorMessage, type Logger } from "../lib/logging.js";
import { cudaDeviceCount } from "../lib/native.js";
import { packageRoot } from "../lib/paths.js";
import { placeModels } from "../lib/placement.js";
import { type ServicePorts, type ServiceProcess, spawnService } from "../lib/service_process.js";

export interface StackConfig {
  draft: DraftServiceConfig;
  target: TargetServiceConfig;
  gateway: GatewayConfig;
}

/** The OpenAI API's name of the embedded target model (its folder is just "target"). */
export const EMBEDDED_SERVED_MODEL_NAME = "pearl-code";

/** The embedded model pair is the default; without it the user must name the models. */
export function withDefaultModels(stack: StackConfig): StackConfig {
  const embedded = join(packageRoot(), "models");
  if (stack.target.modelDir === "" && stack.gateway.servedModelName === "") {
    stack.gateway.servedModelName = EMBEDDED_SERVED_MODEL_NAME;
  }
  for (const role of ["draft", "target"] as const) {
    if (stack[role].modelDir !== "") continue;
    const fallback = join(embedded, role);
    if (!existsSync(join(fallback, "config.json"))) {
      throw new Error(
        `no ${role} model: pass --${role}-model <dir> (or set PEARL_${role.toUpperCase()}_MODEL); ` +
          `the embedded model ${fallback} does not exist`,
      );
    }
    stack[role].modelDir = fallback;
  }
  if (stack.gateway.tokenizerDir === "" && existsSync(join(stack.target.modelDir, "tokenizer.json"))) {
    stack.gateway.tokenizerDir = stack.target.modelDir;
  }
  return stack;
}

export interface RunningStack {
  gatewayPorts: ServicePorts;
  draftPorts: ServicePorts;
  targetPorts: ServicePorts;
  /** The gateway first (it drains its requests), then draft and target. */
  stop(): Promise<void>;
}

/** A crashed service is restarted after 1 s, then 2, 4, ... up to 30 s while it keeps crashing; one that
 * ran a minute counts as recovered. */
const RESTART_BASE_DELAY_MS = 1000;
const RESTART_MAX_DELAY_MS = 30_000;
const STABLE_UPTIME_MS = 60_000;

/** One child service, restarted with backoff whenever it exits unasked, on the ports it first got. */
class SupervisedService {
  private current: ServiceProcess | undefined;
  private startedAt = 0;
  private consecutiveCrashes = 0;
  private restartTimer: NodeJS.Timeout | undefined;
  private stopping = false;
  /** Restarts begin once the whole stack is up; a crash before that fails the start. */
  private supervising = false;

  constructor(
    readonly role: string,
    private readonly args: string[],
    private readonly spawnRole: (role: string, args: string[]) => ServiceProcess,
    private readonly logger: Logger,
  ) {}

  async start(): Promise<ServicePorts> {
    const ports = await this.spawn().ready;
    // A restarted service must come back where the others and the clients look for it.
    this.args.push("--port", String(ports.grpcPort));
    if (ports.httpPort >= 0) this.args.push("--http-port", String(ports.httpPort));
    return ports;
  }

  supervise(): void {
    this.supervising = true;
  }

  async stop(): Promise<void> {
    this.stopping = true;
    clearTimeout(this.restartTimer);
    const child = this.current;
    if (!child) return;
    child.child.kill("SIGTERM");
    await child.exited;
  }

  private spawn(): ServiceProcess {
    const child = this.spawnRole(this.role, this.args);
    this.current = child;
    this.startedAt = performance.now();
    void child.exited.then((code) => this.exited(child, code));
    return child;
  }

  private exited(child: ServiceProcess, code: number | string): void {
    if (this.current === child) this.current = undefined;
    if (this.stopping || !this.supervising) return;
    if (performance.now() - this.startedAt >= STABLE_UPTIME_MS) this.consecutiveCrashes = 0;
    this.consecutiveCrashes += 1;
    const delayMs = Math.min(
      RESTART_MAX_DELAY_MS,
      RESTART_BASE_DELAY_MS * 2 ** (this.consecutiveCrashes - 1),
    );
    this.logger.error("service exited: restarting it", {
      role: this.role,
      code,
      attempt: this.consecutiveCrashes,
      delaySeconds: delayMs / 1000,
    });
    this.restartTimer = setTimeout(() => {
      if (this.stopping) return;
      this.spawn().ready.then(
        (ports) => this.logger.info("service restarted", { role: this.role, ...ports }),
        () => undefined,
      );
    }, delayMs);
  }
}

/**
 * Starts draft and target (in parallel), then the gateway pointed at them. Any of them that dies later
 * is restarted with backoff: requests run in ar while the draft is away, fail with 503 while the target
 * is, and the gateway reconnects to either once it is back.
 */
export async function startStack(stack: StackConfig, logger: Logger, quiet: boolean): Promise<RunningStack> {
  const lineSink = quiet ? () => undefined : undefined;
  // The gateway's API keys travel in its environment, not on its command line.
  const gatewayEnv = { ...process.env, ...secretEnv(stack.gateway, GATEWAY_OPTIONS) };
  const spawnRole = (role: string, args: string[]): ServiceProcess =>
    spawnService([role, ...args], {
      onLine: lineSink,
      stderr: quiet ? "ignore" : "inherit",
      env: role === "gateway" ? gatewayEnv : process.env,
    });
  const draft = new SupervisedService("draft", toArgs(stack.draft, DRAFT_SERVICE_OPTIONS), spawnRole, logger);
  const target = new SupervisedService(
    "target",
    toArgs(stack.target, TARGET_SERVICE_OPTIONS),
    spawnRole,
    logger,
  );
  let gateway: SupervisedService | undefined;
  const stop = async (): Promise<void> => {
    await gateway?.stop();
    await Promise.all([draft.stop(), target.stop()]);
  };

  try {
    const [draftPorts, targetPorts] = await Promise.all([draft.start(), target.start()]);
    const gatewayConfig: GatewayConfig = {
      ...stack.gateway,
      draftAddress: clientAddress(stack.draft.host, draftPorts.grpcPort),
      targetAddress: clientAddress(stack.target.host, targetPorts.grpcPort),
    };
    gateway = new SupervisedService("gateway", toArgs(gatewayConfig, GATEWAY_OPTIONS), spawnRole, logger);
    const gatewayPorts = await gateway.start();
    for (const service of [draft, target, gateway]) service.supervise();
    return { gatewayPorts, draftPorts, targetPorts, stop };
  } catch (error) {
    await stop();
    throw error;
  }
}

/** num_key_value_heads of a Hugging Face config.json (num_attention_heads when absent, as in Llama 1). */
export function readKvHeads(modelDir: string): number {
  const path = join(modelDir, "config.json");
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
  } catch (error) {
    throw new Error(`cannot read ${path} to place the target on GPUs: ${errorMessage(error)}`);
  }
  const heads = config.num_key_value_heads ?? config.num_attention_heads;
  if (typeof heads !== "number" || !Number.isInteger(heads) || heads < 1) {
    throw new Error(`${path}: num_key_value_heads must be a positive integer to place the target on GPUs`);
  }
  return heads;
}

/** The stack's settings, with each model's GPUs decided here, before any service starts. */
export function readStack(values: Record<string, unknown>): StackConfig {
  const gateway = readOptions(values, GATEWAY_OPTIONS);
  const shared = { host: gateway.host, logLevel: gateway.logLevel };
  const stack = withDefaultModels({
    draft: { ...readOptions(values, DRAFT_SERVICE_OPTIONS, "draft-"), ...shared },
    target: { ...readOptions(values, TARGET_SERVICE_OPTIONS, "target-"), ...shared },
    gateway,
  });
  const placement = placeModels({
    gpuCount: cudaDeviceCount(),
    draft: stack.draft,
    target: stack.target,
    targetKvHeads: () => readKvHeads(stack.target.modelDir),
    allowSharedDevices: readOptions(values, PLACEMENT_OPTIONS).allowSharedDevices,
  });
  stack.draft.devices = placement.draft;
  stack.target.devices = placement.target;
  return stack;
}

/**
 * A private stack for one command (generate, bench): ephemeral ports, quiet logs. `metrics` keeps every
 * service's /metrics endpoint (on ephemeral ports; the gateway's is its REST port) for a caller that reads
 * them.
 */
export async function startLocalStack(
  values: Record<string, unknown>,
  logger: Logger,
  options: { metrics: boolean; profileBatchSizes: number[] },
): Promise<RunningStack & { gatewayAddress: string }> {
  const config = readStack(values);
  for (const role of ["draft", "target"] as const) {
    config[role].grpcPort = 0;
    config[role].httpPort = options.metrics ? 0 : -1;
    config[role].profileBatchSizes = options.profileBatchSizes;
    config[role].logLevel = "warn";
  }
  config.gateway = { ...config.gateway, grpcPort: 0, httpPort: options.metrics ? 0 : -1, logLevel: "warn" };
  const stack = await startStack(config, logger, true);
  return { ...stack, gatewayAddress: clientAddress(config.gateway.host, stack.gatewayPorts.grpcPort) };
}
