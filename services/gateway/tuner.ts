// How far each request's draft runs ahead, how many tokens the target verifies per step, and whether a
// pearl request drafts at all, chosen from what the services measure while they run.
//
// PEARL's draft length is gamma = t_target_step / t_draft_step: the draft finishes the next window just
// when the target finishes verifying the current one. That formula assumes a verify step costs the same
// whatever its window, and that every request's draft is as good as every other's. On a CPU, or at a
// large batch on a GPU, a verify step does not cost the same (the formula then feeds on itself: longer
// windows, slower steps, longer windows), and requests differ: a draft that agrees with the target on
// boilerplate code guesses badly on a sampled, high-temperature continuation. So the tuner models what it
// measures:
//
//   - a step's time as a line in the tokens it carries, ms = fixed + perToken * tokens, for the draft and
//     for the target, fitted to recent steps (exponentially weighted; the services' start-up profile seeds
//     it) at whatever batch sizes they run now;
//   - the acceptance rate a of draft tokens, per request: each request's own verdicts, starting from the
//     rate of all recent verdicts (the pair's), which its first few windows then move.
//
// A window of g drafts yields E(g) = (1 - a^(g+1)) / (1 - a) tokens per target step (Leviathan et al.).
// In pearl the draft drafts the next windows while the target verifies these, so with the batch's windows
// g_i a step cycle lasts max(T(sum of 1 + g_i), max g_i * D(drafting requests)) and yields sum E_i(g_i)
// tokens. Each request, at each of its verdicts, takes the g_i >= 1 that gives the batch the most tokens
// per millisecond, the others' windows as they are: per-request acceptance weighed at the batch size it
// runs at, the tokens a request's drafted rows cost every request in the step against the tokens they gain
// it. When no window pays for its own acceptance though one would for the pair's, its draft is to blame:
// it stops drafting alone and goes on on the target (its rows no longer slow the others), while the
// others keep drafting. For one request whose verification is flat in g and a near 1 this is exactly
// PEARL's t_target / t_draft.
//
// Whether drafting pays at all at a batch size (the sessions open on the target), that ideal model cannot
// tell: it knows nothing of windows the draft has not filled yet, of waiting for the draft after a
// rejection, of the gateway's round trip per verify step, or of a draft that shares the target's cores,
// and on a 2-core CPU it promised pearl at 8 requests twice what it delivered. So the tuner also measures
// what sessions get: milliseconds per token between a session's verdicts, as a line in the batch size, one
// line for sessions that draft and one for sessions on the target alone. The start-up profile seeds the
// second (a decode step per token), the ideal model the first: being optimistic, it gets drafting tried at
// a batch size where it was never measured. Each batch size keeps its own decision: drafting stops there
// when the target alone delivers SWITCH_GAIN times more (once drafting sessions delivered EVIDENCE_TOKENS
// there: a request's first cycles wait for the draft's prefill), and starts again when drafting would. New pearl
// requests at a batch size where it does not pay run on the target alone (reported as finished in ar,
// like any request without the draft) and running ones stop drafting; no request starts drafting again
// mid-request, but when the batch shrinks back, new requests take the smaller batch size's decision.
//
// While nobody drafts, nothing measures the draft, its acceptance rate or what drafting delivers: they
// keep their last values, and the line's slope (measured over the batch sizes it saw, or the model's)
// carries them to other batch sizes. Pins (--lookahead, --verify-window) and --min-gamma >= 1 keep every
// request drafting; mode sd always drafts, its window fixed when it opens.
import type { ServiceInfo, StepReport } from "../../proto/gen/pearl/v1/common.js";
import type { GatewayConfig } from "../../lib/config.js";
import type { DecodingModeName } from "../../lib/decoding_modes.js";
import type { Logger } from "../../lib/logging.js";
import type { TunerGauges } from "./metrics.js";

export interface DecodingPlan {
  /** false: the tuner found that drafting does not pay now; the request runs on the target alone (and
   * lookahead and verifyWindow are 0). */
  speculate: boolean;
  /** Draft tokens allowed past the last verified position. */
  lookahead: number;
  /** Most proposed tokens per verify step. */
  verifyWindow: number;
}

