// The engine's deterministic option on its way from the command line to the engine: the flag and its
// environment variable, the trip through `pearl serve` to the draft and target services, the binding, and
// the engine itself. The cpu backend is batch-invariant either way; what the option changes on cuda is
// tested by test/gpu/*.test.ts.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { Command } from "commander";
import OpenAI from "openai";
import {
  addOptions,
  readOptions,
  TARGET_SERVICE_OPTIONS,
  type TargetServiceConfig,
  targetServiceDefaults,
  toArgs,
} from "../lib/config.js";
import { Engine } from "../lib/native.js";
import { PearlServe } from "./helpers/pearl_serve.js";
import { assertSameBits, stepLogits, tokenRange } from "./reference/drive.js";
import { loadFixture } from "./reference/fixtures.js";

function parseTarget(argv: string[], env: Record<string, string> = {}): TargetServiceConfig {
  const saved = { ...process.env };
  Object.assign(process.env, env);
  try {
    const command = new Command("t").exitOverride().configureOutput({ writeErr: () => undefined });
    addOptions(command, TARGET_SERVICE_OPTIONS);
    command.parse(argv, { from: "user" });
    return readOptions(command.opts(), TARGET_SERVICE_OPTIONS);
  } finally {
    for (const key of Object.keys(env)) delete process.env[key];
    Object.assign(process.env, saved);
  }
}

describe("deterministic option", () => {
  test("--deterministic is a switch, off by default; the environment variable takes true/false words", () => {
    assert.equal(parseTarget([]).deterministic, false);
    assert.equal(parseTarget(["--deterministic"]).deterministic, true);
    assert.equal(parseTarget(["--deterministic", "--threads", "2"]).deterministic, true);
    assert.equal(parseTarget(["--deterministic", "false"]).deterministic, false);
    assert.equal(parseTarget([], { PEARL_TARGET_DETERMINISTIC: "1" }).deterministic, true);
    assert.equal(parseTarget([], { PEARL_TARGET_DETERMINISTIC: "0" }).deterministic, false);
    assert.equal(parseTarget([], { PEARL_TARGET_DETERMINISTIC: "true" }).deterministic, true);
    assert.equal(
      parseTarget(["--deterministic", "off"], { PEARL_TARGET_DETERMINISTIC: "on" }).deterministic,
      false,
    );
    assert.throws(
      () => parseTarget(["--deterministic", "maybe"]),
      /expected true, 1, on, yes or false.*"maybe"/,
    );
    assert.throws(() => parseTarget([], { PEARL_TARGET_DETERMINISTIC: "2" }), /PEARL_TARGET_DETERMINISTIC/);
  });

  test("the setting survives the trip through flags to a child process, on and off", () => {
    for (const deterministic of [true, false]) {
      const config = { ...targetServiceDefaults(), deterministic, grpcPort: 0 };
      const args = toArgs(config, TARGET_SERVICE_OPTIONS);
      assert.deepEqual(parseTarget(args, { PEARL_TARGET_DETERMINISTIC: String(!deterministic) }), config);
    }
  });

  test("the binding passes it to the engine and refuses anything but a boolean", async () => {
    const modelDir = loadFixture("llama-gqa-f32").dir;
    await assert.rejects(
      Engine.load({ modelDir, backend: "cpu", deterministic: "yes" as unknown as boolean }),
      /options\.deterministic must be a boolean/,
    );
    const deterministic = await Engine.load({ modelDir, backend: "cpu", numThreads: 1, deterministic: true });
    const plain = await Engine.load({ modelDir, backend: "cpu", numThreads: 1, deterministic: false });
    try {
      assert.equal(deterministic.info.backend, "cpu");
      const prompt = tokenRange(5, 21, deterministic.info.vocabSize);
      await deterministic.addSequence(1);
      await plain.addSequence(1);
      assertSameBits(
        await stepLogits(deterministic, 1, prompt),
        await stepLogits(plain, 1, prompt),
        "the cpu backend is batch-invariant in both modes",
      );
    } finally {
      await deterministic.close();
      await plain.close();
    }
  });

  test("pearl serve --draft-deterministic --target-deterministic loads both engines so and serves", async () => {
    const serve = await PearlServe.start(["--draft-deterministic", "--target-deterministic"]);
    try {
      const loaded = serve.logRecords("model loaded");
      assert.deepEqual(loaded.map((record) => [record.service, record.deterministic]).sort(), [
        ["draft", true],
        ["target", true],
      ]);
      const client = new OpenAI({
        baseURL: `${serve.httpUrl("gateway")}/v1`,
        apiKey: "unused",
        maxRetries: 0,
      });
      const completion = await client.completions.create({
        model: "pearl-code",
        prompt: "def add(a, b):\n",
        max_tokens: 8,
        temperature: 0,
      });
      assert.ok((completion.usage?.completion_tokens ?? 0) >= 1);
      assert.equal(await serve.stop(), 0);
    } finally {
      serve.process.child.kill("SIGKILL");
    }
  });
});
