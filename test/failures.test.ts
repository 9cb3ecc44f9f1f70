// Failures on a real stack: the target killed (kill -9) mid-stream, the draft killed under 16 concurrent
// streams, clients disconnecting at random under load, the gateway stopped with SIGTERM while it serves,
// and `pearl serve` restarting a child that crashed.
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { type ClientReadableStream, status } from "@grpc/grpc-js";
import type { GenerateResponse } from "../proto/gen/pearl/v1/gateway.js";
import { request, SseStream } from "./helpers/http.js";
import { EMBEDDED_MODELS, PearlServe } from "./helpers/pearl_serve.js";
import {
  collect,
  type Generated,
  grpcHealthStatus,
  inParallel,
  randomPrompts,
  Stack,
} from "./helpers/stack.js";
import { PROTO_MODES as MODES } from "../lib/decoding_modes.js";

const TOKENIZER = join(EMBEDDED_MODELS, "target");
const MODEL = "target";
const PROMPT = "def parse(text):\n";

function embeddedStack(gatewayArgs: string[] = []): Promise<Stack> {
  return Stack.start({
    draftModel: join(EMBEDDED_MODELS, "draft"),
    targetModel: join(EMBEDDED_MODELS, "target"),
    gatewayArgs: ["--tokenizer", TOKENIZER, ...gatewayArgs],
  });
}

/** A gRPC stream watched from the side: when its first tokens came, and how and when it ended. */
function watch(call: ClientReadableStream<GenerateResponse>) {
  let firstToken: () => void = () => undefined;
  const started = new Promise<void>((resolve) => (firstToken = resolve));
  const tokens: number[] = [];
  call.on("data", (response: GenerateResponse) => {
    tokens.push(...response.tokenIds);
    firstToken();
  });
  const ended = new Promise<{ code: number; details: string; at: number }>((resolve) => {
    call.on("error", (error: { code: number; details: string }) =>
      resolve({ code: error.code, details: error.details, at: performance.now() }),
    );
    call.on("end", () => resolve({ code: status.OK, details: "", at: performance.now() }));
  });
  return { started, ended, tokens };
}

