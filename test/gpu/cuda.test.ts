// The CUDA backend on a GPU (`npm run test:gpu`, after `npm run build:cuda`): every fixture against
// transformers and against the CPU backend, greedy continuations, batch invariance of the kernels for
// steps of up to 16 rows, the paged KV cache, and greedy speculative decoding equal to target-only decoding.
import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import {
  type DraftDistribution,
  Engine,
  type SamplingParams,
  type StepItem,
  type StepResult,
} from "../../lib/native.js";
import {
  addPrefilled,
  assertSameBits,
  greedyDecode,
  logitsRow,
  neighbourItems,
  only,
  prefillNeighbours,
  rowsAlone,
  stepLogits,
  tokenRange,
} from "../reference/drive.js";
import { FIXTURE_NAMES, type Fixture, loadFixture, relativeError } from "../reference/fixtures.js";
import type { LlamaF64 } from "../reference/llama_f64.js";
import {
  assertDrafted,
  assertEngineChoosesTokens,
  assertEngineDraftsFromTopK,
  assertEngineVerifiesSampledDrafts,
  processLogits,
  sampleToken,
  topKDistribution,
  verifyWindow,
} from "../reference/choose_token.js";
import { loadBf16Oracle } from "./bf16_oracle.js";
import { speculativeGreedy } from "./speculate.js";

// bf16 weights, activations and KV cache against float32 references. A checkpoint stored in bf16 is held to
// the 1e-2 from transformers. One stored in float32/float16 has its weights rounded to bf16 on load,
// a slightly different model: the ideal bf16 engine (bf16_oracle.ts) itself lands 0.6e-2 to 1.3e-2 from
// transformers' float32 logits on those fixtures, so they get 2e-2, and every fixture is held tightly to
// that oracle, which catches kernel bugs.
const VS_ORACLE = 3e-3;
const VS_ORACLE_ROW = 1e-2;
const VS_TRANSFORMERS_BF16_CHECKPOINT = 1e-2;
const VS_TRANSFORMERS_ROUNDED_WEIGHTS = 2e-2;
const CONTINUATION = 6;

function assertFinite(values: Float32Array, what: string): void {
  const bad = values.findIndex((value) => !Number.isFinite(value));
  assert.equal(bad, -1, `${what}: non-finite logit at ${bad}`);
}

for (const name of FIXTURE_NAMES) {
  describe(`cuda vs transformers: ${name}`, () => {
    let fixture: Fixture;
    let cuda: Engine;
    let cpu: Engine;
    let oracle: LlamaF64;

    before(async () => {
      fixture = loadFixture(name);
      cuda = await Engine.load({ modelDir: fixture.dir, backend: "cuda" });
      cpu = await Engine.load({ modelDir: fixture.dir, backend: "cpu" });
      oracle = loadBf16Oracle(fixture.dir);
    });
    after(async () => {
      await cuda?.close();
      await cpu?.close();
    });

    test("the engine runs on the cuda backend", () => {
      assert.equal(cuda.info.backend, "cuda");
      assert.equal(cuda.info.vocabSize, fixture.vocabSize);
    });

    test("prompt logits match transformers and the CPU backend within bf16 error", async (t) => {
      const bound =
        fixture.dtype === "bfloat16" ? VS_TRANSFORMERS_BF16_CHECKPOINT : VS_TRANSFORMERS_ROUNDED_WEIGHTS;
      for (const [i, prompt] of fixture.prompts.entries()) {
        await cuda.addSequence(i);
        await cpu.addSequence(i);
        const gpuLogits = await stepLogits(cuda, i, prompt);
        const cpuLogits = await stepLogits(cpu, i, prompt);
        await cuda.release(i);
        await cpu.release(i);
        assertFinite(gpuLogits, `prompt ${i}`);
        const vsReference = relativeError(gpuLogits, fixture.logits[i]!);
        const vsCpu = relativeError(gpuLogits, cpuLogits);
        t.diagnostic(`prompt ${i} (${fixture.dtype}): vs transformers ${vsReference.toExponential(2)}`);
        assert.ok(vsReference < bound, `prompt ${i}: relative error vs transformers ${vsReference}`);
        assert.ok(vsCpu < bound, `prompt ${i}: relative error vs cpu ${vsCpu}`);
      }
    });

    test("prefill and decode rows match the ideal bf16 engine", async () => {
      for (const [i, prompt] of fixture.prompts.entries()) {
        const continuation = fixture.greedy[i]!.slice(0, CONTINUATION);
        const sequence = [...prompt, ...continuation];
        const vocab = fixture.vocabSize;
        await cuda.addSequence(i);
        const rows = new Float32Array(sequence.length * vocab);
        rows.set(await stepLogits(cuda, i, prompt));
        for (const [t, token] of continuation.entries()) {
          rows.set(await stepLogits(cuda, i, [token]), (prompt.length + t) * vocab);
        }
        await cuda.release(i);
        assertFinite(rows, `sequence ${i}`);
        const expected = Float32Array.from(oracle.forward(sequence));
        const error = relativeError(rows, expected);
        assert.ok(error < VS_ORACLE, `sequence ${i}: relative error vs the bf16 oracle ${error}`);
        for (let row = 0; row < sequence.length; row++) {
          const rowError = relativeError(logitsRow(rows, vocab, row), logitsRow(expected, vocab, row));
          assert.ok(
            rowError < VS_ORACLE_ROW,
            `sequence ${i}, row ${row}: relative error vs the oracle ${rowError}`,
          );
        }
      }
    });

    // Rounding a float32 or float16 checkpoint to bf16 makes a slightly different model, whose greedy
    // path may legitimately leave the reference's at a near-tie; a bf16 checkpoint is the same model.
    test(
      "greedy continuation equals transformers' (bf16 checkpoints)",
      { skip: name !== "llama32-tied-bf16" },
      async () => {
        for (const [i, prompt] of fixture.prompts.entries()) {
          const expected = fixture.greedy[i]!;
          assert.deepEqual(await greedyDecode(cuda, i, prompt, expected.length), expected, `prompt ${i}`);
        }
      },
    );
  });
}

