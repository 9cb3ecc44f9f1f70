// The draft-length tuner on synthetic machines: step reports, verdicts and session cycles as the services
// and the PEARL loop would produce them on a machine whose step costs and acceptance the test chooses.
// A closed loop: every step follows the tuner's plan of the moment, as real requests do.
import assert from "node:assert/strict";
import { Writable } from "node:stream";
import { describe, test } from "node:test";
import winston from "winston";
import { type GatewayConfig, gatewayDefaults } from "../lib/config.js";
import { Registry } from "../lib/metrics.js";
import type { Tuner } from "../services/gateway/tuner.js";
import { makeTuner, startupProfile } from "./helpers/tuner.js";

interface Machine {
  /** Target step ms for a step carrying `tokens` over all its sequences. */
  targetMs: (tokens: number) => number;
  /** Draft step ms at `batch` sequences, one token each. */
  draftMs: (batch: number) => number;
  /** Chance that the target accepts a draft token. */
  acceptance: number;
  /** A drafting session's cycle takes this many times the ideal max(T, g * D) (waiting for drafts after a
   * rejection, round trips): 1 is the ideal pipeline. */
  drafterSlowdown?: number;
}

/** Flat verification: a step costs the same whatever it carries (weight-bound, a GPU at small batch). */
const FLAT: Machine = { targetMs: () => 2, draftMs: () => 0.25, acceptance: 0.8 };
/** Compute-bound steps with a fixed part (a CPU): at 8 sessions a drafted row costs about what it saves,
 * at 1 the fixed part still pays for drafting. */
const LINEAR: Machine = {
  targetMs: (tokens) => 0.625 + 0.25 * tokens,
  draftMs: (batch) => 0.1 + 0.05 * batch,
  acceptance: 0.5,
};

interface Session {
  drafting: boolean;
  stepsLeft: number;
}

/** Drives a tuner the way the services and the PEARL loop do. */
class Simulation {
  readonly logs: Record<string, unknown>[] = [];
  readonly tuner: Tuner;
  readonly registry = new Registry();
  private sessions: Session[] = [];
  private step = 0;
  private draftStep = 0;
  /** Deterministic acceptance: a token is accepted when the running sum of `acceptance` crosses an
   * integer, so that exactly that fraction is accepted. */
  private acceptanceSum = 0;

  constructor(
    private readonly machine: Machine,
    config: Partial<GatewayConfig> = {},
  ) {
    const logs = this.logs;
    const logger = winston.createLogger({
      format: winston.format.json(),
      transports: [
        new winston.transports.Stream({
          stream: new Writable({
            write(chunk: Buffer, _encoding, done) {
              logs.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
              done();
            },
          }),
        }),
      ],
    });
    this.tuner = makeTuner(config, logger, this.registry);
    this.tuner.seed(startupProfile(machine.draftMs), startupProfile(machine.targetMs));
  }

  async gauge(name: string): Promise<number> {
    const metric = await this.registry.getSingleMetric(name)!.get();
    return metric.values[0]!.value;
  }

  tunedLogs(): Record<string, unknown>[] {
    return this.logs.filter((record) => record.message === "draft length tuned");
  }

  /** `steps` target steps with `concurrency` requests in flight, each `requestSteps` steps long: a
   * finished request is replaced at once by a new one, which drafts if the tuner says so then. */
  run(concurrency: number, steps: number, requestSteps = 40): void {
    for (let i = 0; i < steps; i++) {
      while (this.sessions.length > concurrency) this.close(this.sessions[0]!);
      while (this.sessions.length < concurrency)
        this.open(1 + ((this.step * 7 + this.sessions.length) % requestSteps));
      this.oneStep();
      for (const session of [...this.sessions]) {
        session.stepsLeft -= 1;
        if (session.stepsLeft === 0) this.close(session);
      }
    }
  }

  private open(steps: number): void {
    const drafting = this.tuner.plan("pearl").speculate;
    this.tuner.sessionOpened(drafting);
    this.sessions.push({ drafting, stepsLeft: steps });
  }

  private close(session: Session): void {
    if (session.drafting) this.tuner.draftingStopped();
    this.tuner.sessionClosed();
    this.sessions = this.sessions.filter((s) => s !== session);
  }

  private accepts(): boolean {
    const before = Math.floor(this.acceptanceSum);
    this.acceptanceSum += this.machine.acceptance;
    return Math.floor(this.acceptanceSum) > before;
  }

  private oneStep(): void {
    const plan = this.tuner.plan("pearl");
    // As the PEARL loop does: a running session stops drafting when the tuner says drafting does not pay.
    for (const session of this.sessions) {
      if (session.drafting && !plan.speculate) {
        session.drafting = false;
        this.tuner.draftingStopped();
      }
    }
    const drafters = this.sessions.filter((session) => session.drafting).length;
    const window = plan.verifyWindow;
    const tokens = this.sessions.reduce((sum, session) => sum + (session.drafting ? window + 1 : 1), 0);
    const stepMs = this.machine.targetMs(tokens);
    const draftMs = this.machine.draftMs(Math.max(1, drafters));
    const cycleMs = Math.max(stepMs, window * draftMs) * (this.machine.drafterSlowdown ?? 1);
    this.step += 1;
    if (drafters > 0) {
      for (let i = 0; i < window; i++) {
        this.draftStep += 1;
        this.tuner.observeDraftStep({
          step: this.draftStep,
          ms: draftMs,
          batchSize: drafters,
          tokens: drafters,
        });
      }
    }
    for (const session of this.sessions) {
      if (session.drafting) {
        let accepted = 0;
        while (accepted < window && this.accepts()) accepted += 1;
        this.tuner.observeVerification(window, accepted);
        this.tuner.observeCycle(true, accepted + 1, cycleMs);
      } else {
        this.tuner.observeCycle(false, 1, stepMs);
      }
      this.tuner.observeTargetStep({
        step: this.step,
        ms: stepMs,
        batchSize: this.sessions.length,
        tokens,
      });
    }
  }
}

