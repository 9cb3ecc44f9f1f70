// The soak (`npm run soak -- --minutes 30`): `pearl serve` on the embedded CPU pair, kept under a steady
// load of concurrent streaming requests (REST server-sent events and gRPC streams) of mixed prompt and
// output lengths, modes and temperatures, a fraction of them cancelled mid-stream by their client. It
// records every request and, once a minute, the latency percentiles, throughput, each service's resident
// memory and KV blocks in use. It fails (exit 1) on any error the load did not cause itself, on greedy
// output that changes between two requests alike, or on KV left over once the load stops.
//
//   npm run soak -- [--minutes 30] [--concurrency 32] [--cancel-fraction 0.1] [--seed 1] [--out file.json]
import { readFileSync, writeFileSync } from "node:fs";
import { Agent, request as httpRequest } from "node:http";
import os from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { credentials } from "@grpc/grpc-js";
import { CHANNEL_OPTIONS } from "../lib/grpc.js";
import { sampleValue } from "../lib/metrics.js";
import { packageRoot } from "../lib/paths.js";
import { spawnService } from "../lib/service_process.js";
import { TextTokenizer } from "../lib/tokenizer.js";
import { FinishReason } from "../proto/gen/pearl/v1/common.js";
import { DecodingMode, GatewayClient, type GenerateResponse } from "../proto/gen/pearl/v1/gateway.js";

const { values: args } = parseArgs({
  options: {
    minutes: { type: "string", default: "30" },
    concurrency: { type: "string", default: "32" },
    "cancel-fraction": { type: "string", default: "0.1" },
    seed: { type: "string", default: "1" },
    out: { type: "string" },
  },
});
const minutes = Number(args.minutes);
const concurrency = Number(args.concurrency);
const cancelFraction = Number(args["cancel-fraction"]);
if (
  !(minutes > 0) ||
  !Number.isInteger(concurrency) ||
  concurrency < 1 ||
  !(cancelFraction >= 0 && cancelFraction < 1)
) {
  throw new Error("--minutes > 0, --concurrency a positive integer, --cancel-fraction in [0, 1)");
}

let randomState = Number(args.seed) >>> 0 || 1;
function random(): number {
  randomState = (Math.imul(randomState, 1664525) + 1013904223) >>> 0;
  return randomState / 4294967296;
}
const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)]!;

// ---- the stack ----------------------------------------------------------------------------------------

interface Service {
  pid: number;
  grpcPort: number;
  httpPort: number;
}

const services: Partial<Record<"draft" | "target" | "gateway", Service>> = {};
const unexpectedLines: string[] = [];
let gatewayUp: () => void = () => undefined;
const gatewayListening = new Promise<void>((resolve) => (gatewayUp = resolve));
const serve = spawnService(
  [
    "serve",
    ...["--port", "0", "--http-port", "0", "--log-level", "warn"],
    ...["--draft-port", "0", "--draft-http-port", "0", "--draft-threads", "1"],
    ...["--target-port", "0", "--target-http-port", "0", "--target-threads", "1"],
  ],
  {
    stderr: "pipe",
    onLine: (line) => {
      const record = parseJson(line);
      if (record?.message === "listening") {
        const role = record.service as "draft" | "target" | "gateway";
        services[role] = {
          pid: record.pid as number,
          grpcPort: record.grpcPort as number,
          httpPort: record.httpPort as number,
        };
        if (role === "gateway") gatewayUp();
      } else if (record?.level === "error" || record?.level === "warn") {
        unexpectedLines.push(line);
      }
    },
  },
);
serve.child.stderr?.on("data", (chunk: Buffer) => process.stderr.write(chunk));

function parseJson(line: string): Record<string, unknown> | undefined {
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

function rssMiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const match = /VmRSS:\s+(\d+) kB/.exec(status);
  return match ? Number(match[1]) / 1024 : Number.NaN;
}

async function metrics(role: "draft" | "target" | "gateway"): Promise<string> {
  const response = await fetch(`http://127.0.0.1:${services[role]!.httpPort}/metrics`);
  return response.text();
}