/** One request's part in the tuning: the PEARL loop reports its verdicts and asks for its plan. */
export interface SessionTuning {
  /** Its plan now (when it opens, too); speculate false means: do not draft, or stop for good. */
  plan(): DecodingPlan;
  /** One verify step's outcome: `accepted` of `proposed` drafts. */
  observeVerification(proposed: number, accepted: number): void;
  /** Its tokens from one verdict and the milliseconds since its previous verdict (pearl and ar sessions:
   * sd's sequential cycles say nothing about pearl's). */
  observeCycle(tokens: number, ms: number): void;
  /** It goes on on the target alone. */
  draftingStopped(): void;
  /** It ended (both services dropped it). */
  closed(): void;
}

/** Weight of the newest step in the step-time fits, and of the newest verdict in the acceptance rates. */
const STEP_DECAY = 0.02;
/** Weight of the newest token in the delivered-time fits (memory of some hundreds of tokens). */
const TOKEN_DECAY = 0.003;
/** Tokens' worth of belief in each delivered-time line's seed. */
const SEED_TOKENS = 20;
/** Tokens that drafting sessions must deliver at a batch size before what they got can stop drafting
 * there: a request's first cycles wait for the draft's own prefill, and on a shared machine a handful of
 * slow cycles must not end drafting at a batch size for good. */
const EVIDENCE_TOKENS = 128;
/** A decision must promise this much more throughput than the current one to replace it. */
const SWITCH_GAIN = 1.1;
/** Until verdicts say otherwise, assume a draft that is right this often, worth this many observations. */
const PRIOR_ACCEPTANCE = 0.6;
const PRIOR_TRIALS = 20;
/** A request's own rate starts at the pair's, worth this many judged drafts: a few windows rejected at
 * their first token (each one judged draft) halve it, one unlucky window does not. */
const SESSION_PRIOR_TRIALS = 8;

const NOT_DRAFTING: DecodingPlan = { speculate: false, lookahead: 0, verifyWindow: 0 };

/** Tokens a verify step of g drafts yields when each is accepted with probability a (Leviathan et al.). */
function tokensPerVerify(gamma: number, acceptance: number): number {
  const a = Math.min(0.999, Math.max(0.001, acceptance));
  return (1 - Math.pow(a, gamma + 1)) / (1 - a);
}

/** Exponentially weighted least squares of y against x. */
class Line {
  private weight = 0;
  private sumX = 0;
  private sumY = 0;
  private sumXX = 0;
  private sumXY = 0;
  /** Observations that all had about the same x cannot separate the intercept from the slope: the slope
   * then keeps the value it had when they last varied enough (0 before). A target that nobody drafts
   * for sees only plain decode steps, and must not conclude from them that a longer step would cost
   * nothing more. */
  private slope = 0;

  constructor(private readonly decay: number) {}

  add(x: number, y: number, weight = 1): void {
    const keep = Math.pow(1 - this.decay, weight);
    this.weight = this.weight * keep + weight;
    this.sumX = this.sumX * keep + weight * x;
    this.sumY = this.sumY * keep + weight * y;
    this.sumXX = this.sumXX * keep + weight * x * x;
    this.sumXY = this.sumXY * keep + weight * x * y;
    const meanX = this.sumX / this.weight;
    const variance = this.sumXX / this.weight - meanX * meanX;
    if (variance > 0.25) {
      this.slope = Math.max(0, (this.sumXY / this.weight - meanX * (this.sumY / this.weight)) / variance);
    }
  }

  /** The expected y at x; undefined before any observation. */
  at(x: number): number | undefined {
    if (this.weight === 0) return undefined;
    const intercept = Math.max(0, (this.sumY - this.slope * this.sumX) / this.weight);
    return intercept + this.slope * x;
  }
}

/** Accepted drafts among judged ones, exponentially weighted. Drafts after the first rejection of a
 * window were never judged, so a window's trials are its accepted drafts plus that rejection. */
class AcceptanceCounts {
  constructor(
    private accepted: number,
    private trials: number,
  ) {}

  add(proposed: number, accepted: number): void {
    if (proposed === 0) return;
    const trials = accepted + (accepted < proposed ? 1 : 0);
    const keep = Math.pow(1 - STEP_DECAY, trials);
    this.accepted = this.accepted * keep + accepted;
    this.trials = this.trials * keep + trials;
  }

  /** The rate, with `prior` counted as `priorTrials` more trials. */
  rate(prior = 0, priorTrials = 0): number {
    const trials = this.trials + priorTrials;
    return trials > 0 ? (this.accepted + prior * priorTrials) / trials : prior;
  }
}

