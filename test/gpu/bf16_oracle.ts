// The ideal bf16 engine: the float64 forward pass of test/reference/llama_f64.ts, rounding to bf16 at
// exactly the points where the CUDA backend stores bf16 (weight matrices and the embedding table, every
// RMSNorm output, K and V as they enter the cache (K after RoPE), the attention output and the SiLU-gated
// product). Norm weights, biases, q, the residual stream and every reduction stay exact.
//
// Against a float32 checkpoint's transformers logits this oracle already differs by about 1e-2 (the
// format's own error). The CUDA backend must land close to the oracle, not merely within 1e-2 of
// transformers: that separates kernel bugs from bf16 rounding.
import { LlamaF64 } from "../reference/llama_f64.js";

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

export function loadBf16Oracle(modelDir: string): LlamaF64 {
  return LlamaF64.load(modelDir, { round: (values) => values.map(toBf16) });
}
