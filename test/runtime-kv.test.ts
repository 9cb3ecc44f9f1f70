// The paged KV cache through the addon: prefix-cache hits, speculative rollback, block accounting and
// running out of blocks.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Engine } from "../lib/native.js";
import { bitDifference, only, stepLogits } from "./reference/drive.js";
import { loadFixture } from "./reference/fixtures.js";

const BLOCK_SIZE = 8;

function tokens(start: number, count: number, vocab: number): number[] {
  return Array.from({ length: count }, (_, i) => (start + 5 * i) % vocab);
}

describe("paged KV cache", () => {
  let engine: Engine;
  let vocab: number;
  let nextSeqId = 0;

  before(async () => {
    engine = await Engine.load({
      modelDir: loadFixture("llama-gqa-f32").dir,
      backend: "cpu",
      blockSize: BLOCK_SIZE,
    });
    vocab = engine.info.vocabSize;
  });
  after(async () => engine?.close());

  test("a prefix-cache hit gives the same next-token logits as a cold prefill", async () => {
    const prompt = tokens(17, 5 * BLOCK_SIZE + 3, vocab);
    const last = prompt.at(-1)!;
    // Cold: a logits step never matches the prefix cache, so every row is computed.
    const cold = nextSeqId++;
    await engine.addSequence(cold);
    const coldRows = await stepLogits(engine, cold, prompt);
    const coldNext = coldRows.subarray((prompt.length - 1) * vocab);
    await engine.release(cold);

    // Publish the prompt's full blocks from a committed prefill, then free its sequence.
    const publisher = nextSeqId++;
    await engine.addSequence(publisher);
    await engine.step([{ seqId: publisher, tokens: Int32Array.from(prompt) }]);
    await engine.release(publisher);
    const before = await engine.cacheStats();
    assert.ok(
      before.blocksCached >= 5,
      `expected published blocks to stay cached, stats ${JSON.stringify(before)}`,
    );

    const warm = nextSeqId++;
    await engine.addSequence(warm);
    await engine.step([{ seqId: warm, tokens: Int32Array.from(prompt.slice(0, -1)), output: "none" }]);
    const afterHit = await engine.cacheStats();
    assert.equal(afterHit.prefixHits, before.prefixHits + 1, "the warm prefill counts one prefix hit");
    const hitTokens = afterHit.prefixHitTokens - before.prefixHitTokens;
    assert.ok(
      hitTokens >= 4 * BLOCK_SIZE && hitTokens < prompt.length - 1,
      `prefix hit of ${hitTokens} tokens`,
    );

    const warmNext = await stepLogits(engine, warm, [last]);
    assert.equal(bitDifference(warmNext, coldNext), undefined);
    await engine.release(warm);
  });

  test("truncate then re-append equals never having appended", async () => {
    const prompt = tokens(3, 13, vocab);
    const rejected = tokens(40, 6, vocab);
    const accepted = tokens(90, 3, vocab);

    const straight = nextSeqId++;
    await engine.addSequence(straight);
    await engine.step([{ seqId: straight, tokens: Int32Array.from(prompt), output: "none" }]);
    const expected = await stepLogits(engine, straight, accepted);

    const rolledBack = nextSeqId++;
    await engine.addSequence(rolledBack);
    await engine.step([{ seqId: rolledBack, tokens: Int32Array.from(prompt), output: "none" }]);
    // Uncommitted draft tokens crossing a block boundary, then the rollback.
    await engine.step([
      { seqId: rolledBack, tokens: Int32Array.from(rejected), output: "none", commit: false },
    ]);
    assert.equal(await engine.sequenceLength(rolledBack), prompt.length + rejected.length);
    await engine.truncate(rolledBack, prompt.length);
    assert.equal(await engine.sequenceLength(rolledBack), prompt.length);
    const actual = await stepLogits(engine, rolledBack, accepted);

    assert.equal(bitDifference(actual, expected), undefined);
    await engine.release(straight);
    await engine.release(rolledBack);
  });

  test("block accounting returns to its start after release", async () => {
    const start = await engine.cacheStats();
    assert.equal(start.blockSize, BLOCK_SIZE);
    assert.equal(start.blocksUsed + start.blocksFree, start.blocksTotal);
    const ids = [nextSeqId++, nextSeqId++, nextSeqId++];
    for (const [k, seqId] of ids.entries()) {
      await engine.addSequence(seqId);
      await engine.step([
        { seqId, tokens: Int32Array.from(tokens(500 + 31 * k, 3 * BLOCK_SIZE + k, vocab)) },
      ]);
    }
    await engine.truncate(ids[0]!, BLOCK_SIZE + 1);
    const busy = await engine.cacheStats();
    assert.equal(busy.sequences, start.sequences + 3);
    assert.ok(busy.blocksUsed >= start.blocksUsed + 2 + 4 + 4, `blocks used while busy: ${busy.blocksUsed}`);
    assert.equal(busy.blocksUsed + busy.blocksFree, busy.blocksTotal);
    for (const seqId of ids) await engine.release(seqId);
    const end = await engine.cacheStats();
    assert.equal(end.sequences, start.sequences);
    assert.equal(end.blocksUsed, start.blocksUsed);
    assert.equal(end.blocksFree, start.blocksFree);
    assert.equal(end.blocksTotal, start.blocksTotal);
  });
});

describe("running out of KV blocks", () => {
  let engine: Engine;
  let vocab: number;

  before(async () => {
    engine = await Engine.load({
      modelDir: loadFixture("llama-gqa-f32").dir,
      backend: "cpu",
      blockSize: 4,
      numBlocks: 6,
    });
    vocab = engine.info.vocabSize;
  });
  after(async () => engine?.close());

  test("is a clear rejection that changes nothing, and the engine keeps working", async () => {
    const stats = await engine.cacheStats();
    assert.equal(stats.blocksTotal, 6);
    await engine.addSequence(1);
    await engine.addSequence(2);
    await engine.step([{ seqId: 1, tokens: Int32Array.from(tokens(1, 16, vocab)) }]);
    await assert.rejects(
      engine.step([{ seqId: 2, tokens: Int32Array.from(tokens(2, 12, vocab)) }]),
      /out of KV cache blocks/,
    );
    assert.equal(await engine.sequenceLength(2), 0, "the failed step appended nothing");

    await engine.release(1);
    const result = only(await engine.step([{ seqId: 2, tokens: Int32Array.from(tokens(2, 12, vocab)) }]));
    assert.equal(result.length, 12);
    assert.ok(result.nextToken >= 0 && result.nextToken < vocab);
    await engine.release(2);
  });
});
