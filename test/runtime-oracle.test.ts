// A second, independent oracle: a plain TypeScript float64 forward pass (test/reference/llama_f64.ts) with
// its own safetensors reader. It is checked against transformers first, so a disagreement with the native
// runtime points at the runtime, not at the oracle. It is fast enough on the tiny fixtures to cover all of
// them (rope scaling, biases, q/k norm, tied embeddings, bf16/fp16 widened exactly to float64, shards).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Engine } from "../lib/native.js";
import { stepLogits } from "./reference/drive.js";
import { FIXTURE_NAMES, type Fixture, loadFixture, relativeError } from "./reference/fixtures.js";
import { LlamaF64 } from "./reference/llama_f64.js";

for (const name of FIXTURE_NAMES) {
  describe(`float64 oracle: ${name}`, () => {
    let fixture: Fixture;
    let oracleLogits: Float64Array[];
    let engine: Engine;

    before(async () => {
      fixture = loadFixture(name);
      const oracle = LlamaF64.load(fixture.dir);
      oracleLogits = fixture.prompts.map((prompt) => oracle.forward(prompt));
      engine = await Engine.load({ modelDir: fixture.dir, backend: "cpu" });
    });
    after(async () => engine?.close());

    test("the oracle agrees with transformers", () => {
      // transformers computed every reference in float32 from the stored weights, so 1e-5 is ample.
      for (const [i, logits] of oracleLogits.entries()) {
        const error = relativeError(logits, fixture.logits[i]!);
        assert.ok(error < 1e-5, `prompt ${i}: oracle vs transformers relative error ${error}`);
      }
    });

    test("the native runtime agrees with the oracle", async () => {
      for (const [i, prompt] of fixture.prompts.entries()) {
        await engine.addSequence(i);
        const logits = await stepLogits(engine, i, prompt);
        await engine.release(i);
        const error = relativeError(logits, oracleLogits[i]!);
        assert.ok(error < 1e-4, `prompt ${i}: runtime vs oracle relative error ${error}`);
      }
    });
  });
}
