// `pearl bench`: throughput of each decoding mode at given concurrencies, through the gateway's gRPC API
// as a client sees it. Every mode gets the same prompts, so at temperature 0 the outputs must be the same
// token for token (checked). With the services' /metrics at hand (a local stack), it also splits the time
// per target step into the engine's own step and what the gateway, gRPC and waiting for drafts add.
import { credentials } from "@grpc/grpc-js";
import { type DecodingModeName, PROTO_MODES } from "../lib/decoding_modes.js";
import { CHANNEL_OPTIONS } from "../lib/grpc.js";
import { sampleValue } from "../lib/metrics.js";
import { FinishReason, type ServiceInfo } from "../proto/gen/pearl/v1/common.js";
import {
  GatewayClient,
  type GatewayInfo,
  type GenerateRequest,
  type GenerateResponse,
} from "../proto/gen/pearl/v1/gateway.js";

export interface BenchOptions {
  modes: DecodingModeName[];
  concurrencies: number[];
  requests: number;
  maxTokens: number;
  temperature: number;
  /** Prompt length in tokens when the server has no tokenizer (random ids then). */
  promptTokens: number;
}

export interface BenchRow {
  mode: DecodingModeName;
  concurrency: number;
  requests: number;
  tokens: number;
  seconds: number;
  tokensPerSecond: number;
  /** Tokens per target step. */
  meanAcceptedLength: number;
  /** Accepted / proposed draft tokens. */
  acceptance: number;
  meanTtftMs: number;
  /** From the target's /metrics, when known. */
  targetStepMs?: number;
  /** Wall time per target step, minus the engine's step: gateway, gRPC and waiting for drafts. */
  overheadPerTargetStepMs?: number;
  draftStepMs?: number;
}

/** Code prompts for a pair that has a tokenizer (the embedded pair completes Python). */
const CODE_PROMPTS = [
  "def fibonacci(n):\n",
  "import os\nimport sys\n\n\ndef main():\n",
  "class Node:\n    def __init__(self, value):\n",
  "for i in range(10):\n",
  "    def __repr__(self):\n",
  "with open(path) as f:\n",
  "try:\n    import numpy as np\nexcept ImportError:\n",
  "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
];

interface Outcome {
  tokenIds: number[];
  targetSteps: number;
  draftTokens: number;
  acceptedTokens: number;
  ttftMs: number;
}

function generate(client: GatewayClient, request: GenerateRequest): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    let ttftMs = -1;
    const tokenIds: number[] = [];
    let last: GenerateResponse | undefined;
    const call = client.generate(request);
    call.on("data", (response: GenerateResponse) => {
      if (ttftMs < 0 && response.tokenIds.length > 0) ttftMs = performance.now() - started;
      tokenIds.push(...response.tokenIds);
      if (response.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) last = response;
    });
    call.on("error", reject);
    call.on("end", () => {
      const usage = last?.usage;
      if (!usage) return reject(new Error("a response stream ended without usage"));
      resolve({
        tokenIds,
        targetSteps: usage.targetSteps,
        draftTokens: usage.draftTokens,
        acceptedTokens: usage.acceptedTokens,
        ttftMs,
      });
    });
  });
}

function gatewayInfo(client: GatewayClient): Promise<GatewayInfo> {
  return new Promise((resolve, reject) =>
    client.info({}, (error, info) => (error ? reject(error) : resolve(info))),
  );
}

function prompts(
  info: GatewayInfo,
  promptTokens: number,
): Pick<GenerateRequest, "prompt" | "promptTokenIds">[] {
  if (info.hasTokenizer) return CODE_PROMPTS.map((prompt) => ({ prompt, promptTokenIds: [] }));
  const vocab = (info.target as ServiceInfo | undefined)?.model?.vocabSize ?? 2;
  let state = 12345;
  const next = (): number => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state;
  };
  return Array.from({ length: 8 }, () => ({
    prompt: "",
    promptTokenIds: Array.from({ length: promptTokens }, () => next() % vocab),
  }));
}

