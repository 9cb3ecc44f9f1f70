// Pearl requests when the tuner finds that drafting does not pay: they run on the target alone and output
// exactly what ar outputs; a running request stops drafting when the decision changes, and ends with ar's
// output too. The draft is a random model some 200 times the size of its tiny target, so that no drafting
// can pay whatever this machine's timings: a draft step costs many target steps, and its guesses are
// random.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import winston from "winston";
import { Registry } from "../lib/metrics.js";
import { FinishReason } from "../proto/gen/pearl/v1/common.js";
import { DraftLink, TargetLink } from "../services/gateway/links.js";
import { gatewayMetrics } from "../services/gateway/metrics.js";
import { PearlLoop, type RequestUsage } from "../services/gateway/pearl_loop.js";
import { fixtureDir, randomLlama, removeMadeModels } from "./helpers/models.js";
import { PROTO_MODES } from "../lib/decoding_modes.js";
import { inParallel, metricValue, randomPrompts, Stack } from "./helpers/stack.js";
import { makeTuner, startupProfile } from "./helpers/tuner.js";

const TARGET = fixtureDir("llama-gqa-f32");
const PROMPTS = randomPrompts(6, 4, 24, 17);

describe("drafting does not pay: pearl requests run on the target alone", () => {
  let stack: Stack;

  before(async () => {
    const draftModel = randomLlama(
      TARGET,
      { hiddenSize: 512, intermediateSize: 1024, numLayers: 4, numHeads: 8, numKeyValueHeads: 4 },
      5,
    );
    stack = await Stack.start({
      draftModel,
      targetModel: TARGET,
      gatewayArgs: ["--min-gamma", "0", "--log-level", "info"],
    });
  });

  after(async () => {
    await stack?.stop();
    removeMadeModels();
  });

  function gatewayRecords(message: string): Record<string, unknown>[] {
    return stack.logs
      .filter((line) => line.startsWith("{"))
      .map((line) => JSON.parse(line) as Record<string, unknown>)
      .filter((record) => record.service === "gateway" && record.message === message);
  }

  test("the decision is logged and in the gauges", async () => {
    const tuned = gatewayRecords("draft length tuned").at(-1);
    assert.ok(tuned, "the start-up decision was logged");
    assert.equal(tuned.gamma, 0);
    assert.equal(tuned.speculate, false);
    const metrics = await stack.metrics("gateway");
    assert.equal(metricValue(metrics, "pearl_draft_length_tokens"), 0);
    assert.equal(metricValue(metrics, "pearl_lookahead_tokens"), 0);
    assert.equal(metricValue(metrics, "pearl_verify_window_tokens"), 0);
  });

  test("greedy and seeded sampling: pearl outputs ar's tokens, reports ar, and never calls the draft", async () => {
    const draftTokensBefore = metricValue(await stack.metrics("draft"), "pearl_engine_step_tokens_total");
    for (const sampling of [{ temperature: 0 }, { temperature: 1, seed: 3 }]) {
      // One prompt at a time: the batch sizes stay those the start-up profile measured (1 and 2), where the
      // decision not to draft was made; an unmeasured size would try drafting first (tuner.ts).
      const results = await inParallel(PROMPTS, 1, async (prompt, i) => {
        const request = {
          promptTokenIds: prompt,
          maxTokens: 40,
          requestId: `off-${sampling.temperature}-${i}`,
        };
        return {
          ar: await stack.generate({ ...request, ...sampling, requestId: "", mode: PROTO_MODES.ar }),
          pearl: await stack.generate({ ...request, ...sampling, mode: PROTO_MODES.pearl }),
        };
      });
      results.forEach(({ ar, pearl }, i) => {
        assert.deepEqual(pearl.tokenIds, ar.tokenIds, `prompt ${i}, ${JSON.stringify(sampling)}`);
        assert.equal(pearl.finishReason, ar.finishReason);
        assert.equal(pearl.usage.mode, PROTO_MODES.ar, "finished in ar");
        assert.equal(pearl.usage.draftFallback, false, "not a failure of the draft");
        assert.equal(pearl.usage.draftTokens, 0);
        assert.equal(pearl.usage.targetSteps, pearl.tokenIds.length);
      });
    }
    assert.equal(
      metricValue(await stack.metrics("draft"), "pearl_engine_step_tokens_total"),
      draftTokensBefore,
      "the draft ran no step",
    );
    const logged = gatewayRecords("request").filter((record) => String(record.requestId).startsWith("off-"));
    assert.equal(logged.length, 2 * PROMPTS.length);
    for (const record of logged) {
      assert.equal(record.mode, "pearl");
      assert.equal(record.finishedIn, "ar");
      assert.equal(record.speculationOff, true);
      assert.equal(record.draftFallback, false);
    }
  });

  test("mode sd still drafts on the same pair: the decision, not the draft, kept pearl from it", async () => {
    const prompt = PROMPTS[0]!;
    const ar = await stack.generate({
      promptTokenIds: prompt,
      maxTokens: 40,
      temperature: 0,
      mode: PROTO_MODES.ar,
    });
    const sd = await stack.generate({
      promptTokenIds: prompt,
      maxTokens: 40,
      temperature: 0,
      mode: PROTO_MODES.sd,
    });
    assert.deepEqual(sd.tokenIds, ar.tokenIds);
    assert.equal(sd.usage.mode, PROTO_MODES.sd);
    assert.ok(sd.usage.draftTokens > 0);
  });

  test("a running pearl request stops drafting when the tuner stops it, and ends with ar's output", async () => {
    const [targetInfo, draftInfo] = await Promise.all([stack.targetInfo(), stack.draftInfo()]);
    const logger = winston.createLogger({ silent: true });
    const tuner = makeTuner({ minGamma: 0 }, logger, new Registry());
    // A start-up profile in which drafting pays, so that the request starts drafting.
    tuner.seed(
      startupProfile(() => 0.1),
      startupProfile((batch) => 2 + 0.01 * batch),
    );
    assert.equal(tuner.plan("pearl").speculate, true);

    const target = new TargetLink(stack.target.address, logger);
    const draft = new DraftLink(stack.draft.address, logger);
    const prompt = PROMPTS[1]!;
    const maxTokens = 120;
    // A second request, open beside it from the start and drafting too, for whom drafting turns out
    // dismal.
    const beside = tuner.openSession("pearl", "beside");
    assert.equal(beside.plan().speculate, true);
    try {
      const ar = await stack.generate({
        promptTokenIds: prompt,
        maxTokens,
        temperature: 0,
        mode: PROTO_MODES.ar,
      });
      const tokens: number[] = [];
      const usage = await new Promise<RequestUsage>((resolve, reject) => {
        const loop = new PearlLoop(
          1,
          {
            requestId: "stops-drafting",
            promptTokenIds: prompt,
            maxTokens,
            sampling: { temperature: 0, topK: 0, topP: 1, seed: 1 },
            mode: "pearl",
            draftTemperature: 0,
            draftTopK: 16,
          },
          {
            target,
            draft,
            targetContextLength: targetInfo.model!.maxPositionEmbeddings,
            draftContextLength: draftInfo.model!.maxPositionEmbeddings,
            eosTokenIds: new Set(targetInfo.model!.eosTokenIds),
            tuner,
            metrics: gatewayMetrics(new Registry()).loop,
            logger,
            draftLost: reject,
          },
          {
            tokens: (ids) => {
              tokens.push(...ids);
              if (tokens.length >= 20 && tokens.length - ids.length < 20) {
                // What drafting sessions got at this batch size turned out dismal: a second per token.
                for (let i = 0; i < 200; i++) beside.observeCycle(1, 1000);
              }
            },
            finished: (reason, result) => {
              assert.notEqual(reason, FinishReason.FINISH_REASON_UNSPECIFIED);
              resolve(result);
            },
            failed: reject,
          },
        );
        loop.start();
      });
      assert.deepEqual(tokens, ar.tokenIds);
      assert.equal(tuner.plan("pearl").speculate, false);
      assert.ok(usage.draftTokens > 0, "it drafted before the decision");
      assert.equal(usage.mode, "ar", "and finished on the target alone");
      assert.equal(usage.speculationOff, true);
      assert.equal(usage.draftFallback, false);
      const drafts = await stack.draftInfo();
      assert.equal(drafts.activeSessions, 0, "the draft's session was closed");
    } finally {
      beside.closed();
      target.shutdown();
      draft.shutdown();
    }
  });
});
