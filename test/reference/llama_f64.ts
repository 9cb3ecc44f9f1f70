// An independent float64 forward pass of the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3), in
// plain TypeScript, written from the Hugging Face modeling code's math. It shares nothing with the native
// runtime: its own safetensors reader, its own config handling, no KV cache (the whole prompt at once).
// Slow and simple by design; only for tiny test models. A rounding hook turns it into the ideal engine of a
// lower storage precision (test/gpu/bf16_oracle.ts).
import { readFileSync } from "node:fs";
import { join } from "node:path";

import { Checkpoint } from "./safetensors.js";

interface RopeScaling {
  rope_theta?: number;
  rope_type?: string;
  type?: string;
  factor?: number;
  low_freq_factor?: number;
  high_freq_factor?: number;
  original_max_position_embeddings?: number;
}

interface Config {
  hidden_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads?: number;
  head_dim?: number;
  vocab_size: number;
  rms_norm_eps: number;
  rope_theta?: number;
  rope_scaling?: RopeScaling | null;
  /** transformers 5 writes rope_theta and the scaling rule together here. */
  rope_parameters?: RopeScaling | null;
  tie_word_embeddings?: boolean;
  /** Mistral: each position attends to at most this many positions (itself included). */
  sliding_window?: number | null;
}

export interface LlamaF64Options {
  /**
   * Rounds values to the precision an engine stores them in, applied where it stores them: weight
   * matrices and the embedding table (not the 1-D norm weights and biases), every RMSNorm output of the
   * residual stream, K after RoPE and V as they enter the cache, the attention output and the SiLU-gated
   * product. q, the residual stream and every reduction stay float64. Default: nothing is rounded.
   */
  round?: (values: Float64Array) => Float64Array;
}

/** y[rows, out] = x[rows, in] * W^T (+ bias), W stored [out, in] as in torch.nn.Linear. */
function linear(
  x: Float64Array,
  rows: number,
  weight: Float64Array,
  bias: Float64Array | undefined,
): Float64Array {
  const inFeatures = x.length / rows;
  const outFeatures = weight.length / inFeatures;
  const y = new Float64Array(rows * outFeatures);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < outFeatures; o++) {
      let sum = bias ? bias[o]! : 0;
      const w = o * inFeatures;
      const xr = r * inFeatures;
      for (let i = 0; i < inFeatures; i++) sum += x[xr + i]! * weight[w + i]!;
      y[r * outFeatures + o] = sum;
    }
  }
  return y;
}

/** RMSNorm over consecutive groups of weight.length values. */
function rmsNorm(x: Float64Array, weight: Float64Array, eps: number): Float64Array {
  const width = weight.length;
  const y = new Float64Array(x.length);
  for (let start = 0; start < x.length; start += width) {
    let squares = 0;
    for (let i = 0; i < width; i++) squares += x[start + i]! ** 2;
    const scale = 1 / Math.sqrt(squares / width + eps);
    for (let i = 0; i < width; i++) y[start + i] = x[start + i]! * scale * weight[i]!;
  }
  return y;
}

/** Inverse frequencies, with Llama 3.1's "llama3" rescaling when configured. */
function inverseFrequencies(config: Config, headDim: number): Float64Array {
  const scaling = config.rope_parameters ?? config.rope_scaling;
  const theta = scaling?.rope_theta ?? config.rope_theta ?? 10000;
  const inv = Float64Array.from({ length: headDim / 2 }, (_, i) => 1 / theta ** ((2 * i) / headDim));
  const ropeType = scaling?.rope_type ?? scaling?.type ?? "default";
  if (!scaling || ropeType === "default") return inv;
  if (ropeType !== "llama3") throw new Error(`reference model: unsupported rope type ${ropeType}`);
  const factor = scaling.factor!;
  const low = scaling.low_freq_factor!;
  const high = scaling.high_freq_factor!;
  const oldContext = scaling.original_max_position_embeddings!;
  const lowFreqWavelen = oldContext / low;
  const highFreqWavelen = oldContext / high;
  return inv.map((freq) => {
    const wavelen = (2 * Math.PI) / freq;
    if (wavelen < highFreqWavelen) return freq;
    if (wavelen > lowFreqWavelen) return freq / factor;
    const smooth = (oldContext / wavelen - low) / (high - low);
    return (1 - smooth) * (freq / factor) + smooth * freq;
  });
}

/** Rotary embedding in the rotate_half layout: dimension i pairs with i + headDim / 2. */
function applyRope(x: Float64Array, rows: number, heads: number, headDim: number, inv: Float64Array): void {
  const half = headDim / 2;
  for (let pos = 0; pos < rows; pos++) {
    for (let h = 0; h < heads; h++) {
      const base = (pos * heads + h) * headDim;
      for (let i = 0; i < half; i++) {
        const angle = pos * inv[i]!;
        const cos = Math.cos(angle);
        const sin = Math.sin(angle);
        const a = x[base + i]!;
        const b = x[base + half + i]!;
        x[base + i] = a * cos - b * sin;
        x[base + half + i] = b * cos + a * sin;
      }
    }
  }
}

export class LlamaF64 {
  private readonly weights = new Map<string, Float64Array>();
  private readonly numHeads: number;
  private readonly numKvHeads: number;
  private readonly headDim: number;
  private readonly inv: Float64Array;
  private readonly round: (values: Float64Array) => Float64Array;

