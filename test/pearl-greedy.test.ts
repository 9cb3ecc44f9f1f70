// Greedy exactness (docs/design.md §4): pearl and sd output exactly the tokens ar outputs, one request at a time
// or many in flight together, and every request ends exactly: EOS is the last token ever emitted, never
// more than max_tokens, never past the context length. The draft is the target with noise added to its
// weights, so that its guesses are accepted about half the time: both the acceptance and the correction
// paths run on every request.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { FinishReason } from "../proto/gen/pearl/v1/common.js";
import { fixtureDir, modelWithConfig, perturbedModel, removeMadeModels } from "./helpers/models.js";
import { type DecodingModeName, PROTO_MODES } from "../lib/decoding_modes.js";
import { type Generated, inParallel, randomPrompts, Stack } from "./helpers/stack.js";

const TARGET = fixtureDir("llama-gqa-f32");
const CONTEXT_LENGTH = 256;
const EOS = 2;
const PROMPTS = randomPrompts(20, 2, 48, 11);

function greedy(
  stack: Stack,
  prompt: number[],
  maxTokens: number,
  mode: DecodingModeName,
): Promise<Generated> {
  return stack.generate({ promptTokenIds: prompt, maxTokens, temperature: 0, mode: PROTO_MODES[mode] });
}

/** The finish rules, checked on any result. */
function assertExactFinish(result: Generated, promptLength: number, maxTokens: number, eos: number): void {
  const tokens = result.tokenIds;
  const eosAt = tokens.indexOf(eos);
  if (result.finishReason === FinishReason.FINISH_REASON_STOP) {
    assert.equal(eosAt, tokens.length - 1, "a stopped sequence ends at its first EOS");
  } else {
    assert.equal(result.finishReason, FinishReason.FINISH_REASON_LENGTH);
    assert.equal(eosAt, -1, "no EOS in a sequence that ran to its length");
    assert.equal(tokens.length, Math.min(maxTokens, CONTEXT_LENGTH - promptLength));
  }
  assert.ok(tokens.length <= maxTokens);
  assert.equal(result.usage.completionTokens, tokens.length);
}