describe("cuda batch invariance (steps of at most 16 rows)", () => {
  let engine: Engine;
  let vocab: number;
  let prompt: number[];
  let continuation: number[];
  let decodeAlone: Float32Array[];
  let nextSeqId = 0;

  before(async () => {
    engine = await Engine.load({ modelDir: loadFixture("qwen3-qknorm-f32").dir, backend: "cuda" });
    vocab = engine.info.vocabSize;
    prompt = tokenRange(3, 21, vocab);
    continuation = tokenRange(11, 5, vocab);
    decodeAlone = (await rowsAlone(engine, nextSeqId++, prompt, continuation)).decode;
  });
  after(async () => engine?.close());

  test("decode rows batched with 5 other sequences are bit-identical to decoding alone", async () => {
    const others = Array.from({ length: 5 }, () => nextSeqId++);
    await prefillNeighbours(engine, others, (k) => 3 + 37 * k);
    const seqId = nextSeqId++;
    await addPrefilled(engine, seqId, prompt);
    for (const [t, token] of continuation.entries()) {
      const items = neighbourItems(others, t, 3, vocab);
      items.splice(t % items.length, 0, { seqId, tokens: Int32Array.of(token), output: "logits" });
      const results = await engine.step(items);
      const mine = results.find((result) => result.seqId === seqId);
      assertSameBits(mine?.logits, decodeAlone[t]!, `decode step ${t}`);
    }
    for (const id of [...others, seqId]) await engine.release(id);
  });

  test("rows of a verify window are bit-identical to one-token decode steps", async () => {
    const seqId = nextSeqId++;
    await addPrefilled(engine, seqId, prompt);
    const result = only(
      await engine.step([
        { seqId, tokens: Int32Array.from(continuation), numDraft: continuation.length - 1, output: "logits" },
      ]),
    );
    for (const t of continuation.keys()) {
      assertSameBits(result.logits && logitsRow(result.logits, vocab, t), decodeAlone[t]!, `window row ${t}`);
    }
    await engine.release(seqId);
  });

  test("truncate rolls back: re-decoding the same tokens gives the same bits", async () => {
    const seqId = nextSeqId++;
    await addPrefilled(engine, seqId, prompt);
    await stepLogits(engine, seqId, tokenRange(400, 4, vocab));
    await engine.truncate(seqId, prompt.length);
    for (const [t, token] of continuation.entries()) {
      assertSameBits(await stepLogits(engine, seqId, [token]), decodeAlone[t]!, `after truncate, step ${t}`);
    }
    await engine.release(seqId);
  });

  test("a prefix-cache hit gives the next token of a cold prefill", async () => {
    const long = tokenRange(5, 70, vocab);
    const cold = nextSeqId++;
    await engine.addSequence(cold);
    const coldLogits = await stepLogits(engine, cold, long);
    await engine.release(cold);
    const publisher = nextSeqId++;
    await engine.addSequence(publisher);
    await engine.step([{ seqId: publisher, tokens: Int32Array.from(long) }]);
    await engine.release(publisher);
    const before = await engine.cacheStats();
    const warm = nextSeqId++;
    await engine.addSequence(warm);
    await engine.step([{ seqId: warm, tokens: Int32Array.from(long.slice(0, -1)), output: "none" }]);
    const afterHit = await engine.cacheStats();
    assert.ok(afterHit.prefixHitTokens - before.prefixHitTokens >= 48, JSON.stringify(afterHit));
    const warmLast = await stepLogits(engine, warm, long.slice(-1));
    const coldLast = logitsRow(coldLogits, vocab, long.length - 1);
    const error = relativeError(warmLast, coldLast);
    assert.ok(error < VS_ORACLE, `prefix hit vs cold: relative error ${error}`);
    await engine.release(warm);
  });
});

