// The binding's own guarantees: the event loop keeps running during a step, calls run in submission
// order, close() settles what came before it and rejects what comes after, typed results, and an idle
// engine does not keep the process alive.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";

import { Engine, type StepItem } from "../lib/native.js";
import { only } from "./reference/drive.js";
import { loadFixture } from "./reference/fixtures.js";

const MODEL_DIR = loadFixture("llama-gqa-f32").dir;
const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");

describe("engine thread", () => {
  let engine: Engine;
  let vocab: number;

  before(async () => {
    // Room for the event-loop test's largest batch: 256 sequences of 256 tokens.
    engine = await Engine.load({ modelDir: MODEL_DIR, backend: "cpu", blockSize: 16, numBlocks: 4096 });
    vocab = engine.info.vocabSize;
  });
  after(async () => engine?.close());

  test("the event loop keeps ticking during a long step", async (t) => {
    const maxPositions = Math.min(engine.info.maxPositionEmbeddings, 512);
    // Grow the batch until one step takes long enough to tell a blocked loop from a free one.
    for (let sequences = 4; ; sequences *= 2) {
      const items: StepItem[] = [];
      for (let seqId = 0; seqId < sequences; seqId++) {
        await engine.addSequence(seqId);
        items.push({
          seqId,
          tokens: Int32Array.from({ length: maxPositions }, (_, i) => (seqId + 3 * i) % vocab),
        });
      }
      let ticks = 0;
      let longestGap = 0;
      let last = performance.now();
      const timer = setInterval(() => {
        const now = performance.now();
        longestGap = Math.max(longestGap, now - last);
        last = now;
        ticks++;
      }, 2);
      const started = performance.now();
      await engine.step(items);
      const elapsed = performance.now() - started;
      clearInterval(timer);
      for (let seqId = 0; seqId < sequences; seqId++) await engine.release(seqId);
      if (elapsed < 250 && sequences < 256) continue;
      t.diagnostic(
        `${sequences} x ${maxPositions} tokens: ${elapsed.toFixed(0)} ms, ${ticks} ticks, longest gap ${longestGap.toFixed(1)} ms`,
      );
      assert.ok(ticks >= elapsed / 20, `${ticks} timer ticks during a ${elapsed.toFixed(0)} ms step`);
      assert.ok(
        longestGap < elapsed / 4,
        `the loop stalled ${longestGap.toFixed(0)} ms of a ${elapsed.toFixed(0)} ms step`,
      );
      return;
    }
  });

  test("calls run in submission order", async () => {
    const seqId = 77;
    // Nothing is awaited until every call is queued.
    const calls = [
      engine.addSequence(seqId),
      engine.step([{ seqId, tokens: Int32Array.of(1, 2, 3, 4, 5) }]),
      engine.sequenceLength(seqId),
      engine.truncate(seqId, 2),
      engine.sequenceLength(seqId),
      engine.step([{ seqId, tokens: Int32Array.of(6) }]),
      engine.release(seqId),
      engine.sequenceLength(seqId).catch((error: Error) => error),
    ] as const;
    const [, first, lengthAfterFirst, , lengthAfterTruncate, second, , released] = await Promise.all(calls);
    assert.equal(only(first).length, 5);
    assert.equal(lengthAfterFirst, 5);
    assert.equal(lengthAfterTruncate, 2);
    assert.equal(only(second).length, 3);
    assert.ok(released instanceof Error, "the sequence was released before the last call ran");
  });

  test("results are typed and logits are a Float32Array of rows x vocab", async () => {
    await engine.addSequence(5);
    const result = only(await engine.step([{ seqId: 5, tokens: Int32Array.of(4, 8, 15), output: "logits" }]));
    assert.equal(result.seqId, 5);
    assert.equal(result.accepted, 0);
    assert.equal(result.length, 3);
    assert.ok(Number.isInteger(result.nextToken) && result.nextToken >= 0 && result.nextToken < vocab);
    assert.ok(result.logits instanceof Float32Array);
    assert.equal(result.logits.length, 3 * vocab);
    const none = only(await engine.step([{ seqId: 5, tokens: Int32Array.of(16), output: "none" }]));
    assert.equal(none.nextToken, -1);
    assert.equal(none.logits, undefined);
    await engine.release(5);
  });

  test("a sampled draft step returns its top-k distribution q", async () => {
    await engine.addSequence(6);
    const sampling = { temperature: 0.8, topK: 0, topP: 1, seed: 1234 };
    const result = only(
      await engine.step([{ seqId: 6, tokens: Int32Array.of(4, 8, 15), sampling, returnTopK: 4 }]),
    );
    assert.ok(result.q, "q is returned");
    assert.ok(result.q.tokens instanceof Int32Array && result.q.probs instanceof Float32Array);
    assert.ok(result.q.tokens.length >= 1 && result.q.tokens.length <= 4);
    assert.equal(result.q.probs.length, result.q.tokens.length);
    assert.ok(result.q.tokens.includes(result.nextToken), "the sampled token is in q's support");
    await engine.release(6);
  });

  test("steps that feed the previous step's token can be queued before it settles", async () => {
    const [reference, pipelined] = [90, 91];
    const prompt = Int32Array.of(3, 1, 4, 1, 5);
    const sampling = { temperature: 0.9, topK: 0, topP: 1, seed: 42 };
    await engine.addSequence(reference);
    let result = only(await engine.step([{ seqId: reference, tokens: prompt, sampling }]));
    const expected = [result.nextToken];
    for (let i = 0; i < 6; i++) {
      result = only(
        await engine.step([{ seqId: reference, tokens: Int32Array.of(result.nextToken), sampling }]),
      );
      expected.push(result.nextToken);
    }

    await engine.addSequence(pipelined);
    // Nothing is awaited until all seven steps are queued: each feeds the token of the step before it.
    const steps = [engine.step([{ seqId: pipelined, tokens: prompt, sampling }])];
    for (let i = 0; i < 6; i++) {
      steps.push(
        engine.step([{ seqId: pipelined, tokens: new Int32Array(0), feedNextToken: true, sampling }]),
      );
    }
    const results = (await Promise.all(steps)).map(only);
    assert.deepEqual(
      results.map((r) => r.nextToken),
      expected,
    );
    assert.deepEqual(
      results.map((r) => r.length),
      [5, 6, 7, 8, 9, 10, 11],
    );

    // The fed token leads a verify window: the last committed token, then drafts the target agrees with.
    const window = only(
      await engine.step([
        { seqId: reference, tokens: Int32Array.of(9, 9), numDraft: 2, feedNextToken: true },
      ]),
    );
    assert.equal(window.length, 12 + window.accepted);
    await engine.release(reference);
    await engine.release(pipelined);
  });

  test("feeding a token the sequence does not have rejects, and the engine goes on", async () => {
    const seqId = 92;
    await engine.addSequence(seqId);
    const feed: StepItem = { seqId, tokens: new Int32Array(0), feedNextToken: true };
    await assert.rejects(engine.step([feed]), /sequence 92: feed_next_token: no token to feed/);
    await engine.step([{ seqId, tokens: Int32Array.of(1, 2), output: "none" }]);
    await assert.rejects(engine.step([feed]), /no token to feed/);
    await engine.step([{ seqId, tokens: Int32Array.of(3) }]);
    await engine.truncate(seqId, 2);
    await assert.rejects(engine.step([feed]), /no token to feed/);
    await engine.step([{ seqId, tokens: Int32Array.of(3) }]);
    await assert.rejects(engine.step([{ seqId, tokens: Int32Array.of(vocab) }]), /out of range/);
    await assert.rejects(engine.step([feed]), /no token to feed/, "a failed step forgets the token");
    await assert.rejects(
      engine.step([{ ...feed, feedNextToken: 1 as unknown as boolean }]),
      /items\[0\]\.feedNextToken must be a boolean/,
    );
    assert.equal(only(await engine.step([{ seqId, tokens: Int32Array.of(3) }])).length, 4);
    assert.equal(only(await engine.step([feed])).length, 5);
    await engine.release(seqId);
  });
});