/** A session as the tuner sees it. */
interface Session {
  readonly mode: DecodingModeName;
  readonly requestId: string;
  drafting: boolean;
  /** Draft tokens per verify step it runs with (0 while it does not draft). */
  window: number;
  readonly acceptance: AcceptanceCounts;
}

/** The target's step as the ideal model sees it: rows verified, tokens they yield, the longest window
 * the draft must fill and how many sessions it drafts for. */
interface Batch {
  sessions: number;
  rows: number;
  tokens: number;
  longestWindow: number;
  drafting: number;
}

export class Tuner {
  /** Step ms against the tokens in the step. */
  private readonly target = new Line(STEP_DECAY);
  private readonly draft = new Line(STEP_DECAY);
  /** A session's ms per token against the batch size, drafting (pearl) and on the target alone. */
  private readonly deliveredDrafting = new Line(TOKEN_DECAY);
  private readonly deliveredAlone = new Line(TOKEN_DECAY);
  private lastTargetStep = -1;
  private lastDraftStep = -1;
  private readonly sessions = new Set<Session>();
  private draftingSessions = 0;
  /** Every verdict's, the prior of each new session's. */
  private readonly pairAcceptance = new AcceptanceCounts(PRIOR_ACCEPTANCE * PRIOR_TRIALS, PRIOR_TRIALS);
  /** Per batch size: whether drafting, as measured, delivers more than the target alone there. */
  private readonly draftingPaysAt = new Map<number, boolean>();
  /** Per batch size: tokens drafting sessions delivered there since drafting last started there. */
  private readonly draftedAt = new Map<number, number>();
  /** Per batch size: the draft length a new pearl request there gets, as last decided (and logged). */
  private readonly newRequestGamma = new Map<number, number>();
  private readonly pinned: boolean;
  /** The shortest draft length pearl may choose; 0 lets it stop drafting. */
  private readonly minGamma: number;
  /** Until something is measured, draft as mode sd would. */
  private readonly unmeasuredGamma: number;

  constructor(
    private readonly config: GatewayConfig,
    private readonly logger: Logger,
    private readonly gauges: TunerGauges,
  ) {
    if (config.minGamma > config.maxGamma) {
      throw new Error(`--min-gamma (${config.minGamma}) must not exceed --max-gamma (${config.maxGamma})`);
    }
    this.pinned = config.lookahead > 0 || config.verifyWindow > 0;
    this.minGamma = this.pinned ? Math.max(1, config.minGamma) : config.minGamma;
    this.unmeasuredGamma = Math.max(1, this.minGamma, Math.min(config.sdGamma, config.maxGamma));
    this.publish(this.unmeasuredGamma);
  }

  /** Starts from the decode step times the services measured at start-up (one token per sequence). */
  seed(draft: ServiceInfo | undefined, target: ServiceInfo): void {
    for (const timing of target.stepTimes)
      this.target.add(timing.batchSize, timing.meanMs, Math.min(timing.samples, 5));
    for (const timing of draft?.stepTimes ?? [])
      this.draft.add(timing.batchSize, timing.meanMs, Math.min(timing.samples, 5));
    for (const { batchSize, meanMs } of target.stepTimes) {
      // A decode step of the whole batch per token, and what the ideal model promises drafting there.
      this.deliveredAlone.add(batchSize, meanMs, SEED_TOKENS);
      const gamma = this.bestUniformGamma("pearl", batchSize);
      if (gamma !== undefined) {
        const rate = this.uniformRate("pearl", gamma, batchSize)!;
        this.deliveredDrafting.add(batchSize, 1 / rate, SEED_TOKENS);
      }
    }
    this.retune();
  }

  // ---- sessions -----------------------------------------------------------------------------------------

  /** A request opens on the target: mode pearl drafts if that pays now, sd always, ar never. */
  openSession(mode: DecodingModeName, requestId: string): SessionTuning {
    const plan = this.plan(mode);
    const session: Session = {
      mode,
      requestId,
      drafting: plan.speculate,
      window: plan.verifyWindow,
      acceptance: new AcceptanceCounts(0, 0),
    };
    this.sessions.add(session);
    if (session.drafting) this.draftingSessions += 1;
    return {
      plan: () => this.sessionPlan(session),
      observeVerification: (proposed, accepted) => this.observeVerification(session, proposed, accepted),
      observeCycle: (tokens, ms) => this.observeCycle(session, tokens, ms),
      draftingStopped: () => this.draftingStopped(session),
      closed: () => {
        this.draftingStopped(session);
        this.sessions.delete(session);
      },
    };
  }