const EMBEDDED_MODELS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "models");
const EMBEDDED_DRAFT = join(EMBEDDED_MODELS, "draft");
const EMBEDDED_TARGET = join(EMBEDDED_MODELS, "target");

// The engine's Sample steps against the TypeScript rule applied to the logits of Logits steps over the same
// rows (bit-identical on the device: the same row counts take the same kernels). Exact equality is asserted;
// the device's double exp and its sums in another order than the host's can only flip a draw, a cut
// boundary, an acceptance test or a drafting q's float32 rounding within a few ulps of a tie, which these
// seeds do not come near.
describe("cuda tokens picked on the device", () => {
  test("greedy, whole-softmax and top-k/top-p tokens equal the reference rule on the same rows' logits", async () => {
    const engine = await Engine.load({ modelDir: loadFixture("llama-gqa-f32").dir, backend: "cuda" });
    try {
      await assertEngineChoosesTokens(engine, tokenRange(7, 13, engine.info.vocabSize));
    } finally {
      await engine.close();
    }
  });

  // The fixture's top-p rows and the embedded models' (real, peaky rows) end their nuclei within the
  // selection (processed_path's Nucleus rows); the mixed step below also has nuclei past it.
  for (const [name, modelDir] of [
    ["the embedded draft", () => EMBEDDED_DRAFT],
    ["the embedded target", () => EMBEDDED_TARGET],
  ] as const) {
    test(`${name}: greedy, whole-softmax and top-k/top-p tokens and verdicts equal the reference rule`, async () => {
      const engine = await Engine.load({ modelDir: modelDir(), backend: "cuda" });
      try {
        await assertEngineChoosesTokens(engine, tokenRange(7, 13, engine.info.vocabSize));
        await assertEngineVerifiesSampledDrafts(engine, tokenRange(7, 13, engine.info.vocabSize));
      } finally {
        await engine.close();
      }
    });
  }

  test("sampled-draft verify windows (p(d), residual, bonus) get the reference verdict on the same logits", async () => {
    const engine = await Engine.load({ modelDir: loadFixture("llama-gqa-f32").dir, backend: "cuda" });
    try {
      await assertEngineVerifiesSampledDrafts(engine, tokenRange(7, 13, engine.info.vocabSize));
    } finally {
      await engine.close();
    }
  });

  test("a drafting step's q (top k of p, sorted on the device) and its token equal the reference rule", async () => {
    const engine = await Engine.load({ modelDir: loadFixture("llama-gqa-f32").dir, backend: "cuda" });
    try {
      await assertEngineDraftsFromTopK(engine, tokenRange(7, 13, engine.info.vocabSize));
    } finally {
      await engine.close();
    }
  });
});

