#!/usr/bin/env node
// The pearl command: run the services (all three, or one each) and generate from the command line.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { credentials } from "@grpc/grpc-js";
import { Command, InvalidArgumentError, Option } from "commander";
import {
  addOptions,
  DECODING_MODES,
  DEFAULT_PORTS,
  DRAFT_SERVICE_OPTIONS,
  type DraftServiceConfig,
  GATEWAY_OPTIONS,
  type GatewayConfig,
  readOptions,
  TARGET_SERVICE_OPTIONS,
  type TargetServiceConfig,
  toArgs,
} from "../lib/config.js";
import { CHANNEL_OPTIONS, clientAddress } from "../lib/grpc.js";
import { createLogger, errorMessage, type Logger } from "../lib/logging.js";
import type { RunningService } from "../lib/model_service.js";
import { packageRoot } from "../lib/paths.js";
import { type ServiceProcess, spawnService } from "../lib/service_process.js";
import { FinishReason } from "../proto/gen/pearl/v1/common.js";
import { DecodingMode, GatewayClient, type GenerateRequest } from "../proto/gen/pearl/v1/gateway.js";
import { startDraftService } from "../services/draft/server.js";
import { startGatewayService } from "../services/gateway/server.js";
import { startTargetService } from "../services/target/server.js";

const SHARED_KEYS = new Set(["host", "logLevel"]);

function version(): string {
  const manifest = JSON.parse(readFileSync(join(packageRoot(), "package.json"), "utf8")) as { version: string };
  return manifest.version;
}

