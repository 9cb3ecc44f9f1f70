// CPU decode throughput of the native runtime (`npm run bench:cpu`). For each model: prefill one prompt
// per sequence, then time greedy decode steps over the whole batch; median over repeats. Prints a
// markdown table for docs/performance.md.
//
//   npm run bench:cpu -- [--steps 64] [--repeats 5] [--prompt-length 32] [--threads 0] [--batch 1,8]
import { existsSync } from "node:fs";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { Engine, type ModelInfo } from "../lib/native.js";
import { FIXTURES_DIR, fixtureNamesOnDisk } from "../test/reference/fixtures.js";

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");

function nonNegativeInteger(name: string, value: string): number {
  const number = Number(value);
  if (!Number.isInteger(number) || number < 0)
    throw new Error(`--${name} must be a non-negative integer, got ${value}`);
  return number;
}

const { values: args } = parseArgs({
  options: {
    steps: { type: "string", default: "64" },
    repeats: { type: "string", default: "5" },
    "prompt-length": { type: "string", default: "32" },
    threads: { type: "string", default: "0" },
    batch: { type: "string", default: "1,8" },
  },
});
const steps = nonNegativeInteger("steps", args.steps);
const repeats = nonNegativeInteger("repeats", args.repeats);
const promptLength = nonNegativeInteger("prompt-length", args["prompt-length"]);
const numThreads = nonNegativeInteger("threads", args.threads);
const batchSizes = args.batch.split(",").map((value) => nonNegativeInteger("batch", value));
if (steps < 1 || repeats < 1 || promptLength < 1 || batchSizes.some((size) => size < 1)) {
  throw new Error("--steps, --repeats, --prompt-length and --batch must be at least 1");
}

interface Model {
  label: string;
  dir: string;
}

function models(): Model[] {
  const found = fixtureNamesOnDisk().map((name) => ({
    label: `fixture ${name}`,
    dir: join(FIXTURES_DIR, name),
  }));
  for (const name of ["draft", "target"]) {
    const dir = join(REPO_ROOT, "models", name);
    if (existsSync(join(dir, "config.json"))) found.push({ label: `models/${name}`, dir });
  }
  return found;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/** Decode tokens per second of one repeat: `batch` sequences, prefilled, then `steps` timed decode steps. */
async function decodeRun(
  engine: Engine,
  info: ModelInfo,
  batch: number,
  decodeSteps: number,
): Promise<number> {
  const seqIds = Array.from({ length: batch }, (_, i) => i);
  let next: number[] = [];
  for (const seqId of seqIds) {
    await engine.addSequence(seqId);
    const prompt = Int32Array.from(
      { length: promptLength },
      (_, i) => (seqId * 131 + i * 17 + 1) % info.vocabSize,
    );
    const [result] = await engine.step([{ seqId, tokens: prompt }]);
    next.push(result!.nextToken);
  }
  const started = process.hrtime.bigint();
  for (let step = 0; step < decodeSteps; step++) {
    const results = await engine.step(
      seqIds.map((seqId) => ({ seqId, tokens: Int32Array.of(next[seqId]!) })),
    );
    next = results.map((result) => result.nextToken);
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  for (const seqId of seqIds) await engine.release(seqId);
  return (batch * decodeSteps) / seconds;
}

function formatCount(count: number): string {
  if (count >= 1e9) return `${(count / 1e9).toFixed(2)}B`;
  if (count >= 1e6) return `${(count / 1e6).toFixed(1)}M`;
  if (count >= 1e3) return `${(count / 1e3).toFixed(1)}K`;
  return String(count);
}

const rows: string[] = [];
for (const model of models()) {
  const engine = await Engine.load({ modelDir: model.dir, backend: "cpu", numThreads });
  const { info } = engine;
  const decodeSteps = Math.min(steps, info.maxPositionEmbeddings - promptLength);
  if (decodeSteps < 1) throw new Error(`${model.label}: --prompt-length leaves no room for decode steps`);
  const perBatch: string[] = [];
  for (const batch of batchSizes) {
    await decodeRun(engine, info, batch, Math.min(decodeSteps, 4)); // warm-up: page in weights, fill caches
    const rates: number[] = [];
    for (let repeat = 0; repeat < repeats; repeat++)
      rates.push(await decodeRun(engine, info, batch, decodeSteps));
    // The spread shows when other load on the machine disturbed the runs.
    perBatch.push(
      `${median(rates).toFixed(0)} (${Math.min(...rates).toFixed(0)}–${Math.max(...rates).toFixed(0)})`,
    );
    process.stderr.write(`${model.label}: batch ${batch}: ${perBatch.at(-1)} tokens/s\n`);
  }
  await engine.close();
  rows.push(
    `| ${model.label} | ${info.architecture} | ${info.dtype} | ${formatCount(info.numParameters)} | ` +
      `${info.numLayers}x${info.hiddenSize} | ${perBatch.join(" | ")} |`,
  );
}

const cpus = os.cpus();
console.log(`CPU decode throughput, tokens/s: median of ${repeats} runs (min–max)\n`);
console.log(
  `- machine: ${cpus[0]?.model.trim() ?? "unknown CPU"}, ${cpus.length} cores, ${os.platform()} ${os.arch()}`,
);
console.log(`- date: ${new Date().toISOString().slice(0, 10)}, Node ${process.version}`);
console.log(
  `- settings: prompt ${promptLength} tokens per sequence, up to ${steps} greedy decode steps, ` +
    `threads ${numThreads || "all cores"}, fp32 math\n`,
);
console.log(
  `| model | architecture | weights | parameters | layers x hidden | ${batchSizes.map((b) => `batch ${b}`).join(" | ")} |`,
);
console.log(`| --- | --- | --- | --- | --- | ${batchSizes.map(() => "---:").join(" | ")} |`);
for (const row of rows) console.log(row);