// One step holding rows of every processed path (native/src/ops/cuda_ops.cuh, processed_path), each against
// the reference rule on its rows' logits from a step of the same shape on twin sequences. Selected: drafting
// rows without a cut (k from 1 to kMaxSelectedTopK, and k above a tiny temperature's support) and rows whose
// only cut is top_k <= kMaxSelectedTopK (drafting rows, sampling rows and sampled-draft windows; top_k 1 and
// 256, top_k above the support, returnTopK above top_k), or top_k <= kMaxSelectedTopK with top_p. Nucleus
// (top_p alone): rows and sampled-draft windows whose nucleus ends within the selection's kMaxSelectedTopK
// (peaky rows) and ones whose nucleus does not (near-flat rows at a high temperature: the sort decides
// them in the same call), on every model. Sorted: top_k 257 and 300 (one with top_p), returnTopK above
// kMaxSelectedTopK. Whole: a sampled-draft window without a cut. Rows with returnTopK are drafting rows (q
// and the token drawn from it), the others sampling rows (their token).
interface MixedRow {
  sampling: SamplingParams;
  returnTopK?: number;
  /** The support is smaller than k (top_k, else returnTopK): the row exercises a support below its k. */
  supportBelowK?: true;
  /** A Nucleus row whose nucleus ends within the selection ("within") or past it ("past", sorted). */
  nucleus?: "within" | "past";
}

// processed_path's kMaxSelectedTopK (native/src/ops/cuda_ops.cuh): a Nucleus row's selection size.
const MAX_SELECTED_TOP_K = 256;

function assertNucleusPath(tokens: number, path: "within" | "past", what: string): void {
  assert.equal(
    tokens <= MAX_SELECTED_TOP_K ? "within" : "past",
    path,
    `nucleus of ${tokens} tokens, ${what}`,
  );
}
const MIXED_ROWS: readonly MixedRow[] = [
  { sampling: { temperature: 0.8, topK: 0, topP: 1, seed: 31 }, returnTopK: 16 },
  { sampling: { temperature: 1.7, topK: 0, topP: 1, seed: 32 }, returnTopK: 1 },
  { sampling: { temperature: 0.8, topK: 0, topP: 1, seed: 33 }, returnTopK: 256 },
  { sampling: { temperature: 0.8, topK: 0, topP: 1, seed: 34 }, returnTopK: 300 },
  { sampling: { temperature: 1e-5, topK: 0, topP: 1, seed: 35 }, returnTopK: 64, supportBelowK: true },
  { sampling: { temperature: 0.9, topK: 20, topP: 1, seed: 36 }, returnTopK: 16 },
  { sampling: { temperature: 1.3, topK: 0, topP: 0.6, seed: 37 }, returnTopK: 4 },
  { sampling: { temperature: 0.7, topK: 40, topP: 1, seed: 39 }, returnTopK: 300 },
  { sampling: { temperature: 1.0, topK: 256, topP: 1, seed: 40 }, returnTopK: 8 },
  { sampling: { temperature: 1.0, topK: 257, topP: 1, seed: 47 }, returnTopK: 8 },
  { sampling: { temperature: 1e-5, topK: 64, topP: 1, seed: 48 }, returnTopK: 16, supportBelowK: true },
  { sampling: { temperature: 0.9, topK: 20, topP: 1, seed: 41 } },
  { sampling: { temperature: 1.5, topK: 1, topP: 1, seed: 42 } },
  { sampling: { temperature: 1.2, topK: 256, topP: 1, seed: 43 } },
  { sampling: { temperature: 1e-5, topK: 50, topP: 1, seed: 44 }, supportBelowK: true },
  { sampling: { temperature: 0.8, topK: 300, topP: 1, seed: 45 } },
  { sampling: { temperature: 1.0, topK: 0, topP: 0.5, seed: 49 }, nucleus: "within" },
  { sampling: { temperature: 0.8, topK: 0, topP: 0.7, seed: 50 }, returnTopK: 8, nucleus: "within" },
  { sampling: { temperature: 4.0, topK: 0, topP: 0.95, seed: 51 }, nucleus: "past" },
  { sampling: { temperature: 3.0, topK: 0, topP: 0.98, seed: 52 }, returnTopK: 16, nucleus: "past" },
  { sampling: { temperature: 0.7, topK: 100, topP: 0.8, seed: 53 } },
  { sampling: { temperature: 0.9, topK: 100, topP: 0.8, seed: 57 }, returnTopK: 4 },
  { sampling: { temperature: 1.0, topK: 300, topP: 0.9, seed: 54 } },
];
const WHOLE_WINDOW_SAMPLING: SamplingParams = { temperature: 1.1, topK: 0, topP: 1, seed: 38 };
const TOP_K_WINDOW_SAMPLING: SamplingParams = { temperature: 1.1, topK: 30, topP: 1, seed: 46 };
// Sampled-draft windows with a top-p cut only: every row's nucleus within the selection, and past it.
const NUCLEUS_WINDOWS: readonly { sampling: SamplingParams; nucleus: "within" | "past" }[] = [
  { sampling: { temperature: 1.0, topK: 0, topP: 0.5, seed: 55 }, nucleus: "within" },
  { sampling: { temperature: 4.0, topK: 0, topP: 0.95, seed: 56 }, nucleus: "past" },
];
const MIXED_TWIN_BASE = 9900;
const MIXED_CASES = MIXED_ROWS.length + 3 + NUCLEUS_WINDOWS.length;
const DRAFT_SOURCE = 9800;