/** Runs an in-process service until SIGINT or SIGTERM, then closes it gracefully. */
function runUntilSignal(service: RunningService): void {
  let stopping = false;
  const stop = (): void => {
    if (stopping) return;
    stopping = true;
    service.close().then(
      () => process.exit(0),
      (error: unknown) => {
        console.error(errorMessage(error));
        process.exit(1);
      },
    );
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}

async function startOrExit(start: () => Promise<RunningService>, role: string): Promise<void> {
  try {
    runUntilSignal(await start());
  } catch (error) {
    createLogger(role).error("failed to start", { error: errorMessage(error) });
    process.exit(1);
  }
}

// ---- the whole stack as child processes -------------------------------------------------------------

interface StackConfig {
  draft: DraftServiceConfig;
  target: TargetServiceConfig;
  gateway: GatewayConfig;
}

/** The embedded model pair is the default; without it the user must name the models. */
function withDefaultModels(stack: StackConfig): StackConfig {
  const embedded = join(packageRoot(), "models");
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

interface RunningStack {
  gatewayPorts: { grpcPort: number; httpPort: number };
  stop(): Promise<void>;
  /** Resolves when the stack cannot go on (the target or the gateway died), with a reason. */
  broken: Promise<string>;
}

const DRAFT_RESTARTS_PER_MINUTE = 5;

/**
 * Starts draft and target (in parallel), then the gateway pointed at them. A draft that dies is restarted
 * (the gateway runs requests in ar meanwhile); a dead target or gateway breaks the stack.
 */
async function startStack(stack: StackConfig, logger: Logger, quiet: boolean): Promise<RunningStack> {
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
    return { gatewayPorts, stop, broken };
  } catch (error) {
    await stop();
    throw error;
  }
}

function readStack(values: Record<string, unknown>): StackConfig {
  const gateway = readOptions(values, GATEWAY_OPTIONS);
  const shared = { host: gateway.host, logLevel: gateway.logLevel };
  return withDefaultModels({
    draft: { ...readOptions(values, DRAFT_SERVICE_OPTIONS, "draft-"), ...shared },
    target: { ...readOptions(values, TARGET_SERVICE_OPTIONS, "target-"), ...shared },
    gateway,
  });
}

// ---- generate -----------------------------------------------------------------------------------------

function parseTokenIds(raw: string): number[] {
  const ids = raw
    .split(/[\s,]+/)
    .filter((part) => part !== "")
    .map(Number);
  if (ids.length === 0 || ids.some((id) => !Number.isInteger(id) || id < 0)) {
    throw new InvalidArgumentError(`expected token ids separated by commas or spaces, got "${raw}"`);
  }
  return ids;
}

function parseNumber(raw: string): number {
  const value = Number(raw);
  if (raw.trim() === "" || !Number.isFinite(value)) throw new InvalidArgumentError(`not a number: "${raw}"`);
  return value;
}

const PROTO_MODES: Record<string, DecodingMode> = {
  pearl: DecodingMode.DECODING_MODE_PEARL,
  sd: DecodingMode.DECODING_MODE_SD,
  ar: DecodingMode.DECODING_MODE_AR,
};

interface GenerateOptions {
  prompt?: string;
  promptIds?: number[];
  mode?: string;
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  seed?: number;
  draftTemperature?: number;
  gateway: string;
  local: boolean;
  json: boolean;
}

async function generateOnce(address: string, request: GenerateRequest): Promise<Record<string, unknown>> {
  const client = new GatewayClient(address, credentials.createInsecure(), CHANNEL_OPTIONS);
  try {
    return await new Promise((resolve, reject) => {
      const tokenIds: number[] = [];
      let text = "";
      let last: Record<string, unknown> = {};
      const call = client.generate(request);
      call.on("data", (response) => {
        tokenIds.push(...response.tokenIds);
        text += response.text;
        if (response.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) {
          last = {
            finishReason: response.finishReason === FinishReason.FINISH_REASON_STOP ? "stop" : "length",
            usage: response.usage,
          };
        }
      });
      call.on("error", (error: Error) => reject(error));
      call.on("end", () => resolve({ tokenIds, text, ...last }));
    });
  } finally {
    client.close();
  }
}

async function runGenerate(options: GenerateOptions, values: Record<string, unknown>): Promise<void> {
  if ((options.prompt === undefined) === (options.promptIds === undefined)) {
    throw new Error("give exactly one of --prompt <text> and --prompt-ids <ids>");
  }
  const request: GenerateRequest = {
    requestId: "",
    prompt: options.prompt ?? "",
    promptTokenIds: options.promptIds ?? [],
    maxTokens: options.maxTokens ?? 0,
    temperature: options.temperature,
    topP: options.topP,
    topK: options.topK,
    seed: options.seed,
    mode: options.mode ? PROTO_MODES[options.mode]! : DecodingMode.DECODING_MODE_UNSPECIFIED,
    draftTemperature: options.draftTemperature,
  };
  let address = options.gateway;
  let stack: RunningStack | undefined;
  if (options.local) {
    const config = readStack(values);
    for (const role of ["draft", "target"] as const) {
      config[role].grpcPort = 0;
      config[role].httpPort = -1;
      config[role].profileBatchSizes = [1];
      config[role].logLevel = "warn";
    }
    config.gateway = { ...config.gateway, grpcPort: 0, httpPort: -1, logLevel: "warn" };
    stack = await startStack(config, createLogger("pearl", "warn"), true);
    address = clientAddress(config.gateway.host, stack.gatewayPorts.grpcPort);
  }
  try {
    const result = await generateOnce(address, request);
    if (options.json) {
      console.log(JSON.stringify(result));
    } else {
      const text = result.text as string;
      console.log(text !== "" ? text : (result.tokenIds as number[]).join(" "));
    }
  } finally {
    await stack?.stop();
  }
}

// ---- the command line -----------------------------------------------------------------------------------

const program = new Command("pearl")
  .description("Parallel speculative decoding (PEARL) served as draft, target and gateway gRPC services")
  .version(version());

const serve = program
  .command("serve")
  .description("run the draft, target and gateway services as child processes");
addOptions(serve, DRAFT_SERVICE_OPTIONS, "draft-", SHARED_KEYS);
addOptions(serve, TARGET_SERVICE_OPTIONS, "target-", SHARED_KEYS);
addOptions(serve, GATEWAY_OPTIONS, "", new Set(["draftAddress", "targetAddress"]));
serve.action(async (_options, command: Command) => {
  const logger = createLogger("pearl");
  let stack: RunningStack;
  try {
    stack = await startStack(readStack(command.opts()), logger, false);
  } catch (error) {
    logger.error("failed to start", { error: errorMessage(error) });
    process.exit(1);
  }
  let stopping = false;
  const stop = (code: number): void => {
    if (stopping) return;
    stopping = true;
    void stack.stop().then(() => process.exit(code));
  };
  process.on("SIGINT", () => stop(0));
  process.on("SIGTERM", () => stop(0));
  void stack.broken.then((reason) => {
    logger.error("stopping", { reason });
    stop(1);
  });
});

const draft = program.command("draft").description("run the draft service");
addOptions(draft, DRAFT_SERVICE_OPTIONS);
draft.action(async (_options, command: Command) => {
  const config = readOptions(command.opts(), DRAFT_SERVICE_OPTIONS);
  await startOrExit(() => startDraftService(config), "draft");
});

const target = program.command("target").description("run the target service");
addOptions(target, TARGET_SERVICE_OPTIONS);
target.action(async (_options, command: Command) => {
  const config = readOptions(command.opts(), TARGET_SERVICE_OPTIONS);
  await startOrExit(() => startTargetService(config), "target");
});

const gateway = program.command("gateway").description("run the gateway service");
addOptions(gateway, GATEWAY_OPTIONS);
gateway.action(async (_options, command: Command) => {
  const config = readOptions(command.opts(), GATEWAY_OPTIONS);
  await startOrExit(() => startGatewayService(config), "gateway");
});

const generate = program
  .command("generate")
  .description("generate one completion through a running gateway (or, with --local, a stack of its own)")
  .addOption(new Option("--prompt <text>", "prompt text (needs a tokenizer)"))
  .addOption(new Option("--prompt-ids <ids>", "prompt token ids, comma- or space-separated").argParser(parseTokenIds))
  .addOption(new Option("--mode <mode>", "decoding mode (default: the server's)").choices(DECODING_MODES))
  .addOption(new Option("--max-tokens <n>", "most tokens to generate (default: the server's)").argParser(parseNumber))
  .addOption(new Option("--temperature <t>", "sampling temperature, 0 for greedy (default 1)").argParser(parseNumber))
  .addOption(new Option("--top-p <p>", "nucleus sampling mass (default 1)").argParser(parseNumber))
  .addOption(new Option("--top-k <k>", "top-k cut (default none)").argParser(parseNumber))
  .addOption(new Option("--seed <n>", "sampling seed (default random)").argParser(parseNumber))
  .addOption(new Option("--draft-temperature <t>", "draft sampling temperature (default: the server's)").argParser(parseNumber))
  .addOption(
    new Option("--gateway <host:port>", "the gateway to ask")
      .env("PEARL_GATEWAY_ADDRESS")
      .default(`localhost:${DEFAULT_PORTS.gatewayGrpc}`),
  )
  .addOption(new Option("--local", "start draft, target and gateway for this one request").default(false))
  .addOption(new Option("--json", "print tokens, text, finish reason and usage as JSON").default(false));
addOptions(
  generate,
  DRAFT_SERVICE_OPTIONS.filter((spec) => ["modelDir", "backend", "numThreads"].includes(spec.key)),
  "draft-",
);
addOptions(
  generate,
  TARGET_SERVICE_OPTIONS.filter((spec) => ["modelDir", "backend", "numThreads"].includes(spec.key)),
  "target-",
);
generate.action(async (options: GenerateOptions, command: Command) => {
  try {
    await runGenerate(options, command.opts());
  } catch (error) {
    console.error(`pearl generate: ${errorMessage(error)}`);
    process.exitCode = 1;
  }
});

await program.parseAsync();
