// Model folders for the PEARL tests, made from the tiny random fixtures (test/fixtures, vocab 512).
// Two unrelated random models almost never agree, which would leave the acceptance path untested; a
// draft made by adding noise to the target's own weights agrees with it often but not always.
import {
  copyFileSync,
  existsSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), "..", "fixtures");

export function fixtureDir(name: string): string {
  return join(FIXTURES, name);
}

const temporaryDirs: string[] = [];

/** Removes every folder made by this module (call from an after() hook). */
export function removeMadeModels(): void {
  for (const dir of temporaryDirs.splice(0)) rmSync(dir, { recursive: true, force: true });
}

function makeDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), `pearl-${prefix}-`));
  temporaryDirs.push(dir);
  return dir;
}

/** xorshift-based standard normals: the same noise on every run. */
function normals(seed: number): () => number {
  let state = seed >>> 0 || 1;
  const uniform = (): number => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return (state + 0.5) / 4294967296;
  };
  return () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
}

/**
 * A copy of an fp32 single-file fixture whose every weight w becomes w + scale * std(tensor) * N(0, 1).
 * The safetensors header is kept as it is; only tensor bytes change.
 */
export function perturbedModel(source: string, scale: number, seed: number): string {
  const dir = makeDir("perturbed");
  for (const file of readdirSync(source)) {
    if (file.endsWith(".json") && file !== "reference.json")
      copyFileSync(join(source, file), join(dir, file));
  }
  const bytes = readFileSync(join(source, "model.safetensors"));
  const headerLength = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString("utf8")) as Record<
    string,
    { dtype: string; data_offsets: [number, number] }
  >;
  const dataStart = 8 + headerLength;
  const noise = normals(seed);
  for (const [name, tensor] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    if (tensor.dtype !== "F32")
      throw new Error(`${source}: ${name} is ${tensor.dtype}; only F32 fixtures can be perturbed`);
    const [begin, end] = tensor.data_offsets;
    const count = (end - begin) / 4;
    let sum = 0;
    let sumSquares = 0;
    for (let i = 0; i < count; i++) {
      const value = bytes.readFloatLE(dataStart + begin + 4 * i);
      sum += value;
      sumSquares += value * value;
    }
    const mean = sum / count;
    const std = Math.sqrt(Math.max(0, sumSquares / count - mean * mean));
    // Norm weights are near-constant (std ~ 0): they keep their values.
    if (std < 1e-6) continue;
    for (let i = 0; i < count; i++) {
      const at = dataStart + begin + 4 * i;
      bytes.writeFloatLE(bytes.readFloatLE(at) + scale * std * noise(), at);
    }
  }
  writeFileSync(join(dir, "model.safetensors"), bytes);
  return dir;
}

/**
 * A copy of a fixture with config.json fields replaced (the weights are copied unchanged); special-token
 * fields change in generation_config.json too, where a loader may read them.
 */
export function modelWithConfig(source: string, changes: Record<string, unknown>): string {
  const dir = makeDir("config");
  for (const file of readdirSync(source)) {
    if (file === "reference.json" || file === "logits.bin") continue;
    copyFileSync(join(source, file), join(dir, file));
  }
  const patch = (file: string, keys: string[]): void => {
    const path = join(dir, file);
    if (!existsSync(path)) return;
    const json = JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
    for (const key of keys) if (key in changes) json[key] = changes[key];
    writeFileSync(path, JSON.stringify(json, null, 2));
  };
  patch("config.json", Object.keys(changes));
  patch("generation_config.json", ["eos_token_id", "bos_token_id"]);
  return dir;
}

export interface ModelSize {
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKeyValueHeads: number;
}

/**
 * A Llama model of the given size with random weights and the vocabulary and special tokens of a fixture
 * (its config.json otherwise): a draft the gateway accepts for that fixture, as slow as its size makes it.
 */
export function randomLlama(like: string, size: ModelSize, seed: number): string {
  const dir = makeDir("random");
  const config = JSON.parse(readFileSync(join(like, "config.json"), "utf8")) as Record<string, unknown>;
  const headDim = size.hiddenSize / size.numHeads;
  Object.assign(config, {
    hidden_size: size.hiddenSize,
    intermediate_size: size.intermediateSize,
    num_hidden_layers: size.numLayers,
    num_attention_heads: size.numHeads,
    num_key_value_heads: size.numKeyValueHeads,
    head_dim: headDim,
    tie_word_embeddings: false,
  });
  writeFileSync(join(dir, "config.json"), JSON.stringify(config, null, 2));
  if (existsSync(join(like, "generation_config.json")))
    copyFileSync(join(like, "generation_config.json"), join(dir, "generation_config.json"));

  const vocab = config.vocab_size as number;
  const hidden = size.hiddenSize;
  const kv = size.numKeyValueHeads * headDim;
  const shapes: [string, number[]][] = [
    ["model.embed_tokens.weight", [vocab, hidden]],
    ["lm_head.weight", [vocab, hidden]],
    ["model.norm.weight", [hidden]],
  ];
  for (let layer = 0; layer < size.numLayers; layer++) {
    const prefix = `model.layers.${layer}.`;
    shapes.push(
      [`${prefix}input_layernorm.weight`, [hidden]],
      [`${prefix}post_attention_layernorm.weight`, [hidden]],
      [`${prefix}self_attn.q_proj.weight`, [hidden, hidden]],
      [`${prefix}self_attn.k_proj.weight`, [kv, hidden]],
      [`${prefix}self_attn.v_proj.weight`, [kv, hidden]],
      [`${prefix}self_attn.o_proj.weight`, [hidden, hidden]],
      [`${prefix}mlp.gate_proj.weight`, [size.intermediateSize, hidden]],
      [`${prefix}mlp.up_proj.weight`, [size.intermediateSize, hidden]],
      [`${prefix}mlp.down_proj.weight`, [hidden, size.intermediateSize]],
    );
  }
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  let offset = 0;
  for (const [name, shape] of shapes) {
    const bytes = 4 * shape.reduce((product, dimension) => product * dimension, 1);
    header[name] = { dtype: "F32", shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  // The tensors start 8-byte aligned: the header is padded with spaces, as safetensors writers do.
  let headerText = JSON.stringify(header);
  headerText += " ".repeat((8 - (headerText.length % 8)) % 8);
  const file = Buffer.alloc(8 + headerText.length + offset);
  file.writeBigUInt64LE(BigInt(headerText.length), 0);
  file.write(headerText, 8, "ascii");
  const weights = new Float32Array(file.buffer, file.byteOffset + 8 + headerText.length, offset / 4);
  const noise = normals(seed);
  for (const [name, shape] of shapes) {
    const [begin, end] = (header[name] as { data_offsets: [number, number] }).data_offsets;
    const fanIn = shape[shape.length - 1]!;
    const isNorm = shape.length === 1;
    for (let i = begin / 4; i < end / 4; i++) weights[i] = isNorm ? 1 : noise() / Math.sqrt(fanIn);
  }
  writeFileSync(join(dir, "model.safetensors"), file);
  return dir;
}
