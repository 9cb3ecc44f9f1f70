// Tensor parallelism in the cuda backend (`npm run test:gpu`): a model split over k ranks computes the logits
// of the model on one rank, within bf16 error, and the same greedy continuations; padding (3 ranks over 4 KV
// heads, 704 intermediate positions) changes nothing. Ranks go on distinct GPUs (NCCL) where the machine has
// enough of them, and otherwise all on GPU 0 (the same sharding, with the collectives as plain kernels):
// PEARL_TP_DEVICES=shared forces the latter.
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { cudaDeviceCount, Engine } from "../../lib/native.js";
import { greedyDecode, stepLogits, tokenRange } from "../reference/drive.js";
import { FIXTURE_NAMES, loadFixture, relativeError } from "../reference/fixtures.js";
import { referencePrompts, speculativeGreedy } from "./speculate.js";

const MODELS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "models");
const EMBEDDED_TARGET = join(MODELS, "target");
// Checkpoints of real shapes from tools/make_shapes.py (tools/gpu_run.sh writes them there).
const SHAPES_DIR = process.env.PEARL_SHAPES_DIR ?? "/tmp/pearl-shapes";
// Two bf16 engines that add their partial sums in different orders.
const TP_VS_ONE_RANK = 1e-2;
const CONTINUATION = 12;

/** The devices of a `ranks`-way group: GPUs 0..ranks-1 when there are that many and sharing is not forced. */
function groupDevices(ranks: number): number[] {
  const distinct = process.env.PEARL_TP_DEVICES !== "shared" && cudaDeviceCount() >= ranks;
  return Array.from({ length: ranks }, (_, i) => (distinct ? i : 0));
}

async function compareWithOneRank(
  modelDir: string,
  ranks: number,
  prompts: readonly (readonly number[])[],
  greedy: boolean,
  diagnostic: (message: string) => void,
  numBlocks?: number,
): Promise<void> {
  const devices = groupDevices(ranks);
  const single = await Engine.load({ modelDir, backend: "cuda", numBlocks });
  const split = await Engine.load({ modelDir, backend: "cuda", devices, numBlocks });
  try {
    for (const [i, prompt] of prompts.entries()) {
      await single.addSequence(i);
      await split.addSequence(i);
      const expected = await stepLogits(single, i, prompt);
      const actual = await stepLogits(split, i, prompt);
      await single.release(i);
      await split.release(i);
      assert.equal(
        actual.findIndex((value) => !Number.isFinite(value)),
        -1,
        `prompt ${i}: non-finite logit`,
      );
      const error = relativeError(actual, expected);
      diagnostic(`devices ${devices.join(",")}: prompt ${i} relative error ${error.toExponential(2)}`);
      assert.ok(error < TP_VS_ONE_RANK, `prompt ${i} over ${ranks} ranks: relative error ${error}`);
      if (greedy) {
        assert.deepEqual(
          await greedyDecode(split, 100 + i, prompt, CONTINUATION),
          await greedyDecode(single, 100 + i, prompt, CONTINUATION),
          `prompt ${i} over ${ranks} ranks: greedy continuation`,
        );
      }
    }
  } finally {
    await single.close();
    await split.close();
  }
}

for (const name of FIXTURE_NAMES) {
  test(`${name} over 2 ranks: logits and greedy continuations as on one`, async (t) => {
    const fixture = loadFixture(name);
    await compareWithOneRank(fixture.dir, 2, fixture.prompts, true, (message) => t.diagnostic(message));
  });
}

describe("the embedded target over 2, 3 (padded) and 4 ranks", () => {
  const prompts = referencePrompts(3);
  for (const ranks of [2, 3, 4]) {
    test(`${ranks} ranks`, async (t) => {
      await compareWithOneRank(EMBEDDED_TARGET, ranks, prompts, true, (message) => t.diagnostic(message));
    });
  }
});

// Random weights make a deep network chaotic: any change of summation order (splitting o/down across ranks, or
// one rank taking the batch-invariant GEMM instead of cuBLASLt) grows through the 32 layers. The bound is
// therefore that reordering's own size on one rank, measured in the same run.
describe("Llama-3.1-8B shape (random weights) over 2 and 4 ranks", () => {
  const dir = join(SHAPES_DIR, "llama-3.1-8b");
  const skip = existsSync(join(dir, "config.json"))
    ? false
    : `no checkpoint at ${dir} (tools/make_shapes.py)`;
  const prompt = tokenRange(11, 48, 128256);
  const numBlocks = 64;

  async function promptLogits(options: {
    devices?: number[];
    deterministic?: boolean;
  }): Promise<Float32Array> {
    const engine = await Engine.load({ modelDir: dir, backend: "cuda", numBlocks, ...options });
    try {
      await engine.addSequence(0);
      return await stepLogits(engine, 0, prompt);
    } finally {
      await engine.close();
    }
  }

  test(
    "split over 2 and 4 ranks, the logits move no more than a reordering on one rank",
    { skip },
    async (t) => {
      const single = await promptLogits({});
      const reordered = relativeError(await promptLogits({ deterministic: true }), single);
      t.diagnostic(
        `one rank, batch-invariant GEMM vs cuBLASLt: relative error ${reordered.toExponential(2)}`,
      );
      for (const ranks of [2, 4]) {
        const devices = groupDevices(ranks);
        const error = relativeError(await promptLogits({ devices }), single);
        t.diagnostic(`devices ${devices.join(",")}: relative error ${error.toExponential(2)}`);
        assert.ok(
          error < Math.max(TP_VS_ONE_RANK, 2 * reordered),
          `${ranks} ranks: relative error ${error}, one rank reordered ${reordered}`,
        );
      }
    },
  );
});

describe("deterministic mode over 2 ranks", () => {
  test("greedy speculative decoding of 4 concurrent sequences equals target-only decoding", async () => {
    const outcome = await speculativeGreedy({
      sessions: 4,
      draftLength: 5,
      newTokens: 40,
      deterministic: true,
      targetDevices: groupDevices(2),
    });
    assert.deepEqual(outcome.speculative, outcome.targetOnly);
    assert.ok(outcome.acceptedTokens > 0, "the embedded draft agrees with its target at least sometimes");
  });
});

describe("tensor-parallel errors", () => {
  const count = cudaDeviceCount();

  test("a device that does not exist is named", async () => {
    await assert.rejects(
      Engine.load({ modelDir: EMBEDDED_TARGET, backend: "cuda", devices: [0, count] }),
      new RegExp(`device ${count} does not exist \\(${count} CUDA devices visible\\)`),
    );
  });

  test("more ranks than KV heads is refused", async () => {
    await assert.rejects(
      Engine.load({ modelDir: EMBEDDED_TARGET, backend: "cuda", devices: [0, 0, 0, 0, 0] }),
      /tensor parallelism over 5 devices needs at least 5 KV heads; LlamaForCausalLM has 4/,
    );
  });

  test(
    "a group mixing a shared GPU with others is refused",
    { skip: count < 2 && "needs 2 GPUs" },
    async () => {
      await assert.rejects(
        Engine.load({ modelDir: EMBEDDED_TARGET, backend: "cuda", devices: [0, 0, 1] }),
        /must be all distinct, or all the same GPU/,
      );
    },
  );
});