describe("draft-length tuner", () => {
  test("a verify step as slow whatever its window gives PEARL's gamma = t_target / t_draft", async () => {
    const simulation = new Simulation({ targetMs: () => 8, draftMs: () => 1, acceptance: 0.99 });
    simulation.run(1, 400);
    assert.equal(simulation.tuner.plan("pearl").verifyWindow, 8);
    assert.equal(simulation.tuner.plan("pearl").lookahead, 16);
    assert.equal(await simulation.gauge("pearl_draft_length_tokens"), 8);
  });

  test("flat verification at 8 requests: pearl keeps drafting", async () => {
    const simulation = new Simulation(FLAT);
    simulation.run(8, 2000);
    const plan = simulation.tuner.plan("pearl");
    assert.ok(plan.speculate && plan.verifyWindow >= 4, JSON.stringify(plan));
    assert.ok((await simulation.gauge("pearl_draft_length_tokens")) >= 4);
    assert.equal(
      simulation.tunedLogs().filter((record) => record.gamma === 0).length,
      0,
      "never stopped drafting",
    );
  });

  test("compute-bound steps: drafting stops at 8 requests and starts again when the load drops to 1", async () => {
    const simulation = new Simulation(LINEAR);
    simulation.run(1, 400);
    assert.equal(
      simulation.tuner.plan("pearl").speculate,
      true,
      "at 1 request the fixed cost pays for drafting",
    );

    simulation.run(8, 2000);
    assert.deepEqual(simulation.tuner.plan("pearl"), { speculate: false, lookahead: 0, verifyWindow: 0 });
    assert.equal(await simulation.gauge("pearl_draft_length_tokens"), 0);
    assert.equal(await simulation.gauge("pearl_lookahead_tokens"), 0);
    assert.equal(await simulation.gauge("pearl_verify_window_tokens"), 0);
    const off = simulation.tunedLogs().find((record) => record.gamma === 0);
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
    assert.equal(simulation.tuner.plan("pearl").speculate, false, "stays off while the load stays");

    simulation.run(1, 2000);
    const plan = simulation.tuner.plan("pearl");
    assert.ok(plan.speculate && plan.verifyWindow >= 1, JSON.stringify(plan));
    assert.ok((await simulation.gauge("pearl_draft_length_tokens")) >= 1);
    const last = simulation.tunedLogs().at(-1)!;
    assert.equal(last.speculate, true);
  });

  test("what sessions get decides, not what the ideal model promises", () => {
    // Flat verification promises 4.3 tokens a step (2.2 per ms against the target alone's 0.5), but
    // every drafting cycle takes six times the ideal one.
    const simulation = new Simulation({ ...FLAT, drafterSlowdown: 6 });
    simulation.run(1, 2000);
    assert.equal(simulation.tuner.plan("pearl").speculate, false);
  });

  test("pins and --min-gamma 1 keep drafting where it does not pay; sd keeps its gamma", () => {
    for (const config of [{ minGamma: 1 }, { verifyWindow: 3 }, { lookahead: 5 }]) {
      const simulation = new Simulation(LINEAR, config);
      simulation.run(8, 2000);
      assert.equal(simulation.tuner.plan("pearl").speculate, true, JSON.stringify(config));
      assert.equal(
        simulation.tunedLogs().filter((record) => record.gamma === 0).length,
        0,
        JSON.stringify(config),
      );
    }
    const pinned = new Simulation(FLAT, { lookahead: 5, verifyWindow: 3 });
    pinned.run(1, 400);
    assert.deepEqual(pinned.tuner.plan("pearl"), { speculate: true, lookahead: 5, verifyWindow: 3 });
    assert.deepEqual(pinned.tuner.plan("sd"), {
      speculate: true,
      lookahead: gatewayDefaults().sdGamma,
      verifyWindow: gatewayDefaults().sdGamma,
    });
  });

  test("when verification costs grow with the window, the window stays short", () => {
    const simulation = new Simulation(
      { targetMs: (tokens) => 0.2 + tokens, draftMs: () => 0.25, acceptance: 0.6 },
      { minGamma: 1 },
    );
    simulation.run(1, 400);
    const window = simulation.tuner.plan("pearl").verifyWindow;
    assert.ok(window >= 1 && window <= 2, `window ${window}`);
  });

  test("--min-gamma above --max-gamma is refused", () => {
    assert.throws(
      () => new Simulation(FLAT, { minGamma: 5, maxGamma: 4 }),
      /--min-gamma \(5\) must not exceed --max-gamma \(4\)/,
    );
  });
});
