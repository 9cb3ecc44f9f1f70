// The services around the PEARL loop: cancellation frees KV on both services, the counters agree with
// each other and with what requests report, a draft that dies mid-request leaves the output unchanged,
// and the gateway refuses a draft that does not match the target.
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { after, before, describe, test } from "node:test";
import { status } from "@grpc/grpc-js";
import { modelPairDifferences } from "../lib/model_pair.js";
import type { ModelInfo } from "../proto/gen/pearl/v1/common.js";
import { fixtureDir, modelWithConfig, perturbedModel, removeMadeModels } from "./helpers/models.js";
import { PROTO_MODES } from "../lib/decoding_modes.js";
import { type Generated, inParallel, metricValue, randomPrompts, Stack } from "./helpers/stack.js";

const TARGET = fixtureDir("llama-gqa-f32");

describe("services", () => {
  let stack: Stack;

  before(async () => {
    stack = await Stack.start({ draftModel: perturbedModel(TARGET, 0.04, 7), targetModel: TARGET });
  });

  after(async () => {
    await stack?.stop();
    removeMadeModels();
  });

  test("a cancelled request leaves no KV blocks on either service within a second", async () => {
    const call = stack.stream({
      promptTokenIds: randomPrompts(1, 40, 40, 3)[0]!,
      maxTokens: 200,
      temperature: 0,
      mode: PROTO_MODES.pearl,
    });
    let received = 0;
    const ended = new Promise<{ code: number }>((resolve) => {
      call.on("error", (error: { code: number }) => resolve(error));
      call.on("end", () => resolve({ code: status.OK }));
    });
    await new Promise<void>((resolve) =>
      call.on("data", (response: { tokenIds: number[] }) => {
        received += response.tokenIds.length;
        resolve();
      }),
    );
    // Mid-stream: the services hold the session's KV right now.
    const [draftDuring, targetDuring] = await Promise.all([stack.draftInfo(), stack.targetInfo()]);
    call.cancel();
    const cancelledAt = performance.now();
    assert.equal((await ended).code, status.CANCELLED);
    assert.ok(received < 200, "cancelled before the end");
    assert.ok(
      draftDuring.cache!.blocksUsed > 0 && targetDuring.cache!.blocksUsed > 0,
      "KV in use mid-stream",
    );

    for (;;) {
      const [draft, target] = await Promise.all([stack.draftInfo(), stack.targetInfo()]);
      const free = [draft, target].every(
        (info) => info.cache!.blocksUsed === 0 && info.cache!.sequences === 0 && info.activeSessions === 0,
      );
      if (free) break;
      assert.ok(
        performance.now() - cancelledAt < 1000,
        `KV still held: ${JSON.stringify([draft.cache, target.cache])}`,
      );
      await sleep(20);
    }
  });

  test("a request that opens while another decodes on its own is served alongside it", async () => {
    // The target's loop queues an autoregressive session's next step before the last one returns; a session
    // that opens meanwhile must share the following steps, not wait until the running session ends.
    const [longPrompt, shortPrompt] = randomPrompts(2, 8, 8, 11);
    const long = stack.stream({
      promptTokenIds: longPrompt!,
      maxTokens: 240,
      temperature: 0,
      mode: PROTO_MODES.ar,
    });
    let longTokens = 0;
    const longDone = new Promise<void>((resolve, reject) => {
      long.on("data", (response: { tokenIds: number[] }) => (longTokens += response.tokenIds.length));
      long.on("end", resolve);
      long.on("error", reject);
    });
    await new Promise<void>((resolve) => long.once("data", () => resolve()));
    const short = stack.stream({
      promptTokenIds: shortPrompt!,
      maxTokens: 8,
      temperature: 0,
      mode: PROTO_MODES.ar,
    });
    let longAtShortStart = -1;
    let shortTokens = 0;
    await new Promise<void>((resolve, reject) => {
      short.on("data", (response: { tokenIds: number[] }) => {
        if (longAtShortStart < 0) longAtShortStart = longTokens;
        shortTokens += response.tokenIds.length;
      });
      short.on("end", resolve);
      short.on("error", reject);
    });
    const longMeanwhile = longTokens - longAtShortStart;
    assert.ok(shortTokens >= 1);
    // Sharing steps, the long request emits about one token per token of the short one.
    assert.ok(
      longMeanwhile <= 4 * shortTokens + 8,
      `the long request emitted ${longMeanwhile} tokens while the short one emitted its ${shortTokens}`,
    );
    await longDone;
  });

  test("counters agree with usage, with each other and across services", async () => {
    const [gatewayBefore, targetBefore] = await Promise.all([
      stack.metrics("gateway"),
      stack.metrics("target"),
    ]);
    const prompts = randomPrompts(12, 4, 30, 8);
    const results: Generated[] = await inParallel(prompts, 4, (prompt, i) =>
      stack.generate({
        promptTokenIds: prompt,
        maxTokens: 48,
        temperature: 0,
        mode: i % 3 === 0 ? PROTO_MODES.sd : PROTO_MODES.pearl,
      }),
    );
    const [gatewayAfter, targetAfter] = await Promise.all([
      stack.metrics("gateway"),
      stack.metrics("target"),
    ]);
    const delta = (
      name: string,
      labels: Record<string, string> = {},
      text = [gatewayBefore, gatewayAfter],
    ): number => metricValue(text[1]!, name, labels) - metricValue(text[0]!, name, labels);
    const targetDelta = (name: string): number => delta(name, {}, [targetBefore, targetAfter]);
    const sum = (pick: (r: Generated) => number): number => results.reduce((total, r) => total + pick(r), 0);

    for (const r of results) {
      assert.equal(r.usage.meanAcceptedLength, r.usage.completionTokens / r.usage.targetSteps);
      assert.ok(r.usage.acceptedTokens <= r.usage.draftTokens);
    }
    const drafted = delta("pearl_spec_draft_tokens_total");
    const accepted = delta("pearl_spec_accepted_tokens_total");
    assert.equal(
      drafted,
      sum((r) => r.usage.draftTokens),
    );
    assert.equal(
      accepted,
      sum((r) => r.usage.acceptedTokens),
    );
    assert.equal(
      delta("pearl_target_steps_total"),
      sum((r) => r.usage.targetSteps),
    );
    assert.ok(accepted > 0 && accepted < drafted);

    const perPosition = Array.from({ length: 16 }, (_, i) =>
      delta("pearl_spec_accepted_tokens_per_position_total", { position: String(i + 1) }),
    );
    assert.equal(
      perPosition.reduce((a, b) => a + b, 0),
      accepted,
    );
    // Position i+1 of a window is accepted only after position i was.
    for (let i = 1; i < perPosition.length; i++) assert.ok(perPosition[i]! <= perPosition[i - 1]!);

    const verifySteps = delta("pearl_spec_verify_steps_total");
    assert.ok(verifySteps > 0 && verifySteps <= delta("pearl_target_steps_total"));
    assert.equal(delta("pearl_request_mean_accepted_length_tokens_count"), results.length);
    assert.ok(
      Math.abs(
        delta("pearl_request_mean_accepted_length_tokens_sum") - sum((r) => r.usage.meanAcceptedLength),
      ) < 1e-9,
    );

    // The target counts the same proposals from its side.
    assert.equal(targetDelta("pearl_target_proposed_tokens_total"), drafted);
    assert.equal(targetDelta("pearl_target_accepted_tokens_total"), accepted);
    assert.equal(targetDelta("pearl_target_verify_steps_total"), verifySteps);

    assert.ok(metricValue(gatewayAfter, "pearl_lookahead_tokens") >= 1);
    assert.ok(metricValue(gatewayAfter, "pearl_verify_window_tokens") >= 1);
    assert.equal(metricValue(gatewayAfter, "pearl_requests_running_requests"), 0);
  });

  test("a draft killed mid-request: the request completes with ar's output, later ones too", async () => {
    const prompt = randomPrompts(1, 12, 12, 4)[0]!;
    const request = { promptTokenIds: prompt, maxTokens: 200, temperature: 0 };
    const ar = await stack.generate({ ...request, mode: PROTO_MODES.ar });
    const fallbacksBefore = metricValue(await stack.metrics("gateway"), "pearl_draft_fallbacks_total");

    const call = stack.stream({ ...request, mode: PROTO_MODES.pearl });
    const tokens: number[] = [];
    let usage: Generated["usage"] | undefined;
    const done = new Promise<void>((resolve, reject) => {
      call.on("data", (response: { tokenIds: number[]; usage?: Generated["usage"] }) => {
        if (tokens.length === 0) stack.draft.process.child.kill("SIGKILL");
        tokens.push(...response.tokenIds);
        usage = response.usage ?? usage;
      });
      call.on("error", reject);
      call.on("end", resolve);
    });
    await done;
    assert.deepEqual(tokens, ar.tokenIds);
    assert.equal(usage?.draftFallback, true, "the request lost its draft on the way");
    assert.equal(usage?.mode, PROTO_MODES.ar);
    assert.equal(await stack.draft.process.exited, "SIGKILL");
    const fallbacksAfter = metricValue(await stack.metrics("gateway"), "pearl_draft_fallbacks_total");
    assert.ok(fallbacksAfter > fallbacksBefore);

    // Without a draft service, pearl requests run in ar, with the same output.
    const without = await stack.generate({ ...request, mode: PROTO_MODES.pearl });
    assert.deepEqual(without.tokenIds, ar.tokenIds);
    assert.equal(without.usage.draftTokens, 0);

    // A draft service back on the same address is used again.
    await stack.restartDraft();
    const deadline = performance.now() + 10_000;
    for (;;) {
      const again = await stack.generate({ ...request, mode: PROTO_MODES.pearl });
      assert.deepEqual(again.tokenIds, ar.tokenIds);
      if (again.usage.draftTokens > 0) break;
      assert.ok(performance.now() < deadline, "the gateway never went back to the draft");
      await sleep(100);
    }
  });

  test("bad requests get a clear error and the gateway keeps serving", async () => {
    const cases: [Parameters<Stack["generate"]>[0], RegExp][] = [
      [{ promptTokenIds: [5, 600] }, /prompt_token_ids\[1\] = 600 is outside the vocabulary \[0, 512\)/],
      [{ prompt: "hello" }, /no tokenizer/],
      [{}, /exactly one of prompt/],
      [{ promptTokenIds: [5], temperature: -1 }, /temperature must be a finite number >= 0, got -1/],
      [{ promptTokenIds: [5], temperature: NaN }, /temperature must be a finite number >= 0, got NaN/],
      // Given explicitly (GenerateRequest's fields are optional), 0 asks for an empty nucleus.
      [{ promptTokenIds: [5], topP: 0 }, /top_p must be > 0 and <= 1, got 0/],
      [{ promptTokenIds: [5], topP: 1.5 }, /top_p must be > 0 and <= 1, got 1.5/],
      [{ promptTokenIds: [5], topP: NaN }, /top_p must be > 0 and <= 1, got NaN/],
      [{ promptTokenIds: [5], topK: -2 }, /top_k must be an integer >= 0 \(0 or -1: no top-k cut\), got -2/],
      [{ promptTokenIds: [5], draftTemperature: -0.5 }, /draft_temperature must be a finite number >= 0/],
      [{ promptTokenIds: Array.from({ length: 256 }, () => 7) }, /maximum context length is 256 tokens/],
    ];
    for (const [request, message] of cases) {
      await assert.rejects(stack.generate(request), (error: { code: number; details: string }) => {
        assert.equal(error.code, status.INVALID_ARGUMENT);
        assert.match(error.details, message);
        return true;
      });
    }
    const ok = await stack.generate({ promptTokenIds: [5, 6], maxTokens: 3, temperature: 0 });
    assert.equal(ok.tokenIds.length, 3);
    // top_k -1, as in vLLM, is no top-k cut.
    const minusOne = await stack.generate({
      promptTokenIds: [5, 6],
      maxTokens: 3,
      temperature: 0.8,
      topK: -1,
      seed: 4,
    });
    const zero = await stack.generate({
      promptTokenIds: [5, 6],
      maxTokens: 3,
      temperature: 0.8,
      topK: 0,
      seed: 4,
    });
    assert.deepEqual(minusOne.tokenIds, zero.tokenIds);
  });
});