// A case of the mixed step: the tokens both twins append, the sampled twin's item, and the check of its
// result against the reference rule on the logits twin's rows.
interface MixedCase {
  name: string;
  tokens: number[];
  item: (seqId: number, tokens: Int32Array) => StepItem;
  check: (logits: Float32Array, result: StepResult | undefined, what: string) => void;
}

function rowCase(row: MixedRow, index: number, position: number, vocab: number): MixedCase {
  const { sampling, returnTopK } = row;
  return {
    name: `row ${index}: temperature ${sampling.temperature}, top_k ${sampling.topK}, top_p ${sampling.topP}, returnTopK ${returnTopK ?? "none"}`,
    tokens: tokenRange(300 + index, 1, vocab),
    item: (seqId, stepTokens) => ({
      seqId,
      tokens: stepTokens,
      sampling,
      ...(returnTopK === undefined ? {} : { returnTopK }),
    }),
    check: (logits, result, what) => {
      const p = processLogits(logits, sampling);
      if (row.nucleus !== undefined) assertNucleusPath(p.tokens.length, row.nucleus, what);
      if (row.supportBelowK) {
        assert.ok(
          p.tokens.length < (sampling.topK > 0 ? sampling.topK : returnTopK!),
          `support below k, ${what}`,
        );
      }
      if (returnTopK === undefined) {
        assert.equal(result?.nextToken, sampleToken(p, sampling.seed, position), `sampled token, ${what}`);
        return;
      }
      assertDrafted(result, topKDistribution(p, Math.min(returnTopK, vocab)), sampling.seed, position, what);
    },
  };
}

function windowCase(
  name: string,
  window: number[],
  draftDists: DraftDistribution[],
  sampling: SamplingParams,
  position: number,
  vocab: number,
  accepted?: number,
  nucleus?: "within" | "past",
): MixedCase {
  return {
    name: `${name} window, top_k ${sampling.topK}, top_p ${sampling.topP}`,
    tokens: window,
    item: (seqId, stepTokens) => ({
      seqId,
      tokens: stepTokens,
      numDraft: window.length - 1,
      draftDists,
      sampling,
    }),
    check: (logits, result, what) => {
      const rows = window.map((_, row) => logitsRow(logits, vocab, row));
      if (nucleus !== undefined) {
        for (const [index, row] of rows.entries()) {
          assertNucleusPath(processLogits(row, sampling).tokens.length, nucleus, `row ${index}, ${what}`);
        }
      }
      const expected = verifyWindow(rows, window, draftDists, sampling, position);
      if (accepted !== undefined)
        assert.equal(expected.accepted, accepted, `the window's designed verdict, ${what}`);
      assert.deepEqual(
        { accepted: result?.accepted, nextToken: result?.nextToken },
        expected,
        `verdict, ${what}`,
      );
    },
  };
}

