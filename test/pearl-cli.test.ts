// The pearl command as a user runs it: `pearl serve` with the embedded model pair (text in, text out),
// `pearl generate --local`, and a clear error when a model is missing.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { credentials } from "@grpc/grpc-js";
import type { BenchRow } from "../cli/bench.js";
import { CHANNEL_OPTIONS } from "../lib/grpc.js";
import { pearlCommand } from "../lib/service_process.js";
import { GatewayClient } from "../proto/gen/pearl/v1/gateway.js";
import { fixtureDir } from "./helpers/models.js";
import { EMBEDDED_MODELS, PearlServe } from "./helpers/pearl_serve.js";
import { PROTO_MODES } from "../lib/decoding_modes.js";
import { collect, generateRequest } from "./helpers/stack.js";

function runPearl(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const { command, args: base } = pearlCommand();
  const result = spawnSync(command, [...base, ...args], { encoding: "utf8", timeout: 60_000 });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

describe("pearl command", () => {
  test(
    "pearl serve runs the embedded pair: text in, the same text out in every mode; SIGTERM stops it all",
    { skip: !existsSync(join(EMBEDDED_MODELS, "target", "tokenizer.json")) },
    async () => {
      const serve = await PearlServe.start(["--log-level", "warn"]);
      try {
        const client = new GatewayClient(
          serve.grpcAddress("gateway"),
          credentials.createInsecure(),
          CHANNEL_OPTIONS,
        );
        try {
          const prompt = "def add(a, b):\n";
          const request = { prompt, maxTokens: 24, temperature: 0 };
          const ar = await collect(client.generate(generateRequest({ ...request, mode: PROTO_MODES.ar })));
          const texts: Record<string, string> = {};
          for (const mode of ["ar", "pearl", "sd"] as const) {
            const call = client.generate(generateRequest({ ...request, mode: PROTO_MODES[mode] }));
            let text = "";
            call.on("data", (response: { text: string }) => (text += response.text));
            const result = await collect(call);
            assert.deepEqual(result.tokenIds, ar.tokenIds, mode);
            texts[mode] = text;
          }
          assert.ok(texts.ar!.length > 0);
          assert.equal(texts.pearl, texts.ar);
          assert.equal(texts.sd, texts.ar);
          const health = await fetch(`${serve.httpUrl("gateway")}/health`);
          assert.equal(health.status, 200);
        } finally {
          client.close();
        }
        assert.equal(await serve.stop(), 0);
      } finally {
        serve.process.child.kill("SIGKILL");
      }
    },
  );

  test("pearl generate --local prints a completion", () => {
    // --min-gamma 1 keeps pearl drafting whatever the tuner measures on this machine.
    const result = runPearl([
      "generate",
      "--local",
      ...["--draft-model", fixtureDir("llama-gqa-f32"), "--target-model", fixtureDir("llama-gqa-f32")],
      ...["--draft-threads", "1", "--target-threads", "1", "--min-gamma", "1"],
      ...["--prompt-ids", "5,6,7", "--max-tokens", "5", "--temperature", "0", "--mode", "pearl", "--json"],
    ]);
    assert.equal(result.status, 0, result.stderr);
    const output = JSON.parse(result.stdout) as {
      tokenIds: number[];
      finishReason: string;
      usage: { mode: number; draftTokens: number };
    };
    assert.equal(output.tokenIds.length, 5);
    assert.equal(output.finishReason, "length");
    assert.equal(output.usage.mode, PROTO_MODES.pearl);
    assert.ok(output.usage.draftTokens > 0, "pearl drafted");
  });

  test("pearl bench --local measures every mode and temperature against ar and sd, and the ideal", () => {
    const result = runPearl([
      "bench",
      "--local",
      ...["--draft-model", fixtureDir("llama-gqa-f32"), "--target-model", fixtureDir("llama-gqa-f32")],
      ...["--draft-threads", "1", "--target-threads", "1"],
      ...["--concurrency", "1,3", "--temperatures", "0,0.8", "--requests", "4", "--rounds", "2"],
      ...["--max-tokens", "12", "--json"],
    ]);
    assert.equal(result.status, 0, result.stderr);
    assert.equal(result.stderr, "", "no progress bar when stderr is not a terminal");
    const rows = JSON.parse(result.stdout) as BenchRow[];
    assert.deepEqual(
      rows.map((row) => `${row.temperature}:${row.concurrency}:${row.mode}`),
      [0, 0.8].flatMap((t) =>
        [1, 3].flatMap((c) => ["ar", "sd", "pearl"].map((mode) => `${t}:${c}:${mode}`)),
      ),
    );
    for (const row of rows) {
      // Two rounds of 2 requests each, or of the concurrency where it is more.
      assert.equal(row.requests, row.concurrency === 1 ? 4 : 6);
      assert.equal(row.tokens, row.requests * 12);
      assert.ok(row.targetStepMs! > 0);
      const ar = rows.find(
        (r) => r.mode === "ar" && r.concurrency === row.concurrency && r.temperature === row.temperature,
      )!;
      assert.equal(row.speedupOverAr, row.tokensPerSecond / ar.tokensPerSecond);
    }
    // The draft is the target itself: at temperature 0 every draft is accepted, and sd verifies its
    // windows of --sd-gamma 4 (shorter only where a request ends).
    for (const sd of rows.filter((row) => row.mode === "sd")) {
      if (sd.temperature === 0) assert.equal(sd.tokenAcceptance, 1);
      assert.ok(sd.meanWindow! > 1 && sd.meanWindow! <= 4, JSON.stringify(sd));
      assert.ok(sd.draftStepMs! > 0 && sd.idealSpeedupOverAr! > 0, JSON.stringify(sd));
    }
  });

  test("a service without a model says which flag to pass", () => {
    const result = runPearl(["target", "--port", "0", "--http-port", "off"]);
    assert.equal(result.status, 1);
    assert.match(result.stdout, /no target model: pass --model <dir> \(or set PEARL_TARGET_MODEL\)/);
  });
});
