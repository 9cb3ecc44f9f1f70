// Typed wrapper over the native runtime (native/binding/addon.cpp). Every call runs on the engine's own
// thread, in submission order, and returns a Promise; the event loop never waits for the model.
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export type Backend = "cpu" | "cuda" | "auto";

/** temperature 0 is greedy. seed: integer in [0, 2^53 - 1]; a seeded request is reproducible. */
export interface SamplingParams {
  temperature: number;
  topK: number;
  topP: number;
  seed: number;
}

/** A draft's sparse top-k distribution q at one position. */
export interface DraftDistribution {
  tokens: Int32Array;
  probs: Float32Array;
}

/** "none": only extend the KV; "sample": verify trailing drafts and return the next token; "logits": also
 * return the raw logits of every appended row. */
export type StepOutput = "none" | "sample" | "logits";

export interface StepItem {
  seqId: number;
  tokens: Int32Array;
  /** The last numDraft tokens are draft proposals to verify (default 0). */
  numDraft?: number;
  /** Empty/absent for a greedy draft, else one entry per draft token. */
  draftDists?: DraftDistribution[];
  /** Default "sample". */
  output?: StepOutput;
  /** Default greedy {temperature 0, topK 0, topP 1, seed 0}. */
  sampling?: SamplingParams;
  /** The appended non-draft tokens are committed text (default true). */
  commit?: boolean;
  /** A drafting service asks for q (sampled steps only). */
  returnTopK?: number;
  /**
   * The step's input is the nextToken this sequence's previous step returned, then `tokens` (often empty).
   * The engine knows that token as soon as the previous step ends, so a caller may queue this step behind
   * it without awaiting it: the next forward pass then starts at once instead of after the round trip
   * through the event loop (pipelined decode). Only a step with output "sample" or "logits" leaves a token
   * to feed; truncate, release, a failed step and output "none" forget it.
   */
  feedNextToken?: boolean;
  /**
   * k >= 0: the result's `logprobs` hold, for each token the step emits (the accepted drafts, then
   * nextToken), its log-probability at its position and the k most likely tokens', from the distribution the
   * request samples from (temperature > 0: after temperature, top-k and top-p, -Infinity outside the cut;
   * greedy: log_softmax of the logits). The window's logits then go to the host (on cuda, vocab floats a row).
   */
  logprobs?: number;
  /**
   * k >= 0: the result's `promptLogprobs` hold, for every row before the verify window (every row of an
   * output "none" step), the raw log-probability of the token after it and the k most likely tokens': a
   * prompt's scores. A prefill chunk that is not the prompt's last names the token after it in
   * nextPromptToken. Every row of such a step is computed (no prefix-cache match).
   */
  promptLogprobs?: number;
  nextPromptToken?: number;
}

/** Log-probabilities of tokens at consecutive positions: each token's own and the topK most likely
 * tokens' there (most likely first, ties to the lowest id). */
export interface Logprobs {
  topK: number;
  tokens: Int32Array;
  logprobs: Float32Array;
  /** [tokens.length * topK] */
  topTokens: Int32Array;
  topLogprobs: Float32Array;
}

export interface StepResult {
  seqId: number;
  accepted: number;
  /** -1 when output was "none". */
  nextToken: number;
  /** Tokens in the sequence's KV after the step. */
  length: number;
  /** [tokens.length * vocabSize] when output was "logits". */
  logits?: Float32Array;
  q?: DraftDistribution;
  /** When the item asked for logprobs: accepted + 1 tokens. */
  logprobs?: Logprobs;
  /** When the item asked for promptLogprobs: one per row before the window. */
  promptLogprobs?: Logprobs;
}

export interface ModelInfo {
  architecture: string;
  modelType: string;
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  maxPositionEmbeddings: number;
  eosTokenIds: number[];
  bosTokenId: number;
  dtype: string;
  backend: string;
  numParameters: number;
}

export interface CacheStats {
  blockSize: number;
  blocksTotal: number;
  blocksUsed: number;
  blocksFree: number;
  blocksCached: number;
  prefixHitTokens: number;
  prefixQueries: number;
  prefixHits: number;
  sequences: number;
}

