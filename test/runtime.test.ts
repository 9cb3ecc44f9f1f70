// The CPU backend against transformers: logits of every prompt position and greedy continuations, for
// every fixture checkpoint (one per supported architecture, dtype and checkpoint layout).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Engine } from "../lib/native.js";
import { greedyDecode, stepLogits } from "./reference/drive.js";
import {
  FIXTURE_NAMES,
  type Fixture,
  fixtureNamesOnDisk,
  loadFixture,
  relativeError,
} from "./reference/fixtures.js";

test("every fixture checkpoint is present", () => {
  assert.deepEqual(fixtureNamesOnDisk(), [...FIXTURE_NAMES].sort());
});

for (const name of FIXTURE_NAMES) {
  describe(name, () => {
    let fixture: Fixture;
    let engine: Engine;

    before(async () => {
      fixture = loadFixture(name);
      engine = await Engine.load({ modelDir: fixture.dir, backend: "cpu" });
    });
    after(async () => engine?.close());

    test("model info describes the checkpoint", () => {
      assert.equal(engine.info.architecture, fixture.architecture);
      assert.equal(engine.info.vocabSize, fixture.vocabSize);
      assert.equal(engine.info.dtype, fixture.dtype);
      assert.equal(engine.info.backend, "cpu");
      assert.ok(engine.info.numParameters > 0);
    });

    test("logits of every prompt position match transformers", async () => {
      const tolerance = fixture.dtype === "float32" ? 1e-4 : 1e-2;
      for (const [i, prompt] of fixture.prompts.entries()) {
        await engine.addSequence(i);
        const logits = await stepLogits(engine, i, prompt);
        await engine.release(i);
        const error = relativeError(logits, fixture.logits[i]!);
        assert.ok(error < tolerance, `prompt ${i}: relative error ${error} >= ${tolerance}`);
      }
    });

    test("greedy continuation equals transformers'", async () => {
      for (const [i, prompt] of fixture.prompts.entries()) {
        const expected = fixture.greedy[i]!;
        assert.ok(expected.length > 0, `prompt ${i} has no reference continuation`);
        assert.deepEqual(await greedyDecode(engine, i, prompt, expected.length), expected, `prompt ${i}`);
      }
    });
  });
}
