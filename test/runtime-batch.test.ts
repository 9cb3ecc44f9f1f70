// Batch invariance through the addon: a row's logits are bit-identical whether its sequence steps alone,
// in a batch with 7 other sequences of different lengths, inside a verify window or in prefill chunks.
// This is what makes greedy PEARL output equal greedy target-only output.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Engine, type StepItem } from "../lib/native.js";
import {
  addPrefilled,
  assertSameBits,
  logitsRow,
  neighbourItems,
  prefillNeighbours,
  rowsAlone,
  stepLogits,
  tokenRange,
} from "./reference/drive.js";
import { loadFixture } from "./reference/fixtures.js";

for (const name of ["llama-gqa-f32", "qwen3-qknorm-f32"]) {
  describe(`batch invariance: ${name}`, () => {
    let engine: Engine;
    let vocab: number;
    let prompt: number[];
    let continuation: number[];
    // Alone: the prompt's rows, then each continuation token decoded in its own step.
    let promptAlone: Float32Array;
    let decodeAlone: Float32Array[];
    let nextSeqId = 0;

    before(async () => {
      const fixture = loadFixture(name);
      engine = await Engine.load({ modelDir: fixture.dir, backend: "cpu" });
      vocab = engine.info.vocabSize;
      prompt = tokenRange(3, 21, vocab);
      continuation = tokenRange(11, 4, vocab);
      const alone = await rowsAlone(engine, nextSeqId++, prompt, continuation);
      promptAlone = alone.prompt;
      decodeAlone = alone.decode;
    });
    after(async () => engine?.close());

    /** Seven other sequences, each with a different prompt length, already holding their prompts. */
    async function otherSequences(): Promise<number[]> {
      const ids = Array.from({ length: 7 }, () => nextSeqId++);
      await prefillNeighbours(engine, ids, (k) => 2 + 5 * k);
      return ids;
    }

    async function releaseAll(ids: number[]): Promise<void> {
      for (const seqId of ids) await engine.release(seqId);
    }

    test("prefill batched with 7 other sequences", async () => {
      const others = await otherSequences();
      const seqId = nextSeqId++;
      await engine.addSequence(seqId);
      const items: StepItem[] = others.map((other, k) => ({
        seqId: other,
        tokens: Int32Array.from(tokenRange(200 + k, 1 + ((3 * k) % 6), vocab)),
        output: "logits",
      }));
      items.splice(3, 0, { seqId, tokens: Int32Array.from(prompt), output: "logits" });
      const results = await engine.step(items);
      assert.deepEqual(
        results.map((result) => result.seqId),
        items.map((item) => item.seqId),
      );
      assertSameBits(results[3]!.logits, promptAlone, "prompt rows");
      await releaseAll([...others, seqId]);
    });

    test("decode steps batched with 7 other sequences", async () => {
      const others = await otherSequences();
      const seqId = nextSeqId++;
      await addPrefilled(engine, seqId, prompt);
      for (const [t, token] of continuation.entries()) {
        const items = neighbourItems(others, t, 4, vocab);
        items.push({ seqId, tokens: Int32Array.of(token), output: "logits" });
        const results = await engine.step(items);
        assertSameBits(results.at(-1)!.logits, decodeAlone[t]!, `decode step ${t}`);
      }
      await releaseAll([...others, seqId]);
    });

    test("rows of a verify window equal one-token decode steps", async () => {
      const seqId = nextSeqId++;
      await addPrefilled(engine, seqId, prompt);
      const [result] = await engine.step([
        {
          seqId,
          tokens: Int32Array.from(continuation),
          numDraft: continuation.length - 1,
          output: "logits",
        },
      ]);
      for (const t of continuation.keys()) {
        assertSameBits(
          result?.logits && logitsRow(result.logits, vocab, t),
          decodeAlone[t]!,
          `window row ${t}`,
        );
      }
      await engine.release(seqId);
    });

    test("a prompt prefilled in chunks gives the same rows", async () => {
      const seqId = nextSeqId++;
      await engine.addSequence(seqId);
      const first = await stepLogits(engine, seqId, prompt.slice(0, 5));
      const second = await stepLogits(engine, seqId, prompt.slice(5, 17));
      const third = await stepLogits(engine, seqId, prompt.slice(17));
      const chunked = new Float32Array(promptAlone.length);
      chunked.set(first, 0);
      chunked.set(second, first.length);
      chunked.set(third, first.length + second.length);
      assertSameBits(chunked, promptAlone, "chunked prompt rows");
      await engine.release(seqId);
    });
  });
}
