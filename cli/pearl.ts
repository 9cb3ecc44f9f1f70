#!/usr/bin/env node
// The pearl command: run the services (all three, or one each) and generate from the command line.
import { join } from "node:path";
import { credentials } from "@grpc/grpc-js";
import { Command, InvalidArgumentError, Option } from "commander";
import {
  addOptions,
  DEFAULT_PORTS,
  DRAFT_SERVICE_OPTIONS,
  GATEWAY_OPTIONS,
  type ModelServiceConfig,
  omitOptions,
  pickOptions,
  PLACEMENT_OPTIONS,
  readOptions,
  SHARED_OPTION_KEYS,
  TARGET_SERVICE_OPTIONS,
} from "../lib/config.js";
import {
  DECODING_MODE_NAMES,
  type DecodingModeName,
  isDecodingModeName,
  PROTO_MODES,
} from "../lib/decoding_modes.js";
import { CHANNEL_OPTIONS, clientAddress } from "../lib/grpc.js";
import { createLogger, errorMessage } from "../lib/logging.js";
import type { RunningService } from "../lib/model_service.js";
import { cudaDeviceCount } from "../lib/native.js";
import { packageRoot, packageVersion } from "../lib/paths.js";
import { checkDevices, describePlacement } from "../lib/placement.js";
import { SUPERVISED_ENV } from "../lib/service_process.js";
import { FinishReason } from "../proto/gen/pearl/v1/common.js";
import { DecodingMode, GatewayClient, type GenerateRequest } from "../proto/gen/pearl/v1/gateway.js";
import { startDraftService } from "../services/draft/server.js";
import { startGatewayService } from "../services/gateway/server.js";
import { startTargetService } from "../services/target/server.js";
import { formatBench, loadPrompts, runBench } from "./bench.js";
import { ProgressBar } from "./progress.js";
import { readStack, type RunningStack, startLocalStack, startStack } from "./stack.js";

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
  if (process.env[SUPERVISED_ENV] === "1") {
    // Started by a supervisor (pearl serve, a test): its end closes our stdin.
    process.stdin.on("end", stop);
    process.stdin.resume();
  }
}

/** A service started alone takes the GPUs it is given; refuse ones that cannot work before loading. */
function checkServiceDevices(config: ModelServiceConfig): void {
  if (config.devices.length === 0) return;
  checkDevices(config, cudaDeviceCount(), { devices: "--devices", backend: "--backend" });
}

