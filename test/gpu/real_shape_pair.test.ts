// The real-shape pair on the cuda backend (`npm run test:gpu`): checkpoints written by tools/embed_pair.py
// (docs/real-shape-pair.md) with the shapes of Llama-3.2-1B / 3.1-8B / 3.1-70B must continue the held-out
// reference prompts greedily as their small source in models/ does on the cpu backend, with close logits on
// real ids and padded ids at 0 (or masked). Each checkpoint is skipped when its folder is missing:
//
//   python3 tools/embed_pair.py --source models/draft --shape llama-3.2-1b --out /tmp/pearl-real-pair/draft-llama-3.2-1b
//   python3 tools/embed_pair.py --source models/target --shape llama-3.1-8b --out /tmp/pearl-real-pair/target-llama-3.1-8b
//
// PEARL_REAL_PAIR_DIR moves the folder. target-llama-3.1-70b (141 GB) is tested too when present, split over
// 4 GPUs (2 when the machine has only 2).
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { cudaDeviceCount, Engine } from "../../lib/native.js";
import { GREEDY, only } from "../reference/drive.js";

const MODELS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "models");
const PAIR_DIR = process.env.PEARL_REAL_PAIR_DIR ?? "/tmp/pearl-real-pair";
const CONTINUATION = 32;
// bf16 weights and activations against the cpu backend's float32: the bound cuda.test.ts holds bf16
// checkpoints to against transformers, doubled for the q rounding of a head dim 32 -> 64.
const VS_SMALL_ON_CPU = 2e-2;
// tools/embed_pair.py --mask-padded-ids gives padded ids -65536 / rms(final residual).
const MASKED_LOGIT = -200;
// Sequence capacity for 3 prompts of up to ~160 tokens plus the continuation, in blocks of the default size:
// small, so the 70B's weights leave room.
const NUM_BLOCKS = 256;

interface Checkpoint {
  folder: string;
  source: "draft" | "target";
  /** Tensor-parallel ranks (the 70B does not fit one GPU). */
  ranks: number;
}

const CHECKPOINTS: Checkpoint[] = [
  { folder: "draft-llama-3.2-1b", source: "draft", ranks: 1 },
  { folder: "target-llama-3.1-8b", source: "target", ranks: 1 },
  { folder: "target-llama-3.1-70b", source: "target", ranks: cudaDeviceCount() >= 4 ? 4 : 2 },
];

interface EmbeddingRecord {
  source_files: { file: string; sha256: string }[];
  big: {
    hidden: number;
    layers: number;
    heads: number;
    kv_heads: number;
    head_dim: number;
    vocab: number;
    tied: boolean;
  };
  padded_vocab_ids: [number, number];
  padded_id_mask: object | null;
}

const prompts = (
  JSON.parse(readFileSync(join(MODELS, "reference.json"), "utf8")) as { prompts: { ids: number[] }[] }
).prompts.map((prompt) => prompt.ids);

interface Run {
  continuation: number[];
  /** Logits of the row each continuation token was chosen from, [CONTINUATION * vocab]. */
  logits: Float32Array[];
}

/** Greedy decoding that keeps each chosen token's logits row. */
async function decode(engine: Engine, seqId: number, prompt: readonly number[]): Promise<Run> {
  const vocab = engine.info.vocabSize;
  await engine.addSequence(seqId);
  const run: Run = { continuation: [], logits: [] };
  let input = [...prompt];
  while (run.continuation.length < CONTINUATION) {
    const result = only(
      await engine.step([{ seqId, tokens: Int32Array.from(input), output: "logits", sampling: GREEDY }]),
    );
    assert.ok(result.logits, "a logits step returned no logits");
    run.logits.push(result.logits.slice(result.logits.length - vocab));
    run.continuation.push(result.nextToken);
    input = [result.nextToken];
  }
  await engine.release(seqId);
  return run;
}

