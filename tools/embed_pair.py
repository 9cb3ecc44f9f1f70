#!/usr/bin/env python3
"""Embed a small trained Llama checkpoint exactly into the tensor shapes of a real Llama by zero padding.

The big checkpoint has the shapes (so the memory traffic and kernel shapes) of Llama-3.2-1B, Llama-3.1-8B
or Llama-3.1-70B and computes the small model's function: a draft/target pair built this way has the real
cost of the big pair and the real, trained acceptance rate of the small one. The method is
docs/real-shape-pair.md; in short, with small dims (h, nq/nkv heads, head dim d, i, V) and big dims
(H, NQ/NKV, D, I, V'):

- residual stream: the small model's h dims are the first h of H (optionally repeated, see
  --residual-copies); every weight that writes the others is zero, so they stay exactly zero;
- RMSNorm: eps' = eps * h/H and w' = w * sqrt(h/H) give the small model's normalization (exact when H/h is
  a power of 4; otherwise r copies of the residual stream with H/(r h) a power of 4 make it exact:
  --residual-copies, automatic by default, e.g. 2 for 256 -> 8192);
- attention: small KV head g -> big KV head g, its query heads -> the first query heads of big group g;
  rotary pair j -> pair j*D/d (same frequency); q weights x sqrt(D/d) for the 1/sqrt(D) softmax scale
  (exact when D/d is a power of 4);
- MLP zero padded; extra layers all zero (pure residual); extra vocabulary ids get zero embedding and
  lm_head rows, so their logit is exactly 0 (--mask-padded-ids makes it a large negative one instead, so
  that sampling cannot draw them: see PaddedIdMask).

Usage (numpy only; no torch):

    python3 tools/embed_pair.py --source models/draft --shape llama-3.2-1b --out /tmp/pearl-real-pair/draft-llama-3.2-1b
    python3 tools/embed_pair.py --source models/target --shape llama-3.1-8b --out /tmp/pearl-real-pair/target-llama-3.1-8b
    python3 tools/embed_pair.py --source models/target --shape llama-3.1-70b --out /tmp/pearl-real-pair/target-llama-3.1-70b
    python3 tools/embed_pair.py --source models/target --shape custom --hidden 1024 --layers 8 --heads 8 \
        --kv-heads 4 --head-dim 128 --intermediate 1024 --vocab 8192 --out /tmp/target-custom

Output: config.json, bf16 safetensors (one file, or ~5 GB shards plus model.safetensors.index.json),
the tokenizer and generation config copied from the source, and embedding.json (what was done, what is
exact and what rounds). Tensors are written one at a time in row chunks, so a 70B output (140 GB) never
needs more than a chunk of one tensor in memory. All-zero chunks are left as file holes (sparse files,
--dense writes every byte), so an output takes little more disk than its source until it is copied.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

# Hugging Face's default max_shard_size "5GB" is 5 * 10**9 bytes.
DEFAULT_SHARD_BYTES = 5 * 10**9
# Rows written per piece of a tensor: bounds memory to this much beyond the small source.
CHUNK_BYTES = 64 * 2**20
# Granularity of hole detection in sparse output: a piece of this size that is all zero is skipped.
HOLE_BYTES = 2**20
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
OUTPUT_JSON_FILES = ("model.safetensors.index.json", "config.json", "embedding.json")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool


# Hugging Face configs of the real models. Their rope (llama3 scaling, theta 500000) is deliberately not
# part of the shape: the big model keeps the small model's rope so that it computes the same function.
REAL_SHAPES: dict[str, LlamaShape] = {
    "llama-3.2-1b": LlamaShape(2048, 16, 32, 8, 64, 8192, 128256, tied=True),
    "llama-3.1-8b": LlamaShape(4096, 32, 32, 8, 128, 14336, 128256, tied=False),
    "llama-3.1-70b": LlamaShape(8192, 80, 64, 8, 128, 28672, 128256, tied=False),
}


class ShapeError(ValueError):
    """The requested big shape cannot hold the small model exactly (or the source is not a plain Llama)."""


# ---------------------------------------------------------------------------------------------------------
# bf16 <-> float, bit level. bf16 is the top half of a float32; numpy has no bf16 dtype, so it is uint16.


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even (what torch's .to(torch.bfloat16) does); NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding_bias = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    rounded = ((bits.astype(np.uint64) + rounding_bias) >> np.uint64(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def float64_to_bf16(values: np.ndarray) -> np.ndarray:
    """Correctly rounded (nearest, ties to even) from float64, without double rounding through float32.

    Rounding to float32 first can only change the bf16 result when it lands exactly on a bf16 midpoint
    (low 16 bits 0x8000) from a value that was not on it; the residual's sign then says which way to go.
    """
    values = np.asarray(values, dtype=np.float64)
    as_float32 = values.astype(np.float32)
    result = float32_to_bf16(as_float32)
    low_bits = as_float32.view(np.uint32) & np.uint32(0xFFFF)
    residual = values - as_float32.astype(np.float64)
    false_tie = (low_bits == 0x8000) & (residual != 0)
    if false_tie.any():
        truncated = (as_float32.view(np.uint32)[false_tie] >> np.uint32(16)).astype(np.uint16)
        # Away from zero when the true value is further from zero than the midpoint, else toward it.
        away = (residual[false_tie] > 0) == (values[false_tie] > 0)
        result[false_tie] = truncated + away.astype(np.uint16)
    return result


# ---------------------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header, then the raw tensor bytes.

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}


@dataclass
class SourceTensor:
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # raw elements as stored: uint16 for BF16/F16, float32 for F32 (memory-mapped)


def read_safetensors_file(path: Path) -> dict[str, SourceTensor]:
    with path.open("rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_length))
    data_start = 8 + header_length
    tensors: dict[str, SourceTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry["dtype"]
        if dtype not in DTYPE_BYTES:
            raise ShapeError(f"{path}: tensor {name} has dtype {dtype}; only BF16, F16 and F32 sources are read")
        begin, end = entry["data_offsets"]
        shape = tuple(int(n) for n in entry["shape"])
        element = np.float32 if dtype == "F32" else np.uint16
        count = (end - begin) // DTYPE_BYTES[dtype]
        if count != math.prod(shape):
            raise ShapeError(f"{path}: tensor {name} spans {end - begin} bytes for shape {list(shape)}")
        data = np.memmap(path, dtype=element, mode="r", offset=data_start + begin, shape=(count,))
        tensors[name] = SourceTensor(dtype, shape, data.reshape(shape))
    return tensors


def read_checkpoint(model_dir: Path) -> tuple[dict[str, SourceTensor], list[Path]]:
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = [model_dir / "model.safetensors"]
        if not files[0].exists():
            raise ShapeError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        tensors.update(read_safetensors_file(path))
    return tensors, files


def source_as_bf16(tensor: SourceTensor) -> tuple[np.ndarray, int]:
    """The tensor as bf16 bits, and how many of its values changed on the way (0 for a bf16 source)."""
    if tensor.dtype == "BF16":
        return np.asarray(tensor.data), 0
    wide = tensor.data.astype(np.float32) if tensor.dtype == "F32" else tensor.data.view(np.float16).astype(np.float32)
    bits = float32_to_bf16(wide)
    return bits, int(np.count_nonzero(bf16_to_float32(bits) != wide))


# ---------------------------------------------------------------------------------------------------------
# The plan: where every small weight goes in the big tensors.


@dataclass
class Block:
    """`values` (bf16 bits) land at big rows `rows` x big columns `cols`, one index per row/column of values."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray


