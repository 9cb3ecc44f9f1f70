// The one check of sampling parameters (lib/sampling_params.ts), and what the draft and target services
// make of a SamplingParams message: its zeros are unset (proto3 sends unset fields as 0), anything else
// out of range fails the session with the check's message. The gateway's REST and gRPC APIs are tested
// with the same edge cases in openai.test.ts and pearl-services.test.ts.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { credentials } from "@grpc/grpc-js";
import winston from "winston";
import { draftServiceDefaults, targetServiceDefaults } from "../lib/config.js";
import type { RunningService } from "../lib/model_service.js";
import type { SamplingParams } from "../lib/native.js";
import {
  clientSampling,
  samplingParamsOf,
  samplingProblem,
  topLogprobsProblem,
} from "../lib/sampling_params.js";
import { FinishReason, type SamplingParams as SamplingParamsMessage } from "../proto/gen/pearl/v1/common.js";
import { type DraftEvent, DraftServiceClient } from "../proto/gen/pearl/v1/draft.js";
import { type TargetEvent, TargetServiceClient } from "../proto/gen/pearl/v1/target.js";
import { startDraftService } from "../services/draft/server.js";
import { startTargetService } from "../services/target/server.js";
import { fixtureDir } from "./helpers/models.js";

const VALID: SamplingParams = { temperature: 0.7, topP: 0.9, topK: 40, seed: 7 };

describe("samplingProblem", () => {
  const cases: [string, Partial<SamplingParams>, string | undefined][] = [
    ["valid", {}, undefined],
    ["greedy, no cuts, seed 0", { temperature: 0, topP: 1, topK: 0, seed: 0 }, undefined],
    ["a temperature above OpenAI's 2", { temperature: 5 }, undefined],
    ["negative temperature", { temperature: -0.1 }, "temperature"],
    ["NaN temperature", { temperature: NaN }, "temperature"],
    ["infinite temperature", { temperature: Infinity }, "temperature"],
    ["top_p 0", { topP: 0 }, "top_p"],
    ["top_p above 1", { topP: 1.01 }, "top_p"],
    ["NaN top_p", { topP: NaN }, "top_p"],
    // -1 means no cut only as given (clientSampling, samplingParamsOf); resolved, top_k is >= 0.
    ["negative top_k", { topK: -1 }, "top_k"],
    ["fractional top_k", { topK: 1.5 }, "top_k"],
    ["a top_k past the wire's int32", { topK: 1e20 }, "top_k"],
    ["a temperature past the wire's 32-bit float", { temperature: 1e308 }, "temperature"],
    ["NaN top_k", { topK: NaN }, "top_k"],
    ["negative seed", { seed: -1 }, "seed"],
    ["a seed past 2^53", { seed: 2 ** 53 }, "seed"],
  ];
  for (const [name, change, param] of cases) {
    test(name, () => assert.equal(samplingProblem({ ...VALID, ...change })?.param, param));
  }

  test("messages name the field, its range and the value", () => {
    assert.equal(samplingProblem({ ...VALID, topP: 0 })?.message, "top_p must be > 0 and <= 1, got 0");
    assert.equal(
      samplingProblem({ ...VALID, temperature: NaN })?.message,
      "temperature must be a finite number >= 0, got NaN",
    );
  });
});

describe("topLogprobsProblem", () => {
  test("unset, or an integer from 0 to the bound; the message names the field as the caller does", () => {
    assert.equal(topLogprobsProblem(undefined, 20), undefined);
    assert.equal(topLogprobsProblem(0, 20), undefined);
    assert.equal(topLogprobsProblem(20, 20), undefined);
    assert.equal(topLogprobsProblem(21, 20), "top_logprobs must be an integer >= 0 and <= 20, got 21");
    assert.equal(
      topLogprobsProblem(-1, 20, "logprobs"),
      "logprobs must be an integer >= 0 and <= 20, got -1",
    );
    assert.ok(topLogprobsProblem(1.5, 20));
    assert.ok(topLogprobsProblem(NaN, 20));
  });
});

