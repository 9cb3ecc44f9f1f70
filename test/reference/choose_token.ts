// An independent TypeScript statement of how a backend picks a row's token (native/src/ops/choose_token.cpp
// and its CUDA twin): the argmax, or at temperature > 0 the Gumbel-max draw with pearl's counter-based
// noise (native/src/counter_rng.h), ties to the lowest id; for rows with a top-k/top-p cut or judging
// sampled drafts, the draw from the processed distribution (native/src/sampling.cpp) and the speculative
// sampling outcome (accept with min(1, p/q), else the residual draw from norm(max(0, p - q))); for a
// drafting step, the top-k distribution q of p it returns and the token drawn from q.
import assert from "node:assert/strict";

import type { DraftDistribution, Engine, SamplingParams, StepResult } from "../../lib/native.js";
import { addPrefilled, logitsRow, only, stepLogits, tokenRange } from "./drive.js";

const MASK_64 = (1n << 64n) - 1n;
const SAMPLE_PURPOSE = 1n;
const ACCEPT_PURPOSE = 2n;
const RESIDUAL_PURPOSE = 3n;

/** splitmix64's finalizer. */
function mix64(value: bigint): bigint {
  let x = (value + 0x9e3779b97f4a7c15n) & MASK_64;
  x = ((x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK_64;
  x = ((x ^ (x >> 27n)) * 0x94d049bb133111ebn) & MASK_64;
  return x ^ (x >> 31n);
}

/** Uniform in (0, 1) for draw `index` of the `purpose` stream at (seed, position). */
function uniform(seed: bigint, position: bigint, index: number, purpose = SAMPLE_PURPOSE): number {
  const key = mix64(mix64(mix64(seed) ^ (position & MASK_64)) ^ purpose);
  const bits = mix64(key ^ mix64(BigInt(index))) >> 11n;
  return (Number(bits) + 0.5) * 2 ** -53;
}

export interface Choice {
  temperature: number;
  seed: number;
  /** Position of the token being chosen. */
  position: number;
}

/** The token `choice` picks from one row of logits; -1 when nothing can win. */
export function chooseToken(row: Float32Array, choice: Choice): number {
  const temperature = Math.fround(choice.temperature);
  const sample = temperature > 0;
  const inverseTemperature = sample ? 1 / temperature : 0;
  let best = -1;
  let bestKey = 0;
  for (const [i, logit] of row.entries()) {
    if (Number.isNaN(logit) || (sample && !Number.isFinite(logit))) continue;
    const key = sample
      ? logit * inverseTemperature -
        Math.log(-Math.log(uniform(BigInt(choice.seed), BigInt(choice.position), i)))
      : logit;
    if (best < 0 || key > bestKey) {
      best = i;
      bestKey = key;
    }
  }
  return best;
}

/** A processed distribution: its support in ascending id order, with probabilities summing to 1. */
export interface Processed {
  tokens: number[];
  probs: number[];
}

/** Gumbel-max key of `token` with unnormalized probability `weight` in the `purpose` stream. */
function gumbelKey(weight: number, seed: number, position: number, token: number, purpose: bigint): number {
  return Math.log(weight) - Math.log(-Math.log(uniform(BigInt(seed), BigInt(position), token, purpose)));
}

/** The largest Gumbel-max key among tokens of positive weight, ties to the lowest id; -1 when none. */
function gumbelArgmax(
  tokens: readonly number[],
  weights: readonly number[],
  seed: number,
  position: number,
  purpose: bigint,
): number {
  let best = -1;
  let bestKey = 0;
  for (const [i, token] of tokens.entries()) {
    const weight = weights[i]!;
    if (!(weight > 0)) continue;
    const key = gumbelKey(weight, seed, position, token, purpose);
    if (best < 0 || key > bestKey || (key === bestKey && token < best)) {
      best = token;
      bestKey = key;
    }
  }
  return best;
}

/**
 * p = top_p(top_k(softmax(row / temperature))): weights exp((logit - max) / T) (NaN weighs 0), the top k by
 * (weight desc, id asc), then the smallest prefix in that order whose cumulative share of the kept mass
 * reaches top_p. Temperature 0 gives the one-hot argmax.
 */
export function processLogits(row: Float32Array, sampling: SamplingParams): Processed {
  const temperature = Math.fround(sampling.temperature);
  if (!(temperature > 0)) {
    const token = chooseToken(row, { temperature: 0, seed: 0, position: 0 });
    if (token < 0) throw new Error("every logit is NaN");
    return { tokens: [token], probs: [1] };
  }
  let max = -Infinity;
  for (const logit of row) if (!Number.isNaN(logit)) max = Math.max(max, logit);
  if (!Number.isFinite(max)) throw new Error("logits have no finite maximum");
  const inverseTemperature = 1 / temperature;
  const weights = Array.from(row, (logit) =>
    Number.isNaN(logit) ? 0 : Math.exp((logit - max) * inverseTemperature),
  );
  const byProbability = (a: number, b: number) =>
    weights[a] !== weights[b] ? weights[b]! - weights[a]! : a - b;
  const byId = (a: number, b: number) => a - b;
  const massOf = (tokens: readonly number[]) => tokens.reduce((sum, token) => sum + weights[token]!, 0);
  let support = weights.flatMap((weight, token) => (weight > 0 ? [token] : []));
  if (sampling.topK > 0 && sampling.topK < support.length) {
    support = support.sort(byProbability).slice(0, sampling.topK).sort(byId);
  }
  let total = massOf(support);
  const topP = Math.fround(sampling.topP);
  if (topP < 1) {
    const ordered = support.sort(byProbability);
    let cumulative = 0;
    let size = ordered.length;
    for (const [i, token] of ordered.entries()) {
      cumulative += weights[token]! / total;
      if (cumulative >= topP) {
        size = i + 1;
        break;
      }
    }
    support = ordered.slice(0, size).sort(byId);
    total = massOf(support);
  }
  return { tokens: support, probs: support.map((token) => weights[token]! / total) };
}

/** p(token): 0 outside the support. */
export function probabilityOf(p: Processed, token: number): number {
  const index = p.tokens.indexOf(token);
  return index < 0 ? 0 : p.probs[index]!;
}

/** The Gumbel-max draw from p at `position`. */
export function sampleToken(p: Processed, seed: number, position: number): number {
  if (p.tokens.length === 1) return p.tokens[0]!;
  return gumbelArgmax(p.tokens, p.probs, seed, position, SAMPLE_PURPOSE);
}

/**
 * The q a drafting service sends: the first k of p's support by (probability desc, id asc), their
 * probabilities divided by their sum (added in that order) and rounded to float32.
 */
export function topKDistribution(p: Processed, k: number): DraftDistribution {
  const order = p.tokens
    .map((token, i) => ({ token, prob: p.probs[i]! }))
    .sort((a, b) => (a.prob !== b.prob ? b.prob - a.prob : a.token - b.token))
    .slice(0, Math.max(k, 1));
  let total = 0;
  for (const { prob } of order) total += prob;
  return {
    tokens: Int32Array.from(order, ({ token }) => token),
    probs: Float32Array.from(order, ({ prob }) => prob / total),
  };
}

/** The drafted token: the Gumbel-max draw from q as sent (its float32 probabilities) at `position`. */
export function sampleDraftToken(q: DraftDistribution, seed: number, position: number): number {
  return sampleToken({ tokens: Array.from(q.tokens), probs: Array.from(q.probs) }, seed, position);
}

/** A drafting row's result: q is `expected` exactly and its token the draw from q at `position`. */
export function assertDrafted(
  result: StepResult | undefined,
  expected: DraftDistribution,
  seed: number,
  position: number,
  what: string,
): void {
  assert.ok(result?.q, `drafting step returns q, ${what}`);
  assert.deepEqual(result.q.tokens, expected.tokens, `q's tokens, ${what}`);
  assert.deepEqual(result.q.probs, expected.probs, `q's probs, ${what}`);
  assert.equal(result.nextToken, sampleDraftToken(expected, seed, position), `drafted token, ${what}`);
}

/** The draw from norm(max(0, p - q)) at `position` (its own stream), p's own draw when that is empty. */
export function sampleResidual(p: Processed, q: DraftDistribution, seed: number, position: number): number {
  const residual = p.tokens.map((token, i) => {
    const j = Array.from(q.tokens).indexOf(token);
    return j < 0 ? p.probs[i]! : Math.max(0, p.probs[i]! - q.probs[j]!);
  });
  const token = gumbelArgmax(p.tokens, residual, seed, position, RESIDUAL_PURPOSE);
  return token >= 0 ? token : sampleToken(p, seed, position);
}

/** Whether a row is drawn from its processed distribution rather than by chooseToken's one pass. */
function drawsFromProcessed(sampling: SamplingParams, sampledDrafts: boolean): boolean {
  return sampling.topK > 0 || Math.fround(sampling.topP) < 1 || sampledDrafts;
}

/** The token the engine's backend picks from one row at `position`. */
export function rowToken(
  row: Float32Array,
  sampling: SamplingParams,
  position: number,
  sampledDrafts = false,
): number {
  if (!drawsFromProcessed(sampling, sampledDrafts)) return chooseToken(row, { ...sampling, position });
  return sampleToken(processLogits(row, sampling), sampling.seed, position);
}

export interface VerifyOutcome {
  accepted: number;
  nextToken: number;
}

/**
 * The outcome on drafts window[1..] given the window's rows of logits (row i judges window[i + 1]; the last
 * row gives the bonus token); firstPosition is the position of the token row 0 chooses. Greedy drafts
 * (draftDists undefined): accepted while each equals the row's own token. Sampled drafts: accept d when
 * u * q(d) < p(d) with u from the Accept stream, else the residual draw.
 */
export function verifyWindow(
  rows: readonly Float32Array[],
  window: readonly number[],
  draftDists: readonly DraftDistribution[] | undefined,
  sampling: SamplingParams,
  firstPosition: number,
): VerifyOutcome {
  const numDraft = window.length - 1;
  for (let i = 0; i < numDraft; i++) {
    const position = firstPosition + i;
    const draft = window[i + 1]!;
    if (!draftDists) {
      const token = rowToken(rows[i]!, sampling, position);
      if (token !== draft) return { accepted: i, nextToken: token };
      continue;
    }
    const p = processLogits(rows[i]!, sampling);
    const q = draftDists[i]!;
    const j = Array.from(q.tokens).indexOf(draft);
    const qDraft = j < 0 ? 0 : q.probs[j]!;
    const u = uniform(BigInt(sampling.seed), BigInt(position), 0, ACCEPT_PURPOSE);
    if (u * qDraft < probabilityOf(p, draft)) continue;
    return { accepted: i, nextToken: sampleResidual(p, q, sampling.seed, position) };
  }
  return {
    accepted: numDraft,
    nextToken: rowToken(rows[numDraft]!, sampling, firstPosition + numDraft, draftDists !== undefined),
  };
}

/** Greedy, whole-softmax and cut settings every engine check below runs through. */
export const CHOICE_SETTINGS: readonly SamplingParams[] = [
  { temperature: 0, topK: 0, topP: 1, seed: 0 },
  { temperature: 0.8, topK: 0, topP: 1, seed: 11 },
  { temperature: 1.7, topK: 0, topP: 1, seed: 12345 },
  { temperature: 0.9, topK: 20, topP: 1, seed: 21 },
  { temperature: 1.3, topK: 0, topP: 0.6, seed: 22 },
  { temperature: 0.6, topK: 50, topP: 0.9, seed: 23 },
  { temperature: 0, topK: 5, topP: 0.5, seed: 24 },
];

/**
 * Checks on any backend that the tokens an engine picks itself (greedy, sampled from the whole softmax, and
 * sampled with top-k/top-p cuts) are rowToken's on the same rows' logits, in a plain decode step and in a
 * greedy-draft verify window whose first draft is the expected token (so it is accepted and later rows
 * decide).
 */
export async function assertEngineChoosesTokens(engine: Engine, prompt: readonly number[]): Promise<void> {
  const vocab = engine.info.vocabSize;
  const drafts = tokenRange(100, 4, vocab);
  for (const [k, sampling] of CHOICE_SETTINGS.entries()) {
    const what = `temperature ${sampling.temperature}, top_k ${sampling.topK}, top_p ${sampling.topP}`;
    const withLogits = 9000 + 2 * k;
    const choosing = withLogits + 1;
    await addPrefilled(engine, withLogits, prompt);
    await addPrefilled(engine, choosing, prompt);

    const firstRow = await stepLogits(engine, withLogits, [drafts[0]!]);
    const decoded = only(
      await engine.step([{ seqId: choosing, tokens: Int32Array.of(drafts[0]!), sampling }]),
    );
    const expectedFirst = rowToken(firstRow, sampling, prompt.length + 1);
    assert.equal(decoded.nextToken, expectedFirst, `decode step, ${what}`);

    await engine.truncate(withLogits, prompt.length);
    await engine.truncate(choosing, prompt.length);
    const window = [drafts[0]!, expectedFirst, ...drafts.slice(2)];
    const windowLogits = await stepLogits(engine, withLogits, window);
    const rows = window.map((_, row) => logitsRow(windowLogits, vocab, row));
    const expected = verifyWindow(rows, window, undefined, sampling, prompt.length + 1);
    const outcome = only(
      await engine.step([
        { seqId: choosing, tokens: Int32Array.from(window), numDraft: window.length - 1, sampling },
      ]),
    );
    assert.ok(expected.accepted >= 1, "the first draft is the expected token and must be accepted");
    assert.deepEqual(
      { accepted: outcome.accepted, nextToken: outcome.nextToken },
      expected,
      `verify window, ${what}`,
    );
    await engine.release(withLogits);
    await engine.release(choosing);
  }
}

/** A draft's sparse q: `draft` with probability `share`, the rest spread over three other tokens. */
function draftDistribution(draft: number, share: number, vocab: number): DraftDistribution {
  const others = [1, 2, 3].map((k) => (draft + 97 * k) % vocab);
  return {
    tokens: Int32Array.from([draft, ...others]),
    probs: Float32Array.from([share, ...others.map(() => (1 - share) / 3)]),
  };
}

/**
 * Checks on any backend that verify windows of sampled drafts (each with a sparse q) get the outcome
 * verifyWindow gives on the same rows' logits, for every CHOICE_SETTINGS entry and two kinds of window: every
 * draft the target's most likely token with a tiny q(d) (accepted unless p(d) is tinier: the bonus row
 * decides), and a second draft the target's least likely token with q(d) = 0.9 (rejected: the residual
 * decides). Across the settings, at least one window must end in a bonus token and one in a residual draw.
 */
export async function assertEngineVerifiesSampledDrafts(
  engine: Engine,
  prompt: readonly number[],
): Promise<void> {
  const vocab = engine.info.vocabSize;
  const outcomes = { bonus: 0, residual: 0 };
  for (const [k, sampling] of CHOICE_SETTINGS.entries()) {
    for (const rejectSecond of [false, true]) {
      const what = `temperature ${sampling.temperature}, top_k ${sampling.topK}, top_p ${sampling.topP}, ${rejectSecond ? "rejected" : "liked"} second draft`;
      const withLogits = 9500 + 4 * k + (rejectSecond ? 2 : 0);
      const choosing = withLogits + 1;
      await addPrefilled(engine, withLogits, prompt);
      await addPrefilled(engine, choosing, prompt);
      // Each draft is picked from the target's row for the window so far (its logits, then a rollback).
      const window = [tokenRange(200 + k, 1, vocab)[0]!];
      const draftDists: DraftDistribution[] = [];
      for (let i = 0; i < 3; i++) {
        const logits = await stepLogits(engine, withLogits, window);
        await engine.truncate(withLogits, prompt.length);
        const row = logitsRow(logits, vocab, window.length - 1);
        const order = Array.from(row.keys()).sort((a, b) => row[b]! - row[a]! || a - b);
        const rejected = rejectSecond && i === 1;
        const draft = rejected ? order[order.length - 1]! : order[0]!;
        window.push(draft);
        draftDists.push(draftDistribution(draft, rejected ? 0.9 : 0.001, vocab));
      }
      const windowLogits = await stepLogits(engine, withLogits, window);
      const rows = window.map((_, row) => logitsRow(windowLogits, vocab, row));
      const expected = verifyWindow(rows, window, draftDists, sampling, prompt.length + 1);
      const outcome = only(
        await engine.step([
          { seqId: choosing, tokens: Int32Array.from(window), numDraft: 3, draftDists, sampling },
        ]),
      );
      assert.deepEqual(
        { accepted: outcome.accepted, nextToken: outcome.nextToken },
        expected,
        `sampled drafts, ${what}`,
      );
      if (expected.accepted === 3) outcomes.bonus++;
      else outcomes.residual++;
      await engine.release(withLogits);
      await engine.release(choosing);
    }
  }
  assert.ok(
    outcomes.bonus >= 1 && outcomes.residual >= 1,
    `windows exercise both endings: ${JSON.stringify(outcomes)}`,
  );
}

/** Sampled settings (whole softmax and cuts) a drafting step runs with, and the q sizes it asks for. */
const DRAFTING_SETTINGS = CHOICE_SETTINGS.filter((sampling) => sampling.temperature > 0);
const DRAFTING_TOP_KS = [1, 4, 16, 100] as const;

/**
 * Checks on any backend that a drafting step (returnTopK = k while sampling, here after a 2-token chunk so
 * that the drafting row is not the step's only row) returns q = topKDistribution(p, k) of the same row's
 * logits and the token sampleDraftToken draws from that q, for every DRAFTING_SETTINGS entry, k from 1 to
 * more than some cut supports hold, and several seeds; at least one draw must fall below q's top token.
 */
export async function assertEngineDraftsFromTopK(engine: Engine, prompt: readonly number[]): Promise<void> {
  const vocab = engine.info.vocabSize;
  const chunk = tokenRange(300, 2, vocab);
  let belowTheTop = 0;
  for (const [s, setting] of DRAFTING_SETTINGS.entries()) {
    const withLogits = 9800 + 2 * s;
    const drafting = withLogits + 1;
    await addPrefilled(engine, withLogits, prompt);
    await addPrefilled(engine, drafting, prompt);
    const logits = await stepLogits(engine, withLogits, chunk);
    const row = logitsRow(logits, vocab, chunk.length - 1);
    const position = prompt.length + chunk.length;
    for (const k of DRAFTING_TOP_KS) {
      for (const seedOffset of [0, 1, 2]) {
        const sampling = { ...setting, seed: setting.seed + 1000 * seedOffset };
        const what = `temperature ${sampling.temperature}, top_k ${sampling.topK}, top_p ${sampling.topP}, returnTopK ${k}, seed ${sampling.seed}`;
        const result = only(
          await engine.step([{ seqId: drafting, tokens: Int32Array.from(chunk), sampling, returnTopK: k }]),
        );
        await engine.truncate(drafting, prompt.length);
        const expected = topKDistribution(processLogits(row, sampling), k);
        assertDrafted(result, expected, sampling.seed, position, what);
        if (result.nextToken !== expected.tokens[0]) belowTheTop++;
      }
    }
    await engine.release(withLogits);
    await engine.release(drafting);
  }
  assert.ok(belowTheTop >= 1, "some drafted token is not q's most likely one: q is sampled, not maximized");
}