async function scrape(port: number | undefined): Promise<string | undefined> {
  if (port === undefined || port < 0) return undefined;
  return (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
}

function engineSteps(
  before: string | undefined,
  after: string | undefined,
): { steps: number; seconds: number } {
  if (!before || !after) return { steps: 0, seconds: 0 };
  const delta = (name: string): number => sampleValue(after, name) - sampleValue(before, name);
  return {
    steps: delta("pearl_engine_step_duration_seconds_count"),
    seconds: delta("pearl_engine_step_duration_seconds_sum"),
  };
}

export async function runBench(
  address: string,
  options: BenchOptions,
  metricsPorts: { draft?: number; target?: number } = {},
): Promise<{ rows: BenchRow[]; outputsAgree: boolean }> {
  const client = new GatewayClient(address, credentials.createInsecure(), CHANNEL_OPTIONS);
  try {
    const info = await gatewayInfo(client);
    const promptSet = prompts(info, options.promptTokens);
    const requestFor = (index: number, mode: DecodingModeName, maxTokens: number): GenerateRequest => ({
      requestId: "",
      stop: [],
      ...promptSet[index % promptSet.length]!,
      maxTokens,
      temperature: options.temperature,
      seed: index,
      mode: PROTO_MODES[mode],
    });
    const rows: BenchRow[] = [];
    const outputs = new Map<string, string>();
    let outputsAgree = true;
    for (const concurrency of options.concurrencies) {
      for (const mode of options.modes) {
        // One short request first: connections, first-step costs.
        await generate(client, requestFor(0, mode, 8));
        const [targetBefore, draftBefore] = await Promise.all([
          scrape(metricsPorts.target),
          scrape(metricsPorts.draft),
        ]);
        const count = Math.max(options.requests, concurrency);
        const outcomes: Outcome[] = new Array<Outcome>(count);
        let next = 0;
        const started = performance.now();
        await Promise.all(
          Array.from({ length: concurrency }, async () => {
            while (next < count) {
              const index = next++;
              outcomes[index] = await generate(client, requestFor(index, mode, options.maxTokens));
            }
          }),
        );
        const seconds = (performance.now() - started) / 1000;
        const [targetAfter, draftAfter] = await Promise.all([
          scrape(metricsPorts.target),
          scrape(metricsPorts.draft),
        ]);
        outcomes.forEach((outcome, index) => {
          const key = `${concurrency}:${index}`;
          const tokens = outcome.tokenIds.join(",");
          const seen = outputs.get(key);
          if (seen === undefined) outputs.set(key, tokens);
          else if (seen !== tokens && options.temperature === 0) outputsAgree = false;
        });
        const sum = (pick: (o: Outcome) => number): number =>
          outcomes.reduce((total, o) => total + pick(o), 0);
        const tokens = sum((o) => o.tokenIds.length);
        const drafted = sum((o) => o.draftTokens);
        const target = engineSteps(targetBefore, targetAfter);
        const draft = engineSteps(draftBefore, draftAfter);
        rows.push({
          mode,
          concurrency,
          requests: count,
          tokens,
          seconds,
          tokensPerSecond: tokens / seconds,
          meanAcceptedLength: tokens / sum((o) => o.targetSteps),
          acceptance: drafted > 0 ? sum((o) => o.acceptedTokens) / drafted : 0,
          meanTtftMs: sum((o) => o.ttftMs) / count,
          ...(target.steps > 0
            ? {
                targetStepMs: (1000 * target.seconds) / target.steps,
                overheadPerTargetStepMs: (1000 * (seconds - target.seconds)) / target.steps,
              }
            : {}),
          ...(draft.steps > 0 ? { draftStepMs: (1000 * draft.seconds) / draft.steps } : {}),
        });
      }
    }
    return { rows, outputsAgree };
  } finally {
    client.close();
  }
}

export function formatBench(rows: BenchRow[]): string {
  const header = [
    "concurrency",
    "mode",
    "tokens/s",
    "tokens/step",
    "acceptance",
    "TTFT ms",
    "target step ms",
    "overhead/step ms",
    "draft step ms",
  ];
  const fixed = (value: number | undefined, digits: number): string =>
    value === undefined ? "-" : value.toFixed(digits);
  const lines = rows.map((row) => [
    String(row.concurrency),
    row.mode,
    fixed(row.tokensPerSecond, 0),
    fixed(row.meanAcceptedLength, 2),
    row.mode === "ar" ? "-" : fixed(row.acceptance, 2),
    fixed(row.meanTtftMs, 1),
    fixed(row.targetStepMs, 2),
    fixed(row.overheadPerTargetStepMs, 2),
    fixed(row.draftStepMs, 2),
  ]);
  const widths = header.map((title, column) =>
    Math.max(title.length, ...lines.map((line) => line[column]!.length)),
  );
  return [header, ...lines]
    .map((line) => line.map((cell, column) => cell.padStart(widths[column]!)).join("  "))
    .join("\n");
}