  private draftingStopped(session: Session): void {
    if (!session.drafting) return;
    session.drafting = false;
    session.window = 0;
    this.draftingSessions -= 1;
  }

  private observeVerification(session: Session, proposed: number, accepted: number): void {
    session.acceptance.add(proposed, accepted);
    this.pairAcceptance.add(proposed, accepted);
    this.gauges.acceptance.set(this.acceptanceRate);
  }

  private observeCycle(session: Session, tokens: number, ms: number): void {
    if (tokens === 0 || ms <= 0) return;
    const batchSize = Math.max(1, this.sessions.size);
    if (session.drafting) {
      this.deliveredDrafting.add(batchSize, ms / tokens, tokens);
      this.draftedAt.set(batchSize, (this.draftedAt.get(batchSize) ?? 0) + tokens);
    }
    // Beside drafting sessions a session on the target alone waits for their verify steps.
    else if (this.draftingSessions === 0) this.deliveredAlone.add(batchSize, ms / tokens, tokens);
  }

  // ---- steps --------------------------------------------------------------------------------------------

  observeTargetStep(report: StepReport | undefined): void {
    // Every session in a step reports it: count each step once.
    if (!report || report.step === this.lastTargetStep) return;
    this.lastTargetStep = report.step;
    if (this.isDecodeStep(report)) this.target.add(report.tokens, report.ms);
    this.retune();
  }

  observeDraftStep(report: StepReport | undefined): void {
    if (!report || report.step === this.lastDraftStep) return;
    this.lastDraftStep = report.step;
    if (this.isDecodeStep(report)) this.draft.add(report.tokens, report.ms);
  }

  /** The fits are of decode and verify steps. A step that carries more tokens than its rows' longest
   * windows could holds a prefill chunk: its tokens share weight loads far better, and a few hundred of
   * them would tilt the line (a large fixed part, no cost per row) against every verify step's. */
  private isDecodeStep(report: StepReport): boolean {
    const longestWindow = Math.max(this.config.maxGamma, this.config.verifyWindow, this.config.sdGamma);
    return report.tokens <= report.batchSize * (longestWindow + 1);
  }

  // ---- plans --------------------------------------------------------------------------------------------

  /** What a request of this mode that opened now would run with. */
  plan(mode: DecodingModeName): DecodingPlan {
    if (mode === "ar") return NOT_DRAFTING;
    if (mode === "sd") {
      // Vanilla speculative decoding is asked for by name: it always drafts.
      const gamma =
        this.config.sdGamma > 0
          ? this.config.sdGamma
          : (this.bestUniformGamma("sd", this.sessions.size + 1) ?? this.unmeasuredGamma);
      return { speculate: true, lookahead: gamma, verifyWindow: gamma };
    }
    return this.pearlPlan(this.newSessionGamma());
  }

  /** The pair's recent acceptance rate (every request's verdicts). */
  get acceptanceRate(): number {
    return this.pairAcceptance.rate();
  }

  private pearlPlan(gamma: number): DecodingPlan {
    if (gamma === 0) return NOT_DRAFTING;
    const verifyWindow = this.config.verifyWindow > 0 ? this.config.verifyWindow : gamma;
    // The target verifies one window while the draft drafts the next: two windows in flight.
    const lookahead = this.config.lookahead > 0 ? this.config.lookahead : 2 * gamma;
    return { speculate: true, lookahead, verifyWindow };
  }

  /** A new pearl request's draft length beside the sessions open now (0: it does not draft); a log line
   * when it changed at this batch size. Like a running session's window, it changes only for a clear
   * gain, so that a batch size's decision does not flap (nor its log). */
  private newSessionGamma(): number {
    const others = this.batch();
    const batchSize = others.sessions + 1;
    const before = this.newRequestGamma.get(batchSize);
    const current = before !== undefined && before > 0 ? before : undefined;
    const gamma = this.draftingPays(batchSize)
      ? (this.bestGamma(others, this.acceptanceRate, { current, mayStop: false }) ?? this.unmeasuredGamma)
      : 0;
    if (before !== gamma) {
      this.newRequestGamma.set(batchSize, gamma);
      this.logDecision(batchSize, gamma, others);
    }
    return gamma;
  }