// A top-k window [first, g1, g2, last] over the target's greedy continuation g of prompt + first: g1 and g2 are
// accepted whatever the draws (the argmax has p >= 1/top_k, far above their q of 0.01); last is g3 (accepted:
// the bonus row decides) or row 2's least likely token (outside the top k, p = 0: the residual decides).
async function topKWindowCases(engine: Engine, prompt: number[], position: number): Promise<MixedCase[]> {
  const vocab = engine.info.vocabSize;
  const first = tokenRange(210, 1, vocab)[0]!;
  const greedy = await greedyDecode(engine, DRAFT_SOURCE, [...prompt, first], 3);
  await engine.addSequence(DRAFT_SOURCE);
  const context = await stepLogits(engine, DRAFT_SOURCE, [...prompt, first, greedy[0]!, greedy[1]!]);
  await engine.release(DRAFT_SOURCE);
  const rowTwo = logitsRow(context, vocab, prompt.length + 2);
  const unlikely = rowTwo.reduce((best, logit, token) => (logit < rowTwo[best]! ? token : best), 0);
  const sure = (draft: number): DraftDistribution => ({
    tokens: Int32Array.of(draft, (draft + 1) % vocab),
    probs: Float32Array.of(0.01, 0.99),
  });
  const accepted = [first, ...greedy];
  const rejected = [first, greedy[0]!, greedy[1]!, unlikely];
  const rejectedDists = [
    sure(greedy[0]!),
    sure(greedy[1]!),
    { tokens: Int32Array.of(unlikely, greedy[2]!), probs: Float32Array.of(0.5, 0.5) },
  ];
  return [
    windowCase("accepted", accepted, greedy.map(sure), TOP_K_WINDOW_SAMPLING, position, vocab, 3),
    windowCase("rejected-last", rejected, rejectedDists, TOP_K_WINDOW_SAMPLING, position, vocab, 2),
  ];
}

async function assertMixedDraftingStep(engine: Engine, label: string): Promise<void> {
  const vocab = engine.info.vocabSize;
  const prompt = tokenRange(7, 13, vocab);
  const position = prompt.length + 1;
  const whole = tokenRange(200, 4, vocab);
  const wholeDists: DraftDistribution[] = whole.slice(1).map((draft) => ({
    tokens: Int32Array.of(draft, (draft + 1) % vocab),
    probs: Float32Array.of(0.5, 0.5),
  }));
  const cases = [
    ...MIXED_ROWS.map((row, i) => rowCase(row, i, position, vocab)),
    windowCase("whole", whole, wholeDists, WHOLE_WINDOW_SAMPLING, position, vocab),
    ...(await topKWindowCases(engine, prompt, position)),
    ...NUCLEUS_WINDOWS.map(({ sampling, nucleus }) =>
      windowCase(`nucleus ${nucleus}`, whole, wholeDists, sampling, position, vocab, undefined, nucleus),
    ),
  ];
  assert.equal(cases.length, MIXED_CASES);
  const twins = cases.map((_, i) => MIXED_TWIN_BASE + 2 * i);
  for (const id of twins) {
    await addPrefilled(engine, id, prompt);
    await addPrefilled(engine, id + 1, prompt);
  }
  const logitsStep = await engine.step(
    cases.map((mixed, i): StepItem => ({
      seqId: twins[i]!,
      tokens: Int32Array.from(mixed.tokens),
      output: "logits",
    })),
  );
  const sampled = await engine.step(
    cases.map((mixed, i): StepItem => mixed.item(twins[i]! + 1, Int32Array.from(mixed.tokens))),
  );
  for (const [i, mixed] of cases.entries()) {
    const what = `${label}, ${mixed.name}`;
    const logits = logitsStep.find((result) => result.seqId === twins[i])?.logits;
    assert.ok(logits, `twin logits, ${what}`);
    mixed.check(
      logits,
      sampled.find((result) => result.seqId === twins[i]! + 1),
      what,
    );
  }
  for (const id of twins) {
    await engine.release(id);
    await engine.release(id + 1);
  }
}