function sha256(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

/** The best logit's lead over the second best: how close a row is to a tie. */
function margin(row: Float32Array): number {
  let best = -Infinity;
  let second = -Infinity;
  for (const value of row) {
    if (value > best) {
      second = best;
      best = value;
    } else if (value > second) {
      second = value;
    }
  }
  return best - second;
}

const smallRuns = new Map<string, Promise<Run[]>>();

/** The small source's runs on the cpu backend, once per source. */
function smallModelRuns(source: string): Promise<Run[]> {
  let runs = smallRuns.get(source);
  if (!runs) {
    runs = (async () => {
      const engine = await Engine.load({ modelDir: join(MODELS, source), backend: "cpu" });
      try {
        const result: Run[] = [];
        for (const [i, prompt] of prompts.entries()) result.push(await decode(engine, i, prompt));
        return result;
      } finally {
        await engine.close();
      }
    })();
    smallRuns.set(source, runs);
  }
  return runs;
}

for (const checkpoint of CHECKPOINTS) {
  const dir = join(PAIR_DIR, checkpoint.folder);
  const skip = !existsSync(join(dir, "embedding.json"))
    ? `${dir} not found (write it with tools/embed_pair.py)`
    : cudaDeviceCount() < checkpoint.ranks
      ? `needs ${checkpoint.ranks} GPUs`
      : false;

  describe(`real-shape pair on cuda: ${checkpoint.folder}`, { skip }, () => {
    let record: EmbeddingRecord;
    let big: Engine;
    let small: Run[];
    let bigRuns: Run[];

    before(async () => {
      record = JSON.parse(readFileSync(join(dir, "embedding.json"), "utf8")) as EmbeddingRecord;
      small = await smallModelRuns(checkpoint.source);
      const devices = Array.from({ length: checkpoint.ranks }, (_, i) => i);
      big = await Engine.load({ modelDir: dir, backend: "cuda", devices, numBlocks: NUM_BLOCKS });
      bigRuns = [];
      for (const [i, prompt] of prompts.entries()) bigRuns.push(await decode(big, i, prompt));
    });
    after(async () => big?.close());

    test(`it was embedded from models/${checkpoint.source} as it is now`, () => {
      const expected = record.source_files.map(({ file }) => ({
        file,
        sha256: sha256(join(MODELS, checkpoint.source, file)),
      }));
      assert.deepEqual(record.source_files, expected, "models/ changed since: rerun tools/embed_pair.py");
    });

    test("pearl loads it on cuda with the embedded shape", () => {
      assert.equal(big.info.backend, "cuda");
      const { hiddenSize, numLayers, numHeads, numKvHeads, headDim, vocabSize } = big.info;
      const shape = record.big;
      assert.deepEqual(
        { hiddenSize, numLayers, numHeads, numKvHeads, headDim, vocabSize },
        {
          hiddenSize: shape.hidden,
          numLayers: shape.layers,
          numHeads: shape.heads,
          numKvHeads: shape.kv_heads,
          headDim: shape.head_dim,
          vocabSize: shape.vocab,
        },
      );
    });

    test(`greedy continuations (${CONTINUATION} tokens) equal the small model's on the cpu`, () => {
      for (const [i, run] of bigRuns.entries()) {
        const expected = small[i]!.continuation;
        const at = run.continuation.findIndex((token, k) => token !== expected[k]);
        const detail =
          at < 0
            ? ""
            : `: first differs at token ${at} (${run.continuation[at]} vs ${expected[at]}), where the small ` +
              `model's best logit leads the second by ${margin(small[i]!.logits[at]!).toFixed(4)}`;
        assert.deepEqual(run.continuation, expected, `prompt ${i}${detail}`);
      }
    });

    test("real ids' logits are close to the small model's; padded ids are 0 or masked", (t) => {
      const [vocab, bigVocab] = record.padded_vocab_ids;
      const masked = record.padded_id_mask !== null;
      // A tied mask shifts each row's real logits by one constant (softmax-invariant): compared without it.
      const shifted = masked && record.big.tied;
      let worst = 0;
      let paddedMax = -Infinity;
      let paddedMin = Infinity;
      // Rows up to the first divergence compare the same contexts.
      for (const [i, run] of bigRuns.entries()) {
        for (const [k, bigRow] of run.logits.entries()) {
          const smallRow = small[i]!.logits[k]!;
          let scale = 0;
          let difference = 0;
          let shift = 0;
          if (shifted) for (let id = 0; id < vocab; id++) shift += (bigRow[id]! - smallRow[id]!) / vocab;
          for (let id = 0; id < vocab; id++) {
            scale = Math.max(scale, Math.abs(smallRow[id]!));
            difference = Math.max(difference, Math.abs(bigRow[id]! - shift - smallRow[id]!));
          }
          assert.ok(Number.isFinite(difference), `prompt ${i} token ${k}: non-finite logit`);
          worst = Math.max(worst, difference / scale);
          for (let id = vocab; id < bigVocab; id++) {
            paddedMax = Math.max(paddedMax, bigRow[id]!);
            paddedMin = Math.min(paddedMin, bigRow[id]!);
          }
          if (run.continuation[k] !== small[i]!.continuation[k]) break;
        }
      }
      t.diagnostic(`max relative logit error vs the small model on cpu: ${worst.toExponential(2)}`);
      t.diagnostic(`padded logits in [${paddedMin}, ${paddedMax}]${masked ? " (masked)" : ""}`);
      assert.ok(worst < VS_SMALL_ON_CPU, `relative logit error ${worst}`);
      if (bigVocab > vocab) {
        if (masked) assert.ok(paddedMax <= MASKED_LOGIT, `a masked padded id has logit ${paddedMax}`);
        else assert.ok(paddedMin === 0 && paddedMax === 0, `padded logits in [${paddedMin}, ${paddedMax}]`);
      }
    });
  });
}