describe("greedy exactness", () => {
  let stack: Stack;
  let draftDir: string;

  before(async () => {
    draftDir = perturbedModel(TARGET, 0.04, 7);
    stack = await Stack.start({ draftModel: draftDir, targetModel: TARGET });
  });

  after(async () => {
    await stack?.stop();
    removeMadeModels();
  });

  for (const maxTokens of [1, 7, 64]) {
    test(`pearl and sd output ar's tokens: ${PROMPTS.length} prompts, max_tokens ${maxTokens}`, async (t) => {
      const results = await inParallel(PROMPTS, 4, async (prompt) => ({
        ar: await greedy(stack, prompt, maxTokens, "ar"),
        pearl: await greedy(stack, prompt, maxTokens, "pearl"),
        sd: await greedy(stack, prompt, maxTokens, "sd"),
      }));
      results.forEach(({ ar, pearl, sd }, i) => {
        const prompt = PROMPTS[i]!;
        assert.deepEqual(pearl.tokenIds, ar.tokenIds, `pearl, prompt ${i}`);
        assert.deepEqual(sd.tokenIds, ar.tokenIds, `sd, prompt ${i}`);
        for (const result of [ar, pearl, sd]) assertExactFinish(result, prompt.length, maxTokens, EOS);
        assert.equal(ar.usage.targetSteps, ar.tokenIds.length, "ar takes one target step per token");
      });
      if (maxTokens > 1) {
        for (const mode of ["pearl", "sd"] as const) {
          const proposed = results.reduce((sum, r) => sum + r[mode].usage.draftTokens, 0);
          const accepted = results.reduce((sum, r) => sum + r[mode].usage.acceptedTokens, 0);
          const steps = results.reduce((sum, r) => sum + r[mode].usage.targetSteps, 0);
          const tokens = results.reduce((sum, r) => sum + r[mode].tokenIds.length, 0);
          t.diagnostic(
            `${mode}: accepted ${accepted} of ${proposed} drafts, ${(tokens / steps).toFixed(2)} tokens per target step`,
          );
          assert.ok(accepted > 0 && accepted < proposed, `${mode}: both acceptances and rejections happen`);
          assert.ok(steps < tokens, `${mode}: fewer target steps than tokens`);
        }
      }
    });
  }

  test("8 requests of different lengths in flight at once, in every mode together", async () => {
    const prompts = randomPrompts(8, 3, 60, 23);
    const maxTokens = [5, 64, 13, 40, 1, 64, 27, 50];
    const reference = [];
    for (const [i, prompt] of prompts.entries())
      reference.push(await greedy(stack, prompt, maxTokens[i]!, "ar"));
    const all = await Promise.all(
      (["pearl", "sd", "ar"] as const).flatMap((mode) =>
        prompts.map(async (prompt, i) => ({
          mode,
          i,
          result: await greedy(stack, prompt, maxTokens[i]!, mode),
        })),
      ),
    );
    for (const { mode, i, result } of all) {
      assert.deepEqual(result.tokenIds, reference[i]!.tokenIds, `${mode}, request ${i}`);
    }
  });

  test("the context length caps a request exactly", async () => {
    const prompt = randomPrompts(1, CONTEXT_LENGTH - 6, CONTEXT_LENGTH - 6, 5)[0]!;
    const ar = await greedy(stack, prompt, 64, "ar");
    assert.equal(ar.tokenIds.length, 6);
    for (const mode of ["pearl", "sd"] as const) {
      const result = await greedy(stack, prompt, 64, mode);
      assert.deepEqual(result.tokenIds, ar.tokenIds, mode);
      assert.equal(result.finishReason, FinishReason.FINISH_REASON_LENGTH);
    }
  });

  test("EOS is the last token ever emitted", async () => {
    // Make a token the greedy continuation reaches mid-way the end-of-sequence token of a copy of the pair.
    const references = await inParallel(PROMPTS, 4, (prompt) => greedy(stack, prompt, 64, "ar"));
    const first = references[0]!.tokenIds;
    const stopAt = first.findIndex((token, i) => i >= 5 && !first.slice(0, i).includes(token));
    assert.ok(stopAt > 0, "a token that first appears mid-way");
    const eos = first[stopAt]!;
    const eosStack = await Stack.start({
      draftModel: modelWithConfig(draftDir, { eos_token_id: eos }),
      targetModel: modelWithConfig(TARGET, { eos_token_id: eos }),
    });
    try {
      const stopped = await inParallel(PROMPTS, 4, async (prompt, i) => ({
        i,
        ar: await greedy(eosStack, prompt, 64, "ar"),
        pearl: await greedy(eosStack, prompt, 64, "pearl"),
        sd: await greedy(eosStack, prompt, 64, "sd"),
      }));
      assert.deepEqual(stopped[0]!.ar.tokenIds, first.slice(0, stopAt + 1));
      assert.equal(stopped[0]!.ar.finishReason, FinishReason.FINISH_REASON_STOP);
      for (const { i, ar, pearl, sd } of stopped) {
        // The same weights: the same tokens up to the new EOS (past the old one, which is no longer special).
        const before = references[i]!.tokenIds;
        const cut = before.indexOf(eos);
        if (cut >= 0) assert.deepEqual(ar.tokenIds, before.slice(0, cut + 1), `ar, prompt ${i}`);
        else assert.deepEqual(ar.tokenIds.slice(0, before.length), before, `ar, prompt ${i}`);
        assert.deepEqual(pearl.tokenIds, ar.tokenIds, `pearl, prompt ${i}`);
        assert.deepEqual(sd.tokenIds, ar.tokenIds, `sd, prompt ${i}`);
        for (const result of [ar, pearl, sd]) assertExactFinish(result, PROMPTS[i]!.length, 64, eos);
      }
    } finally {
      await eosStack.stop();
    }
  });
});
