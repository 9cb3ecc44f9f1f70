// What the draft and target services' engine loops share: the sessions of every gateway stream, a loop
// that sleeps until a message wakes it, and a batched step that tells failing sessions from the rest.
import { errorMessage, type Logger } from "./logging.js";
import type { Engine, StepItem, StepResult } from "./native.js";

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
