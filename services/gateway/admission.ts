// Admission control: at most maxRunning requests run at once (vLLM's --max-num-seqs), at most maxWaiting
// more wait for a place, first come first served; a request beyond both is refused at once with a
// Retry-After estimate, instead of joining a queue that grows without bound. On shutdown nothing new is
// admitted and the waiting requests are refused.
import type { Counter, Gauge } from "../../lib/metrics.js";

/** The server is at capacity: retry after `retryAfterSeconds`. */
export class OverloadedError extends Error {
  constructor(
    message: string,
    readonly retryAfterSeconds: number,
  ) {
    super(message);
  }
}

/** The server is stopping and takes no new requests. */
export class ShuttingDownError extends Error {}

/** The request's client went away while it waited. */
export class AbandonedError extends Error {}

export interface AdmissionMetrics {
  waiting: Gauge;
  rejected: Counter<"reason">;
}

interface Waiter {
  admit: (release: () => void) => void;
  refuse: (error: Error) => void;
}

/** Waiting time of a request gives the first Retry-After estimates until requests have been timed. */
const FALLBACK_REQUEST_SECONDS = 1;
const MAX_RETRY_AFTER_SECONDS = 60;
/** Weight of the newest request duration in the running mean. */
const DURATION_EMA_WEIGHT = 0.1;

export class Admission {
  private running = 0;
  private readonly waiting: Waiter[] = [];
  private accepting = true;
  private meanRequestSeconds: number | undefined;
  private idleWaiters: (() => void)[] = [];

  constructor(
    private readonly maxRunning: number,
    private readonly maxWaiting: number,
    private readonly metrics: AdmissionMetrics,
  ) {}

  get runningCount(): number {
    return this.running;
  }

  get waitingCount(): number {
    return this.waiting.length;
  }

  /**
   * Resolves with the request's release function once it may run. Rejects with OverloadedError when
   * every place and the queue are taken, ShuttingDownError once the server stops, AbandonedError when
   * `signal` aborts while it waits.
   */
  async admit(signal?: AbortSignal): Promise<() => void> {
    if (signal?.aborted) throw new AbandonedError("the client went away before the request was admitted");
    if (!this.accepting) {
      this.metrics.rejected.inc({ reason: "shutting_down" });
      throw new ShuttingDownError("the server is shutting down");
    }
    if (this.running < this.maxRunning && this.waiting.length === 0) return this.start();
    if (this.waiting.length >= this.maxWaiting) {
      this.metrics.rejected.inc({ reason: "queue_full" });
      const retryAfter = this.retryAfterSeconds();
      throw new OverloadedError(
        `the server is at capacity (${this.running} requests running, ${this.waiting.length} waiting): ` +
          `retry after ${retryAfter} s`,
        retryAfter,
      );
    }
    return new Promise<() => void>((resolve, reject) => {
      const waiter: Waiter = {
        admit: (release) => {
          signal?.removeEventListener("abort", onAbort);
          resolve(release);
        },
        refuse: (error) => {
          signal?.removeEventListener("abort", onAbort);
          reject(error);
        },
      };
      const onAbort = (): void => {
        const index = this.waiting.indexOf(waiter);
        if (index < 0) return;
        this.waiting.splice(index, 1);
        this.metrics.waiting.set(this.waiting.length);
        waiter.refuse(new AbandonedError("the client went away while the request waited"));
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.waiting.push(waiter);
      this.metrics.waiting.set(this.waiting.length);
    });
  }

  /** No new requests; the waiting ones are refused. Running ones go on. */
  stopAccepting(): void {
    this.accepting = false;
    const refused = this.waiting.splice(0);
    this.metrics.waiting.set(0);
    for (const waiter of refused) {
      this.metrics.rejected.inc({ reason: "shutting_down" });
      waiter.refuse(new ShuttingDownError("the server is shutting down"));
    }
  }

  /** Resolves once no request runs. */
  idle(): Promise<void> {
    if (this.running === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private start(): () => void {
    this.running += 1;
    const started = performance.now();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.running -= 1;
      this.observeDuration((performance.now() - started) / 1000);
      this.next();
    };
  }

  private next(): void {
    const waiter = this.waiting.shift();
    if (waiter) {
      this.metrics.waiting.set(this.waiting.length);
      // The place passes straight to the first waiter, before anyone else can take it.
      waiter.admit(this.start());
      return;
    }
    if (this.running === 0) {
      const idle = this.idleWaiters;
      this.idleWaiters = [];
      for (const resolve of idle) resolve();
    }
  }

  private observeDuration(seconds: number): void {
    this.meanRequestSeconds =
      this.meanRequestSeconds === undefined
        ? seconds
        : this.meanRequestSeconds + DURATION_EMA_WEIGHT * (seconds - this.meanRequestSeconds);
  }

  /** When a place is likely to be free for one more request: the queue ahead of it drains at
   * maxRunning requests per mean request duration. */
  private retryAfterSeconds(): number {
    const perRequest = this.meanRequestSeconds ?? FALLBACK_REQUEST_SECONDS;
    const seconds = Math.ceil((perRequest * (this.waiting.length + 1)) / this.maxRunning);
    return Math.min(MAX_RETRY_AFTER_SECONDS, Math.max(1, seconds));
  }
}