@dataclass
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    blocks: list[Block] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return 2 * math.prod(self.shape)


@dataclass
class Finding:
    """One line of the report: a part of the method, whether it is exact, and the figures."""

    what: str
    exact: bool
    detail: str


class RoundingTally:
    """Counts how many bf16 weights a scale moved off the exact product, and by how much."""

    def __init__(self) -> None:
        self.values = 0
        self.rounded = 0
        self.max_relative_error = 0.0

    def scale(self, bits: np.ndarray, factor: float) -> np.ndarray:
        exact = bf16_to_float32(bits).astype(np.float64) * factor
        result = float64_to_bf16(exact)
        stored = bf16_to_float32(result).astype(np.float64)
        self.values += int(bits.size)
        self.rounded += int(np.count_nonzero(stored != exact))
        nonzero = exact != 0
        if nonzero.any():
            relative = np.abs(stored[nonzero] - exact[nonzero]) / np.abs(exact[nonzero])
            self.max_relative_error = max(self.max_relative_error, float(relative.max()))
        return result

    def describe(self, what: str) -> str:
        if self.rounded == 0:
            return f"0 of {self.values} {what} rounded"
        return (
            f"{self.rounded} of {self.values} {what} rounded to bf16, max relative error "
            f"{self.max_relative_error:.2e} (bf16 unit roundoff 2^-8 = {2**-8:.2e})"
        )


@dataclass(frozen=True)
class PaddedIdMask:
    """--mask-padded-ids: a constant residual dim that gives padded ids a large negative logit.

    Residual dim `dim` (the first one no small dim uses) holds `constant` for every token (its embedding
    column) and no layer writes it. Every RMSNorm then sums constant^2 more, which eps' absorbs exactly in
    real arithmetic: (r S + constant^2)/H + eps' = r (S/h + eps) h/H with eps' = (eps r h - constant^2)/H.
    Only the final norm has a weight there (`norm_weight`), so the final normalized value at `dim` is
    n = constant * norm_weight * sqrt(H/(r h)) / rms, rms = sqrt(S/h + eps) of the small model's final
    residual, and padded ids (lm_head, or tied embedding, rows of -`logit_weight` there) get the logit
    -strength / rms with strength = logit_weight * constant * norm_weight * sqrt(H/(r h)). Untied, real
    ids read 0 there: their logits are unchanged. Tied, the embedding's real rows hold `constant` there
    (that is where the constant comes from), so every real logit of a position shifts by the same
    constant * n = strength * constant / (logit_weight * rms): neither argmax nor the softmax over real
    ids changes."""

    dim: int
    constant: float
    norm_weight: float
    logit_weight: float
    strength: float


