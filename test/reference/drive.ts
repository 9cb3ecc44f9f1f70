// Small drivers over the Engine API shared by the runtime tests and the CPU benchmark.
import assert from "node:assert/strict";

import type { Engine, SamplingParams, StepItem, StepResult } from "../../lib/native.js";

export const GREEDY: SamplingParams = { temperature: 0, topK: 0, topP: 1, seed: 0 };

export function only(results: StepResult[]): StepResult {
  const [result] = results;
  if (results.length !== 1 || !result) throw new Error(`expected one step result, got ${results.length}`);
  return result;
}

/** Logits of every row appended by one step on a sequence. */
export async function stepLogits(
  engine: Engine,
  seqId: number,
  tokens: readonly number[],
): Promise<Float32Array> {
  const result = only(await engine.step([{ seqId, tokens: Int32Array.from(tokens), output: "logits" }]));
  if (!result.logits) throw new Error(`sequence ${seqId}: a logits step returned no logits`);
  return result.logits;
}

/** Prefills `prompt` into a new sequence, then decodes `count` tokens greedily, one step each. */
export async function greedyDecode(
  engine: Engine,
  seqId: number,
  prompt: readonly number[],
  count: number,
): Promise<number[]> {
  await engine.addSequence(seqId);
  const generated: number[] = [];
  let next = only(await engine.step([{ seqId, tokens: Int32Array.from(prompt) }])).nextToken;
  while (generated.length < count) {
    generated.push(next);
    if (generated.length === count) break;
    next = only(await engine.step([{ seqId, tokens: Int32Array.of(next) }])).nextToken;
  }
  await engine.release(seqId);
  return generated;
}

/** Row `row` of a [rows, vocab] logits block. */
export function logitsRow(logits: Float32Array, vocab: number, row: number): Float32Array {
  return logits.subarray(row * vocab, (row + 1) * vocab);
}

/** Exact bitwise equality of two float arrays; on mismatch, says where and by how much. */
export function bitDifference(actual: Float32Array, expected: Float32Array): string | undefined {
  if (actual.length !== expected.length) return `length ${actual.length} != ${expected.length}`;
  const a = new Uint32Array(actual.buffer, actual.byteOffset, actual.length);
  const b = new Uint32Array(expected.buffer, expected.byteOffset, expected.length);
  let first = -1;
  let count = 0;
  let maxAbs = 0;
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i]) {
      if (first < 0) first = i;
      count++;
      maxAbs = Math.max(maxAbs, Math.abs(actual[i]! - expected[i]!));
    }
  }
  if (count === 0) return undefined;
  return `${count} of ${a.length} values differ (first at ${first}: ${actual[first]} vs ${expected[first]}; max |diff| ${maxAbs})`;
}

/** Asserts that two logits blocks are bitwise equal; on mismatch the message says where and by how much. */
export function assertSameBits(actual: Float32Array | undefined, expected: Float32Array, what: string): void {
  assert.ok(actual, `${what}: no logits`);
  const difference = bitDifference(actual, expected);
  assert.equal(difference, undefined, `${what}: ${difference}`);
}

/** `count` token ids from `start` in strides of 7, wrapping at `vocab`: a prompt that is not a real text. */
export function tokenRange(start: number, count: number, vocab: number): number[] {
  return Array.from({ length: count }, (_, i) => (start + 7 * i) % vocab);
}

/**
 * A sequence's rows when it steps alone: the prompt's logits, then each continuation token decoded in a
 * step of its own. The rows a batched, windowed or chunked run must reproduce bit for bit.
 */
export async function rowsAlone(
  engine: Engine,
  seqId: number,
  prompt: readonly number[],
  continuation: readonly number[],
): Promise<{ prompt: Float32Array; decode: Float32Array[] }> {
  await engine.addSequence(seqId);
  const promptRows = await stepLogits(engine, seqId, prompt);
  const decode: Float32Array[] = [];
  for (const token of continuation) decode.push(await stepLogits(engine, seqId, [token]));
  await engine.release(seqId);
  return { prompt: promptRows, decode };
}

/** Adds the sequences `ids`, each holding a prompt of its own length (promptLength(index)): batch neighbours. */
export async function prefillNeighbours(
  engine: Engine,
  ids: readonly number[],
  promptLength: (index: number) => number,
): Promise<void> {
  const vocab = engine.info.vocabSize;
  for (const [k, seqId] of ids.entries()) {
    await addPrefilled(engine, seqId, tokenRange(100 + k, promptLength(k), vocab));
  }
}

/** Adds a sequence holding `prompt` (no logits computed). */
export async function addPrefilled(engine: Engine, seqId: number, prompt: readonly number[]): Promise<void> {
  await engine.addSequence(seqId);
  await engine.step([{ seqId, tokens: Int32Array.from(prompt), output: "none" }]);
}

/** The neighbours' items in batched step `step`: each appends 1 to `maxTokens` tokens (decodes and windows). */
export function neighbourItems(
  ids: readonly number[],
  step: number,
  maxTokens: number,
  vocab: number,
): StepItem[] {
  return ids.map((seqId, k) => ({
    seqId,
    tokens: Int32Array.from(tokenRange(300 + k + step, 1 + ((k + step) % maxTokens), vocab)),
    output: "logits",
  }));
}
