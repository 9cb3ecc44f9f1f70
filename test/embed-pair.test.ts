// tools/embed_pair.py (the real-shape pair, docs/real-shape-pair.md) through pearl's native CPU engine: the
// embedded pair in models/ is zero padded into bigger shapes, and each big checkpoint must continue the
// held-out reference prompts greedily exactly as its small source does, give every real vocabulary id the
// small model's logit up to float rounding, and give every padded id a logit of exactly 0. Shapes the
// method cannot hold are refused with a message and nothing written.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Engine } from "../lib/native.js";
import { GREEDY, only } from "./reference/drive.js";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const MODELS = join(ROOT, "models");
const SCRIPT = join(ROOT, "tools", "embed_pair.py");
const CONTINUATION = 24;
// Llama-3's vocabulary: what the real-shape checkpoints pad the 6144-id vocabulary to.
const LLAMA3_VOCAB = 128256;

interface ReferencePrompt {
  ids: number[];
}
const prompts = (
  JSON.parse(readFileSync(join(MODELS, "reference.json"), "utf8")) as { prompts: ReferencePrompt[] }
).prompts;

interface Finding {
  what: string;
  exact: boolean;
  detail: string;
}

interface EmbeddingRecord {
  residual_copies: number;
  findings: Finding[];
  files: string[];
}

const workDir = mkdtempSync(join(tmpdir(), "pearl-embed-"));
after(() => rmSync(workDir, { recursive: true, force: true }));