# What --mask-padded-ids aims at: padded logits of -MASK_STRENGTH / rms(final residual), so -655 or lower
# while that rms is below 100. Powers of two keep every weight exact in bf16.
MASK_STRENGTH = 2.0**16
MASK_LOGIT_WEIGHT = 2.0**16


def padded_id_mask(small: LlamaShape, big: LlamaShape, copies: int, eps: float) -> PaddedIdMask:
    dim = copies * small.hidden
    if dim >= big.hidden:
        raise ShapeError(
            f"--mask-padded-ids needs a residual dim beyond the small model's: hidden {big.hidden} is all taken "
            f"by {copies} x {small.hidden}"
        )
    # The largest power of two whose square is at most half of eps r h, so that eps' stays >= eps r h/(2H).
    budget = eps * copies * small.hidden / 2
    constant = 2.0 ** math.floor(math.log2(math.sqrt(budget)))
    growth = math.sqrt(big.hidden / (copies * small.hidden))
    norm_weight = 2.0 ** round(math.log2(MASK_STRENGTH / (MASK_LOGIT_WEIGHT * constant * growth)))
    strength = MASK_LOGIT_WEIGHT * constant * norm_weight * growth
    return PaddedIdMask(dim, constant, norm_weight, MASK_LOGIT_WEIGHT, strength)


@dataclass
class Plan:
    small: LlamaShape
    big: LlamaShape
    copies: int
    eps: float
    eps_big: float
    norm_scale: float
    q_scale: float
    tensors: list[OutputTensor]
    findings: list[Finding]
    mask: PaddedIdMask | None = None


def is_power_of(base: int, value: float) -> bool:
    if value < 1 or value != int(value):
        return False
    n = int(value)
    while n % base == 0:
        n //= base
    return n == 1


def shape_of_config(config: dict) -> LlamaShape:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return LlamaShape(
        hidden=hidden,
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def format_shape(shape: LlamaShape) -> str:
    return (
        f"(hidden {shape.hidden}, {shape.layers} layers, {shape.heads}/{shape.kv_heads} heads, head_dim "
        f"{shape.head_dim}, intermediate {shape.intermediate}, vocab {shape.vocab}"
        f"{', tied' if shape.tied else ''})"
    )


def rope_of_config(config: dict) -> tuple[str, float]:
    """(rope type, theta) from transformers 5's rope_parameters or 4.x's rope_theta and rope_scaling."""
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    theta = float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))
    return rope_type, theta


def check_source(config: dict, source: Path) -> None:
    """Only what the method covers: a plain Llama (no biases, silu MLP, default or llama3 rope)."""
    if config.get("model_type") != "llama":
        raise ShapeError(f"{source}: model_type is {config.get('model_type')!r}; only llama checkpoints are embedded")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ShapeError(f"{source}: {flag} is set; biases are not embedded")
    if config.get("hidden_act", "silu") != "silu":
        raise ShapeError(f"{source}: hidden_act is {config.get('hidden_act')!r}; the method needs silu(0) * 0 = 0")
    if int(config.get("pretraining_tp", 1)) != 1:
        raise ShapeError(f"{source}: pretraining_tp != 1 is not supported")
    rope_type, _ = rope_of_config(config)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ShapeError(
            f"{source}: rope type {rope_type!r}; only {' and '.join(SUPPORTED_ROPE_TYPES)} are known to keep a "
            "pair's frequency when the head dim grows"
        )


def check_shapes(small: LlamaShape, big: LlamaShape, copies: int) -> None:
    def refuse(reason: str) -> None:
        raise ShapeError(f"cannot embed {format_shape(small)} into {format_shape(big)}: {reason}")

    if copies < 1:
        refuse("--residual-copies must be at least 1")
    if big.hidden < small.hidden * copies:
        what = f"{copies} copies of " if copies > 1 else ""
        refuse(f"hidden {big.hidden} < {what}the small hidden {small.hidden}")
    if big.layers < small.layers:
        refuse(f"{big.layers} layers < the small model's {small.layers}")
    if big.intermediate < small.intermediate:
        refuse(f"intermediate {big.intermediate} < the small model's {small.intermediate}")
    if big.vocab < small.vocab:
        refuse(f"vocab {big.vocab} < the small model's {small.vocab}")
    if big.head_dim % small.head_dim:
        refuse(
            f"head_dim {big.head_dim} is not a multiple of the small head_dim {small.head_dim}: rotary pair j "
            "must land on the big pair of the same frequency, j * D/d"
        )
    if big.heads % big.kv_heads:
        refuse(f"{big.heads} query heads are not a multiple of {big.kv_heads} KV heads")
    if big.kv_heads < small.kv_heads:
        refuse(f"{big.kv_heads} KV heads < the small model's {small.kv_heads}: each small KV head needs its own")
    small_group, big_group = small.heads // small.kv_heads, big.heads // big.kv_heads
    if big_group < small_group:
        refuse(
            f"{big_group} query heads per KV head < the small model's {small_group}: all query heads of a small "
            "group must read one big KV head"
        )


