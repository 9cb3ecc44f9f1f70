// Tokens and verify outcomes the engine's backend computes next to the logits (greedy, sampled from the whole
// softmax, sampled with top-k/top-p cuts, verify windows of greedy and of sampled drafts, and a drafting
// step's q with the token drawn from it), against an
// independent TypeScript statement of the rule, on the CPU backend; test/gpu/cuda.test.ts runs the same
// checks on the CUDA backend.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Engine } from "../lib/native.js";
import {
  assertEngineChoosesTokens,
  assertEngineDraftsFromTopK,
  assertEngineVerifiesSampledDrafts,
  chooseToken,
  processLogits,
  sampleDraftToken,
  sampleResidual,
  topKDistribution,
} from "./reference/choose_token.js";
import { tokenRange } from "./reference/drive.js";
import { loadFixture } from "./reference/fixtures.js";

test("the reference rule: ties to the lowest id, NaN never wins, sampling skips infinite logits", () => {
  const row = Float32Array.from([1, 3, Number.NaN, 3, -Infinity]);
  assert.equal(chooseToken(row, { temperature: 0, seed: 0, position: 0 }), 1);
  assert.equal(
    chooseToken(Float32Array.from([Number.NaN, Number.NaN]), { temperature: 0, seed: 0, position: 0 }),
    -1,
  );
  const draws = new Set<number>();
  for (let seed = 0; seed < 50; seed++) draws.add(chooseToken(row, { temperature: 1, seed, position: 7 }));
  assert.deepEqual([...draws].sort(), [0, 1, 3], "only finite logits are drawn, and each of them is");
});

test("the reference cuts: top-k by (probability, id), then the smallest nucleus reaching top_p", () => {
  const logits = Float32Array.from(
    [0.05, 0.5, 0.15, 0.3, 0.3, 0].map((p) => (p > 0 ? Math.log(p) : -Infinity)),
  );
  const sampling = (topK: number, topP: number) => ({ temperature: 1, topK, topP, seed: 0 });
  assert.deepEqual(processLogits(logits, sampling(0, 1)).tokens, [0, 1, 2, 3, 4]);
  assert.deepEqual(processLogits(logits, sampling(2, 1)).tokens, [1, 3], "the tie at 0.3 keeps the lower id");
  assert.deepEqual(processLogits(logits, sampling(0, 0.6)).tokens, [1, 3], "0.5 / 1.3 < 0.6 <= 0.8 / 1.3");
  assert.deepEqual(processLogits(logits, sampling(3, 0.9)).tokens, [1, 3, 4], "top_p over the top-k mass");
  const p = processLogits(logits, sampling(2, 1));
  assert.ok(Math.abs(p.probs[0]! - 0.5 / 0.8) < 1e-6);
  // The residual keeps only what p has beyond q: here token 3 alone.
  const q = { tokens: Int32Array.of(1, 3), probs: Float32Array.of(0.7, 0.3) };
  for (let seed = 0; seed < 20; seed++) assert.equal(sampleResidual(p, q, seed, 3), 3);
  // A greedy target fully covered by q leaves an empty residual: p's own draw (the argmax) stands in.
  const greedy = processLogits(logits, { temperature: 0, topK: 0, topP: 1, seed: 0 });
  assert.deepEqual(greedy, { tokens: [1], probs: [1] });
  assert.equal(sampleResidual(greedy, { tokens: Int32Array.of(1), probs: Float32Array.of(1) }, 5, 3), 1);
});

test("the reference q: the top k of p by (probability, id), renormalized in float32", () => {
  const logits = Float32Array.from([0.05, 0.5, 0.15, 0.3, 0.3].map(Math.log));
  const p = processLogits(logits, { temperature: 1, topK: 0, topP: 1, seed: 0 });
  const q = topKDistribution(p, 2);
  assert.deepEqual(Array.from(q.tokens), [1, 3], "the tie at 0.3 keeps the lower id");
  assert.deepEqual(q.probs, Float32Array.of(0.5 / 0.8, 0.3 / 0.8));
  assert.deepEqual(
    Array.from(topKDistribution(p, 9).tokens),
    [1, 3, 4, 2, 0],
    "k past the support keeps it all",
  );
  assert.deepEqual(Array.from(topKDistribution(p, 0).tokens), [1], "k below 1 keeps the top token");
  const draws = new Set<number>();
  for (let seed = 0; seed < 60; seed++) draws.add(sampleDraftToken(q, seed, 4));
  assert.deepEqual([...draws].sort(), [1, 3], "the drafted token is drawn from q, and only from q");
});

test("cpu: greedy, whole-softmax and cut tokens equal the reference on the same logits", async () => {
  const fixture = loadFixture("llama-gqa-f32");
  const engine = await Engine.load({ modelDir: fixture.dir, backend: "cpu" });
  try {
    await assertEngineChoosesTokens(engine, tokenRange(7, 13, engine.info.vocabSize));
  } finally {
    await engine.close();
  }
});

test("cpu: sampled-draft verify windows get the reference outcome on the same logits", async () => {
  const fixture = loadFixture("llama-gqa-f32");
  const engine = await Engine.load({ modelDir: fixture.dir, backend: "cpu" });
  try {
    await assertEngineVerifiesSampledDrafts(engine, tokenRange(7, 13, engine.info.vocabSize));
  } finally {
    await engine.close();
  }
});

test("cpu: a drafting step returns the reference q of the same row and the token drawn from it", async () => {
  const fixture = loadFixture("llama-gqa-f32");
  const engine = await Engine.load({ modelDir: fixture.dir, backend: "cpu" });
  try {
    await assertEngineDraftsFromTopK(engine, tokenRange(7, 13, engine.info.vocabSize));
  } finally {
    await engine.close();
  }
});
