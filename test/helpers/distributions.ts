// Exact next-token distributions, computed in the test process from the real engine's logits, and the
// same processing the runtime applies (docs/design.md §4): p = top_p(top_k(softmax(logits / T))).
import { Engine } from "../../lib/native.js";

export type Distribution = Map<number, number>;

export interface Processing {
  temperature: number;
  topK: number;
  topP: number;
}

/** Canonical order: probability descending, token id ascending (as the runtime breaks ties). */
function canonical(weights: Float64Array): number[] {
  return Array.from(weights.keys())
    .filter((token) => weights[token]! > 0)
    .sort((a, b) => (weights[a] !== weights[b] ? weights[b]! - weights[a]! : a - b));
}

export function processLogits(logits: Float32Array, processing: Processing): Distribution {
  let max = -Infinity;
  for (const value of logits) max = Math.max(max, value);
  const weights = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) weights[i] = Math.exp((logits[i]! - max) / processing.temperature);
  let kept = canonical(weights);
  if (processing.topK > 0) kept = kept.slice(0, processing.topK);
  let total = kept.reduce((sum, token) => sum + weights[token]!, 0);
  if (processing.topP < 1) {
    let cumulative = 0;
    let size = kept.length;
    for (let i = 0; i < kept.length; i++) {
      cumulative += weights[kept[i]!]! / total;
      if (cumulative >= processing.topP) {
        size = i + 1;
        break;
      }
    }
    kept = kept.slice(0, size);
    total = kept.reduce((sum, token) => sum + weights[token]!, 0);
  }
  return new Map(kept.map((token) => [token, weights[token]! / total]));
}

/** The k most likely tokens of p, renormalized: a sampled draft's q. */
export function topKOf(p: Distribution, k: number): Distribution {
  const kept = [...p.entries()].sort(([ta, pa], [tb, pb]) => (pa !== pb ? pb - pa : ta - tb)).slice(0, k);
  const total = kept.reduce((sum, [, probability]) => sum + probability, 0);
  return new Map(kept.map(([token, probability]) => [token, probability / total]));
}

export function argmax(p: Distribution): number {
  let best = -1;
  let bestProbability = -1;
  for (const [token, probability] of p) {
    if (probability > bestProbability || (probability === bestProbability && token < best)) {
      best = token;
      bestProbability = probability;
    }
  }
  return best;
}

/** The logits after each context (its last row), in batches that fit a small KV cache. */
export async function lastLogits(modelDir: string, contexts: number[][]): Promise<Float32Array[]> {
  const engine = await Engine.load({ modelDir, backend: "cpu", numThreads: 1, numBlocks: 1024 });
  try {
    const vocab = engine.info.vocabSize;
    const rows: Float32Array[] = [];
    const batchSize = 64;
    for (let start = 0; start < contexts.length; start += batchSize) {
      const batch = contexts.slice(start, start + batchSize);
      const seqIds = batch.map((_, i) => start + i + 1);
      for (const seqId of seqIds) await engine.addSequence(seqId);
      const results = await engine.step(
        batch.map((context, i) => ({
          seqId: seqIds[i]!,
          tokens: Int32Array.from(context),
          output: "logits" as const,
        })),
      );
      results.forEach((result, i) => {
        const length = batch[i]!.length;
        rows.push(result.logits!.slice((length - 1) * vocab, length * vocab));
      });
      for (const seqId of seqIds) await engine.release(seqId);
    }
    return rows;
  } finally {
    await engine.close();
  }
}

/** A seeded uniform source for simulations. */
export function uniforms(seed: number): () => number {
  let state = BigInt(seed) | 1n;
  return () => {
    state = (state * 6364136223846793005n + 1442695040888963407n) & 0xffffffffffffffffn;
    return Number(state >> 11n) / 2 ** 53;
  };
}

export function sample(p: Distribution, uniform: number): number {
  let cumulative = 0;
  let last = -1;
  for (const [token, probability] of p) {
    cumulative += probability;
    last = token;
    if (uniform < cumulative) return token;
  }
  return last;
}
