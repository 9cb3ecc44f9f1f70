// The draft-length tuner on synthetic machines: step reports, verdicts and session cycles as the services
// and the PEARL loop would produce them on a machine whose step costs and acceptance the test chooses.
// A closed loop: every request follows its plan of the moment, as real requests do, and each request can
// have a draft of its own quality.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { type GatewayConfig, gatewayDefaults } from "../lib/config.js";
import { agreesAtRate, type Machine, Simulation } from "./helpers/tuner.js";

/** Flat verification: a step costs the same whatever it carries (weight-bound, a GPU at small batch). */
const FLAT: Machine = { targetMs: () => 2, draftMs: () => 0.25 };
/** Compute-bound steps with a fixed part (a CPU): at 8 sessions a drafted row costs about what it saves,
 * at 1 the fixed part still pays for drafting. */
const LINEAR: Machine = {
  targetMs: (tokens) => 0.625 + 0.25 * tokens,
  draftMs: (batch) => 0.1 + 0.05 * batch,
};
/** Each verified row costs a tenth of a step's fixed millisecond, and drafting is cheap: drafted rows pay
 * in proportion to how many of them the target accepts. */
const ROWS_PRICED: Machine = {
  targetMs: (tokens) => 1 + 0.1 * tokens,
  draftMs: () => 0.05,
};
/** Two requests that run for the whole test, the first with a draft right `first` of the time, the second
 * `second`. */
const twoRequests = (first: number, second: number) => ({
  steps: () => 100_000,
  agreement: (request: number) => agreesAtRate(request === 0 ? first : second),
});

/** A simulation whose requests' drafts are accepted `acceptance` of the time unless a run says otherwise. */
function simulate(machine: Machine, acceptance: number, config: Partial<GatewayConfig> = {}): Simulation {
  return new Simulation(machine, () => agreesAtRate(acceptance), config);
}

