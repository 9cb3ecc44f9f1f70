// The gateway's gRPC Generate API on the embedded model pair (with its tokenizer): a request's id reaches
// the draft's and the target's log lines and comes back in the response metadata, stop strings end the
// output, and a client deadline cancels the generation on both services.
import assert from "node:assert/strict";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { after, before, describe, test } from "node:test";
import { type ClientReadableStream, Metadata, status } from "@grpc/grpc-js";
import { FinishReason } from "../proto/gen/pearl/v1/common.js";
import type { GenerateRequest, GenerateResponse } from "../proto/gen/pearl/v1/gateway.js";
import { EMBEDDED_MODELS } from "./helpers/pearl_serve.js";
import { PROTO_MODES } from "../lib/decoding_modes.js";
import { generateRequest, metricValue, Stack } from "./helpers/stack.js";

const PROMPT = "def add(a, b):\n    return";
const INFO_LOGS = ["--log-level", "info"];

interface Outcome {
  text: string;
  tokenIds: number[];
  finishReason: FinishReason;
  /** The response's initial metadata entry x-request-id. */
  requestId: string | undefined;
  /** The status code the call ended with (OK included). */
  code: number;
  details: string;
}

describe("gRPC Generate API (embedded pair)", () => {
  let stack: Stack;

  before(async () => {
    stack = await Stack.start({
      draftModel: join(EMBEDDED_MODELS, "draft"),
      targetModel: join(EMBEDDED_MODELS, "target"),
      draftArgs: INFO_LOGS,
      targetArgs: INFO_LOGS,
      gatewayArgs: ["--tokenizer", join(EMBEDDED_MODELS, "target"), ...INFO_LOGS],
    });
  });

  after(async () => {
    await stack?.stop();
  });

  function run(request: Partial<GenerateRequest>, metadata = new Metadata(), deadline?: Date) {
    const call: ClientReadableStream<GenerateResponse> = stack.client.generate(
      generateRequest({ prompt: PROMPT, temperature: 0, ...request }),
      metadata,
      deadline ? { deadline } : {},
    );
    return new Promise<Outcome>((resolve) => {
      const outcome: Outcome = {
        text: "",
        tokenIds: [],
        finishReason: FinishReason.FINISH_REASON_UNSPECIFIED,
        requestId: undefined,
        code: status.OK,
        details: "",
      };
      call.on("metadata", (received: Metadata) => {
        outcome.requestId = received.get("x-request-id")[0] as string | undefined;
      });
      call.on("data", (response: GenerateResponse) => {
        outcome.text += response.text;
        outcome.tokenIds.push(...response.tokenIds);
        if (response.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) {
          outcome.finishReason = response.finishReason;
        }
      });
      call.on("error", (error: { code: number; details: string }) =>
        resolve({ ...outcome, code: error.code, details: error.details }),
      );
      call.on("end", () => resolve(outcome));
    });
  }

  /** The JSON log lines of a service with this message and request id, waiting up to 5 s for them. */
  async function logRecords(
    service: "draft" | "target" | "gateway",
    message: string,
    requestId: string,
  ): Promise<Record<string, unknown>[]> {
    const deadline = Date.now() + 5000;
    for (;;) {
      const records = stack.logs
        .filter((line) => line.startsWith("{"))
        .map((line) => JSON.parse(line) as Record<string, unknown>)
        .filter(
          (record) =>
            record.service === service && record.message === message && record.requestId === requestId,
        );
      if (records.length > 0 || Date.now() > deadline) return records;
      await sleep(50);
    }
  }

  function withRequestId(id: string): Metadata {
    const metadata = new Metadata();
    metadata.set("x-request-id", id);
    return metadata;
  }

  test("the x-request-id metadata names the request in the logs of all three services", async () => {
    const outcome = await run({ maxTokens: 16, mode: PROTO_MODES.pearl }, withRequestId("grpc-test-7"));
    assert.equal(outcome.code, status.OK, outcome.details);
    assert.equal(outcome.requestId, "grpc-test-7", "returned in the initial metadata");

    const [draft] = await logRecords("draft", "session", "grpc-test-7");
    assert.ok(draft, "the draft logged the session");
    assert.equal(draft.end, "closed", "the gateway closed the draft's side");
    assert.equal(typeof draft.draftedTokens, "number");
    const [target] = await logRecords("target", "session", "grpc-test-7");
    assert.ok(target, "the target logged the session");
    assert.equal(target.end, "finished");
    assert.equal(target.outputTokens, 16);
    assert.equal(typeof target.sessionId, "number");
    const [gateway] = await logRecords("gateway", "request", "grpc-test-7");
    assert.equal(gateway?.completionTokens, 16);
  });

  test("without an id one is made up and sent back; the request_id field wins over metadata", async () => {
    const made = await run({ maxTokens: 2, mode: PROTO_MODES.pearl });
    assert.match(made.requestId ?? "", /^[0-9a-f-]{36}$/);
    assert.ok((await logRecords("target", "session", made.requestId!)).length > 0);

    const field = await run({ maxTokens: 2, requestId: "from-the-field" }, withRequestId("from-metadata"));
    assert.equal(field.requestId, "from-the-field");

    const bad = await run({ maxTokens: 2 }, withRequestId("has spaces in it"));
    assert.equal(bad.code, status.INVALID_ARGUMENT);
    assert.match(bad.details, /visible ASCII/);
  });

  test("stop strings end the text before them and finish the request with reason stop", async () => {
    const full = await run({ maxTokens: 60 });
    const stopAt = full.text.indexOf("(", 2);
    assert.ok(stopAt > 0, `the greedy text has a "(" to stop at: ${JSON.stringify(full.text)}`);
    const stop = full.text.slice(stopAt, stopAt + 4);
    for (const mode of [PROTO_MODES.pearl, PROTO_MODES.ar]) {
      const stopped = await run({ maxTokens: 60, mode, stop: ["never appears", stop] });
      assert.equal(stopped.code, status.OK, stopped.details);
      assert.equal(stopped.text, full.text.slice(0, stopAt));
      assert.equal(stopped.finishReason, FinishReason.FINISH_REASON_STOP);
      assert.ok(stopped.tokenIds.length < full.tokenIds.length, "generation ended at the stop string");
      assert.deepEqual(stopped.tokenIds, full.tokenIds.slice(0, stopped.tokenIds.length));
    }
    const empty = await run({ maxTokens: 4, stop: [""] });
    assert.equal(empty.code, status.INVALID_ARGUMENT);
    assert.match(empty.details, /must not be empty/);
  });

  test("a deadline cancels the generation: DEADLINE_EXCEEDED, both sessions closed", async () => {
    const cancelledBefore = metricValue(await stack.metrics("gateway"), "pearl_requests_total", {
      finish_reason: "cancelled",
    });
    const maxTokens = 480;
    const started = performance.now();
    const outcome = await run(
      { maxTokens, mode: PROTO_MODES.pearl },
      withRequestId("deadline-1"),
      new Date(Date.now() + 250),
    );
    assert.equal(outcome.code, status.DEADLINE_EXCEEDED);
    assert.ok(outcome.tokenIds.length < maxTokens, "the deadline came before the end");

    const [draft] = await logRecords("draft", "session", "deadline-1");
    const [target] = await logRecords("target", "session", "deadline-1");
    assert.equal(draft?.end, "closed");
    assert.equal(target?.end, "closed", "the target's session was closed, not finished");
    assert.ok(performance.now() - started < 1250, "both sessions closed within a second of the deadline");
    const [draftInfo, targetInfo] = await Promise.all([stack.draftInfo(), stack.targetInfo()]);
    assert.equal(draftInfo.activeSessions, 0);
    assert.equal(targetInfo.activeSessions, 0);
    assert.equal(targetInfo.cache!.blocksUsed, 0);
    const [gateway] = await logRecords("gateway", "request", "deadline-1");
    assert.equal(gateway?.finishReason, "cancelled");
    assert.equal(
      metricValue(await stack.metrics("gateway"), "pearl_requests_total", { finish_reason: "cancelled" }),
      cancelledBefore + 1,
    );
  });
});
