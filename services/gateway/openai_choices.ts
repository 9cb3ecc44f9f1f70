// The several generations behind one OpenAI request: n choices (or best_of runs) for each of its prompts.
// Each is a Gateway.generate() of its own, a session on both services. The first run of a prompt goes
// first; the others start once it has its first token, when its prefill has published the prompt's full
// KV blocks to the prefix cache, so they reuse them instead of each computing the prompt again. Their
// chunks are merged into one stream, tagged with the run they belong to.
import type { TokenLogprobs } from "../../proto/gen/pearl/v1/common.js";
import { AsyncQueue } from "./async_queue.js";
import type { Gateway, GenerateChunk, GenerateInput } from "./gateway.js";

export interface RunPlan {
  /** Which prompt of the request it serves. */
  prompt: number;
  /** Which of the prompt's runs it is. */
  choice: number;
  input: GenerateInput;
}

export interface RunChunk {
  run: number;
  chunk: GenerateChunk;
}

const MASK_64 = (1n << 64n) - 1n;

/**
 * The seed of choice `index` of a request seeded with `seed`: the seed itself for the first choice (so
 * that n = 1 and the first of n choices agree), a splitmix64 mix of (seed, index) cut to 53 bits for the
 * others. Sampling is a pure function of (seed, position), so choices sharing a seed would be copies; with
 * seeds of their own each is reproducible by itself.
 */
export function choiceSeed(seed: number, index: number): number {
  if (index === 0) return seed;
  let z = (BigInt(seed) + BigInt(index) * 0x9e3779b97f4a7c15n) & MASK_64;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK_64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK_64;
  z ^= z >> 31n;
  return Number(z & ((1n << 53n) - 1n));
}

/**
 * Runs every plan and yields their chunks as they come, each run's in order. A run that fails fails the
 * whole stream (its error is thrown) and cancels the others, as does the consumer's leaving early or
 * `signal` aborting (the client went away).
 */
export async function* runChoices(
  gateway: Gateway,
  plans: readonly RunPlan[],
  signal: AbortSignal,
): AsyncGenerator<RunChunk> {
  const queue = new AsyncQueue<RunChunk>();
  const cancel = new AbortController();
  const onAbort = (): void => cancel.abort();
  signal.addEventListener("abort", onAbort, { once: true });
  if (signal.aborted) cancel.abort();
  let unfinished = plans.length;
  const start = (run: number, afterFirstChunk: () => void): void => {
    void (async () => {
      let waitingForFirst = true;
      try {
        for await (const chunk of gateway.generate(plans[run]!.input, cancel.signal)) {
          queue.push({ run, chunk });
          if (waitingForFirst) {
            waitingForFirst = false;
            afterFirstChunk();
          }
        }
        unfinished -= 1;
        if (unfinished === 0) queue.end();
      } catch (error) {
        queue.fail(error as Error);
        cancel.abort();
      }
    })();
  };
  for (let prompt = 0; ; prompt++) {
    const runs = plans.flatMap((plan, run) => (plan.prompt === prompt ? [run] : []));
    if (runs.length === 0) break;
    const [leader, ...followers] = runs;
    start(leader!, () => {
      for (const follower of followers) start(follower, () => undefined);
    });
  }
  try {
    yield* queue;
  } finally {
    signal.removeEventListener("abort", onAbort);
    cancel.abort();
  }
}

/** Everything one run produced, gathered (non-streamed responses). */
export interface RunResult {
  tokenIds: number[];
  text: string;
  /** The scores of tokenIds, when asked for. */
  logprobs: TokenLogprobs | undefined;
  promptLogprobs: TokenLogprobs | undefined;
  last: GenerateChunk;
}

/** Gathers every run's chunks, in plan order. */
export async function collectRuns(runs: AsyncIterable<RunChunk>, count: number): Promise<RunResult[]> {
  const parts = Array.from({ length: count }, () => ({
    tokenIds: [] as number[],
    text: "",
    scores: [] as TokenLogprobs[],
    promptLogprobs: undefined as TokenLogprobs | undefined,
    last: undefined as GenerateChunk | undefined,
  }));
  for await (const { run, chunk } of runs) {
    const part = parts[run]!;
    part.tokenIds.push(...chunk.tokenIds);
    part.text += chunk.text;
    if (chunk.logprobs) part.scores.push(chunk.logprobs);
    part.promptLogprobs ??= chunk.promptLogprobs;
    part.last = chunk;
  }
  return parts.map((part) => {
    if (!part.last) throw new Error("a generation ended without a finish reason");
    return {
      tokenIds: part.tokenIds,
      text: part.text,
      logprobs: part.scores.length > 0 ? joinLogprobs(part.scores) : undefined,
      promptLogprobs: part.promptLogprobs,
      last: part.last,
    };
  });
}

function joinLogprobs(pieces: TokenLogprobs[]): TokenLogprobs {
  return {
    tokenIds: pieces.flatMap((piece) => piece.tokenIds),
    logprobs: pieces.flatMap((piece) => piece.logprobs),
    topK: pieces[0]!.topK,
    topTokenIds: pieces.flatMap((piece) => piece.topTokenIds),
    topLogprobs: pieces.flatMap((piece) => piece.topLogprobs),
  };
}

/** The sum of a run's token log-probabilities: what best_of ranks by. */
export function cumulativeLogprob(result: RunResult): number {
  return (result.logprobs?.logprobs ?? []).reduce((sum, logprob) => sum + logprob, 0);
}