async function until(condition: () => Promise<boolean>, what: string, withinMs: number): Promise<number> {
  const started = performance.now();
  while (!(await condition())) {
    assert.ok(performance.now() - started < withinMs, `not within ${withinMs} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return performance.now() - started;
}

describe("the target or the draft dies, clients vanish", () => {
  let stack: Stack;

  before(async () => {
    stack = await embeddedStack();
  });

  after(async () => {
    await stack?.stop();
  });

  const completions = (): string => `${stack.gatewayUrl}/v1/completions`;
  const healthStatus = async (): Promise<number> => (await request(`${stack.gatewayUrl}/health`)).status;

  test("target kill -9 mid-stream: every request ends with an error within 2 s; after a restart, the same output", async () => {
    const greedy = { prompt: PROMPT, maxTokens: 480, temperature: 0 };
    const before = await stack.generate({ ...greedy, mode: MODES.pearl });
    const restBefore = (await request(completions(), {
      body: JSON.stringify({ model: MODEL, prompt: PROMPT, max_tokens: 32, temperature: 0 }),
    }).then((response) => response.json())) as { choices: { text: string }[] };

    const grpc = [MODES.pearl, MODES.pearl, MODES.ar, MODES.sd].map((mode) =>
      watch(stack.stream({ ...greedy, mode })),
    );
    const sse = [0, 1].map(
      () =>
        new SseStream(completions(), {
          model: MODEL,
          prompt: PROMPT,
          max_tokens: 480,
          temperature: 0,
          stream: true,
        }),
    );
    const plain = request(completions(), {
      body: JSON.stringify({ model: MODEL, prompt: PROMPT, max_tokens: 480, temperature: 0 }),
    }).then((response) => ({ response, at: performance.now() }));
    await Promise.all([...grpc.map((call) => call.started), ...sse.map((stream) => stream.started)]);

    stack.target.process.child.kill("SIGKILL");
    const killedAt = performance.now();
    for (const call of grpc) {
      const ended = await call.ended;
      assert.equal(ended.code, status.UNAVAILABLE, ended.details);
      assert.match(ended.details, /target/);
      assert.ok(ended.at - killedAt < 2000, `ended ${ended.at - killedAt} ms after the kill`);
      assert.ok(call.tokens.length > 0 && call.tokens.length < 480);
    }
    for (const stream of sse) {
      const closedAt = await stream.closed;
      assert.ok(closedAt - killedAt < 2000);
      assert.equal(stream.error()?.code, "service_unavailable");
      assert.equal(stream.events.at(-1), "[DONE]", "the error event, then the end of the stream");
    }
    const { response, at } = await plain;
    assert.equal(response.status, 503);
    assert.equal((response.json() as { error: { code: string } }).error.code, "service_unavailable");
    assert.ok(at - killedAt < 2000);

    await until(async () => (await healthStatus()) === 503, "/health unhealthy", 2000);
    await until(
      async () => (await grpcHealthStatus(stack.gateway.address)) === "NOT_SERVING",
      "gRPC health NOT_SERVING",
      2000,
    );
    await assert.rejects(stack.generate({ ...greedy, maxTokens: 4 }), (error: { code: number }) => {
      assert.equal(error.code, status.UNAVAILABLE);
      return true;
    });
    const refused = await request(completions(), {
      body: JSON.stringify({ model: MODEL, prompt: PROMPT, max_tokens: 4 }),
    });
    assert.equal(refused.status, 503);
    // The draft's side of the lost sessions is closed too.
    await until(async () => (await stack.draftInfo()).activeSessions === 0, "draft sessions closed", 1000);

    await stack.restartTarget();
    await until(async () => (await healthStatus()) === 200, "/health healthy again", 10_000);
    await until(
      async () => (await grpcHealthStatus(stack.gateway.address)) === "SERVING",
      "gRPC health SERVING again",
      1000,
    );
    const again = await stack.generate({ ...greedy, mode: MODES.pearl });
    assert.deepEqual(again.tokenIds, before.tokenIds);
    const restAgain = (await request(completions(), {
      body: JSON.stringify({ model: MODEL, prompt: PROMPT, max_tokens: 32, temperature: 0 }),
    }).then((reply) => reply.json())) as { choices: { text: string }[] };
    assert.equal(restAgain.choices[0]!.text, restBefore.choices[0]!.text);
    await stack.kvReleased(1000);
  });

  test("draft kill -9 under 16 concurrent streams: all complete with ar's output", async () => {
    const prompts = randomPrompts(16, 6, 40, 21);
    const request = { maxTokens: 160, temperature: 0 };
    const ar = await inParallel(prompts, 4, (prompt) =>
      stack.generate({ ...request, promptTokenIds: prompt, mode: MODES.ar }),
    );
    const calls = prompts.map((prompt) =>
      stack.stream({ ...request, promptTokenIds: prompt, mode: MODES.pearl }),
    );
    const results = calls.map((call) => collect(call));
    const watched = calls.map(watch);
    await Promise.all(watched.map((call) => call.started));
    stack.draft.process.child.kill("SIGKILL");
    const done: Generated[] = await Promise.all(results);
    done.forEach((result, i) => assert.deepEqual(result.tokenIds, ar[i]!.tokenIds, `request ${i}`));
    assert.ok(
      done.filter((result) => result.usage.draftFallback).length >= 8,
      "most requests lost their draft on the way",
    );
    assert.equal(await stack.draft.process.exited, "SIGKILL");
    await stack.restartDraft();
    await stack.kvReleased(1000);
  });

  test("requests cancelled as they open, while others decode: no session is left behind", async () => {
    // A close that arrives while the service is still adding the session to its engine must stand.
    const background = randomPrompts(8, 20, 40, 5).map((prompt) =>
      collect(stack.stream({ promptTokenIds: prompt, maxTokens: 300, temperature: 0, mode: MODES.pearl })),
    );
    const prompts = randomPrompts(120, 4, 60, 8);
    await inParallel(prompts, 24, async (prompt, i) => {
      const call = stack.stream({ promptTokenIds: prompt, maxTokens: 100, mode: MODES.pearl });
      const ended = watch(call).ended;
      setTimeout(() => call.cancel(), i % 8);
      await ended;
    });
    await Promise.all(background);
    await stack.kvReleased(1000);
  });

  test("clients disconnecting at random under load: KV on both services back to baseline within 1 s", async () => {
    const prompts = randomPrompts(24, 6, 60, 33);
    // Seeded: which request is dropped, and after how long.
    let state = 12345;
    const random = (): number => {
      state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
      return state / 4294967296;
    };
    const ends = prompts.map(async (prompt, i) => {
      const dropAfterMs = random() < 0.75 ? 50 + random() * 900 : undefined;
      if (i % 2 === 0) {
        const call = stack.stream({
          promptTokenIds: prompt,
          maxTokens: 200,
          temperature: i % 4 === 0 ? 0 : 1,
          mode: i % 3 === 0 ? MODES.ar : MODES.pearl,
        });
        const watched = watch(call);
        if (dropAfterMs !== undefined) setTimeout(() => call.cancel(), dropAfterMs);
        return watched.ended;
      }
      const stream = new SseStream(completions(), {
        model: MODEL,
        prompt,
        max_tokens: 200,
        stream: true,
        decoding: i % 3 === 1 ? "sd" : "pearl",
      });
      if (dropAfterMs !== undefined) setTimeout(() => stream.abort(), dropAfterMs);
      return stream.closed;
    });
    await Promise.all(ends);
    const tookMs = await stack.kvReleased(1000);
    assert.ok(tookMs < 1000);
    // And the stack still serves.
    const after = await stack.generate({ promptTokenIds: prompts[0]!, maxTokens: 8, temperature: 0 });
    assert.equal(after.tokenIds.length, 8);
  });
});

describe("graceful shutdown of the gateway", () => {
  test("SIGTERM: new requests refused, short ones finish, long ones cancelled at the timeout, KV freed, exit 0", async () => {
    const stack = await embeddedStack(["--shutdown-timeout", "1"]);
    try {
      const long = [0, 1, 2].map(() =>
        watch(stack.stream({ prompt: PROMPT, maxTokens: 480, temperature: 0, mode: MODES.pearl })),
      );
      const longSse = new SseStream(`${stack.gatewayUrl}/v1/completions`, {
        model: MODEL,
        prompt: PROMPT,
        max_tokens: 480,
        stream: true,
      });
      await Promise.all([...long.map((call) => call.started), longSse.started]);
      // Admitted (its first token is out) before the signal.
      const shortCall = stack.stream({ prompt: PROMPT, maxTokens: 8, temperature: 0 });
      const short = collect(shortCall);
      await watch(shortCall).started;
      stack.gateway.process.child.kill("SIGTERM");
      const stoppedAt = performance.now();

      await until(
        async () => (await request(`${stack.gatewayUrl}/health`)).status === 503,
        "/health says shutting down",
        1000,
      );
      const refused = await request(`${stack.gatewayUrl}/v1/completions`, {
        body: JSON.stringify({ model: MODEL, prompt: PROMPT, max_tokens: 4 }),
      });
      assert.equal(refused.status, 503);
      assert.match((refused.json() as { error: { message: string } }).error.message, /shutting down/);
      await assert.rejects(stack.generate({ prompt: PROMPT, maxTokens: 4 }), (error: { code: number }) => {
        assert.equal(error.code, status.UNAVAILABLE);
        return true;
      });

      assert.equal((await short).tokenIds.length, 8, "a request in flight finishes within the timeout");
      for (const call of long) {
        const ended = await call.ended;
        assert.equal(ended.code, status.UNAVAILABLE);
        assert.match(
          ended.details,
          /shutting down: the request was cancelled after the 1 s shutdown timeout/,
        );
        assert.ok(ended.at - stoppedAt < 2500);
      }
      await longSse.closed;
      assert.match(longSse.error()?.message ?? "", /shutting down/);
      assert.equal(longSse.events.at(-1), "[DONE]");
      assert.equal(await stack.gateway.process.exited, 0);
      await stack.kvReleased(1000);
    } finally {
      await stack.stop();
    }
  });
});

describe("pearl serve supervises its services", () => {
  let serve: PearlServe;

  before(async () => {
    serve = await PearlServe.start(["--log-level", "info"]);
  });

  after(async () => {
    if (serve) assert.equal(await serve.stop(), 0);
  });

  const targetPid = (): number => {
    const records = serve.logRecords("listening").filter((record) => record.service === "target");
    return records.at(-1)!.pid as number;
  };

  const complete = async (): Promise<{ status: number; text: string }> => {
    const response = await request(`${serve.httpUrl("gateway")}/v1/completions`, {
      body: JSON.stringify({ model: "pearl-code", prompt: PROMPT, max_tokens: 24, temperature: 0 }),
    });
    return { status: response.status, text: response.text };
  };

  test("a target that crashes is restarted with backoff and serves the same output again", async () => {
    const before = await complete();
    assert.equal(before.status, 200);
    const beforeText = (JSON.parse(before.text) as { choices: { text: string }[] }).choices[0]!.text;

    for (const attempt of [1, 2]) {
      const pid = targetPid();
      process.kill(pid, "SIGKILL");
      await until(
        async () => serve.logRecords("service exited: restarting it").length >= attempt,
        "the restart is announced",
        2000,
      );
      const restart = serve.logRecords("service exited: restarting it")[attempt - 1]!;
      assert.deepEqual(
        { role: restart.role, code: restart.code, attempt: restart.attempt, delay: restart.delaySeconds },
        { role: "target", code: "SIGKILL", attempt, delay: attempt },
        "the delay doubles while the service keeps crashing",
      );
      await until(async () => targetPid() !== pid, "the target is back", 15_000);
      await until(async () => (await complete()).status === 200, "a request succeeds", 10_000);
    }
    const after = await complete();
    assert.equal((JSON.parse(after.text) as { choices: { text: string }[] }).choices[0]!.text, beforeText);
    assert.equal(serve.logRecords("service restarted").length, 2);
  });
});
