// Sampling exactness (docs/design.md §4): whatever the draft proposes, the tokens pearl emits follow the target's
// distribution. Each draw is one seeded request of 3 tokens: t0 comes from the target's prefill, t1 is
// decided by a verify step (the acceptance rule under test). The joint distribution of (t0, t1) is
// compared with the exact one, p(t0 | prompt) p(t1 | prompt, t0), computed here from the engine's logits,
// by a chi-square test; and with ar's draws. The same test is shown to reject samples drawn with a
// subtly broken acceptance rule, so passing it means something.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  argmax,
  type Distribution,
  lastLogits,
  type Processing,
  processLogits,
  sample,
  topKOf,
  uniforms,
} from "./helpers/distributions.js";
import { fixtureDir, perturbedModel, removeMadeModels } from "./helpers/models.js";
import { PROTO_MODES } from "../lib/decoding_modes.js";
import { Stack, inParallel, type Generated } from "./helpers/stack.js";
import {
  chiSquareGoodnessOfFit,
  type ChiSquareResult,
  chiSquareHomogeneity,
  countCategories,
} from "./helpers/stats.js";
import type { GenerateRequest } from "../proto/gen/pearl/v1/gateway.js";

const TARGET = fixtureDir("llama-gqa-f32");
const PROMPT = [17, 99, 245, 3, 480, 61];
const DRAWS = 2000;
const SEEDS = Array.from({ length: DRAWS }, (_, i) => 1000 + i);
const DRAFT_TOP_K = 16;
/** Rejecting a correct sampler this often is acceptable; a broken one must fall far below. */
const PASS_P_VALUE = 1e-3;
const BROKEN_P_VALUE = 1e-6;
const VOCAB = 512;

function summary(result: ChiSquareResult): string {
  return `chi2 ${result.statistic.toFixed(1)}, ${result.degrees} dof, p = ${result.pValue.toExponential(2)}`;
}