describe("close", () => {
  test("settles every call made before it and rejects every call after it", async () => {
    const engine = await Engine.load({ modelDir: MODEL_DIR, backend: "cpu" });
    const added = engine.addSequence(1);
    const stepped = engine.step([{ seqId: 1, tokens: Int32Array.of(3, 1, 4) }]);
    const closed = engine.close();
    const late = assert.rejects(engine.addSequence(2), /closed/);
    await added;
    assert.equal(only(await stepped).length, 3);
    await closed;
    await late;
    await assert.rejects(engine.cacheStats(), /closed/);
    await assert.rejects(engine.close(), /closed/);
  });

  test("an idle engine that was never closed does not keep the process alive", () => {
    const script = `
      import { Engine } from "./lib/native.ts";
      const engine = await Engine.load({ modelDir: ${JSON.stringify(MODEL_DIR)}, backend: "cpu" });
      await engine.addSequence(1);
      const [result] = await engine.step([{ seqId: 1, tokens: Int32Array.of(1, 2) }]);
      console.log("length", result.length);
    `;
    const child = spawnSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      cwd: REPO_ROOT,
      encoding: "utf8",
      timeout: 30_000,
    });
    assert.equal(child.error, undefined, "the child exited by itself");
    assert.equal(child.status, 0, child.stderr);
    assert.match(child.stdout, /length 2/);
  });
});
