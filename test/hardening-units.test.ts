// The parts of production hardening that need no stack: API key matching, the admission queue, the
// flags of keys and TLS, and the bound on a prompt's text length.
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, test } from "node:test";
import { Command } from "commander";
import { addOptions, GATEWAY_OPTIONS, readOptions, secretEnv, toArgs } from "../lib/config.js";
import { metricsOn, Registry, sampleValue } from "../lib/metrics.js";
import { TextTokenizer } from "../lib/tokenizer.js";
import {
  AbandonedError,
  Admission,
  OverloadedError,
  ShuttingDownError,
} from "../services/gateway/admission.js";
import { ApiKeys, bearerToken } from "../services/gateway/auth.js";
import { EMBEDDED_MODELS } from "./helpers/pearl_serve.js";

describe("API keys", () => {
  test("any of several keys is accepted, nothing else is", () => {
    const keys = new ApiKeys(["sk-one", "sk-two-longer"]);
    assert.ok(keys.enabled);
    assert.ok(keys.accepts("sk-one"));
    assert.ok(keys.accepts("sk-two-longer"));
    for (const wrong of ["sk-on", "sk-one ", "sk-onex", "SK-ONE", "", "sk-two", undefined]) {
      assert.equal(keys.accepts(wrong), false, String(wrong));
    }
    assert.equal(new ApiKeys([]).enabled, false);
  });

  test("only a Bearer authorization carries a key", () => {
    assert.equal(bearerToken("Bearer abc"), "abc");
    assert.equal(bearerToken("bearer   abc  "), "abc");
    assert.equal(bearerToken("Basic abc"), undefined);
    assert.equal(bearerToken("Bearer"), undefined);
    assert.equal(bearerToken("Bearer a b"), undefined);
    assert.equal(bearerToken(undefined), undefined);
    assert.equal(bearerToken(["Bearer abc"]), undefined);
  });
});

describe("admission", () => {
  function admission(maxRunning: number, maxWaiting: number) {
    const registry = new Registry();
    const metric = metricsOn(registry);
    const waiting = metric.gauge("waiting", "w");
    const rejected = metric.counter("rejected_total", "r", ["reason"]);
    const queue = new Admission(maxRunning, maxWaiting, { waiting, rejected });
    const value = async (name: string, labels: Record<string, string> = {}) =>
      sampleValue(await registry.metrics(), name, labels);
    return { queue, value };
  }

  test("runs maxRunning, queues maxWaiting first come first served, refuses the rest", async () => {
    const { queue, value } = admission(2, 2);
    const first = await queue.admit();
    const second = await queue.admit();
    const order: string[] = [];
    const third = queue.admit().then((release) => (order.push("third"), release));
    const fourth = queue.admit().then((release) => (order.push("fourth"), release));
    assert.equal(queue.waitingCount, 2);
    assert.equal(await value("waiting"), 2);
    await assert.rejects(queue.admit(), (error: OverloadedError) => {
      assert.ok(error instanceof OverloadedError);
      assert.ok(error.retryAfterSeconds >= 1 && error.retryAfterSeconds <= 60);
      assert.match(error.message, /2 requests running, 2 waiting/);
      return true;
    });
    assert.equal(await value("rejected_total", { reason: "queue_full" }), 1);
    first();
    first(); // a second release changes nothing
    const releaseThird = await third;
    assert.equal(queue.runningCount, 2);
    assert.equal(queue.waitingCount, 1);
    second();
    const releaseFourth = await fourth;
    assert.deepEqual(order, ["third", "fourth"]);
    const idle = queue.idle();
    releaseThird();
    releaseFourth();
    await idle;
    assert.equal(queue.runningCount, 0);
  });

  test("a place freed goes to the first waiter, not to a newcomer", async () => {
    const { queue } = admission(1, 1);
    const running = await queue.admit();
    const waiter = queue.admit();
    running();
    // The newcomer arrives before the waiter's promise has even resolved: it must wait its turn.
    const newcomer = queue.admit();
    assert.equal(queue.runningCount, 1);
    assert.equal(queue.waitingCount, 1);
    (await waiter)();
    (await newcomer)();
    assert.equal(queue.runningCount, 0);
  });

  test("a waiter whose client leaves frees its place in the queue", async () => {
    const { queue } = admission(1, 1);
    const running = await queue.admit();
    const client = new AbortController();
    const waiter = queue.admit(client.signal);
    client.abort();
    await assert.rejects(waiter, AbandonedError);
    assert.equal(queue.waitingCount, 0);
    const next = queue.admit();
    running();
    (await next)();
    await assert.rejects(queue.admit(AbortSignal.abort()), AbandonedError);
  });

  test("stopping refuses the waiting and the new, lets the running finish", async () => {
    const { queue, value } = admission(1, 4);
    const running = await queue.admit();
    const waiters = [queue.admit(), queue.admit()];
    queue.stopAccepting();
    for (const waiter of waiters) await assert.rejects(waiter, ShuttingDownError);
    await assert.rejects(queue.admit(), ShuttingDownError);
    assert.equal(await value("rejected_total", { reason: "shutting_down" }), 3);
    assert.equal(await value("waiting"), 0);
    const idle = queue.idle();
    running();
    await idle;
  });
});