// ---- the load -----------------------------------------------------------------------------------------

const tokenizer = TextTokenizer.load(join(packageRoot(), "models", "target"))!;
const CONTEXT = 512;
const PROMPTS = [
  "def fibonacci(n):\n",
  "import os\nimport sys\n\n\ndef main():\n",
  "class Node:\n    def __init__(self, value):\n",
  readFileSync(join(packageRoot(), "lib", "tokenizer.ts"), "utf8").slice(0, 600),
  readFileSync(join(packageRoot(), "services", "gateway", "stop_strings.ts"), "utf8").slice(0, 1200),
].map((text) => ({ text, tokens: tokenizer.encode(text).length }));
const MAX_TOKENS = [8, 32, 96, 192, 320];
const MODES = ["pearl", "pearl", "pearl", "sd", "ar"] as const;
const PROTO_MODES = {
  pearl: DecodingMode.DECODING_MODE_PEARL,
  sd: DecodingMode.DECODING_MODE_SD,
  ar: DecodingMode.DECODING_MODE_AR,
};

interface Outcome {
  api: "rest" | "grpc";
  startedAt: number;
  endedAt: number;
  ttftMs: number | undefined;
  tokens: number;
  kind: "ok" | "cancelled" | "error";
  error?: string;
  /** Greedy, finished: what the same request must produce every time. */
  greedyKey?: string;
  output?: string;
  speculated?: boolean;
}

const outcomes: Outcome[] = [];
const greedyOutputs = new Map<string, string>();
const mismatches: string[] = [];
const agent = new Agent({ keepAlive: true, maxSockets: concurrency * 2 });
let grpcClient: GatewayClient;

interface Plan {
  prompt: (typeof PROMPTS)[number];
  maxTokens: number;
  mode: (typeof MODES)[number];
  temperature: number;
  cancelAfterMs: number | undefined;
}

function plan(): Plan {
  const prompt = pick(PROMPTS);
  const maxTokens = Math.min(pick(MAX_TOKENS), CONTEXT - 1 - prompt.tokens);
  return {
    prompt,
    maxTokens,
    mode: pick(MODES),
    temperature: random() < 0.6 ? 0 : 0.8,
    cancelAfterMs: random() < cancelFraction ? 20 + random() * 1500 : undefined,
  };
}

function restRequest(p: Plan): Promise<Outcome> {
  const startedAt = performance.now();
  return new Promise((resolve) => {
    let ttftMs: number | undefined;
    let tokens = 0;
    let text = "";
    let error: string | undefined;
    let speculated = false;
    let cancelled = false;
    let pending = "";
    const body = JSON.stringify({
      model: "pearl-code",
      prompt: p.prompt.text,
      max_tokens: p.maxTokens,
      temperature: p.temperature,
      decoding: p.mode,
      stream: true,
      stream_options: { include_usage: true },
    });
    const outgoing = httpRequest(
      {
        host: "127.0.0.1",
        port: services.gateway!.httpPort,
        path: "/v1/completions",
        method: "POST",
        agent,
        headers: { "content-type": "application/json" },
      },
      (response) => {
        if (response.statusCode !== 200) error = `HTTP ${response.statusCode}`;
        response.on("data", (chunk: Buffer) => {
          pending += chunk.toString("utf8");
          const lines = pending.split("\n");
          pending = lines.pop()!;
          for (const line of lines) {
            if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
            const event = JSON.parse(line.slice(6)) as {
              error?: { message: string };
              choices: { text: string }[];
              usage: { completion_tokens: number; draft_tokens: number } | null;
            };
            if (event.error) error = event.error.message;
            else if (event.usage) {
              tokens = event.usage.completion_tokens;
              speculated = event.usage.draft_tokens > 0;
            } else if (event.choices[0]!.text !== "") {
              ttftMs ??= performance.now() - startedAt;
              text += event.choices[0]!.text;
            }
          }
        });
        response.on("close", () =>
          resolve(
            finish(
              "rest",
              p,
              startedAt,
              ttftMs,
              tokens,
              cancelled,
              error ?? (response.complete ? undefined : "the stream broke off"),
              text,
              speculated,
            ),
          ),
        );
      },
    );
    outgoing.on("error", (failure) => {
      if (!cancelled)
        resolve(finish("rest", p, startedAt, ttftMs, tokens, false, failure.message, text, speculated));
      else resolve(finish("rest", p, startedAt, ttftMs, tokens, true, undefined, text, speculated));
    });
    if (p.cancelAfterMs !== undefined) {
      setTimeout(() => {
        cancelled = true;
        outgoing.destroy();
      }, p.cancelAfterMs);
    }
    outgoing.end(body);
  });
}

