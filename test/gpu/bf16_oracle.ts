// The ideal bf16 engine: a float64 forward pass (the math of test/reference/llama_f64.ts) that rounds to
// bf16 at exactly the points where the CUDA backend stores bf16: weight matrices and the embedding table,
// every RMSNorm output, K and V as they enter the cache (K after RoPE), the attention output and the
// SiLU-gated product. Norm weights, biases, q, the residual stream and every reduction stay exact.
//
// Against a float32 checkpoint's transformers logits this oracle already differs by about 1e-2 (the
// format's own error). The CUDA backend must land close to the oracle, not merely within 1e-2 of
// transformers: that separates kernel bugs from bf16 rounding.
import { readFileSync } from "node:fs";
import { join } from "node:path";

import { Checkpoint } from "../../lib/safetensors.js";

interface RopeParameters {
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
  rope_scaling?: RopeParameters | null;
  rope_parameters?: RopeParameters | null;
  tie_word_embeddings?: boolean;
  sliding_window?: number | null;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** Round to the nearest bf16 (ties to even) through float32, as a float32 value rounded on the GPU. */
export function toBf16(value: number): number {
  f32[0] = value;
  const bits = u32[0]!;
  if ((bits & 0x7fffffff) > 0x7f800000) return Number.NaN;
  u32[0] = (bits + 0x7fff + ((bits >>> 16) & 1)) & 0xffff0000;
  return f32[0]!;
}

function roundAll(values: Float64Array): Float64Array {
  return values.map(toBf16);
}

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
      let sum = 0;
      for (let i = 0; i < inFeatures; i++) sum += x[r * inFeatures + i]! * weight[o * inFeatures + i]!;
      y[r * outFeatures + o] = bias ? sum + bias[o]! : sum;
    }
  }
  return y;
}

function rmsNorm(x: Float64Array, weight: Float64Array, eps: number): Float64Array {
  const width = weight.length;
  const y = new Float64Array(x.length);
  for (let start = 0; start < x.length; start += width) {
    let squares = 0;
    for (let i = 0; i < width; i++) squares += x[start + i]! ** 2;
    const scale = 1 / Math.sqrt(squares / width + eps);
    for (let i = 0; i < width; i++) y[start + i] = weight[i]! * (x[start + i]! * scale);
  }
  return y;
}

function inverseFrequencies(config: Config, headDim: number): Float64Array {
  const scaling = config.rope_parameters ?? config.rope_scaling;
  const theta = scaling?.rope_theta ?? config.rope_theta ?? 10000;
  const inv = Float64Array.from({ length: headDim / 2 }, (_, i) => 1 / theta ** ((2 * i) / headDim));
  const ropeType = scaling?.rope_type ?? scaling?.type ?? "default";
  if (!scaling || ropeType === "default") return inv;
  if (ropeType !== "llama3") throw new Error(`bf16 oracle: unsupported rope type ${ropeType}`);
  const { factor, low_freq_factor: low, high_freq_factor: high } = scaling as Required<RopeParameters>;
  const oldContext = scaling.original_max_position_embeddings!;
  return inv.map((freq) => {
    const wavelen = (2 * Math.PI) / freq;
    if (wavelen < oldContext / high) return freq;
    if (wavelen > oldContext / low) return freq / factor;
    const smooth = (oldContext / wavelen - low) / (high - low);
    return (1 - smooth) * (freq / factor) + smooth * freq;
  });
}

function applyRope(x: Float64Array, rows: number, heads: number, headDim: number, inv: Float64Array): void {
  const half = headDim / 2;
  for (let pos = 0; pos < rows; pos++) {
    for (let h = 0; h < heads; h++) {
      const base = (pos * heads + h) * headDim;
      for (let i = 0; i < half; i++) {
        const angle = pos * inv[i]!;
        const a = x[base + i]!;
        const b = x[base + half + i]!;
        x[base + i] = a * Math.cos(angle) - b * Math.sin(angle);
        x[base + half + i] = b * Math.cos(angle) + a * Math.sin(angle);
      }
    }
  }
}

export class Bf16Oracle {
  private readonly weights = new Map<string, Float64Array>();
  private readonly numHeads: number;
  private readonly numKvHeads: number;
  private readonly headDim: number;
  private readonly inv: Float64Array;

