// Admission control and request limits on a real stack: with 2 places and a queue of 2, a burst of 8
// requests runs 4 (2 at a time, every output whole) and refuses 4 with 429 / RESOURCE_EXHAUSTED and a
// Retry-After, counted; a client that leaves the queue frees its place in it; bodies and prompts over the
// limits get 413 / 400 (a huge text prompt without being tokenized).
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { type ClientReadableStream, Metadata, status } from "@grpc/grpc-js";
import type { GenerateResponse } from "../proto/gen/pearl/v1/gateway.js";
import { request, SseStream } from "./helpers/http.js";
import { EMBEDDED_MODELS } from "./helpers/pearl_serve.js";
import { PROTO_MODES as MODES } from "../lib/decoding_modes.js";
import { collect, type Generated, metricValue, Stack } from "./helpers/stack.js";

const MODEL = "target";
const MAX_PROMPT_TOKENS = 64;
const MAX_BODY_BYTES = 64 * 1024;

describe("admission control", () => {
  let stack: Stack;

  before(async () => {
    stack = await Stack.start({
      draftModel: join(EMBEDDED_MODELS, "draft"),
      targetModel: join(EMBEDDED_MODELS, "target"),
      gatewayArgs: [
        ...["--tokenizer", join(EMBEDDED_MODELS, "target")],
        ...["--max-num-seqs", "2", "--max-waiting", "2"],
        ...["--max-prompt-tokens", String(MAX_PROMPT_TOKENS), "--max-body-bytes", String(MAX_BODY_BYTES)],
      ],
    });
  });

  after(async () => {
    await stack?.stop();
  });

  async function gauge(name: string): Promise<number> {
    return metricValue(await stack.metrics("gateway"), name);
  }

  async function until(condition: () => Promise<boolean>, what: string, withinMs = 5000): Promise<void> {
    const deadline = performance.now() + withinMs;
    while (!(await condition())) {
      assert.ok(performance.now() < deadline, `never: ${what}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  // Long enough (greedy, hundreds of tokens) that a burst arrives while the first two still run.
  const longRequest = { prompt: "def parse(text):\n", maxTokens: 300, temperature: 0, mode: MODES.ar };

  test("gRPC: a burst of 8 runs 2 at a time, queues 2, refuses 4 with RESOURCE_EXHAUSTED", async () => {
    const rejectedBefore = metricValue(await stack.metrics("gateway"), "pearl_requests_rejected_total", {
      reason: "queue_full",
    });
    const reference = await stack.generate(longRequest);
    const calls: ClientReadableStream<GenerateResponse>[] = [];
    const outcomes: Promise<Generated | { code: number; metadata: Metadata }>[] = [];
    for (let i = 0; i < 8; i++) {
      const call = stack.stream(longRequest);
      calls.push(call);
      outcomes.push(collect(call).catch((error: { code: number; metadata: Metadata }) => error));
    }
    await until(async () => (await gauge("pearl_requests_waiting_requests")) === 2, "two requests waiting");
    assert.equal(await gauge("pearl_requests_running_requests"), 2);
    const results = await Promise.all(outcomes);
    const refused = results.filter(
      (result): result is { code: number; metadata: Metadata } => "code" in result,
    );
    const served = results.filter((result): result is Generated => "tokenIds" in result);
    assert.equal(refused.length, 4);
    assert.equal(served.length, 4);
    for (const error of refused) {
      assert.equal(error.code, status.RESOURCE_EXHAUSTED);
      assert.ok(Number(error.metadata.get("retry-after")[0]) >= 1);
    }
    for (const result of served) assert.deepEqual(result.tokenIds, reference.tokenIds);
    const after = await stack.metrics("gateway");
    assert.equal(
      metricValue(after, "pearl_requests_rejected_total", { reason: "queue_full" }) - rejectedBefore,
      4,
    );
    assert.equal(metricValue(after, "pearl_requests_waiting_requests"), 0);
    assert.equal(metricValue(after, "pearl_requests_running_requests"), 0);
    await stack.kvReleased(1000);
  });

  test("REST: 429 in OpenAI's shape with a Retry-After header, then the queue drains", async () => {
    const body = {
      model: MODEL,
      prompt: "def parse(text):\n",
      max_tokens: 300,
      temperature: 0,
      stream: true,
    };
    const streams = Array.from(
      { length: 4 },
      () => new SseStream(stack.gatewayUrl + "/v1/completions", body),
    );
    await until(async () => (await gauge("pearl_requests_waiting_requests")) === 2, "two requests waiting");
    const refused = await request(stack.gatewayUrl + "/v1/completions", { body: JSON.stringify(body) });
    assert.equal(refused.status, 429);
    assert.ok(Number(refused.headers["retry-after"]) >= 1, `Retry-After: ${refused.headers["retry-after"]}`);
    const { error } = refused.json() as { error: { type: string; code: string; message: string } };
    assert.equal(error.code, "rate_limit_exceeded");
    assert.match(error.message, /at capacity \(2 requests running, 2 waiting\)/);
    for (const stream of streams) {
      assert.equal(await stream.status, 200);
      await stream.closed;
      assert.equal(stream.events.at(-1), "[DONE]");
      assert.equal(stream.error(), undefined);
    }
  });

  test("a client that gives up while waiting leaves the queue", async () => {
    const running = [stack.stream(longRequest), stack.stream(longRequest)];
    const runningDone = running.map((call) => collect(call));
    await until(async () => (await gauge("pearl_requests_running_requests")) === 2, "two running");
    const waiting = stack.stream(longRequest);
    const waitingEnded = collect(waiting).catch((error: { code: number }) => error);
    await until(async () => (await gauge("pearl_requests_waiting_requests")) === 1, "one waiting");
    waiting.cancel();
    assert.equal(((await waitingEnded) as { code: number }).code, status.CANCELLED);
    await until(async () => (await gauge("pearl_requests_waiting_requests")) === 0, "the queue empty");
    await Promise.all(runningDone);
    await stack.kvReleased(1000);
  });

  test("bodies over --max-body-bytes get 413, gRPC messages RESOURCE_EXHAUSTED", async () => {
    const big = JSON.stringify({ model: MODEL, prompt: "x".repeat(MAX_BODY_BYTES), max_tokens: 1 });
    const refused = await request(stack.gatewayUrl + "/v1/completions", { body: big });
    assert.equal(refused.status, 413);
    assert.equal((refused.json() as { error: { code: string } }).error.code, "request_too_large");
    await assert.rejects(
      stack.generate({
        promptTokenIds: Array.from({ length: MAX_BODY_BYTES + 1000 }, () => 70),
        maxTokens: 1,
      }),
      (error: { code: number }) => error.code === status.RESOURCE_EXHAUSTED,
    );
  });

  test("prompts over --max-prompt-tokens get 400; a huge text is refused without tokenizing it", async () => {
    const tooLong = {
      model: MODEL,
      prompt: Array.from({ length: MAX_PROMPT_TOKENS + 1 }, () => 70),
      max_tokens: 1,
    };
    const refused = await request(stack.gatewayUrl + "/v1/completions", { body: JSON.stringify(tooLong) });
    assert.equal(refused.status, 400);
    assert.match(
      (refused.json() as { error: { message: string } }).error.message,
      /more than the limit of 64/,
    );
    const fits = { ...tooLong, prompt: tooLong.prompt.slice(1) };
    assert.equal(
      (await request(stack.gatewayUrl + "/v1/completions", { body: JSON.stringify(fits) })).status,
      200,
    );
    await assert.rejects(
      stack.generate({ promptTokenIds: tooLong.prompt, maxTokens: 1 }),
      (error: { code: number; details: string }) =>
        error.code === status.INVALID_ARGUMENT && /more than the limit of 64/.test(error.details),
    );
    // 54 kB of text: its length alone rules it out (the message is not the one of a counted prompt).
    const text = { model: MODEL, prompt: "def f():\n    pass\n".repeat(3000), max_tokens: 1 };
    const huge = await request(stack.gatewayUrl + "/v1/completions", { body: JSON.stringify(text) });
    assert.equal(huge.status, 400);
    const { error } = huge.json() as { error: { code: string; message: string } };
    assert.equal(error.code, "prompt_too_long");
    assert.match(error.message, /54000 characters long, more than any prompt of at most 64 tokens/);
  });
});