function grpcRequest(p: Plan): Promise<Outcome> {
  const startedAt = performance.now();
  return new Promise((resolve) => {
    let ttftMs: number | undefined;
    let tokens = 0;
    let ids: number[] = [];
    let speculated = false;
    let cancelled = false;
    let settled = false;
    const done = (error: string | undefined): void => {
      if (settled) return;
      settled = true;
      resolve(finish("grpc", p, startedAt, ttftMs, tokens, cancelled, error, ids.join(","), speculated));
    };
    const call = grpcClient.generate({
      requestId: "",
      prompt: p.prompt.text,
      promptTokenIds: [],
      maxTokens: p.maxTokens,
      temperature: p.temperature,
      mode: PROTO_MODES[p.mode],
      stop: [],
    });
    call.on("data", (response: GenerateResponse) => {
      if (response.tokenIds.length > 0) ttftMs ??= performance.now() - startedAt;
      ids = ids.concat(response.tokenIds);
      tokens += response.tokenIds.length;
      if (response.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED)
        speculated = (response.usage?.draftTokens ?? 0) > 0;
    });
    call.on("error", (error: Error) => done(cancelled ? undefined : error.message));
    call.on("end", () => done(undefined));
    if (p.cancelAfterMs !== undefined) {
      setTimeout(() => {
        cancelled = true;
        call.cancel();
      }, p.cancelAfterMs);
    }
  });
}

function finish(
  api: "rest" | "grpc",
  p: Plan,
  startedAt: number,
  ttftMs: number | undefined,
  tokens: number,
  cancelled: boolean,
  error: string | undefined,
  output: string,
  speculated: boolean,
): Outcome {
  const endedAt = performance.now();
  if (cancelled) return { api, startedAt, endedAt, ttftMs, tokens, kind: "cancelled" };
  if (error !== undefined) return { api, startedAt, endedAt, ttftMs, tokens, kind: "error", error };
  const outcome: Outcome = { api, startedAt, endedAt, ttftMs, tokens, kind: "ok", speculated };
  if (p.temperature === 0) {
    // Greedy output depends on the prompt and length only: not on the mode, the batch, or the hour.
    const key = `${api}|${PROMPTS.indexOf(p.prompt)}|${p.maxTokens}`;
    const seen = greedyOutputs.get(key);
    if (seen === undefined) greedyOutputs.set(key, output);
    else if (seen !== output) mismatches.push(`${key} (${p.mode})`);
  }
  return outcome;
}

// ---- measurement --------------------------------------------------------------------------------------

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

interface Minute {
  minute: number;
  finished: number;
  cancelled: number;
  errors: number;
  tokensPerSecond: number;
  e2eP50Ms: number;
  e2eP99Ms: number;
  ttftP50Ms: number;
  ttftP99Ms: number;
  speculatedShare: number;
  rssMiB: Record<string, number>;
  kvBlocksUsed: { draft: number; target: number };
  healthy: boolean;
}