describe("cuda drafting, sampling and verify rows of every processed path in one step", () => {
  for (const [name, modelDir] of [
    ["llama-gqa-f32 (vocab 512)", () => loadFixture("llama-gqa-f32").dir],
    ["the embedded draft (vocab 6144)", () => EMBEDDED_DRAFT],
    ["the embedded target (vocab 6144)", () => EMBEDDED_TARGET],
  ] as const) {
    test(`${name}: q, tokens and verdicts equal the reference rule, with and without forced bisection`, async () => {
      const engine = await Engine.load({ modelDir: modelDir(), backend: "cuda" });
      try {
        await assertMixedDraftingStep(engine, "default");
        // 0: every selected row bisects down to its k-th token (at the default only heavy ties do).
        process.env.PEARL_CUDA_SELECT_CANDIDATES = "0";
        await assertMixedDraftingStep(engine, "bisection");
        process.env.PEARL_CUDA_SELECT_CANDIDATES = "2049";
        await assert.rejects(
          assertMixedDraftingStep(engine, "refused"),
          /PEARL_CUDA_SELECT_CANDIDATES must be an integer from 0 to 2048, got "2049"/,
        );
        delete process.env.PEARL_CUDA_SELECT_CANDIDATES;
        for (let id = MIXED_TWIN_BASE; id < MIXED_TWIN_BASE + 2 * MIXED_CASES; id++) await engine.release(id);
        await assertMixedDraftingStep(engine, "after the refusal");
      } finally {
        delete process.env.PEARL_CUDA_SELECT_CANDIDATES;
        await engine.close();
      }
    });
  }
});

describe("cuda skinny GEMM variants (PEARL_CUDA_SKINNY_VARIANT)", () => {
  const VARIANTS = ["tiles1", "tiles2", "tiles4", "tiles1-prefetch", "tiles2-prefetch"];

  // The fixture's matrices are a few CTAs wide; the embedded target's lm_head (6144 x 256) runs several
  // waves, and its down projection (k = 704) has a k that ends inside a warp's step.
  const fixture = loadFixture("qwen2-bias-f32");
  const MODELS = [
    { name: fixture.name, dir: fixture.dir, vocab: fixture.vocabSize },
    { name: "embedded target", dir: EMBEDDED_TARGET, vocab: 6144 },
  ];

  test("every variant gives bit-identical logits, and an unknown name is refused", async () => {
    try {
      for (const model of MODELS) {
        const prompt = tokenRange(3, 11, model.vocab);
        const byVariant: Float32Array[] = [];
        for (const variant of VARIANTS) {
          process.env.PEARL_CUDA_SKINNY_VARIANT = variant;
          const engine = await Engine.load({ modelDir: model.dir, backend: "cuda" });
          await engine.addSequence(0);
          byVariant.push(await stepLogits(engine, 0, prompt));
          await engine.close();
        }
        for (const [i, logits] of byVariant.entries()) {
          assertSameBits(logits, byVariant[0]!, `${model.name}, ${VARIANTS[i]!}`);
        }
      }
      process.env.PEARL_CUDA_SKINNY_VARIANT = "tiles3";
      await assert.rejects(
        Engine.load({ modelDir: MODELS[0]!.dir, backend: "cuda" }),
        /unknown skinny GEMM variant "tiles3"/,
      );
    } finally {
      delete process.env.PEARL_CUDA_SKINNY_VARIANT;
    }
  });
});

describe("cuda deterministic mode (EngineOptions.deterministic)", () => {
  test("a prompt of 40 rows batched with 7 others is bit-identical to the prompt alone", async () => {
    const engine = await Engine.load({
      modelDir: loadFixture("llama-gqa-f32").dir,
      backend: "cuda",
      deterministic: true,
    });
    try {
      const vocab = engine.info.vocabSize;
      const prompt = tokenRange(9, 40, vocab);
      await engine.addSequence(0);
      const alone = await stepLogits(engine, 0, prompt);
      const items: StepItem[] = [];
      for (let k = 1; k <= 7; k++) {
        await engine.addSequence(k);
        items.push({
          seqId: k,
          tokens: Int32Array.from(tokenRange(50 + k, 5 + 9 * k, vocab)),
          output: "logits",
        });
      }
      await engine.addSequence(99);
      items.splice(4, 0, { seqId: 99, tokens: Int32Array.from(prompt), output: "logits" });
      const results = await engine.step(items);
      assertSameBits(results.find((result) => result.seqId === 99)?.logits, alone, "prompt rows in a batch");
    } finally {
      await engine.close();
    }
  });

  test("greedy speculative decoding of 4 concurrent sequences equals target-only decoding", async () => {
    const outcome = await speculativeGreedy({
      sessions: 4,
      draftLength: 5,
      newTokens: 48,
      deterministic: true,
    });
    assert.deepEqual(outcome.speculative, outcome.targetOnly);
    assert.ok(outcome.acceptedTokens > 0, "the embedded draft agrees with its target at least sometimes");
  });
});