describe("a KV cache too small for every request at once", () => {
  test("sessions queue and give KV back, and every output stays the same", async () => {
    const stack = await Stack.start({
      draftModel: perturbedModel(TARGET, 0.04, 7),
      targetModel: TARGET,
      targetArgs: ["--kv-blocks", "40"],
    });
    try {
      const prompts = randomPrompts(16, 30, 60, 9);
      const request = { maxTokens: 100, temperature: 1, seed: 5 };
      // One at a time, everything fits.
      const reference = await inParallel(prompts, 1, (prompt) =>
        stack.generate({ ...request, promptTokenIds: prompt, mode: PROTO_MODES.ar }),
      );
      const before = metricValue(await stack.metrics("target"), "pearl_target_preemptions_total");
      for (const mode of ["pearl", "ar"] as const) {
        const together = await Promise.all(
          prompts.map((prompt) =>
            stack.generate({ ...request, promptTokenIds: prompt, mode: PROTO_MODES[mode] }),
          ),
        );
        together.forEach((result, i) =>
          assert.deepEqual(result.tokenIds, reference[i]!.tokenIds, `${mode} ${i}`),
        );
      }
      const after = await stack.metrics("target");
      assert.ok(
        metricValue(after, "pearl_target_preemptions_total") > before,
        "some sessions were preempted",
      );
      assert.equal(metricValue(after, "pearl_sessions_waiting_sessions"), 0);
    } finally {
      await stack.stop();
    }
  });
});