async function snapshot(minute: number, from: number, to: number): Promise<Minute> {
  const window = outcomes.filter((outcome) => outcome.endedAt >= from && outcome.endedAt < to);
  const ok = window.filter((outcome) => outcome.kind === "ok");
  const e2e = ok.map((outcome) => outcome.endedAt - outcome.startedAt).sort((a, b) => a - b);
  const ttft = ok
    .flatMap((outcome) => (outcome.ttftMs === undefined ? [] : [outcome.ttftMs]))
    .sort((a, b) => a - b);
  const [draftMetrics, targetMetrics] = await Promise.all([metrics("draft"), metrics("target")]);
  const health = await fetch(`http://127.0.0.1:${services.gateway!.httpPort}/health`);
  return {
    minute,
    finished: ok.length,
    cancelled: window.filter((outcome) => outcome.kind === "cancelled").length,
    errors: window.filter((outcome) => outcome.kind === "error").length,
    tokensPerSecond: window.reduce((sum, outcome) => sum + outcome.tokens, 0) / ((to - from) / 1000),
    e2eP50Ms: percentile(e2e, 50),
    e2eP99Ms: percentile(e2e, 99),
    ttftP50Ms: percentile(ttft, 50),
    ttftP99Ms: percentile(ttft, 99),
    speculatedShare: ok.length > 0 ? ok.filter((outcome) => outcome.speculated).length / ok.length : 0,
    rssMiB: Object.fromEntries(
      (["draft", "target", "gateway"] as const).map((role) => [
        role,
        Number(rssMiB(services[role]!.pid).toFixed(1)),
      ]),
    ),
    kvBlocksUsed: {
      draft: sampleValue(draftMetrics, "pearl_kv_cache_blocks", { state: "used" }),
      target: sampleValue(targetMetrics, "pearl_kv_cache_blocks", { state: "used" }),
    },
    healthy: health.status === 200,
  };
}

function fmt(value: number, digits = 0): string {
  return Number.isFinite(value) ? value.toFixed(digits) : "-";
}

function row(m: Minute): string {
  return (
    `| ${m.minute} | ${m.finished} | ${m.cancelled} | ${m.errors} | ${fmt(m.tokensPerSecond)} | ` +
    `${fmt(m.ttftP50Ms)} / ${fmt(m.ttftP99Ms)} | ${fmt(m.e2eP50Ms)} / ${fmt(m.e2eP99Ms)} | ` +
    `${fmt(m.speculatedShare * 100)}% | ${m.rssMiB.draft} / ${m.rssMiB.target} / ${m.rssMiB.gateway} | ` +
    `${m.kvBlocksUsed.draft} / ${m.kvBlocksUsed.target} |`
  );
}

