// --devices as a user meets it on the real pearl command: a malformed list or a GPU the host does not have
// is refused with the flag named and a non-zero exit, before `pearl serve` starts any service; a stack
// that starts prints where each model runs.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { describe, test } from "node:test";
import { setTimeout } from "node:timers/promises";
import { pearlCommand } from "../lib/service_process.js";
import { fixtureDir } from "./helpers/models.js";
import { PearlServe } from "./helpers/pearl_serve.js";

function runPearl(
  args: string[],
  env: NodeJS.ProcessEnv = {},
): { status: number | null; stdout: string; stderr: string } {
  const { command, args: base } = pearlCommand();
  const result = spawnSync(command, [...base, ...args], {
    encoding: "utf8",
    timeout: 60_000,
    env: { ...process.env, ...env },
  });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** The JSON log lines a command printed on stdout. */
function records(stdout: string): Record<string, unknown>[] {
  return stdout
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

/** Asserts that `pearl serve` stopped at placement: its own error line only, no service started. */
function assertRefusedBeforeStart(stdout: string, message: RegExp): void {
  const lines = records(stdout);
  assert.equal(lines.length, 1, stdout);
  assert.equal(lines[0]!.service, "pearl");
  assert.equal(lines[0]!.message, "failed to start");
  assert.match(String(lines[0]!.error), message);
}

const MODEL = fixtureDir("llama-gqa-f32");
const QUIET_SERVICE = ["--model", MODEL, "--port", "0", "--http-port", "off", "--threads", "1"];

describe("pearl --devices", () => {
  test("a malformed list is refused by the flag it came from", () => {
    const flag = runPearl(["target", ...QUIET_SERVICE, "--devices", "0,x"]);
    assert.equal(flag.status, 1);
    assert.match(flag.stderr, /option '--devices <list>' argument '0,x' is invalid/);
    assert.match(flag.stderr, /expected CUDA device ordinals separated by commas/);

    const env = runPearl(["serve", "--port", "0"], { PEARL_DRAFT_DEVICES: "gpu0" });
    assert.equal(env.status, 1);
    assert.match(env.stderr, /option '--draft-devices <list>' value 'gpu0' from env 'PEARL_DRAFT_DEVICES'/);
    assert.equal(records(env.stdout).length, 0, env.stdout);
  });

  test("pearl serve refuses a GPU the host does not have, naming the flag and the device count", () => {
    const result = runPearl(["serve", "--port", "0", "--target-backend", "cuda", "--target-devices", "99"]);
    assert.equal(result.status, 1);
    assertRefusedBeforeStart(result.stdout, /^--target-devices 99: device 99 does not exist; .*CUDA device/);
  });

  test("pearl serve refuses devices on the cpu backend", () => {
    const result = runPearl(["serve", "--port", "0", "--draft-backend", "cpu", "--draft-devices", "0"]);
    assert.equal(result.status, 1);
    assertRefusedBeforeStart(
      result.stdout,
      /^--draft-devices needs the cuda backend \(--draft-backend is cpu\)$/,
    );
  });

  test("a service started alone refuses a GPU the host does not have", () => {
    const result = runPearl(["target", ...QUIET_SERVICE, "--backend", "cuda", "--devices", "99"]);
    assert.equal(result.status, 1);
    const lines = records(result.stdout);
    assert.equal(lines.length, 1, result.stdout);
    assert.match(String(lines[0]!.error), /^--devices 99: device 99 does not exist; .*CUDA device/);
  });

  test("pearl serve prints the placement once, then starts the services", async () => {
    const serve = await PearlServe.start(["--draft-backend", "cpu", "--target-backend", "cpu"]);
    try {
      // pearl serve handles SIGTERM once it says it is serving, a moment after the gateway listens.
      const deadline = Date.now() + 10_000;
      while (!serve.lines.some((line) => line.includes('"pearl is serving')) && Date.now() < deadline) {
        await setTimeout(20);
      }
      const placements = serve.lines
        .filter((line) => line.includes('"placement: '))
        .map((line) => JSON.parse(line) as Record<string, unknown>);
      assert.equal(placements.length, 1, serve.lines.join("\n"));
      assert.equal(placements[0]!.message, "placement: draft on the CPU, target on the CPU");
      assert.equal(placements[0]!.targetDevices, "cpu");
      assert.equal(await serve.stop(), 0, serve.lines.join("\n"));
    } finally {
      serve.process.child.kill("SIGKILL");
    }
  });
});
