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
  stop(): Promise<void>;
  /** Resolves when the stack cannot go on (the target or the gateway died), with a reason. */
  broken: Promise<string>;
}

const DRAFT_RESTARTS_PER_MINUTE = 5;

/**
 * Starts draft and target (in parallel), then the gateway pointed at them. A draft that dies is restarted
 * (the gateway runs requests in ar meanwhile); a dead target or gateway breaks the stack.
 */
export async function startStack(stack: StackConfig, logger: Logger, quiet: boolean): Promise<RunningStack> {
  const lineSink = quiet ? () => undefined : undefined;
  const spawnRole = (role: string, args: string[]): ServiceProcess =>
    spawnService([role, ...args], { onLine: lineSink, stderr: quiet ? "ignore" : "inherit" });
  const draftArgs = toArgs(stack.draft, DRAFT_SERVICE_OPTIONS);
  const children = new Set<ServiceProcess>();
  let stopping = false;
  let reportBroken: (reason: string) => void = () => undefined;
  const broken = new Promise<string>((resolve) => {
    reportBroken = resolve;
  });

  const track = (role: string, service: ServiceProcess, onExit?: () => void): ServiceProcess => {
    children.add(service);
    void service.exited.then((code) => {
      children.delete(service);
      if (stopping) return;
      logger.error("service exited", { role, code });
      if (onExit) onExit();
      else reportBroken(`the ${role} service exited (${code})`);
    });
    return service;
  };

  const draftRestarts: number[] = [];
  const startDraft = (): ServiceProcess => track("draft", spawnRole("draft", draftArgs), restartDraft);
  function restartDraft(): void {
    const now = Date.now();
    while (draftRestarts.length > 0 && draftRestarts[0]! < now - 60_000) draftRestarts.shift();
    if (draftRestarts.length >= DRAFT_RESTARTS_PER_MINUTE) {
      logger.error("the draft service keeps exiting: not restarting it; requests run in ar");
      return;
    }
    draftRestarts.push(now);
    setTimeout(() => {
      if (!stopping) startDraft();
    }, 1000);
  }

  const stop = async (): Promise<void> => {
    stopping = true;
    const exits = [...children].map((child) => child.exited);
    for (const child of children) child.child.kill("SIGTERM");
    await Promise.all(exits);
  };

  try {
    const draft = startDraft();
    const target = track("target", spawnRole("target", toArgs(stack.target, TARGET_SERVICE_OPTIONS)));
    const [draftPorts, targetPorts] = await Promise.all([draft.ready, target.ready]);
    // A restarted draft must come back on the same port: pin the one it got.
    draftArgs.push("--port", String(draftPorts.grpcPort));
    const gatewayConfig: GatewayConfig = {
      ...stack.gateway,
      draftAddress: clientAddress(stack.draft.host, draftPorts.grpcPort),
      targetAddress: clientAddress(stack.target.host, targetPorts.grpcPort),
    };
    const gateway = track("gateway", spawnRole("gateway", toArgs(gatewayConfig, GATEWAY_OPTIONS)));
    const gatewayPorts = await gateway.ready;
    return { gatewayPorts, draftPorts, targetPorts, stop, broken };
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