describe("sampling exactness", () => {
  let stack: Stack;
  let draftDir: string;
  /** Logits after the prompt, and after prompt + t0 for every t0. */
  let targetFirst: Float32Array;
  let targetSecond: Float32Array[];
  let draftSecond: Float32Array[];

  before(async () => {
    draftDir = perturbedModel(TARGET, 0.04, 7);
    stack = await Stack.start({
      draftModel: draftDir,
      targetModel: TARGET,
      gatewayArgs: ["--draft-top-k", String(DRAFT_TOP_K)],
    });
    const contexts = Array.from({ length: VOCAB }, (_, t0) => [...PROMPT, t0]);
    targetFirst = (await lastLogits(TARGET, [PROMPT]))[0]!;
    targetSecond = await lastLogits(TARGET, contexts);
    draftSecond = await lastLogits(draftDir, contexts);
  });

  after(async () => {
    await stack?.stop();
    removeMadeModels();
  });

  function expectedJoint(processing: Processing): Map<string, number> {
    const joint = new Map<string, number>();
    for (const [t0, p0] of processLogits(targetFirst, processing)) {
      for (const [t1, p1] of processLogits(targetSecond[t0]!, processing)) joint.set(`${t0},${t1}`, p0 * p1);
    }
    return joint;
  }

  async function draw(request: Partial<GenerateRequest>): Promise<Generated[]> {
    return inParallel(SEEDS, 16, (seed) =>
      stack.generate({ promptTokenIds: PROMPT, maxTokens: 3, seed, ...request }),
    );
  }

  const pairs = (results: Generated[]): Map<string, number> =>
    countCategories(results.map((r) => `${r.tokenIds[0]},${r.tokenIds[1]}`));

  function assertAcceptanceExercised(results: Generated[]): void {
    const proposed = results.reduce((sum, r) => sum + r.usage.draftTokens, 0);
    const accepted = results.reduce((sum, r) => sum + r.usage.acceptedTokens, 0);
    assert.ok(accepted > 0.1 * proposed && accepted < 0.9 * proposed, `accepted ${accepted} of ${proposed}`);
  }

  for (const [name, processing] of [
    ["temperature 1", { temperature: 1, topK: 0, topP: 1 }],
    ["temperature 1, top_p 0.9", { temperature: 1, topK: 0, topP: 0.9 }],
  ] as const) {
    test(`${name}: pearl emits ar's tokens seed by seed, distributed as the target's p`, async (t) => {
      const request = { temperature: processing.temperature, topP: processing.topP };
      const ar = await draw({ ...request, mode: PROTO_MODES.ar });
      const pearl = await draw({ ...request, mode: PROTO_MODES.pearl });
      for (let i = 0; i < DRAWS; i++) {
        assert.deepEqual(pearl[i]!.tokenIds, ar[i]!.tokenIds, `seed ${SEEDS[i]}`);
      }
      assertAcceptanceExercised(pearl);
      const expected = expectedJoint(processing);
      const fit = chiSquareGoodnessOfFit(pairs(pearl), expected);
      t.diagnostic(`pearl vs exact: ${summary(fit)}`);
      assert.ok(fit.bins >= 10, `only ${fit.bins} bins`);
      assert.ok(fit.pValue > PASS_P_VALUE, `pearl vs exact p: ${JSON.stringify(fit)}`);
    });
  }

  test("a sampled draft (temperature 1, sparse top-k q) keeps the target's distribution", async (t) => {
    const request = { temperature: 1, topP: 1, draftTemperature: 1 };
    const ar = await draw({ ...request, mode: PROTO_MODES.ar });
    const pearl = await draw({ ...request, mode: PROTO_MODES.pearl });
    assertAcceptanceExercised(pearl);
    const differing = pearl.filter((r, i) => r.tokenIds.join() !== ar[i]!.tokenIds.join()).length;
    // The draft's own randomness now shapes which tokens are accepted, so seeds no longer match one to one.
    assert.ok(differing > 0, "a sampled draft should change some seeded outputs");
    const fit = chiSquareGoodnessOfFit(pairs(pearl), expectedJoint({ temperature: 1, topK: 0, topP: 1 }));
    t.diagnostic(`pearl vs exact: ${summary(fit)}`);
    assert.ok(fit.pValue > PASS_P_VALUE, `pearl vs exact p: ${JSON.stringify(fit)}`);
    const homogeneity = chiSquareHomogeneity(pairs(pearl), pairs(ar));
    t.diagnostic(`pearl vs ar: ${summary(homogeneity)}`);
    assert.ok(homogeneity.pValue > PASS_P_VALUE, `pearl vs ar: ${JSON.stringify(homogeneity)}`);
  });

  test("the same test rejects a biased acceptance rule (and passes the right one)", (t) => {
    const processing = { temperature: 1, topK: 0, topP: 1 };
    const expected = expectedJoint(processing);
    const p0 = processLogits(targetFirst, processing);
    const next = uniforms(42);

    // The right rules and two classic bugs, each drawing t0 ~ p then t1 through an acceptance step.
    const simulate = (rule: (p: Distribution, draft: Distribution) => number): Map<string, number> => {
      const samples: string[] = [];
      for (let i = 0; i < DRAWS; i++) {
        const t0 = sample(p0, next());
        const t1 = rule(
          processLogits(targetSecond[t0]!, processing),
          processLogits(draftSecond[t0]!, processing),
        );
        samples.push(`${t0},${t1}`);
      }
      return countCategories(samples);
    };
    const residual = (p: Distribution, q: Distribution): Distribution => {
      const weights = new Map<number, number>();
      let total = 0;
      for (const [token, probability] of p) {
        const weight = Math.max(0, probability - (q.get(token) ?? 0));
        weights.set(token, weight);
        total += weight;
      }
      return new Map([...weights].map(([token, weight]) => [token, weight / total]));
    };
    const greedy = (fixResidual: boolean) => (p: Distribution, draftP: Distribution) => {
      const proposal = argmax(draftP);
      if (next() < (p.get(proposal) ?? 0)) return proposal;
      return sample(fixResidual ? residual(p, new Map([[proposal, 1]])) : p, next());
    };
    const sampled = (fixResidual: boolean) => (p: Distribution, draftP: Distribution) => {
      const q = topKOf(draftP, DRAFT_TOP_K);
      const proposal = sample(q, next());
      if (next() * q.get(proposal)! < (p.get(proposal) ?? 0)) return proposal;
      return sample(fixResidual ? residual(p, q) : p, next());
    };

    for (const [name, rule] of [
      ["greedy draft, residual p without d", greedy(true)],
      ["sampled draft, residual max(0, p - q)", sampled(true)],
    ] as const) {
      const fit = chiSquareGoodnessOfFit(simulate(rule), expected);
      t.diagnostic(`${name}: ${summary(fit)}`);
      assert.ok(fit.pValue > PASS_P_VALUE, `${name} should pass: ${JSON.stringify(fit)}`);
    }
    for (const [name, rule] of [
      ["greedy draft, rejected tokens resampled from p itself", greedy(false)],
      ["sampled draft, rejected tokens resampled from p itself", sampled(false)],
    ] as const) {
      const fit = chiSquareGoodnessOfFit(simulate(rule), expected);
      t.diagnostic(`${name}: ${summary(fit)}`);
      assert.ok(fit.pValue < BROKEN_P_VALUE, `${name} should fail: ${JSON.stringify(fit)}`);
    }
  });

  test("a seeded request is reproducible, with a greedy or a sampled draft", async () => {
    for (const draftTemperature of [0, 1]) {
      const request = {
        promptTokenIds: PROMPT,
        maxTokens: 24,
        temperature: 1,
        draftTemperature,
        mode: PROTO_MODES.pearl,
      };
      const seeds = SEEDS.slice(0, 12);
      const first = await inParallel(seeds, 6, (seed) => stack.generate({ ...request, seed }));
      const second = await inParallel(seeds, 3, (seed) => stack.generate({ ...request, seed }));
      assert.deepEqual(
        second.map((r) => r.tokenIds),
        first.map((r) => r.tokenIds),
      );
      assert.ok(new Set(first.map((r) => r.tokenIds.join())).size > 1, "different seeds should differ");
    }
  });
});