async function startOrExit(start: () => Promise<RunningService>, role: string): Promise<void> {
  try {
    runUntilSignal(await start());
  } catch (error) {
    createLogger(role).error("failed to start", { error: errorMessage(error) });
    process.exit(1);
  }
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

interface GenerateOptions {
  prompt?: string;
  promptIds?: number[];
  mode?: DecodingModeName;
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  seed?: number;
  draftTemperature?: number;
  stop: string[];
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
    mode: options.mode ? PROTO_MODES[options.mode] : DecodingMode.DECODING_MODE_UNSPECIFIED,
    draftTemperature: options.draftTemperature,
    stop: options.stop,
  };
  const stack = options.local
    ? await startLocalStack(values, createLogger("pearl", "warn"), { metrics: false, profileBatchSizes: [1] })
    : undefined;
  try {
    const result = await generateOnce(stack?.gatewayAddress ?? options.gateway, request);
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

/** The settings of the stack that `generate --local` and `bench --local` start for themselves. */
const LOCAL_SERVICE_KEYS = ["modelDir", "backend", "numThreads", "devices", "deterministic"] as const;
const LOCAL_GATEWAY_KEYS = ["lookahead", "verifyWindow", "minGamma", "maxGamma", "sdGamma"] as const;

function addLocalStackOptions(command: Command): void {
  addOptions(command, pickOptions(DRAFT_SERVICE_OPTIONS, LOCAL_SERVICE_KEYS), "draft-");
  addOptions(command, pickOptions(TARGET_SERVICE_OPTIONS, LOCAL_SERVICE_KEYS), "target-");
  addOptions(command, pickOptions(GATEWAY_OPTIONS, LOCAL_GATEWAY_KEYS));
  addOptions(command, PLACEMENT_OPTIONS);
}

const program = new Command("pearl")
  .description("Parallel speculative decoding (PEARL) served as draft, target and gateway gRPC services")
  .version(packageVersion());

const serve = program
  .command("serve")
  .description("run the draft, target and gateway services as child processes");
addOptions(serve, omitOptions(DRAFT_SERVICE_OPTIONS, SHARED_OPTION_KEYS), "draft-");
addOptions(serve, omitOptions(TARGET_SERVICE_OPTIONS, SHARED_OPTION_KEYS), "target-");
addOptions(serve, omitOptions(GATEWAY_OPTIONS, ["draftAddress", "targetAddress"]));
addOptions(serve, PLACEMENT_OPTIONS);
serve.action(async (_options, command: Command) => {
  const logger = createLogger("pearl");
  let stack: RunningStack;
  let host: string;
  try {
    const config = readStack(command.opts());
    host = config.gateway.host;
    const placement = describePlacement({ draft: config.draft.devices, target: config.target.devices });
    logger.info(placement.text, placement.fields);
    stack = await startStack(config, logger, false);
  } catch (error) {
    logger.error("failed to start", { error: errorMessage(error) });
    process.exit(1);
  }
  const { grpcPort, httpPort } = stack.gatewayPorts;
  const openaiApi = httpPort >= 0 ? `http://${clientAddress(host, httpPort)}/v1` : null;
  const grpcAddress = clientAddress(host, grpcPort);
  logger.info(
    openaiApi
      ? `pearl is serving: OpenAI API at ${openaiApi}, gRPC at ${grpcAddress}`
      : `pearl is serving: gRPC at ${grpcAddress}`,
    { openaiApi, grpc: grpcAddress },
  );
  let stopping = false;
  const stop = (code: number): void => {
    if (stopping) return;
    stopping = true;
    void stack.stop().then(() => process.exit(code));
  };
  process.on("SIGINT", () => stop(0));
  process.on("SIGTERM", () => stop(0));
  if (process.env[SUPERVISED_ENV] === "1") {
    process.stdin.on("end", () => stop(0));
    process.stdin.resume();
  }
});

const draft = program.command("draft").description("run the draft service");
addOptions(draft, DRAFT_SERVICE_OPTIONS);
draft.action(async (_options, command: Command) => {
  const config = readOptions(command.opts(), DRAFT_SERVICE_OPTIONS);
  await startOrExit(async () => {
    checkServiceDevices(config);
    return startDraftService(config);
  }, "draft");
});

const target = program.command("target").description("run the target service");
addOptions(target, TARGET_SERVICE_OPTIONS);
target.action(async (_options, command: Command) => {
  const config = readOptions(command.opts(), TARGET_SERVICE_OPTIONS);
  await startOrExit(async () => {
    checkServiceDevices(config);
    return startTargetService(config);
  }, "target");
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
  .addOption(
    new Option("--prompt-ids <ids>", "prompt token ids, comma- or space-separated").argParser(parseTokenIds),
  )
  .addOption(
    new Option("--mode <mode>", "decoding mode (default: the server's)").choices(DECODING_MODE_NAMES),
  )
  .addOption(
    new Option("--max-tokens <n>", "most tokens to generate (default: the server's)").argParser(parseNumber),
  )
  .addOption(
    new Option("--temperature <t>", "sampling temperature, 0 for greedy (default 1)").argParser(parseNumber),
  )
  .addOption(new Option("--top-p <p>", "nucleus sampling mass (default 1)").argParser(parseNumber))
  .addOption(new Option("--top-k <k>", "top-k cut (default none)").argParser(parseNumber))
  .addOption(new Option("--seed <n>", "sampling seed (default random)").argParser(parseNumber))
  .addOption(
    new Option("--draft-temperature <t>", "draft sampling temperature (default: the server's)").argParser(
      parseNumber,
    ),
  )
  .addOption(
    new Option("--stop <text>", "end the output just before this text (repeatable; needs a tokenizer)")
      .argParser((raw: string, previous: string[]) => [...previous, raw])
      .default([]),
  )
  .addOption(
    new Option("--gateway <host:port>", "the gateway to ask")
      .env("PEARL_GATEWAY_ADDRESS")
      .default(`localhost:${DEFAULT_PORTS.gatewayGrpc}`),
  )
  .addOption(new Option("--local", "start draft, target and gateway for this one request").default(false))
  .addOption(new Option("--json", "print tokens, text, finish reason and usage as JSON").default(false));
addLocalStackOptions(generate);
generate.action(async (options: GenerateOptions, command: Command) => {
  try {
    await runGenerate(options, command.opts());
  } catch (error) {
    console.error(`pearl generate: ${errorMessage(error)}`);
    process.exitCode = 1;
  }
});

function parseList<T>(parse: (raw: string) => T): (raw: string) => T[] {
  return (raw) =>
    raw
      .split(",")
      .filter((part) => part.trim() !== "")
      .map((part) => parse(part.trim()));
}

function parsePositiveInteger(raw: string): number {
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 1)
    throw new InvalidArgumentError(`expected a positive integer, got "${raw}"`);
  return value;
}

function parseMode(raw: string): DecodingModeName {
  if (!isDecodingModeName(raw)) throw new InvalidArgumentError(`expected pearl, sd or ar, got "${raw}"`);
  return raw;
}

interface BenchCommandOptions {
  modes: DecodingModeName[];
  concurrency: number[];
  temperatures: number[];
  requests: number;
  rounds: number;
  maxTokens: number;
  prompts: string;
  promptTokens: number;
  gateway: string;
  draftMetrics?: string;
  targetMetrics?: string;
  gatewayMetrics?: string;
  local: boolean;
  json: boolean;
  progress: boolean;
}

const bench = program
  .command("bench")
  .description(
    "measure tokens/s of each decoding mode through a running gateway (or, with --local, a stack of its " +
      "own), with speedups over ar and sd and the analytic ideal for the measured acceptance and step times",
  )
  .addOption(
    new Option("--modes <list>", "modes to measure")
      .argParser(parseList(parseMode))
      .default(["ar", "sd", "pearl"], "ar,sd,pearl"),
  )
  .addOption(
    new Option("--concurrency <list>", "requests in flight at once")
      .argParser(parseList(parsePositiveInteger))
      .default([1, 4, 16, 32], "1,4,16,32"),
  )
  .addOption(
    new Option(
      "--temperatures <list>",
      "sampling temperatures (0: greedy; greedy outputs are compared across modes)",
    )
      .argParser(parseList(parseNumber))
      .default([0, 0.8], "0,0.8"),
  )
  .addOption(
    new Option("--requests <n>", "requests per mode, concurrency and temperature")
      .argParser(parsePositiveInteger)
      .default(128),
  )
  .addOption(
    new Option(
      "--rounds <n>",
      "turns the modes take at each concurrency and temperature, the requests split among them (each at " +
        "least the concurrency): modes that alternate share the machine's quiet and busy moments",
    )
      .argParser(parsePositiveInteger)
      .default(4),
  )
  .addOption(
    new Option("--max-tokens <n>", "tokens per request").argParser(parsePositiveInteger).default(128),
  )
  .addOption(
    new Option("--prompts <file>", "prompts, used in turn, when the server has a tokenizer").default(
      join(packageRoot(), "bench", "heldout_prompts.json"),
      "bench/heldout_prompts.json: held-out code for the embedded pair",
    ),
  )
  .addOption(
    new Option("--prompt-tokens <n>", "prompt length when the server has no tokenizer (random token ids)")
      .argParser(parsePositiveInteger)
      .default(32),
  )
  .addOption(
    new Option("--gateway <host:port>", "the gateway to measure")
      .env("PEARL_GATEWAY_ADDRESS")
      .default(`localhost:${DEFAULT_PORTS.gatewayGrpc}`),
  )
  .addOption(
    new Option("--draft-metrics <url>", "the running draft service's /metrics (adds draft step times)").env(
      "PEARL_DRAFT_METRICS_URL",
    ),
  )
  .addOption(
    new Option(
      "--target-metrics <url>",
      "the running target service's /metrics (adds target step times)",
    ).env("PEARL_TARGET_METRICS_URL"),
  )
  .addOption(
    new Option(
      "--gateway-metrics <url>",
      "the running gateway's /metrics (adds acceptance and windows, and with step times the ideal)",
    ).env("PEARL_GATEWAY_METRICS_URL"),
  )
  .addOption(
    new Option(
      "--local",
      "start draft, target and gateway for the measurement (adds every service's /metrics)",
    ).default(false),
  )
  .addOption(new Option("--json", "print the rows as JSON").default(false))
  .addOption(
    new Option("--no-progress", "no progress bar on stderr (there is none unless it is a terminal)"),
  );
addLocalStackOptions(bench);
bench.action(async (options: BenchCommandOptions, command: Command) => {
  let stack: Awaited<ReturnType<typeof startLocalStack>> | undefined;
  const progress = options.progress && process.stderr.isTTY ? new ProgressBar(process.stderr) : undefined;
  try {
    const prompts = loadPrompts(options.prompts);
    // Inside the try: a stack that cannot start (a missing model, a placement refused) is a message too.
    stack = options.local
      ? await startLocalStack(command.opts(), createLogger("pearl", "warn"), {
          metrics: true,
          profileBatchSizes: [1, 2, 4, 8],
        })
      : undefined;
    const metricsUrl = (port: number | undefined): string | undefined =>
      port !== undefined && port >= 0 ? `http://127.0.0.1:${port}/metrics` : undefined;
    const { rows, outputsAgree } = await runBench(
      stack?.gatewayAddress ?? options.gateway,
      {
        modes: options.modes,
        concurrencies: options.concurrency,
        temperatures: options.temperatures,
        requests: options.requests,
        rounds: options.rounds,
        maxTokens: options.maxTokens,
        prompts,
        promptTokens: options.promptTokens,
      },
      stack
        ? {
            draft: metricsUrl(stack.draftPorts.httpPort),
            target: metricsUrl(stack.targetPorts.httpPort),
            gateway: metricsUrl(stack.gatewayPorts.httpPort),
          }
        : { draft: options.draftMetrics, target: options.targetMetrics, gateway: options.gatewayMetrics },
      (done, total, label) => progress?.update(done, total, label),
    );
    progress?.finish();
    console.log(options.json ? JSON.stringify(rows) : formatBench(rows));
    if (!outputsAgree) {
      console.error("pearl bench: greedy outputs differ between modes");
      process.exitCode = 1;
    }
  } catch (error) {
    progress?.finish();
    console.error(`pearl bench: ${errorMessage(error)}`);
    process.exitCode = 1;
  } finally {
    await stack?.stop();
  }
});

await program.parseAsync();