  private constructor(
    private readonly config: Config,
    checkpoint: Checkpoint,
  ) {
    this.numHeads = config.num_attention_heads;
    this.numKvHeads = config.num_key_value_heads ?? config.num_attention_heads;
    this.headDim = config.head_dim ?? config.hidden_size / config.num_attention_heads;
    this.inv = inverseFrequencies(config, this.headDim);
    for (const name of checkpoint.tensors.keys()) {
      const tensor = checkpoint.read(name);
      // Matrices (2-D) live on the GPU as bf16; norm weights and biases (1-D) as float32.
      this.weights.set(name, tensor.shape.length === 2 ? roundAll(tensor.data) : tensor.data);
    }
  }

  static load(modelDir: string): Bf16Oracle {
    const config = JSON.parse(readFileSync(join(modelDir, "config.json"), "utf8")) as Config;
    return new Bf16Oracle(config, Checkpoint.open(modelDir));
  }

  private weight(name: string): Float64Array {
    const weight = this.weights.get(name);
    if (!weight) throw new Error(`bf16 oracle: missing tensor ${name}`);
    return weight;
  }

  private project(x: Float64Array, rows: number, prefix: string): Float64Array {
    return linear(x, rows, this.weight(`${prefix}.weight`), this.weights.get(`${prefix}.bias`));
  }

  /** Logits [tokens.length, vocab] of a sequence from position 0 (causal). */
  forward(tokens: readonly number[]): Float64Array {
    const { hidden_size: hidden, rms_norm_eps: eps } = this.config;
    const rows = tokens.length;
    const embedding = this.weight("model.embed_tokens.weight");
    let x = new Float64Array(rows * hidden);
    tokens.forEach((token, r) => x.set(embedding.subarray(token * hidden, (token + 1) * hidden), r * hidden));
    for (let layer = 0; layer < this.config.num_hidden_layers; layer++) {
      const p = `model.layers.${layer}`;
      const normed = roundAll(rmsNorm(x, this.weight(`${p}.input_layernorm.weight`), eps));
      const attention = this.attention(normed, rows, `${p}.self_attn`);
      x = x.map((value, i) => value + attention[i]!);
      const normed2 = roundAll(rmsNorm(x, this.weight(`${p}.post_attention_layernorm.weight`), eps));
      const gate = this.project(normed2, rows, `${p}.mlp.gate_proj`);
      const up = this.project(normed2, rows, `${p}.mlp.up_proj`);
      const activated = gate.map((g, i) => toBf16((g / (1 + Math.exp(-g))) * up[i]!));
      const down = this.project(activated, rows, `${p}.mlp.down_proj`);
      x = x.map((value, i) => value + down[i]!);
    }
    const final = roundAll(rmsNorm(x, this.weight("model.norm.weight"), eps));
    const tied = this.config.tie_word_embeddings ?? true;
    return linear(final, rows, this.weight(tied ? "model.embed_tokens.weight" : "lm_head.weight"), undefined);
  }

  private attention(x: Float64Array, rows: number, prefix: string): Float64Array {
    const { numHeads, numKvHeads, headDim } = this;
    let q = this.project(x, rows, `${prefix}.q_proj`);
    let k = this.project(x, rows, `${prefix}.k_proj`);
    const qNorm = this.weights.get(`${prefix}.q_norm.weight`);
    const kNorm = this.weights.get(`${prefix}.k_norm.weight`);
    if (qNorm) q = rmsNorm(q, qNorm, this.config.rms_norm_eps);
    if (kNorm) k = rmsNorm(k, kNorm, this.config.rms_norm_eps);
    applyRope(q, rows, numHeads, headDim, this.inv);
    applyRope(k, rows, numKvHeads, headDim, this.inv);
    k = roundAll(k);
    const v = roundAll(this.project(x, rows, `${prefix}.v_proj`));

    const group = numHeads / numKvHeads;
    const window = this.config.sliding_window ?? 0;
    const scale = 1 / Math.sqrt(headDim);
    const out = new Float64Array(rows * numHeads * headDim);
    const scores = new Float64Array(rows);
    for (let h = 0; h < numHeads; h++) {
      const kvHead = Math.floor(h / group);
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
          const vBase = (j * numKvHeads + kvHead) * headDim;
          for (let d = 0; d < headDim; d++)
            out[qBase + d] = out[qBase + d]! + (scores[j]! / total) * v[vBase + d]!;
        }
      }
    }
    return this.project(roundAll(out), rows, `${prefix}.o_proj`);
  }
}