  private constructor(
    private readonly config: Config,
    checkpoint: Checkpoint,
    options: LlamaF64Options,
  ) {
    this.round = options.round ?? ((values) => values);
    this.numHeads = config.num_attention_heads;
    this.numKvHeads = config.num_key_value_heads ?? config.num_attention_heads;
    this.headDim = config.head_dim ?? config.hidden_size / config.num_attention_heads;
    this.inv = inverseFrequencies(config, this.headDim);
    for (const name of checkpoint.tensors.keys()) {
      const tensor = checkpoint.read(name);
      this.weights.set(name, tensor.shape.length === 2 ? this.round(tensor.data) : tensor.data);
    }
  }

  static load(modelDir: string, options: LlamaF64Options = {}): LlamaF64 {
    const config = JSON.parse(readFileSync(join(modelDir, "config.json"), "utf8")) as Config;
    return new LlamaF64(config, Checkpoint.open(modelDir), options);
  }

  private weight(name: string): Float64Array {
    const weight = this.weights.get(name);
    if (!weight) throw new Error(`reference model: missing tensor ${name}`);
    return weight;
  }

  private project(x: Float64Array, rows: number, prefix: string): Float64Array {
    return linear(x, rows, this.weight(`${prefix}.weight`), this.weights.get(`${prefix}.bias`));
  }

  /** Logits [tokens.length, vocab] for a whole prompt (causal attention over positions 0..n-1). */
  forward(tokens: readonly number[]): Float64Array {
    const { hidden_size: hidden, vocab_size: vocab, rms_norm_eps: eps } = this.config;
    const rows = tokens.length;
    const embedding = this.weight("model.embed_tokens.weight");
    let x = new Float64Array(rows * hidden);
    tokens.forEach((token, r) => x.set(embedding.subarray(token * hidden, (token + 1) * hidden), r * hidden));

    for (let layer = 0; layer < this.config.num_hidden_layers; layer++) {
      const p = `model.layers.${layer}`;
      const normed = this.round(rmsNorm(x, this.weight(`${p}.input_layernorm.weight`), eps));
      const attention = this.attention(normed, rows, `${p}.self_attn`);
      x = x.map((value, i) => value + attention[i]!);
      const normed2 = this.round(rmsNorm(x, this.weight(`${p}.post_attention_layernorm.weight`), eps));
      const gate = this.project(normed2, rows, `${p}.mlp.gate_proj`);
      const up = this.project(normed2, rows, `${p}.mlp.up_proj`);
      const activated = this.round(gate.map((g, i) => (g / (1 + Math.exp(-g))) * up[i]!));
      const down = this.project(activated, rows, `${p}.mlp.down_proj`);
      x = x.map((value, i) => value + down[i]!);
    }

    const final = this.round(rmsNorm(x, this.weight("model.norm.weight"), eps));
    // PretrainedConfig defaults tie_word_embeddings to true, and save_pretrained omits default values.
    const tied = this.config.tie_word_embeddings ?? true;
    const head = this.weight(tied ? "model.embed_tokens.weight" : "lm_head.weight");
    const logits = linear(final, rows, head, undefined);
    if (logits.length !== rows * vocab)
      throw new Error("reference model: lm_head shape does not match vocab_size");
    return logits;
  }

  private attention(x: Float64Array, rows: number, prefix: string): Float64Array {
    const { numHeads, numKvHeads, headDim } = this;
    let q = this.project(x, rows, `${prefix}.q_proj`);
    let k = this.project(x, rows, `${prefix}.k_proj`);
    const v = this.round(this.project(x, rows, `${prefix}.v_proj`));
    // Qwen3: RMSNorm over each head's q and k before the rotation.
    const qNorm = this.weights.get(`${prefix}.q_norm.weight`);
    const kNorm = this.weights.get(`${prefix}.k_norm.weight`);
    if (qNorm) q = rmsNorm(q, qNorm, this.config.rms_norm_eps);
    if (kNorm) k = rmsNorm(k, kNorm, this.config.rms_norm_eps);
    applyRope(q, rows, numHeads, headDim, this.inv);
    applyRope(k, rows, numKvHeads, headDim, this.inv);
    k = this.round(k);

    const groupSize = numHeads / numKvHeads;
    const window = this.config.sliding_window ?? 0;
    const scale = 1 / Math.sqrt(headDim);
    const out = new Float64Array(rows * numHeads * headDim);
    const scores = new Float64Array(rows);
    for (let h = 0; h < numHeads; h++) {
      const kvHead = Math.floor(h / groupSize);
      for (let i = 0; i < rows; i++) {
        const first = window > 0 ? Math.max(0, i - window + 1) : 0;
        const qBase = (i * numHeads + h) * headDim;
        let max = -Infinity;
        for (let j = first; j <= i; j++) {
          const kBase = (j * numKvHeads + kvHead) * headDim;
          let dot = 0;
          for (let d = 0; d < headDim; d++) dot += q[qBase + d]! * k[kBase + d]!;
          scores[j] = dot * scale;
          max = Math.max(max, scores[j]!);
        }
        let total = 0;
        for (let j = first; j <= i; j++) {
          scores[j] = Math.exp(scores[j]! - max);
          total += scores[j]!;
        }
        for (let j = first; j <= i; j++) {
          const weight = scores[j]! / total;
          const vBase = (j * numKvHeads + kvHead) * headDim;
          for (let d = 0; d < headDim; d++) out[qBase + d] = out[qBase + d]! + weight * v[vBase + d]!;
        }
      }
    }
    return this.project(this.round(out), rows, `${prefix}.o_proj`);
  }
}
