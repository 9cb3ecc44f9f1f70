// What the draft and target services' engine loops share: the sessions of every gateway stream, a loop
// that sleeps until a message wakes it, a batched step that tells failing sessions from the rest, and
// SessionLoop, the part of a service's engine loop that does not depend on what its sessions do.
import type { StepReport } from "../proto/gen/pearl/v1/common.js";
import { errorMessage, type Logger } from "./logging.js";
import type { Registry } from "./metrics.js";
import type { EngineMetrics } from "./engine_metrics.js";
import type { Engine, StepItem, StepResult } from "./native.js";
import type { StepTimes } from "./step_times.js";

/** Monotonic engine sequence ids, unique within the process. */
export class SequenceIds {
  private next = 1;
  allocate(): number {
    return this.next++;
  }
}

/** Sessions by the stream that opened them and by the id the gateway gave them (ids are per stream). */
export class SessionTable<Sink, Session> {
  private readonly byStream = new Map<Sink, Map<number, Session>>();

  get(sink: Sink, sessionId: number): Session | undefined {
    return this.byStream.get(sink)?.get(sessionId);
  }

  add(sink: Sink, sessionId: number, session: Session): void {
    let stream = this.byStream.get(sink);
    if (!stream) {
      stream = new Map();
      this.byStream.set(sink, stream);
    }
    stream.set(sessionId, session);
  }

  delete(sink: Sink, sessionId: number): void {
    const stream = this.byStream.get(sink);
    stream?.delete(sessionId);
    if (stream?.size === 0) this.byStream.delete(sink);
  }

  ofStream(sink: Sink): Session[] {
    return [...(this.byStream.get(sink)?.values() ?? [])];
  }

  /** Every session, oldest stream first, each stream's sessions in the order they opened. */
  all(): Session[] {
    const sessions: Session[] = [];
    for (const stream of this.byStream.values()) sessions.push(...stream.values());
    return sessions;
  }

  get size(): number {
    let count = 0;
    for (const stream of this.byStream.values()) count += stream.size;
    return count;
  }
}

/**
 * Runs `iteration` over and over; when an iteration finds nothing to do (returns false) the loop sleeps
 * until wake(). Messages change state and call wake(); only the loop touches the engine.
 */
export class LoopDriver {
  private wakeRequested = false;
  private wakeUp: (() => void) | undefined;
  private stopping = false;
  private done: Promise<void> | undefined;
  /** Why the loop stopped, if it failed: the service is then unhealthy. */
  failure: string | undefined;

  constructor(
    private readonly name: string,
    private readonly logger: Logger,
    private readonly iteration: () => Promise<boolean>,
    /** Runs once after the last iteration: free what is left. */
    private readonly drain: () => Promise<void>,
  ) {}

  get isStopping(): boolean {
    return this.stopping;
  }

  /** Whether a message has asked for a new turn since the current one began. */
  get wakePending(): boolean {
    return this.wakeRequested;
  }

  start(): void {
    this.done = this.run().catch((error: unknown) => {
      this.failure = errorMessage(error);
      this.logger.error(`${this.name} loop stopped`, { error: this.failure });
    });
  }

