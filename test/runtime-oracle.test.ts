// A second, independent oracle: a plain TypeScript float64 forward pass (test/reference/llama_f64.ts) with
// its own safetensors reader. It is checked against transformers first, so a disagreement with the native
// runtime points at the runtime, not at the oracle.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Engine } from "../lib/native.js";
import { stepLogits } from "./reference/drive.js";
import { type Fixture, loadFixture, relativeError } from "./reference/fixtures.js";
import { LlamaF64 } from "./reference/llama_f64.js";

// llama-gqa-f32 is the oracle's own fixture; the others cover rope scaling, biases, q/k norm, tied
// embeddings and reduced-precision weights (widened exactly to float64 by the oracle's reader).
const ORACLE_FIXTURES = [
  "llama-gqa-f32",
  "llama31-rope-f32",
  "qwen2-bias-f32",
  "qwen3-qknorm-f32",
  "llama32-tied-bf16",
];

for (const name of ORACLE_FIXTURES) {
  describe(`float64 oracle: ${name}`, () => {
    let fixture: Fixture;
    let oracle: LlamaF64;
    let engine: Engine;

    before(async () => {
      fixture = loadFixture(name);
      oracle = LlamaF64.load(fixture.dir);
      engine = await Engine.load({ modelDir: fixture.dir, backend: "cpu" });
    });
    after(async () => engine?.close());

    test("the oracle agrees with transformers", () => {
      // transformers computed a bf16 checkpoint's reference from the same stored weights, in float32.
      for (const [i, prompt] of fixture.prompts.entries()) {
        const error = relativeError(oracle.forward(prompt), fixture.logits[i]!);
        assert.ok(error < 1e-4, `prompt ${i}: oracle vs transformers relative error ${error}`);
      }
    });

    test("the native runtime agrees with the oracle", async () => {
      for (const [i, prompt] of fixture.prompts.entries()) {
        await engine.addSequence(i);
        const logits = await stepLogits(engine, i, prompt);
        await engine.release(i);
        const error = relativeError(logits, oracle.forward(prompt));
        assert.ok(error < 1e-4, `prompt ${i}: runtime vs oracle relative error ${error}`);
      }
    });
  });
}
