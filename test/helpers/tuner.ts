// A Tuner outside the gateway, for tests that drive it by hand, and a closed-loop simulation that drives
// it as the services and the PEARL loop do: step reports, verdicts and session cycles on a machine whose
// step costs the test chooses, each request with a draft of its own quality.
import { Writable } from "node:stream";
import winston from "winston";
import type { Logger } from "../../lib/logging.js";
import { type GatewayConfig, gatewayDefaults } from "../../lib/config.js";
import { Registry } from "../../lib/metrics.js";
import type { ServiceInfo } from "../../proto/gen/pearl/v1/common.js";
import { gatewayMetrics } from "../../services/gateway/metrics.js";
import { type DecodingPlan, type SessionTuning, Tuner } from "../../services/gateway/tuner.js";

/** A tuner on the gateway's defaults overridden by `config`, the gateway's metrics (its gauges among
 * them) in `registry`. */
export function makeTuner(config: Partial<GatewayConfig>, logger: Logger, registry: Registry): Tuner {
  return new Tuner({ ...gatewayDefaults(), ...config }, logger, gatewayMetrics(registry).tuner);
}

/** A service's start-up profile: decode steps at batch 1, 2, 4 and 8 taking `ms(batch)`. */
export function startupProfile(ms: (batchSize: number) => number): ServiceInfo {
  return {
    model: undefined,
    cache: undefined,
    activeSessions: 0,
    stepTimes: [1, 2, 4, 8].map((batchSize) => ({ batchSize, meanMs: ms(batchSize), samples: 5 })),
  };
}

export interface Machine {
  /** Target step ms for a step carrying `tokens` over all its sequences. */
  targetMs: (tokens: number) => number;
  /** Draft step ms at `batch` sequences, one token each. */
  draftMs: (batch: number) => number;
  /** A drafting session's cycle takes this many times the ideal max(T, g * D) (waiting for drafts after a
   * rejection, round trips): 1 is the ideal pipeline. */
  drafterSlowdown?: number;
}

/** How one request's drafts fare against its target. */
export interface DraftAgreement {
  /** The target verifies `window` drafts: how many it accepts (it then commits those and one token of
   * its own). */
  verify(window: number): number;
  /** The target decodes one token without a draft. */
  decode(): void;
  /** Nothing is left to generate. */
  readonly finished: boolean;
}

/** A draft accepted exactly `rate` of the time, for ever: a token is accepted when the running sum of
 * `rate` crosses an integer. */
export function agreesAtRate(rate: number): DraftAgreement {
  let sum = 0;
  const accepts = (): boolean => {
    const before = Math.floor(sum);
    sum += rate;
    return Math.floor(sum) > before;
  };
  return {
    verify(window) {
      let accepted = 0;
      while (accepted < window && accepts()) accepted += 1;
      return accepted;
    },
    decode: () => undefined,
    finished: false,
  };
}

/** A draft along a real output: `accepted[p]` says whether the target accepts the draft's token at
 * position p of it. The request ends with the output. */
export function agreesAlong(accepted: readonly boolean[]): DraftAgreement {
  let position = 0;
  return {
    verify(window) {
      let run = 0;
      while (run < window && position + run < accepted.length && accepted[position + run]) run += 1;
      position += run + 1;
      return run;
    },
    decode() {
      position += 1;
    },
    get finished() {
      return position >= accepted.length;
    },
  };
}

interface Session {
  tuning: SessionTuning;
  plan: DecodingPlan;
  agreement: DraftAgreement;
  stepsLeft: number;
}

/** Drives a tuner the way the services and the PEARL loop do. */
export class Simulation {
  readonly logs: Record<string, unknown>[] = [];
  readonly tuner: Tuner;
  readonly registry = new Registry();
  private sessions: Session[] = [];
  private opened = 0;
  private step = 0;
  private draftStep = 0;