describe("flags", () => {
  function parse(argv: string[], env: Record<string, string> = {}) {
    const saved = { ...process.env };
    Object.assign(process.env, env);
    try {
      const command = new Command().exitOverride().configureOutput({ writeErr: () => undefined });
      addOptions(command, GATEWAY_OPTIONS);
      command.parse(argv, { from: "user" });
      return readOptions(command.opts(), GATEWAY_OPTIONS);
    } finally {
      process.env = saved;
    }
  }

  test("--api-key repeats and takes commas, PEARL_API_KEY too; the keys never go on a command line", () => {
    assert.deepEqual(parse(["--api-key", "a", "--api-key", "b,c"]).apiKeys, ["a", "b", "c"]);
    assert.deepEqual(parse([], { PEARL_API_KEY: "x,y" }).apiKeys, ["x", "y"]);
    assert.deepEqual(parse([]).apiKeys, []);
    assert.throws(() => parse(["--api-key", "a,,b"]), /an API key must not be empty/);
    const config = parse(["--api-key", "secret-1", "--api-key", "secret-2"]);
    const args = toArgs(config, GATEWAY_OPTIONS);
    assert.ok(!args.join(" ").includes("secret"), args.join(" "));
    assert.deepEqual(secretEnv(config, GATEWAY_OPTIONS), { PEARL_API_KEY: "secret-1,secret-2" });
    // What toArgs writes reads back as the same config.
    assert.deepEqual(parse(args), { ...config, apiKeys: [] });
  });

  test("--api-key-exempt, admission and TLS flags with their defaults and variables", () => {
    const defaults = parse([]);
    assert.deepEqual(defaults.apiKeyExempt, ["health", "metrics"]);
    assert.equal(defaults.maxNumSeqs, 256);
    assert.equal(defaults.maxWaiting, 1024);
    assert.equal(defaults.maxBodyBytes, 4 * 1024 * 1024);
    assert.equal(defaults.shutdownTimeoutSeconds, 30);
    assert.deepEqual(parse(["--api-key-exempt", "off"]).apiKeyExempt, []);
    assert.deepEqual(parse([], { PEARL_API_KEY_EXEMPT: "metrics" }).apiKeyExempt, ["metrics"]);
    assert.throws(() => parse(["--api-key-exempt", "health,v1"]), /expected one of health, metrics/);
    const tls = parse([], {
      PEARL_GATEWAY_TLS_CERT: "c.pem",
      PEARL_GATEWAY_TLS_KEY: "k.pem",
      PEARL_LINK_TLS_CA: "ca.pem",
      PEARL_MAX_NUM_SEQS: "8",
      PEARL_MAX_WAITING: "0",
    });
    assert.deepEqual(
      [tls.tlsCert, tls.tlsKey, tls.linkTlsCa, tls.maxNumSeqs, tls.maxWaiting],
      ["c.pem", "k.pem", "ca.pem", 8, 0],
    );
  });
});

describe("prompt text bound", () => {
  test("no text of n tokens is longer than maxTextLength(n)", () => {
    const tokenizer = TextTokenizer.load(join(EMBEDDED_MODELS, "target"))!;
    const texts = [
      "def add(a, b):\n    return a + b\n",
      " ".repeat(300),
      "=".repeat(500),
      "# 你好，世界 😀 日本語のテキスト\n",
      "<|endoftext|>".repeat(20),
      "\t\t\n\n\r\n" + "x".repeat(100),
    ];
    for (const text of texts) {
      const tokens = tokenizer.encode(text).length;
      assert.ok(
        text.length <= tokenizer.maxTextLength(tokens),
        `${JSON.stringify(text.slice(0, 20))}: ${tokens}`,
      );
    }
  });
});
