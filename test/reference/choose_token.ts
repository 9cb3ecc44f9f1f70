// An independent TypeScript statement of how a backend picks a row's token (native/src/ops/choose_token.cpp
// and its CUDA twin): the argmax, or at temperature > 0 the Gumbel-max draw with pearl's counter-based
// noise (native/src/counter_rng.h), ties to the lowest id.
import assert from "node:assert/strict";

import type { Engine, SamplingParams } from "../../lib/native.js";
import { addPrefilled, logitsRow, only, stepLogits, tokenRange } from "./drive.js";

const MASK_64 = (1n << 64n) - 1n;
const SAMPLE_PURPOSE = 1n;

/** splitmix64's finalizer. */
function mix64(value: bigint): bigint {
  let x = (value + 0x9e3779b97f4a7c15n) & MASK_64;
  x = ((x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK_64;
  x = ((x ^ (x >> 27n)) * 0x94d049bb133111ebn) & MASK_64;
  return x ^ (x >> 31n);
}

/** Uniform in (0, 1) for draw `index` of the sampling stream at (seed, position). */
function uniform(seed: bigint, position: bigint, index: number): number {
  const key = mix64(mix64(mix64(seed) ^ (position & MASK_64)) ^ SAMPLE_PURPOSE);
  const bits = mix64(key ^ mix64(BigInt(index))) >> 11n;
  return (Number(bits) + 0.5) * 2 ** -53;
}

export interface Choice {
  temperature: number;
  seed: number;
  /** Position of the token being chosen. */
  position: number;
}

/** The token `choice` picks from one row of logits; -1 when nothing can win. */
export function chooseToken(row: Float32Array, choice: Choice): number {
  const temperature = Math.fround(choice.temperature);
  const sample = temperature > 0;
  const inverseTemperature = sample ? 1 / temperature : 0;
  let best = -1;
  let bestKey = 0;
  for (const [i, logit] of row.entries()) {
    if (Number.isNaN(logit) || (sample && !Number.isFinite(logit))) continue;
    const key = sample
      ? logit * inverseTemperature -
        Math.log(-Math.log(uniform(BigInt(choice.seed), BigInt(choice.position), i)))
      : logit;
    if (best < 0 || key > bestKey) {
      best = i;
      bestKey = key;
    }
  }
  return best;
}

/**
 * Checks on any backend that the tokens an engine picks itself (greedy, and sampled from the whole
 * softmax with a greedy draft) are chooseToken's on the same rows' logits, in a plain decode step and in
 * a verify window whose first draft is the expected token (so it is accepted and later rows decide).
 */
export async function assertEngineChoosesTokens(engine: Engine, prompt: readonly number[]): Promise<void> {
  const vocab = engine.info.vocabSize;
  const drafts = tokenRange(100, 4, vocab);
  const settings: SamplingParams[] = [
    { temperature: 0, topK: 0, topP: 1, seed: 0 },
    { temperature: 0.8, topK: 0, topP: 1, seed: 11 },
    { temperature: 1.7, topK: 0, topP: 1, seed: 12345 },
  ];
  for (const [k, sampling] of settings.entries()) {
    const withLogits = 9000 + 2 * k;
    const choosing = withLogits + 1;
    const choiceAt = (position: number) => ({ ...sampling, position });
    await addPrefilled(engine, withLogits, prompt);
    await addPrefilled(engine, choosing, prompt);

    const firstRow = await stepLogits(engine, withLogits, [drafts[0]!]);
    const decoded = only(
      await engine.step([{ seqId: choosing, tokens: Int32Array.of(drafts[0]!), sampling }]),
    );
    const expectedFirst = chooseToken(firstRow, choiceAt(prompt.length + 1));
    assert.equal(decoded.nextToken, expectedFirst, `decode step, temperature ${sampling.temperature}`);

    await engine.truncate(withLogits, prompt.length);
    await engine.truncate(choosing, prompt.length);
    const window = [drafts[0]!, expectedFirst, ...drafts.slice(2)];
    const windowLogits = await stepLogits(engine, withLogits, window);
    const expected = window.map((_, row) =>
      chooseToken(logitsRow(windowLogits, vocab, row), choiceAt(prompt.length + row + 1)),
    );
    const verdict = only(
      await engine.step([
        { seqId: choosing, tokens: Int32Array.from(window), numDraft: window.length - 1, sampling },
      ]),
    );
    let accepted = 0;
    while (accepted < window.length - 1 && window[accepted + 1] === expected[accepted]) accepted++;
    assert.ok(accepted >= 1, "the first draft is the expected token and must be accepted");
    assert.equal(verdict.accepted, accepted, `verify window, temperature ${sampling.temperature}`);
    assert.equal(verdict.nextToken, expected[accepted], `verify window, temperature ${sampling.temperature}`);
    await engine.release(withLogits);
    await engine.release(choosing);
  }
}