describe("cuda default mode, steps of at most 16 rows", () => {
  test("greedy speculative decoding of 3 concurrent sequences equals target-only decoding", async () => {
    const outcome = await speculativeGreedy({
      sessions: 3,
      draftLength: 4,
      newTokens: 48,
      deterministic: false,
    });
    assert.deepEqual(outcome.speculative, outcome.targetOnly);
  });
});

describe("cuda overlapped steps (feedNextToken, queued behind the step in flight)", () => {
  const GREEDY: SamplingParams = { temperature: 0, topK: 0, topP: 1, seed: 0 };
  const WHOLE: SamplingParams = { temperature: 0.8, topK: 0, topP: 1, seed: 99 };
  const TOP_K: SamplingParams = { temperature: 0.8, topK: 20, topP: 1, seed: 5 };
  let engine: Engine;

  before(async () => {
    engine = await Engine.load({ modelDir: EMBEDDED_TARGET, backend: "cuda" });
  });
  after(async () => engine?.close());

  /**
   * Three sequences through one script of steps: decode steps that feed the previous token (greedy and
   * whole-softmax rows, which may begin behind the step in flight and take its tokens on the device), a
   * top-k step (which may not), a step mixing a fed row with given tokens, and a truncate after which
   * feeding is refused. `queued`: every call is made before any is awaited; otherwise one at a time.
   */
  async function script(seqIds: number[], queued: boolean): Promise<(number[] | string)[]> {
    const vocab = engine.info.vocabSize;
    const fed = (sampling: SamplingParams): StepItem[] =>
      seqIds.map((seqId) => ({ seqId, tokens: new Int32Array(0), feedNextToken: true, sampling }));
    const calls: (() => Promise<StepResult[] | void>)[] = [
      ...seqIds.map((seqId) => () => engine.addSequence(seqId)),
      () =>
        engine.step(
          seqIds.map((seqId, i) => ({
            seqId,
            tokens: Int32Array.from(tokenRange(7 + 5 * i, 9 + i, vocab)),
            commit: false,
          })),
        ),
      ...Array.from({ length: 6 }, (_, i) => () => engine.step(fed(i % 2 ? WHOLE : GREEDY))),
      () => engine.step(fed(TOP_K)),
      ...Array.from({ length: 3 }, () => () => engine.step(fed(GREEDY))),
      () =>
        engine.step([
          { seqId: seqIds[0]!, tokens: Int32Array.of(3), feedNextToken: true },
          { seqId: seqIds[1]!, tokens: Int32Array.of(17, 4) },
          { seqId: seqIds[2]!, tokens: new Int32Array(0), feedNextToken: true, sampling: WHOLE },
        ]),
      ...Array.from({ length: 2 }, () => () => engine.step(fed(GREEDY))),
      () => engine.truncate(seqIds[1]!, 12),
      () => engine.step(fed(GREEDY)),
      ...seqIds.map((seqId) => () => engine.release(seqId)),
    ];
    const outcome = (result: StepResult[] | void): number[] | string =>
      result ? result.flatMap((r) => [r.nextToken, r.length]) : "done";
    // The two runs use different sequence ids.
    const failure = (error: Error): string => error.message.replace(/sequence \d+/g, "sequence N");
    if (queued) return Promise.all(calls.map((call) => call().then(outcome, failure)));
    const outcomes: (number[] | string)[] = [];
    for (const call of calls) outcomes.push(await call().then(outcome, failure));
    return outcomes;
  }

  test("queued steps give what the same steps give one at a time", async () => {
    const oneAtATime = await script([1, 2, 3], false);
    const queued = await script([4, 5, 6], true);
    assert.deepEqual(queued, oneAtATime);
    assert.match(String(oneAtATime.at(-4)), /sequence N: feed_next_token: no token to feed/);
    const decoded = oneAtATime.filter((outcome) => Array.isArray(outcome)).length;
    assert.equal(decoded, 14, "every step but the last one after the truncate returned results");
  });
});