describe("model pair check", () => {
  after(() => removeMadeModels());

  const info = (overrides: Partial<ModelInfo>): ModelInfo => ({
    modelId: "m",
    architecture: "LlamaForCausalLM",
    modelType: "llama",
    vocabSize: 512,
    hiddenSize: 64,
    numLayers: 2,
    maxPositionEmbeddings: 256,
    eosTokenIds: [2],
    bosTokenId: 1,
    dtype: "float32",
    backend: "cpu",
    numParameters: 1,
    ...overrides,
  });

  test("names every difference in vocabulary and special tokens", () => {
    assert.deepEqual(modelPairDifferences(info({}), info({ hiddenSize: 128, numLayers: 8 })), []);
    assert.deepEqual(
      modelPairDifferences(info({ vocabSize: 500, eosTokenIds: [2, 7], bosTokenId: 0 }), info({})),
      [
        "vocab size: draft 500, target 512",
        "eos token ids: draft [2, 7], target [2]",
        "bos token id: draft 0, target 1",
      ],
    );
  });

  test("the gateway refuses to start with a draft whose special tokens differ", async () => {
    const draft = modelWithConfig(TARGET, { eos_token_id: 3 });
    await assert.rejects(
      Stack.start({ draftModel: draft, targetModel: TARGET }),
      /refusing the model pair: .*eos token ids: draft \[3\], target \[2\]/,
    );
  });
});
