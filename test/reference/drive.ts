// Small drivers over the Engine API shared by the runtime tests and the CPU benchmark.
import type { Engine, SamplingParams, StepResult } from "../../lib/native.js";

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