  /** A running session's plan, re-decided at every verdict: its own acceptance, this batch. */
  private sessionPlan(session: Session): DecodingPlan {
    if (!session.drafting) return NOT_DRAFTING;
    if (session.mode === "sd") {
      return { speculate: true, lookahead: session.window, verifyWindow: session.window };
    }
    const others = this.batch(session);
    const batchSize = others.sessions + 1;
    const acceptance = session.acceptance.rate(this.acceptanceRate, SESSION_PRIOR_TRIALS);
    const batchAllows = this.draftingPays(batchSize);
    let gamma = 0;
    if (batchAllows) {
      const current = session.window;
      gamma = this.bestGamma(others, acceptance, { current, mayStop: true }) ?? current;
      // The model found that no window pays, but the same request with the pair's acceptance would
      // draft: its own draft is to blame, and it stops. If not even that would draft, the model is
      // blaming the step costs, and whether drafting pays at a batch size is the measured decision's.
      if (gamma === 0 && this.bestGamma(others, this.acceptanceRate, { current, mayStop: true }) === 0) {
        gamma = this.bestGamma(others, acceptance, { current, mayStop: false }) ?? current;
      }
    }
    if (gamma === 0) {
      this.logger.debug("request stops drafting", {
        requestId: session.requestId,
        why: batchAllows
          ? "its draft agrees too rarely: its rows cost the batch more than they gain it"
          : "drafting does not pay at this batch size",
        acceptanceRate: Number(acceptance.toFixed(3)),
        batchSize,
      });
      return NOT_DRAFTING;
    }
    const plan = this.pearlPlan(gamma);
    session.window = plan.verifyWindow;
    return plan;
  }

  // ---- the ideal model ----------------------------------------------------------------------------------

  /** The open sessions' step, without `except`. */
  private batch(except?: Session): Batch {
    const batch: Batch = { sessions: 0, rows: 0, tokens: 0, longestWindow: 0, drafting: 0 };
    for (const session of this.sessions) {
      if (session === except) continue;
      const acceptance = session.acceptance.rate(this.acceptanceRate, SESSION_PRIOR_TRIALS);
      this.addTo(batch, session.drafting ? session.window : 0, acceptance);
    }
    return batch;
  }

  private addTo(batch: Batch, window: number, acceptance: number): Batch {
    batch.sessions += 1;
    batch.rows += 1 + window;
    batch.tokens += window > 0 ? tokensPerVerify(window, acceptance) : 1;
    if (window > 0) {
      batch.longestWindow = Math.max(batch.longestWindow, window);
      batch.drafting += 1;
    }
    return batch;
  }

  /** Tokens per millisecond of a pearl batch (undefined before any measurement). */
  private throughput(batch: Batch): number | undefined {
    const verify = this.target.at(batch.rows);
    if (verify === undefined) return undefined;
    let cycle = verify;
    if (batch.drafting > 0) {
      const draftStep = this.draft.at(batch.drafting);
      if (draftStep === undefined) return undefined;
      cycle = Math.max(verify, batch.longestWindow * draftStep);
    }
    return batch.tokens / Math.max(cycle, 1e-6);
  }

  /**
   * The draft length of a session with this acceptance beside `others` that gives the batch the most
   * tokens per millisecond; 0 (no drafting) is a candidate when `mayStop` and --min-gamma allow. A
   * session already running at `current` changes its window only for a gain of SWITCH_GAIN on its share
   * of the batch's throughput (each change is a message to the target, and noise must not make windows
   * flap); it stops drafting as soon as that gains the batch anything: stopping is for good, and the
   * prior on its acceptance keeps an unlucky first window from deciding it.
   */
  private bestGamma(
    others: Batch,
    acceptance: number,
    { current, mayStop }: { current?: number; mayStop: boolean },
  ): number | undefined {
    const value = (gamma: number): number | undefined =>
      this.throughput(this.addTo({ ...others }, gamma, acceptance));
    let best: number | undefined;
    let bestValue = 0;
    for (
      let gamma = mayStop ? this.minGamma : Math.max(1, this.minGamma);
      gamma <= this.config.maxGamma;
      gamma++
    ) {
      const candidate = value(gamma);
      if (candidate === undefined) return undefined;
      if (best === undefined || candidate > bestValue) {
        best = gamma;
        bestValue = candidate;
      }
    }
    if (current === undefined || best === current) return best;
    const currentValue = value(current)!;
    if (best === 0) return bestValue > currentValue ? 0 : current;
    const share = currentValue / (others.sessions + 1);
    return bestValue - currentValue >= (SWITCH_GAIN - 1) * share ? best : current;
  }