/** Sessions and KV blocks in use on draft and target, polled until both are zero (or 10 s passed). */
async function kvRelease(): Promise<{
  kvAfter: Record<"draft" | "target", { sessions: number; blocksUsed: number }>;
  kvReleasedMs: number | null;
}> {
  const started = performance.now();
  for (;;) {
    const [draftMetrics, targetMetrics] = await Promise.all([metrics("draft"), metrics("target")]);
    const held = (text: string) => ({
      sessions: sampleValue(text, "pearl_sessions_active_sessions"),
      blocksUsed: sampleValue(text, "pearl_kv_cache_blocks", { state: "used" }),
    });
    const kvAfter = { draft: held(draftMetrics), target: held(targetMetrics) };
    const free = Object.values(kvAfter).every(
      (service) => service.sessions === 0 && service.blocksUsed === 0,
    );
    const elapsed = performance.now() - started;
    if (free) return { kvAfter, kvReleasedMs: Math.round(elapsed) };
    if (elapsed > 10_000) return { kvAfter, kvReleasedMs: null };
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

// ---- run ----------------------------------------------------------------------------------------------

async function main(): Promise<number> {
  const startupTimer = setTimeout(() => {
    console.error("pearl serve did not start within 120 s");
    process.exit(1);
  }, 120_000);
  await gatewayListening;
  clearTimeout(startupTimer);
  grpcClient = new GatewayClient(
    `127.0.0.1:${services.gateway!.grpcPort}`,
    credentials.createInsecure(),
    CHANNEL_OPTIONS,
  );
  const rssAtStart = Object.fromEntries(
    (["draft", "target", "gateway"] as const).map((role) => [
      role,
      Number(rssMiB(services[role]!.pid).toFixed(1)),
    ]),
  );
  console.log(
    `soak: ${minutes} min, ${concurrency} concurrent streams, ${cancelFraction * 100}% cancelled; ` +
      `${os.cpus().length} cores, Node ${process.version}; RSS at start (MiB) ${JSON.stringify(rssAtStart)}`,
  );
  console.log(
    "| minute | finished | cancelled | errors | tokens/s | TTFT p50 / p99 ms | e2e p50 / p99 ms | speculated | RSS MiB draft / target / gateway | KV used draft / target |",
  );
  console.log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");

  const started = performance.now();
  const deadline = started + minutes * 60_000;
  const workers = Array.from({ length: concurrency }, async (_, worker) => {
    while (performance.now() < deadline) {
      const p = plan();
      // A third of the streams speak gRPC, the rest REST.
      outcomes.push(await (worker % 3 === 0 ? grpcRequest(p) : restRequest(p)));
    }
  });
  const perMinute: Minute[] = [];
  const ticker = (async () => {
    for (let minute = 1; started + minute * 60_000 <= deadline + 1; minute++) {
      await new Promise((resolve) => setTimeout(resolve, started + minute * 60_000 - performance.now()));
      const m = await snapshot(minute, started + (minute - 1) * 60_000, started + minute * 60_000);
      perMinute.push(m);
      console.log(row(m));
    }
  })();
  await Promise.all(workers);
  await ticker;

  // Once the load is gone, both services must be back to no session and no KV block in use.
  const { kvAfter, kvReleasedMs } = await kvRelease();
  const rssAtEnd = Object.fromEntries(
    (["draft", "target", "gateway"] as const).map((role) => [
      role,
      Number(rssMiB(services[role]!.pid).toFixed(1)),
    ]),
  );
  grpcClient.close();
  agent.destroy();
  serve.child.kill("SIGTERM");
  const exitCode = await serve.exited;

  const errors = outcomes.filter((outcome) => outcome.kind === "error");
  const ok = outcomes.filter((outcome) => outcome.kind === "ok");
  const all = ok.map((outcome) => outcome.endedAt - outcome.startedAt).sort((a, b) => a - b);
  const summary = {
    date: new Date().toISOString(),
    machine: `${os.cpus().length} × ${os.cpus()[0]?.model ?? "cpu"}, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, ${os.platform()} ${os.release()}`,
    node: process.version,
    command: `npm run soak -- --minutes ${minutes} --concurrency ${concurrency} --cancel-fraction ${cancelFraction} --seed ${args.seed}`,
    requests: outcomes.length,
    finished: ok.length,
    cancelled: outcomes.filter((outcome) => outcome.kind === "cancelled").length,
    unexpectedErrors: errors.length,
    errorSamples: [...new Set(errors.map((outcome) => outcome.error))].slice(0, 10),
    greedyKeys: greedyOutputs.size,
    greedyMismatches: mismatches,
    tokens: outcomes.reduce((sum, outcome) => sum + outcome.tokens, 0),
    e2eP50Ms: percentile(all, 50),
    e2eP99Ms: percentile(all, 99),
    rssAtStart,
    rssAtEnd,
    kvAfter,
    kvReleasedMs,
    warnOrErrorLogLines: unexpectedLines.slice(0, 20),
    servePid: serve.child.pid,
    serveExitCode: exitCode,
    perMinute,
  };
  console.log(JSON.stringify({ ...summary, perMinute: undefined }, null, 2));
  if (args.out) writeFileSync(args.out, JSON.stringify(summary, null, 2) + "\n");
  const failed = errors.length > 0 || mismatches.length > 0 || kvReleasedMs === null || exitCode !== 0;
  return failed ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    console.error(error);
    serve.child.kill("SIGKILL");
    process.exit(1);
  },
);