export interface EngineOptions {
  modelDir: string;
  backend?: Backend;
  blockSize?: number;
  numBlocks?: number;
  numThreads?: number;
  /** CUDA device ordinals, one per tensor-parallel rank (rank i on devices[i]); a repeated ordinal puts
   * several ranks on one GPU. Default: device 0 alone. cuda backend only. */
  devices?: number[];
  /** Batch-invariant numerics, so greedy pearl/sd output equals ar whatever shares a step. The cpu backend
   * always is; on cuda every matrix product then takes the batch-invariant kernel (slower on steps of
   * more than 16 rows). Default false. */
  deterministic?: boolean;
}

interface NativeEngine {
  load(options: EngineOptions): Promise<ModelInfo>;
  addSequence(seqId: number): Promise<void>;
  truncate(seqId: number, length: number): Promise<void>;
  release(seqId: number): Promise<void>;
  sequenceLength(seqId: number): Promise<number>;
  step(items: StepItem[]): Promise<StepResult[]>;
  cacheStats(): Promise<CacheStats>;
  close(): Promise<void>;
}

interface Addon {
  NativeEngine: new () => NativeEngine;
  cudaDeviceCount(): number;
  measureAllReduce(devices: number[], floats: number, deterministic: boolean): number;
}

const ADDON_RELATIVE_PATH = "native/build/Release/pearl_addon.node";

// This file runs as lib/native.ts under tsx and as dist/lib/native.js after tsc: the repository root is
// one or two levels up.
function addonCandidates(): string[] {
  const here = dirname(fileURLToPath(import.meta.url));
  return [resolve(here, "..", ADDON_RELATIVE_PATH), resolve(here, "..", "..", ADDON_RELATIVE_PATH)];
}

let addon: Addon | undefined;

function loadAddon(): Addon {
  if (addon) return addon;
  const candidates = addonCandidates();
  const path = candidates.find((candidate) => existsSync(candidate));
  if (!path) {
    throw new Error(
      `the native runtime is not built (looked for ${candidates.join(" and ")}): run \`npm run build:native\``,
    );
  }
  addon = createRequire(import.meta.url)(path) as Addon;
  return addon;
}

/** CUDA devices this process (and any child it starts with the same environment) can use; 0 without a
 * GPU or driver, and in a build without CUDA. */
export function cudaDeviceCount(): number {
  return loadAddon().cudaDeviceCount();
}

/** Median microseconds of one all-reduce of `floats` float32 values over a tensor-parallel group on
 * `devices` (the collective the cuda backend runs twice per layer), for a benchmark's floor. Blocks the
 * event loop while it measures; throws in a build without CUDA. */
export function measureAllReduce(devices: number[], floats: number, deterministic: boolean): number {
  return loadAddon().measureAllReduce(devices, floats, deterministic);
}

export class Engine {
  private constructor(
    private readonly native: NativeEngine,
    readonly info: ModelInfo,
  ) {}

  /** Loads a Hugging Face model folder on a new engine thread. */
  static async load(options: EngineOptions): Promise<Engine> {
    const native = new (loadAddon().NativeEngine)();
    const info = await native.load(options);
    return new Engine(native, info);
  }

  async addSequence(seqId: number): Promise<void> {
    return this.native.addSequence(seqId);
  }

  /** Speculative rollback: keep positions [0, length). */
  async truncate(seqId: number, length: number): Promise<void> {
    return this.native.truncate(seqId, length);
  }

  /** Frees the sequence's KV blocks; published prefix blocks stay cached. */
  async release(seqId: number): Promise<void> {
    return this.native.release(seqId);
  }

  async sequenceLength(seqId: number): Promise<number> {
    return this.native.sequenceLength(seqId);
  }

  /** One batched forward over all items (each sequence at most once). */
  async step(items: StepItem[]): Promise<StepResult[]> {
    return this.native.step(items);
  }

  async cacheStats(): Promise<CacheStats> {
    return this.native.cacheStats();
  }

  /** Settles after every call made before it, then frees the model; later calls reject. */
  async close(): Promise<void> {
    return this.native.close();
  }
}
