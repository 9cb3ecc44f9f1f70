// Tokens the engine's backend picks itself (greedy, and sampled from the whole softmax), against an
// independent TypeScript statement of the rule, on the CPU backend; test/gpu/cuda.test.ts runs the same
// check on the CUDA backend.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Engine } from "../lib/native.js";
import { assertEngineChoosesTokens, chooseToken } from "./reference/choose_token.js";
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

test("cpu: greedy and whole-softmax tokens equal the reference on the same logits", async () => {
  const fixture = loadFixture("llama-gqa-f32");
  const engine = await Engine.load({ modelDir: fixture.dir, backend: "cpu" });
  try {
    await assertEngineChoosesTokens(engine, tokenRange(7, 13, engine.info.vocabSize));
  } finally {
    await engine.close();
  }
});