function runEmbed(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const result = spawnSync("python3", [SCRIPT, ...args], { encoding: "utf8", timeout: 120_000 });
  if (result.error) throw result.error;
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** Runs the script into a fresh folder under workDir and returns the folder and its embedding.json. */
function embed(name: string, source: string, args: string[]): { dir: string; record: EmbeddingRecord } {
  const dir = join(workDir, name);
  const result = runEmbed(["--source", join(MODELS, source), "--out", dir, ...args]);
  assert.equal(result.status, 0, `embed_pair.py ${args.join(" ")} failed:\n${result.stdout}${result.stderr}`);
  const record = JSON.parse(readFileSync(join(dir, "embedding.json"), "utf8")) as EmbeddingRecord;
  return { dir, record };
}

function inexactParts(record: EmbeddingRecord): string[] {
  return record.findings.filter((finding) => !finding.exact).map((finding) => finding.what);
}

/** A greedy continuation, and the logits at every position fed: the prompt's and the continuation's but
 * its last token (each row is what the next token was chosen from). */
interface Run {
  continuation: number[];
  logits: Float32Array;
}

/** Greedy decoding that keeps the logits of every position: one prefill, then one step per token. */
async function runPrompts(engine: Engine): Promise<Run[]> {
  const runs: Run[] = [];
  for (const [seqId, prompt] of prompts.entries()) {
    await engine.addSequence(seqId);
    const continuation: number[] = [];
    const logits: Float32Array[] = [];
    let input = prompt.ids;
    while (continuation.length < CONTINUATION) {
      const result = only(
        await engine.step([{ seqId, tokens: Int32Array.from(input), output: "logits", sampling: GREEDY }]),
      );
      assert.ok(result.logits, "a logits step returned no logits");
      logits.push(result.logits);
      continuation.push(result.nextToken);
      input = [result.nextToken];
    }
    await engine.release(seqId);
    runs.push({ continuation, logits: concatenate(logits) });
  }
  return runs;
}

function concatenate(parts: Float32Array[]): Float32Array {
  const all = new Float32Array(parts.reduce((length, part) => length + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    all.set(part, offset);
    offset += part.length;
  }
  return all;
}

interface LogitComparison {
  /** max over positions of max_id |big - small| / max_id |small|, over real ids. */
  maxRelativeError: number;
  /** The same for big - small minus its row's mean: blind to a shift of a whole row, which changes neither
   * argmax nor softmax (what the tied padded-id mask does). */
  maxRelativeSpread: number;
  /** Largest |row shift| (mean of big - small) relative to max_id |small|. */
  maxRelativeShift: number;
  /** Extremes of the padded ids' logits (0, 0 without padded ids). */
  paddedLogits: { min: number; max: number };
  positions: number;
}

function compareLogits(
  small: Float32Array,
  big: Float32Array,
  vocab: number,
  bigVocab: number,
): LogitComparison {
  const positions = small.length / vocab;
  assert.equal(big.length, positions * bigVocab, "big logits cover other positions");
  const result: LogitComparison = {
    maxRelativeError: 0,
    maxRelativeSpread: 0,
    maxRelativeShift: 0,
    paddedLogits: { min: bigVocab > vocab ? Infinity : 0, max: bigVocab > vocab ? -Infinity : 0 },
    positions,
  };
  const difference = new Float64Array(vocab);
  for (let row = 0; row < positions; row++) {
    const smallRow = small.subarray(row * vocab, (row + 1) * vocab);
    const bigRow = big.subarray(row * bigVocab, (row + 1) * bigVocab);
    let scale = 0;
    let shift = 0;
    for (let id = 0; id < vocab; id++) {
      scale = Math.max(scale, Math.abs(smallRow[id]!));
      difference[id] = bigRow[id]! - smallRow[id]!;
      shift += difference[id]! / vocab;
    }
    let error = 0;
    let spread = 0;
    for (const value of difference) {
      error = Math.max(error, Math.abs(value));
      spread = Math.max(spread, Math.abs(value - shift));
    }
    result.maxRelativeError = Math.max(result.maxRelativeError, error / scale);
    result.maxRelativeSpread = Math.max(result.maxRelativeSpread, spread / scale);
    result.maxRelativeShift = Math.max(result.maxRelativeShift, Math.abs(shift) / scale);
    for (let id = vocab; id < bigVocab; id++) {
      result.paddedLogits.min = Math.min(result.paddedLogits.min, bigRow[id]!);
      result.paddedLogits.max = Math.max(result.paddedLogits.max, bigRow[id]!);
    }
  }
  return result;
}

/**
 * Softmax mass at temperature T on `padded` ids of logit exactly 0 beside the real logits of one row:
 * padded * e^0 / (padded * e^0 + sum_real e^(z / T)), in float64 with the max taken out.
 */
function paddedMass(realLogits: Float32Array, padded: number, temperature: number): number {
  let max = 0; // the padded ids' own logit
  for (const logit of realLogits) max = Math.max(max, logit / temperature);
  let real = 0;
  for (const logit of realLogits) real += Math.exp(logit / temperature - max);
  const pad = padded * Math.exp(-max);
  return pad / (pad + real);
}

/** The same mass measured on a big model's own logits (padded ids are those from `vocab` on). */
function measuredPaddedMass(bigRow: Float32Array, vocab: number, temperature: number): number {
  let max = -Infinity;
  for (const logit of bigRow) max = Math.max(max, logit / temperature);
  let pad = 0;
  let total = 0;
  for (const [id, logit] of bigRow.entries()) {
    const weight = Math.exp(logit / temperature - max);
    total += weight;
    if (id >= vocab) pad += weight;
  }
  return pad / total;
}

interface PairCase {
  name: string;
  source: "target" | "draft";
  args: string[];
  /** Parts of the method the script must report as not exact (the vocabulary always is not). */
  inexact: string[];
  /** Bound on the relative logit error over real ids. */
  tolerance: number;
  shape: { hiddenSize: number; numLayers: number; numHeads: number; numKvHeads: number; headDim: number };
  vocab: number;
  sharded?: boolean;
  /** --mask-padded-ids: padded logits must be at most MASKED_LOGIT instead of exactly 0. */
  masked?: boolean;
}

// Padded logits under --mask-padded-ids are -65536 / rms(final residual); this bound leaves their softmax
// mass below 122112 * e^-200 even at T = 1.
const MASKED_LOGIT = -200;

const CASES: PairCase[] = [
  {
    // Every ratio a power of 4 (hidden 4x, head dim 4x), padded ids masked: real logits as the small
    // model's up to float rounding (the mask's eps' rounds once to float32). Sharded at 40 MB so that the
    // index path of pearl's loader reads it.
    name: "target, power-of-4 ratios, padded ids masked",
    source: "target",
    args: ["--shape", "custom", "--hidden", "1024", "--layers", "6", "--heads", "8", "--kv-heads", "4"],
    inexact: ["rmsnorm", "vocabulary"],
    tolerance: 1e-5,
    shape: { hiddenSize: 1024, numLayers: 6, numHeads: 8, numKvHeads: 4, headDim: 128 },
    vocab: 8192,
    sharded: true,
    masked: true,
  },
  {
    // The Llama-3.2-1B case in small: head dim 32 -> 64 rounds the q weights x sqrt(2); groups of 2 query
    // heads -> groups of 4 (extra query heads), 2 -> 4 KV heads, 2 extra layers, tied embeddings, whose
    // padded-id mask shifts each position's real logits by one constant.
    name: "draft, head dim x2 (q rounded), extra heads and layers, tied, padded ids masked",
    source: "draft",
    args: ["--shape", "custom", "--hidden", "512", "--layers", "6", "--heads", "16", "--kv-heads", "4"],
    inexact: ["attention scale", "rmsnorm", "vocabulary"],
    tolerance: 1e-2,
    shape: { hiddenSize: 512, numLayers: 6, numHeads: 16, numKvHeads: 4, headDim: 64 },
    vocab: 8192,
    masked: true,
  },
  {
    // Hidden x2 is not a power of 4: two copies of the residual stream make the norm rescale exact
    // (the Llama-3.1-70B case, 256 -> 8192, takes the same two copies). 4 -> 8 KV heads. Padded ids
    // keep logit 0 (the default).
    name: "target, hidden x2 with two residual copies (exact), padded ids at 0",
    source: "target",
    args: ["--shape", "custom", "--hidden", "512", "--layers", "6", "--heads", "16", "--kv-heads", "8"],
    inexact: ["vocabulary"],
    tolerance: 1e-5,
    shape: { hiddenSize: 512, numLayers: 6, numHeads: 16, numKvHeads: 8, headDim: 32 },
    vocab: 6400,
  },
  {
    // The same shape by the plain method (one copy): the norm weights x sqrt(1/2) round in bf16.
    name: "target, hidden x2 with one residual copy (norm rounded)",
    source: "target",
    args: [
      ...["--shape", "custom", "--hidden", "512", "--layers", "6", "--heads", "16", "--kv-heads", "8"],
      ...["--residual-copies", "1"],
    ],
    inexact: ["rmsnorm"],
    tolerance: 2e-2,
    shape: { hiddenSize: 512, numLayers: 6, numHeads: 16, numKvHeads: 8, headDim: 32 },
    vocab: 6144,
  },
];

function caseArgs(pairCase: PairCase): string[] {
  const small = JSON.parse(readFileSync(join(MODELS, pairCase.source, "config.json"), "utf8")) as {
    intermediate_size: number;
  };
  const args = [
    ...pairCase.args,
    ...["--head-dim", String(pairCase.shape.headDim), "--vocab", String(pairCase.vocab)],
    ...["--intermediate", String(small.intermediate_size + 64)],
  ];
  if (pairCase.source === "draft") args.push("--tied");
  if (pairCase.sharded) args.push("--shard-size", String(40_000_000));
  if (pairCase.masked) args.push("--mask-padded-ids");
  return args;
}

const smallRuns = new Map<string, Promise<{ engine: Engine; runs: Run[] }>>();
/** Each case's big-model runs, by case name, for the padded-mass check. */
const bigRunsByCase = new Map<string, Run[]>();

/** The small model's engine and runs, loaded once per source for all cases. */
function smallModel(source: string): Promise<{ engine: Engine; runs: Run[] }> {
  let loaded = smallRuns.get(source);
  if (!loaded) {
    loaded = (async () => {
      const engine = await Engine.load({ modelDir: join(MODELS, source), backend: "cpu" });
      return { engine, runs: await runPrompts(engine) };
    })();
    smallRuns.set(source, loaded);
  }
  return loaded;
}

after(async () => {
  for (const loaded of smallRuns.values()) await (await loaded).engine.close();
});

for (const pairCase of CASES) {
  describe(`embed_pair.py: ${pairCase.name}`, () => {
    let dir: string;
    let record: EmbeddingRecord;
    let big: Engine;
    let small: { engine: Engine; runs: Run[] };
    let bigRuns: Run[];

    before(async () => {
      ({ dir, record } = embed(
        pairCase.name.replace(/[^a-z0-9]+/gi, "-"),
        pairCase.source,
        caseArgs(pairCase),
      ));
      small = await smallModel(pairCase.source);
      big = await Engine.load({ modelDir: dir, backend: "cpu" });
      bigRuns = await runPrompts(big);
      bigRunsByCase.set(pairCase.name, bigRuns);
    });
    after(async () => big?.close());

    test("the script reports which parts are exact", () => {
      assert.deepEqual(
        inexactParts(record).sort(),
        [...pairCase.inexact].sort(),
        JSON.stringify(record.findings),
      );
    });

    test("pearl loads the big checkpoint with the requested shape", () => {
      const { hiddenSize, numLayers, numHeads, numKvHeads, headDim } = big.info;
      assert.deepEqual({ hiddenSize, numLayers, numHeads, numKvHeads, headDim }, pairCase.shape);
      assert.equal(big.info.vocabSize, pairCase.vocab);
      assert.equal(big.info.dtype, "bfloat16");
      assert.equal(existsSync(join(dir, "model.safetensors.index.json")), pairCase.sharded === true);
      assert.ok(pairCase.sharded !== true || record.files.length > 1, `files: ${record.files.join(", ")}`);
      for (const file of ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]) {
        assert.equal(
          readFileSync(join(dir, file), "utf8"),
          readFileSync(join(MODELS, pairCase.source, file), "utf8"),
        );
      }
    });

    test(`greedy continuations (${CONTINUATION} tokens) equal the small model's`, () => {
      for (const [index, run] of bigRuns.entries()) {
        assert.deepEqual(run.continuation, small.runs[index]!.continuation, `prompt ${index}`);
      }
    });

    const padded = pairCase.masked ? `at most ${MASKED_LOGIT}` : "exactly 0";
    test(`real ids keep the small model's logits, padded ids get ${padded}`, (t) => {
      const vocab = small.engine.info.vocabSize;
      const tied = pairCase.source === "draft";
      let worst = 0;
      let worstShift = 0;
      let positions = 0;
      const hasPadded = pairCase.vocab > vocab;
      const paddedLogits = hasPadded ? { min: Infinity, max: -Infinity } : { min: 0, max: 0 };
      for (const [index, run] of bigRuns.entries()) {
        const comparison = compareLogits(small.runs[index]!.logits, run.logits, vocab, pairCase.vocab);
        // A tied mask shifts whole rows (softmax-invariant); everywhere else the logits themselves match.
        worst = Math.max(
          worst,
          tied && pairCase.masked ? comparison.maxRelativeSpread : comparison.maxRelativeError,
        );
        worstShift = Math.max(worstShift, comparison.maxRelativeShift);
        paddedLogits.min = Math.min(paddedLogits.min, comparison.paddedLogits.min);
        paddedLogits.max = Math.max(paddedLogits.max, comparison.paddedLogits.max);
        positions += comparison.positions;
      }
      t.diagnostic(
        `max relative logit error over ${positions} positions: ${worst.toExponential(2)} (bound ${pairCase.tolerance})` +
          (tied && pairCase.masked
            ? ` after removing row shifts of up to ${worstShift.toExponential(2)}`
            : ""),
      );
      if (hasPadded) {
        t.diagnostic(
          `padded logits in [${paddedLogits.min.toPrecision(4)}, ${paddedLogits.max.toPrecision(4)}]`,
        );
      }
      assert.ok(worst <= pairCase.tolerance, `relative logit error ${worst}`);
      if (pairCase.masked) {
        assert.ok(paddedLogits.max <= MASKED_LOGIT, `a masked padded id has logit ${paddedLogits.max}`);
      } else {
        assert.deepEqual(paddedLogits, { min: 0, max: 0 }, "padded ids must have logit exactly 0");
      }
    });

    if (pairCase.masked) {
      test("sampling cannot draw a masked padded id", () => {
        for (const run of bigRuns) {
          for (let row = 0; row < run.logits.length / pairCase.vocab; row++) {
            const bigRow = run.logits.subarray(row * pairCase.vocab, (row + 1) * pairCase.vocab);
            const mass = measuredPaddedMass(bigRow, small.engine.info.vocabSize, 1);
            assert.ok(mass < 1e-60, `position ${row}: padded mass ${mass} at T 1`);
          }
        }
      });
    }
  });
}

describe("padded vocabulary: softmax mass on ids of logit 0", () => {
  test("predicted from the small model's logits, it is what the big model's softmax puts there", async () => {
    // The exact case with padded ids at logit 0: 6400 - 6144 = 256 of them.
    const pairCase = CASES[2]!;
    const bigRuns = bigRunsByCase.get(pairCase.name);
    assert.ok(bigRuns, `${pairCase.name} did not run`);
    const small = await smallModel(pairCase.source);
    const vocab = small.engine.info.vocabSize;
    let positions = 0;
    for (const [index, run] of bigRuns.entries()) {
      const smallLogits = small.runs[index]!.logits;
      for (let row = 0; row < smallLogits.length / vocab; row++, positions++) {
        const smallRow = smallLogits.subarray(row * vocab, (row + 1) * vocab);
        const bigRow = run.logits.subarray(row * pairCase.vocab, (row + 1) * pairCase.vocab);
        for (const temperature of [0.8, 1]) {
          const predicted = paddedMass(smallRow, pairCase.vocab - vocab, temperature);
          const measured = measuredPaddedMass(bigRow, vocab, temperature);
          assert.ok(
            Math.abs(predicted - measured) <= 1e-4 * measured,
            `prompt ${index}, T ${temperature}, position ${row}: predicted ${predicted}, measured ${measured}`,
          );
        }
      }
    }
    assert.ok(positions > 400, `${positions} positions`);
  });

  for (const source of ["target", "draft"] as const) {
    test(`${source}: padded to Llama-3's ${LLAMA3_VOCAB} ids (the real shapes)`, async (t) => {
      const small = await smallModel(source);
      const vocab = small.engine.info.vocabSize;
      const padded = LLAMA3_VOCAB - vocab;
      let positions = 0;
      let lowestBest = Infinity;
      for (const run of small.runs) {
        for (let row = 0; row < run.logits.length / vocab; row++) {
          const logits = run.logits.subarray(row * vocab, (row + 1) * vocab);
          lowestBest = Math.min(lowestBest, Math.max(...logits));
          positions++;
        }
      }
      for (const temperature of [0.8, 1]) {
        const masses = small.runs.flatMap((run) =>
          Array.from({ length: run.logits.length / vocab }, (_, row) =>
            paddedMass(run.logits.subarray(row * vocab, (row + 1) * vocab), padded, temperature),
          ),
        );
        const mean = masses.reduce((sum, mass) => sum + mass, 0) / masses.length;
        const sorted = [...masses].sort((a, b) => a - b);
        const median = sorted[Math.floor(sorted.length / 2)]!;
        t.diagnostic(
          `T ${temperature}: padded mass mean ${mean.toFixed(4)}, median ${median.toFixed(4)}, max ` +
            `${sorted[sorted.length - 1]!.toFixed(4)} over ${positions} positions (${padded} padded ids)`,
        );
      }
      t.diagnostic(`lowest best real logit: ${lowestBest.toFixed(3)} (greedy is unaffected while > 0)`);
      // Greedy equality of the real-shape checkpoints rests on this: at every position the best real id
      // beats the padded ids' logit of 0.
      assert.ok(
        lowestBest > 0,
        `a position's best real logit is ${lowestBest}: greedy would pick a padded id`,
      );
    });
  }
});

describe("embed_pair.py refuses shapes the method cannot hold", () => {
  const refusals: { name: string; source: string; args: string[]; message: RegExp }[] = [
    {
      name: "head dim not a multiple of the small one",
      source: "target",
      args: ["--shape", "custom", ...shapeArgs({ headDim: 48 })],
      message: /head_dim 48 is not a multiple of the small head_dim 32/,
    },
    {
      name: "hidden smaller than the small model's",
      source: "target",
      args: ["--shape", "custom", ...shapeArgs({ hidden: 128 })],
      message: /hidden 128 < the small hidden 256/,
    },
    {
      name: "fewer layers",
      source: "target",
      args: ["--shape", "custom", ...shapeArgs({ layers: 4 })],
      message: /4 layers < the small model's 6/,
    },
    {
      name: "fewer KV heads",
      source: "target",
      args: ["--shape", "custom", ...shapeArgs({ heads: 8, kvHeads: 2 })],
      message: /2 KV heads < the small model's 4/,
    },
    {
      name: "smaller query groups",
      source: "target",
      args: ["--shape", "custom", ...shapeArgs({ heads: 8, kvHeads: 8 })],
      message: /1 query heads per KV head < the small model's 2/,
    },
    {
      name: "the untied target into the tied Llama-3.2-1B shape",
      source: "target",
      args: ["--shape", "llama-3.2-1b"],
      message: /ties lm_head to the embedding and the source's lm_head is a different matrix/,
    },
  ];

  for (const refusal of refusals) {
    test(refusal.name, () => {
      const out = join(workDir, `refused-${refusal.name.replace(/[^a-z0-9]+/gi, "-")}`);
      const result = runEmbed(["--source", join(MODELS, refusal.source), "--out", out, ...refusal.args]);
      assert.equal(result.status, 2, `${result.stdout}${result.stderr}`);
      assert.match(result.stderr, /^embed_pair: error: /);
      assert.match(result.stderr, refusal.message);
      assert.equal(existsSync(out), false, "a refused shape wrote its output folder");
    });
  }
});

function shapeArgs(changes: {
  hidden?: number;
  layers?: number;
  heads?: number;
  kvHeads?: number;
  headDim?: number;
}): string[] {
  // A shape the target fits in, with one field changed.
  const shape = { hidden: 1024, layers: 8, heads: 16, kvHeads: 8, headDim: 64, ...changes };
  return [
    ...["--hidden", String(shape.hidden), "--layers", String(shape.layers)],
    ...["--heads", String(shape.heads), "--kv-heads", String(shape.kvHeads)],
    ...["--head-dim", String(shape.headDim), "--intermediate", "1024", "--vocab", "8192"],
  ];
}