def auto_residual_copies(small_hidden: int, big_hidden: int) -> int:
    """The fewest copies r of the residual stream that make H / (r h) a power of 4, else 1.

    RMSNorm over r identical copies of the h small dims, zero padded to H, sees sum/H = (sum_small/h) (r h/H).
    When r h/H is 1/4^k, eps' = eps r h/H and w' = w sqrt(r h/H) are scalings by powers of two: exact in
    float32 and bf16. 256 -> 8192 (ratio 32) takes two copies (ratio 16); 1 for a power-of-4 ratio (the
    plain method: 128 -> 2048 and 256 -> 4096 are 16).
    """
    for copies in range(1, big_hidden // small_hidden + 1):
        if big_hidden % (copies * small_hidden) == 0 and is_power_of(4, big_hidden // (copies * small_hidden)):
            return copies
    return 1


def head_dim_map(small_head_dim: int, big_head_dim: int) -> np.ndarray:
    """Small dim e of a head -> big dim. rotate_half pairs dim j with j + d/2 (pair j, frequency index j), so
    pair j goes to pair j D/d: (j, j + d/2) -> (j D/d, j D/d + D/2)."""
    stride = big_head_dim // small_head_dim
    small_half, big_half = small_head_dim // 2, big_head_dim // 2
    e = np.arange(small_head_dim)
    return (e // small_half) * big_half + (e % small_half) * stride


def query_head_map(small: LlamaShape, big: LlamaShape) -> np.ndarray:
    """Small query head -> big query head: member m of small group g -> member m of big group g, so it reads
    big KV head g, which holds small KV head g."""
    small_group, big_group = small.heads // small.kv_heads, big.heads // big.kv_heads
    head = np.arange(small.heads)
    return (head // small_group) * big_group + head % small_group


def head_rows(heads: np.ndarray, small_head_dim: int, big_head_dim: int) -> np.ndarray:
    """Big index of every small q/k/v/o dim (head-major, as the small tensor lays them out)."""
    dims = head_dim_map(small_head_dim, big_head_dim)
    return (heads[:, None] * big_head_dim + dims[None, :]).reshape(-1)


def rope_frequencies_match(small_head_dim: int, big_head_dim: int) -> bool:
    """pearl (native/src/ops/rope.cpp, used by both backends) and transformers compute
    inv_freq_j = 1 / theta^(float32(2j) / float32(head_dim)). Big pair j D/d has exponent
    float32(2j D/d) / float32(D): the correctly rounded quotient of the same rational as the small pair's,
    so the same float32, the same frequency, and (llama3 rescaling is a function of the frequency alone)
    the same scaled frequency. Checked here on the actual float32 values."""
    stride = big_head_dim // small_head_dim
    j = np.arange(small_head_dim // 2)
    small_exponent = (2 * j).astype(np.float32) / np.float32(small_head_dim)
    big_exponent = (2 * j * stride).astype(np.float32) / np.float32(big_head_dim)
    return bool(np.array_equal(small_exponent, big_exponent))


def layer_shapes(big: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    H, q_width, kv_width = big.hidden, big.heads * big.head_dim, big.kv_heads * big.head_dim
    return [
        ("input_layernorm.weight", (H,)),
        ("self_attn.q_proj.weight", (q_width, H)),
        ("self_attn.k_proj.weight", (kv_width, H)),
        ("self_attn.v_proj.weight", (kv_width, H)),
        ("self_attn.o_proj.weight", (H, q_width)),
        ("post_attention_layernorm.weight", (H,)),
        ("mlp.gate_proj.weight", (big.intermediate, H)),
        ("mlp.up_proj.weight", (big.intermediate, H)),
        ("mlp.down_proj.weight", (H, big.intermediate)),
    ]


def make_plan(
    config: dict,
    tensors: dict[str, SourceTensor],
    big: LlamaShape,
    copies: int | None,
    source: Path,
    mask_padded_ids: bool = False,
) -> Plan:
    """Where every small weight goes. Source tensors are converted (and scaled) here, once; the big
    tensors exist only as placements until they are written."""
    check_source(config, source)
    small = shape_of_config(config)
    copies = auto_residual_copies(small.hidden, big.hidden) if copies is None else copies
    check_shapes(small, big, copies)

    changed_by_conversion = 0

    def source_bits(name: str) -> np.ndarray:
        nonlocal changed_by_conversion
        if name not in tensors:
            raise ShapeError(f"{source}: tensor {name} is missing")
        bits, changed = source_as_bf16(tensors[name])
        changed_by_conversion += changed
        return bits

    embed = source_bits("model.embed_tokens.weight")
    lm_head = embed if small.tied else source_bits("lm_head.weight")
    if big.tied and not small.tied and not np.array_equal(lm_head, embed):
        raise ShapeError(
            f"cannot embed {format_shape(small)} into {format_shape(big)}: the big shape ties lm_head to the "
            "embedding and the source's lm_head is a different matrix"
        )

    h, H = small.hidden, big.hidden
    ratio = copies * h / H
    eps = float(config["rms_norm_eps"])
    eps_big = eps * ratio
    mask = padded_id_mask(small, big, copies, eps) if mask_padded_ids and big.vocab > small.vocab else None
    if mask is not None:
        eps_big = (eps * copies * h - mask.constant**2) / H
    norm_scale = math.sqrt(ratio)
    q_scale = math.sqrt(big.head_dim / small.head_dim)
    norm_tally, q_tally = RoundingTally(), RoundingTally()

    # Readers (q, k, v, gate, up, lm_head) take copy 0 of the residual; writers (embedding, o_proj,
    # down_proj) write every copy with the same weights, so the copies stay bit-identical.
    read_cols = np.arange(h)
    write_rows = [np.arange(h) + k * h for k in range(copies)]
    q_rows = head_rows(query_head_map(small, big), small.head_dim, big.head_dim)
    kv_rows = head_rows(np.arange(small.kv_heads), small.head_dim, big.head_dim)
    mlp_rows = np.arange(small.intermediate)
    vocab_rows = np.arange(small.vocab)
    one_row = np.zeros(1, dtype=np.int64)

    def norm(name: str) -> OutputTensor:
        weight = norm_tally.scale(source_bits(name), norm_scale)[None, :]
        return OutputTensor(name, (H,), [Block(one_row, cols, weight) for cols in write_rows])

    def read(name: str, shape: tuple[int, int], rows: np.ndarray, values: np.ndarray) -> OutputTensor:
        return OutputTensor(name, shape, [Block(rows, read_cols, values)])

    def write(name: str, shape: tuple[int, int], cols: np.ndarray) -> OutputTensor:
        values = source_bits(name)
        return OutputTensor(name, shape, [Block(rows, cols, values) for rows in write_rows])

    q_width, kv_width = big.heads * big.head_dim, big.kv_heads * big.head_dim
    padded_rows = np.arange(small.vocab, big.vocab)
    # Rows of padded vocabulary ids stay zero: never produced by the tokenizer, and logit 0 when tied.
    embedding = OutputTensor(
        "model.embed_tokens.weight", (big.vocab, H), [Block(vocab_rows, cols, embed) for cols in write_rows]
    )
    final_norm = norm("model.norm.weight")
    head = None if big.tied else read("lm_head.weight", (big.vocab, H), vocab_rows, lm_head)
    if mask is not None:
        mask_col = np.array([mask.dim])

        def column(rows: np.ndarray, value: float) -> Block:
            return Block(rows, mask_col, np.full((rows.size, 1), float64_to_bf16(np.array(value)), dtype="<u2"))

        # Tied, the padded rows of the embedding are the padded rows of lm_head; a padded id is then never
        # fed (it has no probability to be drawn), so its own residual does not matter.
        embedding.blocks.append(column(vocab_rows if big.tied else np.arange(big.vocab), mask.constant))
        logits_from = embedding if head is None else head
        logits_from.blocks.append(column(padded_rows, -mask.logit_weight))
        final_norm.blocks.append(column(one_row, mask.norm_weight))
    out = [embedding]
    for layer in range(big.layers):
        p = f"model.layers.{layer}."
        if layer >= small.layers:
            # An extra layer is all zero: its norms output 0, so q, k, v, the attention output, o_proj, gate,
            # up and down_proj are all exactly 0 and the layer adds nothing. Zero is also the one value that
            # cannot make an inf or NaN anywhere downstream.
            out.extend(OutputTensor(p + suffix, shape) for suffix, shape in layer_shapes(big))
            continue
        attn, mlp = p + "self_attn.", p + "mlp."
        scaled_q = q_tally.scale(source_bits(attn + "q_proj.weight"), q_scale)
        out += [
            norm(p + "input_layernorm.weight"),
            read(attn + "q_proj.weight", (q_width, H), q_rows, scaled_q),
            read(attn + "k_proj.weight", (kv_width, H), kv_rows, source_bits(attn + "k_proj.weight")),
            read(attn + "v_proj.weight", (kv_width, H), kv_rows, source_bits(attn + "v_proj.weight")),
            write(attn + "o_proj.weight", (H, q_width), q_rows),
            norm(p + "post_attention_layernorm.weight"),
            read(mlp + "gate_proj.weight", (big.intermediate, H), mlp_rows, source_bits(mlp + "gate_proj.weight")),
            read(mlp + "up_proj.weight", (big.intermediate, H), mlp_rows, source_bits(mlp + "up_proj.weight")),
            write(mlp + "down_proj.weight", (H, big.intermediate), mlp_rows),
        ]
    out.append(final_norm)
    if head is not None:
        out.append(head)

    plan = Plan(small, big, copies, eps, eps_big, norm_scale, q_scale, out, [], mask)
    plan.findings = describe_plan(plan, config, norm_tally, q_tally, changed_by_conversion)
    return plan


def describe_plan(
    plan: Plan, config: dict, norm_tally: RoundingTally, q_tally: RoundingTally, changed_by_conversion: int
) -> list[Finding]:
    small, big, copies = plan.small, plan.big, plan.copies
    h, H = small.hidden, big.hidden
    findings: list[Finding] = []
    if changed_by_conversion:
        findings.append(Finding("source dtype", False, f"{changed_by_conversion} source weights rounded to bf16"))

    placed = f"dims 0..{h - 1}" if copies == 1 else f"{copies} identical copies at dims 0..{copies * h - 1}"
    findings.append(
        Finding("residual stream", True, f"hidden {h} -> {H}: {placed}; all other dims are written by zero weights")
    )
    ratio_text = f"{copies} x {h}/{H}" if copies > 1 else f"{h}/{H}"
    power_of_4 = H % (copies * h) == 0 and is_power_of(4, H // (copies * h))
    mask = plan.mask
    if mask is None:
        eps_text = f"eps {plan.eps:g} -> {plan.eps_big:g} (x {ratio_text})"
    else:
        eps_text = (
            f"eps {plan.eps:g} -> {plan.eps_big:.9g} (eps x {ratio_text} - {mask.constant:g}^2/{H}: absorbs the "
            "mask dim, exact in real arithmetic, not a power-of-two scaling: rounds once to float32)"
        )
    norm_exact = norm_tally.rounded == 0 and power_of_4 and mask is None
    findings.append(
        Finding(
            "rmsnorm",
            norm_exact,
            f"{eps_text}, weights x sqrt({ratio_text}) = {plan.norm_scale:.6g}: "
            + norm_tally.describe("norm weights")
            + ("" if power_of_4 else "; H/(copies h) is not a power of 4, so the rescale is not a power of two"),
        )
    )
    findings.append(
        Finding(
            "attention scale",
            q_tally.rounded == 0,
            f"head_dim {small.head_dim} -> {big.head_dim}: 1/sqrt({big.head_dim}) softmax scale, q weights x "
            f"sqrt({big.head_dim}/{small.head_dim}) = {plan.q_scale:.6g}: " + q_tally.describe("q weights"),
        )
    )
    rope_type, theta = rope_of_config(config)
    stride = big.head_dim // small.head_dim
    rope_ok = rope_frequencies_match(small.head_dim, big.head_dim)
    findings.append(
        Finding(
            "rope",
            rope_ok,
            f"type {rope_type}, theta {theta:g} kept; rotary pair j -> pair {stride}j, "
            + ("float32 frequencies identical" if rope_ok else "float32 frequencies DIFFER"),
        )
    )
    small_group, big_group = small.heads // small.kv_heads, big.heads // big.kv_heads
    findings.append(
        Finding(
            "attention heads",
            True,
            f"{small.heads}/{small.kv_heads} -> {big.heads}/{big.kv_heads}: small KV head g -> big KV head g "
            f"({big.kv_heads - small.kv_heads} KV heads zero), small group of {small_group} -> first {small_group} "
            f"of big group of {big_group} ({big.heads - small.heads} query heads zero, o_proj columns zero)",
        )
    )
    findings.append(
        Finding("mlp", True, f"intermediate {small.intermediate} -> {big.intermediate}, zero padded (silu(0) * 0 = 0)")
    )
    extra_layers = big.layers - small.layers
    findings.append(
        Finding(
            "layers",
            True,
            f"{small.layers} -> {big.layers}"
            + (f": layers {small.layers}..{big.layers - 1} all zero, pure residual" if extra_layers else ""),
        )
    )
    if big.tied or small.tied:
        tie = "tied" if big.tied else "untied: lm_head copied from the tied embedding"
        findings.append(Finding("embeddings", True, tie))
    padded = big.vocab - small.vocab
    if padded == 0:
        vocabulary = f"{small.vocab}, no padding"
    elif mask is None:
        vocabulary = (
            f"{small.vocab} -> {big.vocab}: {padded} padded ids with zero embedding and lm_head rows get logit "
            "exactly 0; greedy is unchanged while the best real logit is > 0, sampling puts mass on them "
            "(docs/real-shape-pair.md; --mask-padded-ids avoids it)"
        )
    else:
        row_shift = mask.strength * mask.constant / mask.logit_weight
        shift = (
            f"; tied, so every real logit of a position shifts by the same {row_shift:g} / rms (argmax and "
            "softmax over real ids unchanged)"
            if big.tied
            else "; real logits unchanged"
        )
        vocabulary = (
            f"{small.vocab} -> {big.vocab}: {padded} padded ids masked through constant residual dim {mask.dim} "
            f"(value {mask.constant:g}, final norm weight {mask.norm_weight:g}, padded rows -{mask.logit_weight:g}): "
            f"their logit is -{mask.strength:g} / rms(final residual of the small model){shift}"
        )
    findings.append(Finding("vocabulary", padded == 0, vocabulary))
    return findings


# ---------------------------------------------------------------------------------------------------------
# Writing: shards of at most max_shard_bytes (a bigger tensor gets a shard of its own), one tensor at a
# time, each in row chunks.


def assign_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def safetensors_header(tensors: list[OutputTensor]) -> bytes:
    """The 8-byte little-endian length and the JSON header, offsets in the order the tensors are written."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        end = offset + tensor.nbytes
        header[tensor.name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    # Padded with spaces to a multiple of 8, as the safetensors library does, so tensor data is 8-aligned.
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def tensor_chunks(tensor: OutputTensor) -> Iterator[np.ndarray]:
    """The big tensor as bf16 bits, a few rows at a time: zeros with the small blocks scattered in."""
    rows, cols = (1, tensor.shape[0]) if len(tensor.shape) == 1 else tensor.shape
    rows_per_chunk = max(1, CHUNK_BYTES // (2 * cols))
    for first in range(0, rows, rows_per_chunk):
        last = min(rows, first + rows_per_chunk)
        chunk = np.zeros((last - first, cols), dtype="<u2")
        for block in tensor.blocks:
            inside = (block.rows >= first) & (block.rows < last)
            if inside.any():
                chunk[np.ix_(block.rows[inside] - first, block.cols)] = block.values[inside]
        yield chunk


def write_bits(file: BinaryIO, chunk: np.ndarray, sparse: bool) -> None:
    flat = chunk.reshape(-1)
    step = HOLE_BYTES // 2
    for start in range(0, flat.size, step):
        piece = flat[start : start + step]
        if sparse and not piece.any():
            file.seek(piece.nbytes, 1)  # a hole: reads back as zeros, takes no disk
        else:
            file.write(memoryview(piece).cast("B"))


def write_safetensors(path: Path, tensors: list[OutputTensor], sparse: bool) -> None:
    with path.open("wb") as file:
        file.write(safetensors_header(tensors))
        for tensor in tensors:
            for chunk in tensor_chunks(tensor):
                write_bits(file, chunk, sparse)
        file.truncate(file.tell())  # a trailing hole still needs the file to reach its full length


def write_checkpoint(out_dir: Path, tensors: list[OutputTensor], max_shard_bytes: int, sparse: bool) -> list[str]:
    shards = assign_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0], sparse)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        print(f"  writing {name} ({sum(t.nbytes for t in shard) / 1e9:.2f} GB)", flush=True)
        write_safetensors(out_dir / name, shard, sparse)
        weight_map.update({tensor.name: name for tensor in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def big_config(config: dict, plan: Plan, max_positions: int | None) -> dict:
    big = plan.big
    result = dict(config)
    result.update(
        {
            "hidden_size": big.hidden,
            "num_hidden_layers": big.layers,
            "num_attention_heads": big.heads,
            "num_key_value_heads": big.kv_heads,
            "head_dim": big.head_dim,
            "intermediate_size": big.intermediate,
            "vocab_size": big.vocab,
            "tie_word_embeddings": big.tied,
            "rms_norm_eps": plan.eps_big,
        }
    )
    result["dtype"] = "bfloat16"
    if "torch_dtype" in result:
        result["torch_dtype"] = "bfloat16"
    if max_positions is not None:
        result["max_position_embeddings"] = max_positions
    return result


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for piece in iter(lambda: file.read(2**22), b""):
            digest.update(piece)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Command line.


def residual_copies_arg(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}")
    return int(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Embed a small Llama checkpoint exactly into a real Llama's tensor shapes by zero padding.",
        epilog="See docs/real-shape-pair.md for the method and what is exact.",
    )
    parser.add_argument("--source", type=Path, required=True, help="small Hugging Face Llama folder")
    parser.add_argument("--shape", required=True, choices=[*REAL_SHAPES, "custom"])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; must be empty unless --force)")
    custom = parser.add_argument_group("custom shape (--shape custom)")
    for flag, field_name in (
        ("hidden", "hidden_size"),
        ("layers", "num_hidden_layers"),
        ("heads", "num_attention_heads"),
        ("kv-heads", "num_key_value_heads"),
        ("head-dim", "head_dim"),
        ("intermediate", "intermediate_size"),
        ("vocab", "vocab_size"),
    ):
        custom.add_argument(f"--{flag}", type=int, metavar="N", help=field_name)
    custom.add_argument("--tied", action="store_true", help="tie lm_head to the embedding")
    parser.add_argument(
        "--residual-copies",
        type=residual_copies_arg,
        default=None,
        metavar="auto|N",
        help="copies of the small residual stream in the big one (default auto: the fewest that make the norm "
        "rescale exact, 1 when H/h is a power of 4 or none does; 1 is the plain method)",
    )
    parser.add_argument(
        "--mask-padded-ids",
        action="store_true",
        help="give padded vocabulary ids a large negative logit instead of 0 (one constant residual dim; see "
        "docs/real-shape-pair.md), so that sampling cannot draw them",
    )
    parser.add_argument("--max-position-embeddings", type=int, help="default: the source's (its training context)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_BYTES, help="bytes per shard (default 5e9)")
    parser.add_argument("--dense", action="store_true", help="write every zero byte instead of leaving file holes")
    parser.add_argument("--force", action="store_true", help="replace the checkpoint files of an existing --out")
    parser.add_argument("--dry-run", action="store_true", help="check the shape and print the report; write nothing")
    return parser.parse_args(argv)


def requested_shape(args: argparse.Namespace) -> LlamaShape:
    if args.shape != "custom":
        return REAL_SHAPES[args.shape]
    fields = {
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
    }
    missing = [f"--{name.replace('_', '-')}" for name, value in fields.items() if value is None]
    if missing:
        raise ShapeError(f"--shape custom needs {', '.join(missing)}")
    bad = [f"--{name.replace('_', '-')} {value}" for name, value in fields.items() if value <= 0]
    if bad:
        raise ShapeError(f"shape values must be positive: {', '.join(bad)}")
    return LlamaShape(**fields, tied=args.tied)


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise ShapeError(f"{out_dir} exists and is not empty (--force replaces its checkpoint files)")
        for path in out_dir.iterdir():
            if path.suffix == ".safetensors" or path.name in OUTPUT_JSON_FILES:
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        big = requested_shape(args)
        config = json.loads((args.source / "config.json").read_text())
        tensors, source_files = read_checkpoint(args.source)
        plan = make_plan(config, tensors, big, args.residual_copies, args.source, args.mask_padded_ids)
    except (ShapeError, ValueError, FileNotFoundError) as error:
        print(f"embed_pair: error: {error}", file=sys.stderr)
        return 2

    print(f"embed {args.source} {format_shape(plan.small)}")
    print(f"  into {args.shape} {format_shape(plan.big)}")
    for finding in plan.findings:
        label = "exact " if finding.exact else "DIFFERS" if finding.what == "vocabulary" else "ROUNDS"
        print(f"  {label} {finding.what}: {finding.detail}")
    print(
        "  (exact: the same function in real arithmetic, with every big bf16 weight a small weight times a power "
        "of two or zero; float sums over the interleaved zeros may still round in a different order)"
    )
    total_bytes = sum(t.nbytes for t in plan.tensors)
    print(f"  {len(plan.tensors)} tensors, {total_bytes / 1e9:.3f} GB bf16")
    if args.dry_run:
        return 0

    try:
        prepare_out_dir(args.out, args.force)
    except ShapeError as error:
        print(f"embed_pair: error: {error}", file=sys.stderr)
        return 2
    files = write_checkpoint(args.out, plan.tensors, args.shard_size, sparse=not args.dense)
    big_config_json = big_config(config, plan, args.max_position_embeddings)
    (args.out / "config.json").write_text(json.dumps(big_config_json, indent=2) + "\n")
    for name in COPIED_FILES:
        if (args.source / name).exists():
            shutil.copyfile(args.source / name, args.out / name)
    record = {
        "tool": "tools/embed_pair.py",
        "source": str(args.source),
        "source_files": [{"file": path.name, "sha256": sha256_of(path)} for path in source_files],
        "shape": args.shape,
        "small": asdict(plan.small),
        "big": asdict(plan.big),
        "residual_copies": plan.copies,
        "rms_norm_eps": {"small": plan.eps, "big": plan.eps_big},
        "norm_weight_scale": plan.norm_scale,
        "q_scale": plan.q_scale,
        "padded_vocab_ids": [plan.small.vocab, plan.big.vocab],
        "padded_id_mask": asdict(plan.mask) if plan.mask else None,
        "findings": [asdict(finding) for finding in plan.findings],
        "files": files,
    }
    # Written last: its presence marks a complete output (test/gpu/real_shape_pair.test.ts relies on it).
    (args.out / "embedding.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