  /** `agreement`: the draft of a request that the run does not give one of its own. */
  constructor(
    private readonly machine: Machine,
    private readonly agreement: () => DraftAgreement,
    config: Partial<GatewayConfig> = {},
  ) {
    const logs = this.logs;
    const logger = winston.createLogger({
      level: "debug",
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

  /** The running sessions' verify windows (0: on the target alone). */
  windows(): number[] {
    return this.sessions.map((session) => (session.plan.speculate ? session.plan.verifyWindow : 0));
  }

  /** `steps` target steps with `concurrency` requests in flight, each `requestSteps` steps long at most
   * (lengths vary): a finished request is replaced at once by a new one, which drafts if the tuner says so
   * then. `requests` can give every new request (numbered from 0) its own length and draft. */
  run(
    concurrency: number,
    steps: number,
    requestSteps = 40,
    requests: { steps?: (request: number) => number; agreement?: (request: number) => DraftAgreement } = {},
  ): void {
    for (let i = 0; i < steps; i++) {
      while (this.sessions.length > concurrency) this.close(this.sessions[0]!);
      while (this.sessions.length < concurrency) {
        const request = this.opened;
        this.open(
          requests.steps?.(request) ?? 1 + ((this.step * 7 + this.sessions.length) % requestSteps),
          requests.agreement?.(request) ?? this.agreement(),
        );
      }
      this.oneStep();
      for (const session of [...this.sessions]) {
        session.stepsLeft -= 1;
        if (session.stepsLeft === 0 || session.agreement.finished) this.close(session);
      }
    }
  }

  /** These requests at once (none other) until each has generated its output: per request, its verify
   * window at every step it ran (0: on the target alone). */
  runRequests(agreements: DraftAgreement[]): number[][] {
    this.finishAll();
    const windows: number[][] = agreements.map(() => []);
    const sessions = agreements.map((agreement) => {
      this.open(Number.POSITIVE_INFINITY, agreement);
      return this.sessions.at(-1)!;
    });
    while (this.sessions.length > 0) {
      sessions.forEach((session, i) => {
        if (this.sessions.includes(session))
          windows[i]!.push(session.plan.speculate ? session.plan.verifyWindow : 0);
      });
      this.oneStep();
      for (const session of [...this.sessions]) if (session.agreement.finished) this.close(session);
    }
    return windows;
  }

  /** Every request in flight ends. */
  finishAll(): void {
    for (const session of [...this.sessions]) this.close(session);
  }

  private open(steps: number, agreement: DraftAgreement): void {
    const tuning = this.tuner.openSession("pearl", `request-${this.opened++}`);
    const plan = tuning.plan();
    // As the PEARL loop does: a pearl request the tuner does not let draft runs on the target alone.
    if (!plan.speculate) tuning.draftingStopped();
    this.sessions.push({ tuning, plan, agreement, stepsLeft: steps });
  }

  private close(session: Session): void {
    session.tuning.closed();
    this.sessions = this.sessions.filter((s) => s !== session);
  }

  private oneStep(): void {
    const drafters = this.sessions.filter((session) => session.plan.speculate);
    const windows = this.windows();
    const tokens = windows.reduce((sum, window) => sum + window + 1, 0);
    const longestWindow = Math.max(0, ...windows);
    const stepMs = this.machine.targetMs(tokens);
    const draftMs = this.machine.draftMs(Math.max(1, drafters.length));
    const cycleMs = Math.max(stepMs, longestWindow * draftMs) * (this.machine.drafterSlowdown ?? 1);
    this.step += 1;
    for (let i = 0; i < longestWindow; i++) {
      this.draftStep += 1;
      this.tuner.observeDraftStep({
        step: this.draftStep,
        ms: draftMs,
        batchSize: drafters.length,
        tokens: drafters.length,
      });
    }
    for (const session of this.sessions) {
      if (session.plan.speculate) {
        const window = session.plan.verifyWindow;
        const accepted = session.agreement.verify(window);
        session.tuning.observeVerification(window, accepted);
        session.tuning.observeCycle(accepted + 1, cycleMs);
      } else {
        session.agreement.decode();
        session.tuning.observeCycle(1, stepMs);
      }
      this.tuner.observeTargetStep({ step: this.step, ms: stepMs, batchSize: this.sessions.length, tokens });
      // As the PEARL loop does after each verdict: the session's plan for its next window; a session
      // the tuner stops goes on on the target alone.
      if (session.plan.speculate) {
        session.plan = session.tuning.plan();
        if (!session.plan.speculate) session.tuning.draftingStopped();
      }
    }
  }
}
