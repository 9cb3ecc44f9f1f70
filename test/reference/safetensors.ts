// A small, strict safetensors reader (single file or sharded with model.safetensors.index.json). It is
// independent of the native loader on purpose: the float64 reference model reads weights through it.
//
// Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}
// (plus optional __metadata__), then the raw little-endian tensor data; offsets are relative to the data.
import { closeSync, existsSync, fstatSync, openSync, readFileSync, readSync } from "node:fs";
import { join } from "node:path";

export type SafetensorsDtype = "F64" | "F32" | "F16" | "BF16";

const DTYPE_BYTES: Record<SafetensorsDtype, number> = { F64: 8, F32: 4, F16: 2, BF16: 2 };

export interface TensorInfo {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /** Absolute byte offset of the tensor's data in its file. */
  byteOffset: number;
  byteLength: number;
  file: string;
}

export interface Tensor {
  shape: number[];
  data: Float64Array;
}

function isDtype(value: unknown): value is SafetensorsDtype {
  return typeof value === "string" && Object.hasOwn(DTYPE_BYTES, value);
}

function isNonNegativeInteger(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}

/** Reads and validates the header of one .safetensors file. */
export function readSafetensorsHeader(file: string): Map<string, TensorInfo> {
  const fd = openSync(file, "r");
  try {
    const fileSize = fstatSync(fd).size;
    if (fileSize < 8) throw new Error(`${file}: too short for a safetensors header (${fileSize} bytes)`);
    const lengthBytes = Buffer.alloc(8);
    readSync(fd, lengthBytes, 0, 8, 0);
    const headerLength = lengthBytes.readBigUInt64LE(0);
    if (headerLength > BigInt(fileSize - 8)) {
      throw new Error(`${file}: header length ${headerLength} exceeds the file size ${fileSize}`);
    }
    const headerBytes = Buffer.alloc(Number(headerLength));
    readSync(fd, headerBytes, 0, headerBytes.length, 8);
    let header: unknown;
    try {
      header = JSON.parse(headerBytes.toString("utf8"));
    } catch (error) {
      throw new Error(`${file}: header is not valid JSON (${(error as Error).message})`);
    }
    if (typeof header !== "object" || header === null || Array.isArray(header)) {
      throw new Error(`${file}: header is not a JSON object`);
    }
    const dataStart = 8 + headerBytes.length;
    const dataSize = fileSize - dataStart;
    const tensors = new Map<string, TensorInfo>();
    for (const [name, entry] of Object.entries(header as Record<string, unknown>)) {
      if (name === "__metadata__") continue;
      const { dtype, shape, data_offsets: offsets } = (entry ?? {}) as Record<string, unknown>;
      if (!isDtype(dtype)) throw new Error(`${file}: tensor ${name} has unsupported dtype ${String(dtype)}`);
      if (!Array.isArray(shape) || !shape.every(isNonNegativeInteger)) {
        throw new Error(`${file}: tensor ${name} has an invalid shape`);
      }
      if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegativeInteger)) {
        throw new Error(`${file}: tensor ${name} has invalid data_offsets`);
      }
      const [begin, end] = offsets as [number, number];
      if (begin > end || end > dataSize) {
        throw new Error(
          `${file}: tensor ${name} data_offsets [${begin}, ${end}] are outside the data (${dataSize} bytes)`,
        );
      }
      const expected = shape.reduce((product: number, dim: number) => product * dim, 1) * DTYPE_BYTES[dtype];
      if (end - begin !== expected) {
        throw new Error(
          `${file}: tensor ${name} holds ${end - begin} bytes, its shape and dtype need ${expected}`,
        );
      }
      tensors.set(name, { name, dtype, shape, byteOffset: dataStart + begin, byteLength: end - begin, file });
    }
    return tensors;
  } finally {
    closeSync(fd);
  }
}

function halfToNumber(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

function decode(bytes: Buffer, dtype: SafetensorsDtype): Float64Array {
  const count = bytes.length / DTYPE_BYTES[dtype];
  switch (dtype) {
    case "F64":
      return Float64Array.from({ length: count }, (_, i) => bytes.readDoubleLE(i * 8));
    case "F32":
      return Float64Array.from({ length: count }, (_, i) => bytes.readFloatLE(i * 4));
    case "F16":
      return Float64Array.from({ length: count }, (_, i) => halfToNumber(bytes.readUInt16LE(i * 2)));
    case "BF16": {
      // bf16 is the upper half of a float32.
      const widened = new Uint32Array(count);
      for (let i = 0; i < count; i++) widened[i] = bytes.readUInt16LE(i * 2) << 16;
      return Float64Array.from(new Float32Array(widened.buffer));
    }
  }
}

/** All tensors of a Hugging Face model folder, single-file or sharded. */
export class Checkpoint {
  private constructor(readonly tensors: Map<string, TensorInfo>) {}

  static open(modelDir: string): Checkpoint {
    const single = join(modelDir, "model.safetensors");
    const index = join(modelDir, "model.safetensors.index.json");
    if (existsSync(single)) return new Checkpoint(readSafetensorsHeader(single));
    if (!existsSync(index)) throw new Error(`${modelDir}: neither model.safetensors nor ${index} exists`);
    const weightMap = (JSON.parse(readFileSync(index, "utf8")) as { weight_map?: Record<string, string> })
      .weight_map;
    if (!weightMap) throw new Error(`${index}: missing weight_map`);
    const tensors = new Map<string, TensorInfo>();
    for (const shard of new Set(Object.values(weightMap))) {
      for (const [name, info] of readSafetensorsHeader(join(modelDir, shard))) tensors.set(name, info);
    }
    for (const [name, shard] of Object.entries(weightMap)) {
      if (tensors.get(name)?.file !== join(modelDir, shard)) {
        throw new Error(`${index}: tensor ${name} is not in ${shard}`);
      }
    }
    return new Checkpoint(tensors);
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /** Reads a tensor, widened to float64. */
  read(name: string): Tensor {
    const info = this.tensors.get(name);
    if (!info) throw new Error(`missing tensor ${name}`);
    const bytes = Buffer.alloc(info.byteLength);
    const fd = openSync(info.file, "r");
    try {
      readSync(fd, bytes, 0, info.byteLength, info.byteOffset);
    } finally {
      closeSync(fd);
    }
    return { shape: info.shape, data: decode(bytes, info.dtype) };
  }
}