describe("draft-length tuner", () => {
  test("a verify step as slow whatever its window gives PEARL's gamma = t_target / t_draft", async () => {
    const simulation = simulate({ targetMs: () => 8, draftMs: () => 1 }, 0.99);
    simulation.run(1, 400);
    assert.deepEqual(simulation.windows(), [8]);
    assert.deepEqual(simulation.tuner.plan("pearl"), { speculate: true, lookahead: 16, verifyWindow: 8 });
    assert.equal(await simulation.gauge("pearl_draft_length_tokens"), 8);
  });

  test("flat verification at 8 requests: pearl keeps drafting", async () => {
    const simulation = simulate(FLAT, 0.8);
    simulation.run(8, 2000);
    const windows = simulation.windows();
    assert.ok(
      windows.every((window) => window >= 4),
      `windows ${windows}`,
    );
    assert.ok((await simulation.gauge("pearl_draft_length_tokens")) >= 4);
    assert.equal(
      simulation.tunedLogs().filter((record) => record.gamma === 0).length,
      0,
      "never stopped drafting",
    );
  });

  test("compute-bound steps: drafting stops at 8 requests and starts again when the load drops to 1", async () => {
    const simulation = simulate(LINEAR, 0.5);
    simulation.run(1, 400);
    assert.deepEqual(simulation.windows().length, 1);
    assert.ok(simulation.windows()[0]! >= 1, "at 1 request the fixed cost pays for drafting");

    simulation.run(8, 2000);
    assert.ok(
      simulation.windows().every((window) => window === 0),
      `windows ${simulation.windows()}`,
    );
    const off = simulation.tunedLogs().find((record) => record.gamma === 0 && record.batchSize === 8);
    assert.ok(off, "the decision was logged");
    assert.equal(off.speculate, false);
    assert.ok(
      (off.targetAloneTokensPerMs as number) > (off.draftingTokensPerMs as number),
      JSON.stringify(off),
    );
    // Mode sd is asked for by name: it drafts whatever pearl does.
    assert.equal(simulation.tuner.plan("sd").speculate, true);

    // Nobody drafts: the acceptance estimate keeps its last value.
    const acceptance = simulation.tuner.acceptanceRate;
    simulation.run(8, 500);
    assert.equal(simulation.tuner.acceptanceRate, acceptance);
    assert.ok(
      simulation.windows().every((window) => window === 0),
      `stays off while the load stays: ${simulation.windows()}`,
    );

    // With 7 requests in flight, an 8th would not draft either, and the gauges say so.
    simulation.finishAll();
    simulation.run(7, 1, 0, { steps: () => 100 });
    assert.deepEqual(simulation.tuner.plan("pearl"), { speculate: false, lookahead: 0, verifyWindow: 0 });
    assert.equal(await simulation.gauge("pearl_draft_length_tokens"), 0);
    assert.equal(await simulation.gauge("pearl_lookahead_tokens"), 0);
    assert.equal(await simulation.gauge("pearl_verify_window_tokens"), 0);
    simulation.run(1, 2000);
    assert.ok(simulation.windows()[0]! >= 1, JSON.stringify(simulation.windows()));
  });

  test("drafting is decided per batch size: each keeps its decision when the load moves between them", () => {
    const simulation = simulate(LINEAR, 0.5);
    simulation.run(1, 400);
    simulation.run(8, 2000);
    const logged = (batchSize: number): number[] =>
      simulation
        .tunedLogs()
        .filter((record) => record.batchSize === batchSize)
        .map((record) => record.gamma as number);
    assert.ok(logged(1).at(-1)! >= 1, `batch 1: ${logged(1)}`);
    assert.equal(logged(8).at(-1), 0, `batch 8: ${logged(8)}`);
    // Back at one request, the very first one drafts: batch size 1 kept its own decision while 8 was off.
    const longRequests = { steps: () => 100 };
    simulation.finishAll();
    simulation.run(1, 1, 0, longRequests);
    assert.ok(simulation.windows()[0]! >= 1, JSON.stringify(simulation.windows()));
    // And at 8 again, requests stop drafting within two steps of the batch filling: no learning it again.
    simulation.run(8, 2, 0, longRequests);
    assert.ok(
      simulation.windows().every((window) => window === 0),
      `windows ${simulation.windows()}`,
    );
    simulation.finishAll();
    simulation.run(1, 1, 0, longRequests);
    assert.ok(simulation.windows()[0]! >= 1, JSON.stringify(simulation.windows()));
  });

  test("per-request acceptance: a request whose draft agrees badly stops drafting alone", () => {
    const simulation = simulate(ROWS_PRICED, 0.6);
    simulation.run(2, 200, 0, twoRequests(0.9, 0.1));
    const [good, bad] = simulation.windows();
    assert.ok(good! >= 2, `the agreeing request drafts on with window ${good}`);
    assert.equal(bad, 0, "the other one runs on the target alone");
    const stopped = simulation.logs.filter((record) => record.message === "request stops drafting");
    assert.deepEqual(
      stopped.map((record) => [record.requestId, record.why]),
      [["request-1", "its draft agrees too rarely: its rows cost the batch more than they gain it"]],
    );
    // Its own rate, well under the pair's, as the verdicts of its first windows moved it.
    assert.ok((stopped[0]!.acceptanceRate as number) < 0.4, JSON.stringify(stopped[0]));
    // Its verdicts moved its own rate, not the next request's start: a third one drafts.
    simulation.run(3, 1, 0, { steps: () => 100_000 });
    assert.ok(simulation.windows()[2]! >= 2, JSON.stringify(simulation.windows()));
  });

  test("per-request acceptance: a better draft gets a longer window beside a worse one", () => {
    const simulation = simulate(ROWS_PRICED, 0.6);
    simulation.run(2, 200, 0, twoRequests(0.95, 0.55));
    const [better, worse] = simulation.windows();
    assert.ok(worse! >= 1, `windows ${simulation.windows()}`);
    assert.ok(better! >= 3 * worse!, `windows ${simulation.windows()}`);
  });

  test("verification that costs nothing more per row: even a poor draft keeps drafting", () => {
    // Flat steps (a GPU at a small batch): a rejected row costs the batch nothing, an accepted one gains.
    const simulation = simulate(FLAT, 0.8);
    simulation.run(2, 200, 0, twoRequests(0.95, 0.3));
    assert.ok(
      simulation.windows().every((window) => window >= 4),
      `windows ${simulation.windows()}`,
    );
  });

  test("what sessions get decides, not what the ideal model promises", () => {
    // Flat verification promises 4.3 tokens a step (2.2 per ms against the target alone's 0.5), but
    // every drafting cycle takes six times the ideal one.
    const simulation = simulate({ ...FLAT, drafterSlowdown: 6 }, 0.8);
    simulation.run(1, 2000);
    assert.deepEqual(simulation.windows(), [0]);
    const last = simulation
      .tunedLogs()
      .filter((record) => record.batchSize === 1)
      .at(-1)!;
    assert.equal(last.gamma, 0);
  });

  test("pins and --min-gamma 1 keep drafting where it does not pay; sd keeps its gamma", () => {
    for (const config of [{ minGamma: 1 }, { verifyWindow: 3 }, { lookahead: 5 }]) {
      const simulation = simulate(LINEAR, 0.5, config);
      // Every other request with a draft that agrees badly: even those keep drafting.
      simulation.run(8, 2000, 40, {
        agreement: (request) => agreesAtRate(request % 2 === 0 ? 0.5 : 0.05),
      });
      assert.ok(
        simulation.windows().every((window) => window >= 1),
        `${JSON.stringify(config)}: ${simulation.windows()}`,
      );
      assert.equal(
        simulation.tunedLogs().filter((record) => record.gamma === 0).length,
        0,
        JSON.stringify(config),
      );
    }
    const pinned = simulate(FLAT, 0.8, { lookahead: 5, verifyWindow: 3 });
    pinned.run(1, 400);
    assert.deepEqual(pinned.tuner.plan("pearl"), { speculate: true, lookahead: 5, verifyWindow: 3 });
    assert.deepEqual(pinned.tuner.plan("sd"), {
      speculate: true,
      lookahead: gatewayDefaults().sdGamma,
      verifyWindow: gatewayDefaults().sdGamma,
    });
  });

  test("when verification costs grow with the window, the window stays short", () => {
    const simulation = simulate({ targetMs: (tokens) => 0.2 + tokens, draftMs: () => 0.25 }, 0.6, {
      minGamma: 1,
    });
    simulation.run(1, 400);
    const [window] = simulation.windows();
    assert.ok(window! >= 1 && window! <= 2, `window ${window}`);
  });

  test("--min-gamma above --max-gamma is refused", () => {
    assert.throws(
      () => simulate(FLAT, 0.8, { minGamma: 5, maxGamma: 4 }),
      /--min-gamma \(5\) must not exceed --max-gamma \(4\)/,
    );
  });
});
