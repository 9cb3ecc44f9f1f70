// CUDA backend benchmark (`npm run bench:gpu -- --models DIR[,DIR...]`), through the same Engine API the
// services use, so every figure includes the host side of a step (metadata upload, logits copy-back and
// sampling on the host). Per model: checkpoint load time; per-token decode latency at several batch
// sizes, one step at a time and pipelined (each step queued before the one it feeds settles); the cost of
// verify windows of 2, 4, 8 and 16 tokens relative to one decode step; prefill tokens/s; and each decode
// figure as a fraction of the bandwidth floor (bytes read per step over the card's measured read
// bandwidth, taken from tools/make_shapes.py's --baseline-json when given). With --sampling, the same
// decode and an 8-token verify window under each sampling setting, against greedy in the same run: what
// picking tokens with top-k/top-p cuts and weighing sampled drafts costs.
//
//   npm run bench:gpu -- --models /tmp/shapes/llama-3.2-1b,/tmp/shapes/llama-3.1-8b \
//     [--baseline hf_baseline.json] [--json out.json] [--batch 1,4,16,64] [--steps 32] \
//     [--prompt-length 128] [--prefill-length 2048] [--variants default,no-graphs,deterministic,tiles4,no-pdl]
//     [--sampling greedy,whole,top-p,top-k,top-k-top-p,draft-q16,draft-q16-top-p] [--tp 1,2,4]
//
// --tp runs each model tensor-parallel over GPUs 0..k-1 for each k listed (a size the machine lacks GPUs for
// is skipped with a note); its floor is the bytes each GPU reads over the bandwidth plus two all-reduces of the
// residual stream per layer, each timed alone (measureAllReduce).
import { readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { parseArgs } from "node:util";

import {
  cudaDeviceCount,
  type DraftDistribution,
  Engine,
  measureAllReduce,
  type ModelInfo,
  type SamplingParams,
} from "../lib/native.js";

function positiveIntegers(name: string, value: string): number[] {
  const numbers = value.split(",").map(Number);
  if (numbers.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new Error(`--${name} must be a comma list of positive integers, got ${value}`);
  }
  return numbers;
}

const { values: args } = parseArgs({
  options: {
    models: { type: "string" },
    baseline: { type: "string" },
    json: { type: "string" },
    batch: { type: "string", default: "1,4,16,64" },
    windows: { type: "string", default: "2,4,8,16" },
    steps: { type: "string", default: "32" },
    "prompt-length": { type: "string", default: "128" },
    "prefill-length": { type: "string", default: "2048" },
    variants: { type: "string", default: "default" },
    sampling: { type: "string", default: "" },
    tp: { type: "string", default: "1" },
  },
});
if (!args.models)
  throw new Error("--models DIR[,DIR...] is required (checkpoints from tools/make_shapes.py)");
const modelDirs = args.models.split(",").filter((dir) => dir.length > 0);
const batchSizes = positiveIntegers("batch", args.batch);
const windowSizes = positiveIntegers("windows", args.windows);
const [steps] = positiveIntegers("steps", args.steps);
const [promptLength] = positiveIntegers("prompt-length", args["prompt-length"]);
const [prefillLength] = positiveIntegers("prefill-length", args["prefill-length"]);
const tensorParallelSizes = positiveIntegers("tp", args.tp);
/** What a variant changes: the engine's deterministic option and the environment the engine loads in. */
interface VariantSetup {
  deterministic: boolean;
  env: Record<string, string>;
}
const VARIANTS = {
  default: { deterministic: false, env: {} },
  "no-graphs": { deterministic: false, env: { PEARL_CUDA_GRAPHS: "0" } },
  deterministic: { deterministic: true, env: {} },
  // Every matrix on the widest skinny-GEMM launch shape: the same-run baseline for the per-shape tuning.
  tiles4: { deterministic: false, env: { PEARL_CUDA_SKINNY_VARIANT: "tiles4" } },
  // GEMMs launched after the kernel before them ends, not overlapping it.
  "no-pdl": { deterministic: false, env: { PEARL_CUDA_PDL: "0" } },
} satisfies Record<string, VariantSetup>;
type Variant = keyof typeof VARIANTS;
const variants = args.variants.split(",").map((name) => {
  if (!(name in VARIANTS))
    throw new Error(`--variants: unknown ${name} (known: ${Object.keys(VARIANTS).join(", ")})`);
  return name as Variant;
});

const GREEDY: SamplingParams = { temperature: 0, topK: 0, topP: 1, seed: 0 };
const T08: SamplingParams = { temperature: 0.8, topK: 0, topP: 1, seed: 7 };
/** How the timed steps sample; returnTopK makes them drafting steps (a drafting service's q of k entries). */
interface SamplingSetup {
  sampling: SamplingParams;
  returnTopK?: number;
}
const SAMPLING_SETTINGS = {
  greedy: { sampling: GREEDY },
  whole: { sampling: T08 },
  "top-p": { sampling: { ...T08, topP: 0.9 } },
  "top-k": { sampling: { ...T08, topK: 50 } },
  "top-k-top-p": { sampling: { ...T08, topK: 50, topP: 0.9 } },
  "draft-q16": { sampling: T08, returnTopK: 16 },
  "draft-q16-top-p": { sampling: { ...T08, topP: 0.9 }, returnTopK: 16 },
} satisfies Record<string, SamplingSetup>;
type SamplingSetting = keyof typeof SAMPLING_SETTINGS;
const samplingSettings = args.sampling
  .split(",")
  .filter((name) => name.length > 0)
  .map((name) => {
    if (!(name in SAMPLING_SETTINGS))
      throw new Error(`--sampling: unknown ${name} (known: ${Object.keys(SAMPLING_SETTINGS).join(", ")})`);
    return name as SamplingSetting;
  });

interface Baseline {
  device?: string;
  bandwidth?: { read_bytes_per_s: number; copy_bytes_per_s: number };
  shapes?: Record<string, { hf_eager_ms_per_token?: Record<string, number> }>;
}
const baseline: Baseline = args.baseline ? (JSON.parse(readFileSync(args.baseline, "utf8")) as Baseline) : {};
const readBandwidth = baseline.bandwidth?.read_bytes_per_s;

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

function tokens(count: number, seed: number, vocab: number): Int32Array {
  return Int32Array.from({ length: count }, (_, i) => (seed * 7919 + i * 104729 + 13) % vocab);
}

async function timed<T>(body: () => Promise<T>): Promise<[T, number]> {
  const start = process.hrtime.bigint();
  const value = await body();
  return [value, Number(process.hrtime.bigint() - start) / 1e6];
}

/** Bytes a decode step must read on each of `ranks` GPUs: every weight once (the lm_head included, the
 * embedding table only when it is the lm_head) plus the KV of every row's context, split evenly. */
function bytesPerStep(dir: string, info: ModelInfo, batch: number, context: number, ranks: number): number {
  const config = JSON.parse(readFileSync(join(dir, "config.json"), "utf8")) as {
    tie_word_embeddings?: boolean;
  };
  const embedding = info.vocabSize * info.hiddenSize;
  const readParameters = info.numParameters - (config.tie_word_embeddings ? 0 : embedding);
  const kvPerToken = 2 * info.numLayers * info.numKvHeads * info.headDim * 2;
  return (readParameters * 2 + batch * context * kvPerToken) / ranks;
}

interface DecodeResult {
  batch: number;
  msPerStep: number;
  tokensPerS: number;
  /** Steps queued behind the one in flight (feedNextToken). */
  pipelinedMsPerStep: number;
  pipelinedTokensPerS: number;
  floorMs?: number;
  /** TP > 1: one all-reduce of the step's residual stream, measured alone (the floor counts two a layer). */
  allReduceUs?: number;
  fractionOfFloor?: number;
  pipelinedFractionOfFloor?: number;
}

async function decode(
  engine: Engine,
  dir: string,
  batch: number,
  ranks: number,
  { sampling, returnTopK }: SamplingSetup = SAMPLING_SETTINGS.greedy,
): Promise<DecodeResult> {
  const vocab = engine.info.vocabSize;
  const ids = Array.from({ length: batch }, (_, i) => 10_000 + i);
  for (const seqId of ids) await engine.addSequence(seqId);
  const prefill = await engine.step(
    ids.map((seqId) => ({ seqId, tokens: tokens(promptLength!, seqId, vocab) })),
  );
  let next = prefill.map((result) => result.nextToken);
  const times: number[] = [];
  for (let s = 0; s < steps! + 2; s++) {
    const [results, ms] = await timed(() =>
      engine.step(ids.map((seqId, i) => ({ seqId, tokens: Int32Array.of(next[i]!), sampling, returnTopK }))),
    );
    next = results.map((result) => result.nextToken);
    if (s >= 2) times.push(ms); // the first steps of a bucket capture its graph
  }
  // Pipelined: each step feeds the tokens of the one before it and is queued before that one settles, so
  // the round trip through the event loop overlaps the next forward pass. Time between settlements.
  const fed = ids.map((seqId) => ({
    seqId,
    tokens: new Int32Array(0),
    feedNextToken: true,
    sampling,
    returnTopK,
  }));
  const pipelinedTimes: number[] = [];
  let inFlight = engine.step(fed);
  let settled = process.hrtime.bigint();
  for (let s = 0; s < steps! + 2; s++) {
    const queued = engine.step(fed);
    await inFlight;
    const now = process.hrtime.bigint();
    if (s >= 2) pipelinedTimes.push(Number(now - settled) / 1e6);
    settled = now;
    inFlight = queued;
  }
  await inFlight;
  for (const seqId of ids) await engine.release(seqId);
  const msPerStep = median(times);
  const pipelinedMsPerStep = median(pipelinedTimes);
  const result: DecodeResult = {
    batch,
    msPerStep,
    tokensPerS: (batch * 1000) / msPerStep,
    pipelinedMsPerStep,
    pipelinedTokensPerS: (batch * 1000) / pipelinedMsPerStep,
  };
  if (readBandwidth) {
    result.floorMs =
      (bytesPerStep(dir, engine.info, batch, promptLength! + steps! / 2, ranks) / readBandwidth) * 1000;
    result.fractionOfFloor = result.floorMs / msPerStep;
    result.pipelinedFractionOfFloor = result.floorMs / pipelinedMsPerStep;
  }
  return result;
}

/** A sampled draft's q at one position: `entries` tokens around the draft, the draft the likeliest. */
function draftDistribution(draft: number, entries: number, vocab: number): DraftDistribution {
  const tokenIds = Int32Array.from({ length: entries }, (_, i) => (draft + i * 7919) % vocab);
  const weights = Array.from({ length: entries }, (_, i) => 1 / (i + 1));
  const total = weights.reduce((a, b) => a + b, 0);
  return { tokens: tokenIds, probs: Float32Array.from(weights, (w) => w / total) };
}

/** Median time of one verify step of `window` tokens (window - 1 drafts) on one sequence; with `sampling`
 * at temperature > 0 the drafts come with a q each (sampled drafts). */
async function verify(engine: Engine, window: number, sampling: SamplingParams = GREEDY): Promise<number> {
  const vocab = engine.info.vocabSize;
  const seqId = 20_000 + window;
  await engine.addSequence(seqId);
  const [prefill] = await engine.step([{ seqId, tokens: tokens(promptLength!, seqId, vocab) }]);
  let last = prefill!.nextToken;
  const times: number[] = [];
  for (let s = 0; s < steps! + 2; s++) {
    const drafts = tokens(window - 1, seqId + s, vocab);
    const draftDists =
      sampling.temperature > 0 ? Array.from(drafts, (draft) => draftDistribution(draft, 8, vocab)) : [];
    const window_tokens = Int32Array.from([last, ...drafts]);
    const [results, ms] = await timed(() =>
      engine.step([{ seqId, tokens: window_tokens, numDraft: window - 1, sampling, draftDists }]),
    );
    last = results[0]!.nextToken;
    if (s >= 2) times.push(ms);
  }
  await engine.release(seqId);
  return median(times);
}

async function prefill(engine: Engine): Promise<number> {
  const vocab = engine.info.vocabSize;
  const times: number[] = [];
  for (let r = 0; r < 3; r++) {
    const seqId = 30_000 + r;
    await engine.addSequence(seqId);
    const [, ms] = await timed(() =>
      engine.step([{ seqId, tokens: tokens(prefillLength!, seqId, vocab), commit: false }]),
    );
    await engine.release(seqId);
    times.push(ms);
  }
  return (prefillLength! * 1000) / median(times.slice(1));
}

interface SamplingResult {
  setting: SamplingSetting;
  decodeMs: Record<string, number>;
  verify8Ms?: number;
}

interface ModelReport {
  model: string;
  variant: Variant;
  /** Tensor-parallel ranks, on GPUs 0..tp-1. */
  tp: number;
  loadS: number;
  parameters: number;
  decode: DecodeResult[];
  verify: { window: number; ms: number; vsDecode: number }[];
  sampling: SamplingResult[];
  prefillTokensPerS: number;
  hfEagerMsPerToken?: Record<string, number>;
}

/** A tensor-parallel step also waits for two all-reduces of its rows' residual stream per layer. */
function addCollectiveFloor(
  result: DecodeResult,
  devices: number[],
  info: ModelInfo,
  deterministic: boolean,
): void {
  result.allReduceUs = measureAllReduce(devices, result.batch * info.hiddenSize, deterministic);
  if (result.floorMs === undefined) return;
  result.floorMs += (2 * info.numLayers * result.allReduceUs) / 1000;
  result.fractionOfFloor = result.floorMs / result.msPerStep;
  result.pipelinedFractionOfFloor = result.floorMs / result.pipelinedMsPerStep;
}

async function benchModel(dir: string, variant: Variant, tp: number): Promise<ModelReport> {
  const devices = Array.from({ length: tp }, (_, i) => i);
  const saved = new Map<string, string | undefined>();
  const { deterministic, env }: VariantSetup = VARIANTS[variant];
  for (const [key, value] of Object.entries(env)) {
    saved.set(key, process.env[key]);
    process.env[key] = value;
  }
  try {
    const [engine, loadMs] = await timed(() =>
      Engine.load({
        modelDir: dir,
        backend: "cuda",
        deterministic,
        devices,
      }),
    );
    try {
      const decodeResults: DecodeResult[] = [];
      for (const batch of batchSizes) decodeResults.push(await decode(engine, dir, batch, tp));
      if (tp > 1) {
        for (const result of decodeResults) addCollectiveFloor(result, devices, engine.info, deterministic);
      }
      const oneRow = decodeResults.find((result) => result.batch === 1)?.msPerStep;
      const verifyResults = [];
      for (const window of windowSizes) {
        const ms = await verify(engine, window);
        verifyResults.push({ window, ms, vsDecode: oneRow ? ms / oneRow : Number.NaN });
      }
      const samplingResults: SamplingResult[] = [];
      for (const setting of samplingSettings) {
        const setup: SamplingSetup = SAMPLING_SETTINGS[setting];
        const decodeMs: Record<string, number> = {};
        for (const batch of [1, 16]) {
          decodeMs[batch] = (await decode(engine, dir, batch, tp, setup)).msPerStep;
        }
        // A drafting step verifies nothing: its setting has no verify window.
        const verify8Ms = setup.returnTopK ? undefined : await verify(engine, 8, setup.sampling);
        samplingResults.push({ setting, decodeMs, verify8Ms });
      }
      return {
        model: basename(dir),
        variant,
        tp,
        loadS: loadMs / 1000,
        parameters: engine.info.numParameters,
        decode: decodeResults,
        verify: verifyResults,
        sampling: samplingResults,
        prefillTokensPerS: await prefill(engine),
        hfEagerMsPerToken: baseline.shapes?.[basename(dir)]?.hf_eager_ms_per_token,
      };
    } finally {
      await engine.close();
    }
  } finally {
    for (const [key, value] of saved) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
  }
}

function percentOfFloor(result: DecodeResult): string {
  const percent = (fraction: number) => `${(100 * fraction).toFixed(0)}%`;
  if (!result.fractionOfFloor || !result.pipelinedFractionOfFloor) return "-";
  return `${percent(result.fractionOfFloor)} (${percent(result.pipelinedFractionOfFloor)})`;
}

function table(reports: ModelReport[]): string {
  const lines = [
    `card: ${baseline.device ?? "unknown"}; read bandwidth ${readBandwidth ? (readBandwidth / 1e12).toFixed(2) + " TB/s" : "not measured"}; prompt ${promptLength} tokens, ${steps} timed steps (median)`,
    "",
    "| model | variant | TP | batch | ms/step | tok/s | pipelined ms/step | pipelined tok/s | floor ms | % of floor (pipelined) | HF eager ms/token |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ];
  for (const report of reports) {
    for (const result of report.decode) {
      const hf = report.hfEagerMsPerToken?.[String(result.batch)];
      lines.push(
        `| ${report.model} | ${report.variant} | ${report.tp} | ${result.batch} | ${result.msPerStep.toFixed(3)} | ${result.tokensPerS.toFixed(0)} | ${result.pipelinedMsPerStep.toFixed(3)} | ${result.pipelinedTokensPerS.toFixed(0)} | ${result.floorMs?.toFixed(3) ?? "-"} | ${percentOfFloor(result)} | ${hf?.toFixed(2) ?? "-"} |`,
      );
    }
  }
  lines.push(
    "",
    "| model | variant | load s | prefill tok/s | verify window: ms (x decode) |",
    "| --- | --- | --- | --- | --- |",
  );
  for (const report of reports) {
    const windows = report.verify
      .map((v) => `${v.window}: ${v.ms.toFixed(3)} (${v.vsDecode.toFixed(2)}x)`)
      .join("; ");
    lines.push(
      `| ${report.model} | ${report.variant} | ${report.loadS.toFixed(1)} | ${report.prefillTokensPerS.toFixed(0)} | ${windows} |`,
    );
  }
  if (reports.some((report) => report.sampling.length > 0)) {
    lines.push(
      "",
      "| model | variant | sampling | batch 1 ms | batch 16 ms | 8-token verify ms (sampled drafts when T > 0) |",
      "| --- | --- | --- | --- | --- | --- |",
    );
    for (const report of reports) {
      for (const result of report.sampling) {
        lines.push(
          `| ${report.model} | ${report.variant} | ${result.setting} | ${result.decodeMs[1]!.toFixed(3)} | ${result.decodeMs[16]!.toFixed(3)} | ${result.verify8Ms?.toFixed(3) ?? "-"} |`,
        );
      }
    }
  }
  return lines.join("\n");
}

const reports: ModelReport[] = [];
const gpus = cudaDeviceCount();
for (const dir of modelDirs) {
  for (const tp of tensorParallelSizes) {
    if (tp > gpus) {
      console.log(`${basename(dir)}: TP ${tp} skipped, this machine has ${gpus} GPU(s)`);
      continue;
    }
    for (const variant of variants) {
      const report = await benchModel(dir, variant, tp);
      reports.push(report);
      console.log(JSON.stringify(report));
    }
  }
}
if (args.json) writeFileSync(args.json, JSON.stringify({ baseline, reports }, null, 1));
console.log(table(reports));