  /** One session's tokens per millisecond when `batch` sessions all draft g (mode sd: in turn with the
   * target); undefined before any measurement. */
  private uniformRate(mode: "pearl" | "sd", gamma: number, batch: number): number | undefined {
    const verify = this.target.at(batch * (gamma + 1));
    const draftStep = this.draft.at(batch);
    if (verify === undefined || draftStep === undefined) return undefined;
    const cycle = mode === "pearl" ? Math.max(verify, gamma * draftStep) : verify + gamma * draftStep;
    return tokensPerVerify(gamma, this.acceptanceRate) / Math.max(cycle, 1e-6);
  }

  private bestUniformGamma(mode: "pearl" | "sd", batch: number): number | undefined {
    let best: number | undefined;
    let bestRate = 0;
    for (let gamma = Math.max(1, this.minGamma); gamma <= this.config.maxGamma; gamma++) {
      const rate = this.uniformRate(mode, gamma, batch);
      if (rate !== undefined && rate > bestRate) {
        best = gamma;
        bestRate = rate;
      }
    }
    return best;
  }

  // ---- what sessions get --------------------------------------------------------------------------------

  /** Tokens per millisecond a session gets at this batch size, drafting and on the target alone. */
  private delivered(batchSize: number): { drafting: number; alone: number } | undefined {
    const drafting = this.deliveredDrafting.at(batchSize);
    const alone = this.deliveredAlone.at(batchSize);
    if (drafting === undefined || alone === undefined) return undefined;
    return { drafting: 1 / Math.max(drafting, 1e-6), alone: 1 / Math.max(alone, 1e-6) };
  }

  /** Whether drafting delivers more than the target alone at this batch size, as measured; a batch size
   * keeps its last decision until the other side promises SWITCH_GAIN more, and drafting, once on, until
   * EVIDENCE_TOKENS of it were measured there. */
  private draftingPays(batchSize: number): boolean {
    if (this.minGamma > 0) return true;
    const delivered = this.delivered(batchSize);
    if (!delivered) return true;
    const before = this.draftingPaysAt.get(batchSize);
    const measured = (this.draftedAt.get(batchSize) ?? 0) >= EVIDENCE_TOKENS;
    const pays =
      before === undefined
        ? delivered.drafting >= delivered.alone
        : before
          ? !measured || delivered.alone <= SWITCH_GAIN * delivered.drafting
          : delivered.drafting > SWITCH_GAIN * delivered.alone;
    if (pays && before === false) this.draftedAt.set(batchSize, 0);
    this.draftingPaysAt.set(batchSize, pays);
    return pays;
  }

  /** After every target step: the gauges follow the decision for a request arriving now. */
  private retune(): void {
    this.publish(this.newSessionGamma());
  }

  private logDecision(batchSize: number, gamma: number, others: Batch): void {
    const plan = this.pearlPlan(gamma);
    const delivered = this.delivered(batchSize);
    const rounded = (value: number | undefined, digits = 3): number | null =>
      value === undefined ? null : Number(value.toFixed(digits));
    this.logger.info("draft length tuned", {
      batchSize,
      gamma,
      speculate: plan.speculate,
      lookahead: plan.lookahead,
      verifyWindow: plan.verifyWindow,
      pinned: this.pinned,
      acceptanceRate: rounded(this.acceptanceRate),
      // A verify step of this batch with the new request's window (a plain decode row for 0).
      targetVerifyMs: rounded(this.target.at(others.rows + 1 + plan.verifyWindow)),
      draftStepMs: rounded(this.draft.at(others.drafting + 1)),
      // Per session at this batch size, as measured: what drafting and the target alone deliver.
      draftingTokensPerMs: rounded(delivered?.drafting, 4),
      targetAloneTokensPerMs: rounded(delivered?.alone, 4),
    });
  }

  private publish(gamma: number): void {
    const plan = this.pearlPlan(gamma);
    this.gauges.gamma.set(gamma);
    this.gauges.lookahead.set(plan.lookahead);
    this.gauges.verifyWindow.set(plan.verifyWindow);
    this.gauges.acceptance.set(this.acceptanceRate);
  }
}
