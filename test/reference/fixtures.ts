// Reads the tiny Hugging Face checkpoints and transformers references under test/fixtures/ (written by
// tools/make_fixtures.py).
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const FIXTURES_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..", "fixtures");

/** Every fixture tools/make_fixtures.py produces; the tests insist that all of them are present. */
export const FIXTURE_NAMES = [
  "llama-gqa-f32",
  "llama31-rope-f32",
  "llama32-tied-bf16",
  "mistral-f16",
  "qwen2-bias-f32",
  "qwen3-qknorm-f32",
  "llama-sharded-f32",
] as const;

export interface Fixture {
  name: string;
  dir: string;
  architecture: string;
  dtype: "float32" | "bfloat16" | "float16";
  prompts: number[][];
  vocabSize: number;
  /** transformers' greedy continuation per prompt (new tokens only). */
  greedy: number[][];
  /** transformers' float32 logits of every position of prompt i: [prompts[i].length, vocabSize]. */
  logits: Float32Array[];
}

interface ReferenceJson {
  name: string;
  architecture: string;
  dtype: Fixture["dtype"];
  prompts: number[][];
  logits_file: string;
  vocab_size: number;
  greedy: number[][];
}

export function fixtureNamesOnDisk(): string[] {
  if (!existsSync(FIXTURES_DIR)) return [];
  return readdirSync(FIXTURES_DIR)
    .filter((name) => existsSync(join(FIXTURES_DIR, name, "reference.json")))
    .sort();
}

export function loadFixture(name: string): Fixture {
  const dir = join(FIXTURES_DIR, name);
  const reference = JSON.parse(readFileSync(join(dir, "reference.json"), "utf8")) as ReferenceJson;
  const bytes = readFileSync(join(dir, reference.logits_file));
  const all = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4).slice();
  const totalRows = reference.prompts.reduce((sum, prompt) => sum + prompt.length, 0);
  if (all.length !== totalRows * reference.vocab_size) {
    throw new Error(
      `${name}: ${reference.logits_file} holds ${all.length} floats, expected ${totalRows} rows`,
    );
  }
  const logits: Float32Array[] = [];
  let row = 0;
  for (const prompt of reference.prompts) {
    logits.push(all.subarray(row * reference.vocab_size, (row + prompt.length) * reference.vocab_size));
    row += prompt.length;
  }
  return {
    name,
    dir,
    architecture: reference.architecture,
    dtype: reference.dtype,
    prompts: reference.prompts,
    vocabSize: reference.vocab_size,
    greedy: reference.greedy,
    logits,
  };
}

/** ||out - ref|| / ||ref|| over two equally long vectors. */
export function relativeError(out: ArrayLike<number>, ref: ArrayLike<number>): number {
  if (out.length !== ref.length) throw new Error(`length mismatch: ${out.length} vs ${ref.length}`);
  let diff = 0;
  let norm = 0;
  for (let i = 0; i < ref.length; i++) {
    diff += (out[i]! - ref[i]!) ** 2;
    norm += ref[i]! ** 2;
  }
  return Math.sqrt(diff / norm);
}

export function argmax(values: ArrayLike<number>, start = 0, end = values.length): number {
  let best = start;
  for (let i = start + 1; i < end; i++) if (values[i]! > values[best]!) best = i;
  return best - start;
}