  /** Stops after the current iteration, then drains. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.wake();
    await this.done;
  }

  wake(): void {
    this.wakeRequested = true;
    const wakeUp = this.wakeUp;
    this.wakeUp = undefined;
    wakeUp?.();
  }

  private async run(): Promise<void> {
    while (!this.stopping) {
      // A message that arrives while the iteration runs wakes the next one at once.
      this.wakeRequested = false;
      const worked = await this.iteration();
      if (!worked && !this.wakeRequested && !this.stopping) {
        await new Promise<void>((resolve) => {
          this.wakeUp = resolve;
        });
      }
    }
    await this.drain();
  }
}

/**
 * One batched step. The engine rejects a whole batch without changing anything when one item is bad
 * (out of range, out of KV blocks); stepping each item alone then tells the sessions at fault, which get
 * their error, from the rest, which go on. `batched` says whether the timing is a real batched step.
 */
export async function stepIsolatingFailures(
  engine: Engine,
  items: StepItem[],
  logger: Logger,
): Promise<{ results: (StepResult | Error)[]; batched: boolean }> {
  try {
    return { results: await engine.step(items), batched: true };
  } catch (error) {
    logger.warn("batched step failed; stepping its items one by one", { error: errorMessage(error) });
    const results: (StepResult | Error)[] = [];
    for (const item of items) {
      results.push(
        await engine.step([item]).then(
          (result) => result[0]!,
          (itemError: unknown) => new Error(errorMessage(itemError)),
        ),
      );
    }
    return { results, batched: false };
  }
}

/** What the gRPC side of a model service asks of its engine loop. */
export interface SessionCore<Sink, Open> {
  readonly activeSessions: number;
  /** Why the engine loop stopped, if it failed: the service is then unhealthy. */
  readonly failure: string | undefined;
  start(): void;
  /** Stops the loop after the current step and frees every session. */
  stop(): Promise<void>;
  open(sink: Sink, request: Open): void;
  close(sink: Sink, sessionId: number): void;
  /** The stream ended: its sessions end with it. */
  closeStream(sink: Sink): void;
  /** Ends the session (if it is open) and tells the gateway why. */
  failSession(sink: Sink, sessionId: number, message: string): void;
}

/** Where a session's events go: the gateway stream that opened it. */
export interface SessionSink {
  failed(sessionId: number, message: string): void;
}

/** Why a session ended, as its log line says. */
export type SessionEnd = "finished" | "closed" | "stream ended" | "failed" | "shutdown";

/** What every engine-loop session holds, whatever its service. */
export interface LoopSession<Sink> {
  readonly sink: Sink;
  readonly sessionId: number;
  /** The gateway's request id: session ids are per stream and reused, this one names the request in
   * the logs of all three services. */
  readonly requestId: string;
  readonly seqId: number;
  /** performance.now() when it opened. */
  readonly openedAt: number;
  /** "closing": the next bookkeeping frees the session; the other states are the service's own. */
  state: string;
  /** Set with the closing state. */
  endReason?: SessionEnd;
  /** Whether the engine holds a sequence for it. */
  inEngine: boolean;
}

/** What an engine loop works with: the service's engine and its instruments. */
export interface EngineLoopParts {
  engine: Engine;
  ids: SequenceIds;
  stepTimes: StepTimes;
  metrics: EngineMetrics;
  registry: Registry;
  logger: Logger;
}

/** Tokens the item appends: its tokens, and the one it feeds from its sequence's previous step. */
export function fedTokens(item: StepItem): number {
  return item.tokens.length + (item.feedNextToken ? 1 : 0);
}

/** A step's results, in the order of its work (an Error for an item that failed), and its report. */
export interface StepOutcome {
  results: (StepResult | Error)[];
  report: StepReport;
}

/** One session's part of a batched step. */
export interface SessionWork<Session> {
  session: Session;
  item: StepItem;
}

/**
 * The engine loop of a model service, but for what its sessions hold and what their steps do: sessions
 * opened and closed by gateway streams, a session's failure, and the turn of the loop (bookkeeping, then
 * one timed batched step over every session with work).
 */
export abstract class SessionLoop<
  Sink extends SessionSink,
  Session extends LoopSession<Sink>,
  Open extends { sessionId: number; requestId: string },
  Work extends SessionWork<Session>,
> implements SessionCore<Sink, Open> {
  protected readonly sessions = new SessionTable<Sink, Session>();
  protected readonly engine: Engine;
  protected readonly ids: SequenceIds;
  protected readonly metrics: EngineMetrics;
  protected readonly logger: Logger;
  protected readonly eos: Set<number>;
  protected readonly loop: LoopDriver;
  private readonly stepTimes: StepTimes;
  private steps = 0;
  /** performance.now() when the last step settled. */
  private lastSettled = 0;

  constructor(
    private readonly role: "draft" | "target",
    parts: EngineLoopParts,
  ) {
    this.engine = parts.engine;
    this.ids = parts.ids;
    this.metrics = parts.metrics;
    this.logger = parts.logger;
    this.stepTimes = parts.stepTimes;
    this.eos = new Set(parts.engine.info.eosTokenIds);
    this.loop = new LoopDriver(
      role,
      parts.logger,
      () => this.iteration(),
      () => this.drain(),
    );
  }

  start(): void {
    this.loop.start();
  }

  stop(): Promise<void> {
    return this.loop.stop();
  }

  get failure(): string | undefined {
    return this.loop.failure;
  }

  get activeSessions(): number {
    return this.sessions.size;
  }

  // ---- messages from the gateway ----------------------------------------------------------------------

  /** Opens a session, unless the stream already has one by that id or the request is bad. */
  open(sink: Sink, request: Open): Session | undefined {
    const problem = this.sessions.get(sink, request.sessionId)
      ? `session ${request.sessionId} is already open on this stream`
      : this.checkOpen(request);
    if (problem) {
      this.logger.warn(`${this.role} session refused`, {
        requestId: request.requestId,
        sessionId: request.sessionId,
        error: problem,
      });
      sink.failed(request.sessionId, problem);
      return undefined;
    }
    const session = this.createSession(sink, request);
    this.sessions.add(sink, request.sessionId, session);
    this.loop.wake();
    return session;
  }

  close(sink: Sink, sessionId: number): void {
    const session = this.lookup(sink, sessionId);
    if (session) this.end(session, "closed");
  }

  closeStream(sink: Sink): void {
    for (const session of this.sessions.ofStream(sink)) this.end(session, "stream ended");
  }

  failSession(sink: Sink, sessionId: number, message: string): void {
    const session = this.sessions.get(sink, sessionId);
    if (!session) {
      // The request that failed may have been the session's open: the gateway waits for it all the same.
      sink.failed(sessionId, message);
      return;
    }
    // A closing session has already ended for the gateway too (finished, closed or failed).
    if (session.state !== "closing") this.fail(session, message);
  }

  // ---- what each service does its own way -------------------------------------------------------------

  /** Why the request cannot open a session, if it cannot. */
  protected abstract checkOpen(request: Open): string | undefined;

  protected abstract createSession(sink: Sink, request: Open): Session;

  /** Engine bookkeeping between steps, freeing the closing sessions (remove) among it. */
  protected abstract settleSessions(): Promise<void>;

  /** What the next step does: the sessions with work, each with its step item. */
  protected abstract collectWork(): Work[];

  /**
   * The step that follows `work`, queued before `work`'s results are known (stepPipelined): sessions whose
   * next input is the token their item picks, fed by the engine. Empty when the loop should collect work
   * again after this step.
   */
  protected abstract continuation(work: Work[]): Work[];

  /** Acts on a step's results (succeeded). */
  protected abstract apply(work: Work[], outcome: StepOutcome): void;

  /** Runs the work, pipelined (stepPipelined). */
  protected async runStep(work: Work[]): Promise<void> {
    await this.stepPipelined(work);
  }

  /** What the session's log line reports besides its ids, end and duration. */
  protected abstract summary(session: Session): Record<string, unknown>;

  // ---- the loop ---------------------------------------------------------------------------------------

  /** One turn of the loop; false when it found nothing to do. */
  private async iteration(): Promise<boolean> {
    await this.settleSessions();
    const work = this.collectWork();
    if (work.length === 0) return false;
    await this.runStep(work);
    return true;
  }

  private async drain(): Promise<void> {
    for (const session of this.sessions.all()) this.end(session, "shutdown");
    await this.settleSessions();
  }

  /** Marks the session for the next bookkeeping to free; the first reason given is the one logged. */
  protected end(session: Session, reason: SessionEnd): void {
    if (session.state === "closing") return;
    session.state = "closing";
    session.endReason = reason;
    this.loop.wake();
  }

  /** Forgets a closing session, frees its engine sequence and logs its one line. */
  protected async remove(session: Session): Promise<void> {
    this.sessions.delete(session.sink, session.sessionId);
    if (session.inEngine) await this.engine.release(session.seqId);
    this.logger.info("session", {
      requestId: session.requestId,
      sessionId: session.sessionId,
      end: session.endReason ?? "closed",
      ...this.summary(session),
      seconds: Number(((performance.now() - session.openedAt) / 1000).toFixed(4)),
    });
  }

  /**
   * One batched step, timed: a real batched step feeds the step-time figures and the metrics. A step
   * queued behind another one starts when that one settles, and is timed from there. With
   * `isolateFailures` false, a failing batch rejects instead of being stepped item by item.
   */
  protected async step(work: Work[], isolateFailures = true): Promise<StepOutcome> {
    const items = work.map((w) => w.item);
    const queued = performance.now();
    const { results, batched } = isolateFailures
      ? await stepIsolatingFailures(this.engine, items, this.logger)
      : { results: await this.engine.step(items), batched: true };
    const settled = performance.now();
    const ms = settled - Math.max(queued, this.lastSettled);
    this.lastSettled = settled;
    if (batched) {
      this.stepTimes.record(items.length, ms);
      this.metrics.stepSeconds.observe(ms / 1000);
      this.metrics.batchSize.observe(items.length);
    }
    this.steps += 1;
    const report: StepReport = {
      step: this.steps,
      ms,
      batchSize: items.length,
      tokens: items.reduce((sum, item) => sum + fedTokens(item), 0),
    };
    return { results, report };
  }

  /**
   * Steps `work` and keeps going: before a step's results come back, the step after it (continuation of
   * its work) is already queued, so the
   * engine starts it without waiting for this loop's round trip between two steps. A message from a stream
   * (wake) stops that: the queued step is awaited and the next turn sees the change. A queued step whose
   * batch fails changes nothing (the engine undoes it, and fails the one queued behind it): its sessions
   * step again on the next turn, failures isolated.
   */
  protected async stepPipelined(work: Work[]): Promise<void> {
    let running: { work: Work[]; outcome: Promise<StepOutcome | undefined> } = {
      work,
      outcome: this.step(work),
    };
    for (;;) {
      const next = this.continuation(running.work);
      const queued = next.length > 0 ? { work: next, outcome: this.queueStep(next) } : undefined;
      const outcome = await running.outcome;
      if (outcome) this.apply(running.work, outcome);
      if (!queued) return;
      if (!outcome || this.loop.wakePending || this.loop.isStopping) {
        const last = await queued.outcome;
        if (outcome && last) this.apply(queued.work, last);
        return;
      }
      running = queued;
    }
  }

  private async queueStep(work: Work[]): Promise<StepOutcome | undefined> {
    try {
      return await this.step(work, false);
    } catch (error) {
      this.logger.debug(`queued ${this.role} step failed; its sessions step again`, {
        error: errorMessage(error),
      });
      return undefined;
    }
  }

  /**
   * A step's results, in the order of its work, for the sessions that are still open; a session whose
   * item failed gets the error instead, and is left out.
   */
  protected *succeeded(work: Work[], results: (StepResult | Error)[]): Generator<[Work, StepResult]> {
    for (let i = 0; i < work.length; i++) {
      const w = work[i]!;
      const result = results[i]!;
      if (w.session.state === "closing") continue;
      if (result instanceof Error) {
        this.fail(w.session, result.message);
        continue;
      }
      yield [w, result];
    }
  }

  // ---- helpers ----------------------------------------------------------------------------------------

  /** Why the prompt cannot open a session, if it cannot. */
  protected checkPrompt(prompt: number[]): string | undefined {
    const contextLength = this.engine.info.maxPositionEmbeddings;
    if (prompt.length === 0) return "empty prompt";
    const vocabularyProblem = this.checkVocabulary(prompt, "prompt token");
    if (vocabularyProblem) return vocabularyProblem;
    if (prompt.length >= contextLength) {
      return `prompt of ${prompt.length} tokens leaves no room in the ${this.role}'s context of ${contextLength}`;
    }
    return undefined;
  }

  /** Names the first token outside the model's vocabulary (`what`: which tokens), if there is one. */
  protected checkVocabulary(tokens: number[], what: string): string | undefined {
    const vocabSize = this.engine.info.vocabSize;
    const badToken = tokens.find((token) => !(Number.isInteger(token) && token >= 0 && token < vocabSize));
    return badToken === undefined
      ? undefined
      : `${what} ${badToken} is outside the vocabulary of ${vocabSize}`;
  }

  /** The open session by that id on the stream; undefined once it is closing. */
  protected lookup(sink: Sink, sessionId: number): Session | undefined {
    const session = this.sessions.get(sink, sessionId);
    return session && session.state !== "closing" ? session : undefined;
  }

  protected fail(session: Session, message: string): void {
    this.logger.warn(`${this.role} session failed`, {
      requestId: session.requestId,
      sessionId: session.sessionId,
      error: message,
    });
    this.end(session, "failed");
    session.sink.failed(session.sessionId, message);
  }
}