describe("clientSampling and samplingParamsOf", () => {
  test("a client's unset fields take the OpenAI defaults; top_k -1 is no cut", () => {
    assert.deepEqual(
      clientSampling({}, () => 11),
      { temperature: 1, topP: 1, topK: 0, seed: 11 },
    );
    assert.deepEqual(
      clientSampling({ temperature: 0, topP: 0, topK: -1, seed: 0 }, () => 11),
      { temperature: 0, topP: 0, topK: 0, seed: 0 },
    );
  });

  test("a message's zeros are unset: top_p 0 is 1; no message is greedy", () => {
    assert.deepEqual(samplingParamsOf({ temperature: 0, topK: 0, topP: 0, seed: 0 }), {
      temperature: 0,
      topK: 0,
      topP: 1,
      seed: 0,
    });
    assert.deepEqual(samplingParamsOf(undefined), { temperature: 0, topK: 0, topP: 1, seed: 0 });
    assert.equal(samplingParamsOf({ temperature: 1, topK: -1, topP: 0.5, seed: 0 }).topK, 0);
    assert.equal(samplingParamsOf({ temperature: 1, topK: 0, topP: NaN, seed: 0 }).topP, NaN);
  });
});

describe("the services' SamplingParams", () => {
  const silent = winston.createLogger({ silent: true });
  const modelService = {
    modelDir: fixtureDir("llama-gqa-f32"),
    grpcPort: 0,
    httpPort: -1,
    numThreads: 1,
    profileBatchSizes: [],
  };
  let target: RunningService;
  let draft: RunningService;

  before(async () => {
    target = await startTargetService({ ...targetServiceDefaults(), ...modelService }, silent);
    draft = await startDraftService({ ...draftServiceDefaults(), ...modelService }, silent);
  });

  after(async () => {
    await target?.close();
    await draft?.close();
  });

  /** Opens one autoregressive target session and collects its tokens, or the failure message. */
  function targetSession(sampling: SamplingParamsMessage | undefined): Promise<number[] | string> {
    const client = new TargetServiceClient(`127.0.0.1:${target.grpcPort}`, credentials.createInsecure());
    const call = client.session();
    return new Promise<number[] | string>((resolve, reject) => {
      const tokens: number[] = [];
      call.on("data", (event: TargetEvent) => {
        if (event.failed) resolve(event.failed.message);
        if (!event.verdict) return;
        tokens.push(...event.verdict.tokenIds);
        if (event.verdict.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) resolve(tokens);
      });
      call.on("error", reject);
      call.write({
        open: {
          sessionId: 1,
          requestId: "sampling-test",
          promptTokenIds: [5, 6, 7],
          sampling,
          maxTokens: 4,
          autoregressive: true,
          verifyWindow: 0,
        },
      });
    }).finally(() => {
      call.end();
      client.close();
    });
  }

  test("target: top_p 0 on the wire is no nucleus cut", async () => {
    const sampled = { temperature: 0.8, topK: 0, seed: 9 };
    const unset = await targetSession({ ...sampled, topP: 0 });
    assert.ok(Array.isArray(unset), `failed: ${String(unset)}`);
    assert.deepEqual(unset, await targetSession({ ...sampled, topP: 1 }));
  });

  test("target: a NaN temperature, a top_k below -1 and a top_p above 1 fail the session", async () => {
    assert.equal(
      await targetSession({ temperature: NaN, topK: 0, topP: 1, seed: 0 }),
      "temperature must be a finite number >= 0, got NaN",
    );
    assert.match(
      String(await targetSession({ temperature: 1, topK: -2, topP: 1, seed: 0 })),
      /^top_k must be/,
    );
    assert.match(
      String(await targetSession({ temperature: 1, topK: 0, topP: 1.5, seed: 0 })),
      /^top_p must be/,
    );
  });

  test("draft: a negative temperature fails the session, naming the draft", async () => {
    const client = new DraftServiceClient(`127.0.0.1:${draft.grpcPort}`, credentials.createInsecure());
    const call = client.session();
    const failure = new Promise<string>((resolve, reject) => {
      call.on("data", (event: DraftEvent) => {
        if (event.failed) resolve(event.failed.message);
      });
      call.on("error", reject);
    });
    call.write({
      open: {
        sessionId: 3,
        requestId: "sampling-test",
        promptTokenIds: [5, 6, 7],
        sampling: { temperature: -1, topK: 0, topP: 0, seed: 0 },
        distributionTopK: 8,
        lookahead: 4,
        maxPosition: 0,
      },
    });
    assert.equal(
      await failure,
      "the draft's sampling parameters: temperature must be a finite number >= 0, got -1",
    );
    call.end();
    client.close();
  });
});
