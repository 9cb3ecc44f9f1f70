#!/usr/bin/env python3
"""Tiny random-weight checkpoints of every architecture the runtime supports, with transformers' answers.

Run where PyTorch and transformers are installed (CPU is enough):

    python3 tools/make_fixtures.py --out-dir test/fixtures

For every fixture it writes <out-dir>/<name>/ with the save_pretrained checkpoint plus
  reference.json  {name, architecture, dtype, prompts, logits_file, vocab_size, greedy}
  logits.bin      little-endian float32 [sum(len(prompt)), vocab]: transformers' float32 logits at every
                  prompt position, prompts concatenated in order.
"greedy" holds transformers' greedy continuation of each prompt (new tokens only). Checkpoints stored in
bf16/fp16 are reloaded from disk and upcast to float32 before anything is computed, so the reference is
what an fp32 engine computes from exactly the stored weights.

The random weights are scaled so that logits are far from uniform, and prompts are drawn (from a fixed
seed) until every greedy step has a clear winner: a near-tie would make "greedy continuation identical" a
coin flip between two correct implementations.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

SEED = 20250
VOCAB_SIZE = 512
PROMPT_LENGTHS = (5, 17, 40)
NEW_TOKENS = 16
MAX_PROMPT_DRAWS = 200
# Greedy steps must win by this fraction of the top logit; the brief's floor is 1e-3, the extra room
# keeps fp32 summation-order differences between engines far from flipping an argmax.
MIN_RELATIVE_MARGIN = 2e-3
MIN_MEDIAN_MAX_PROB = 0.05

EMBEDDING_STD = 0.3
MATRIX_STD = 0.15
BIAS_STD = 0.2
NORM_JITTER_STD = 0.1

COMMON_SHAPE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=MATRIX_STD,
)


@dataclass
class Fixture:
    name: str
    config_class: str
    dtype: torch.dtype
    overrides: dict = field(default_factory=dict)
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    max_shard_size: str | None = None


FIXTURES = [
    Fixture("llama-gqa-f32", "LlamaConfig", torch.float32, {"tie_word_embeddings": False}),
    Fixture(
        "llama31-rope-f32",
        "LlamaConfig",
        torch.float32,
        {"tie_word_embeddings": False, "head_dim": 32},
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    Fixture("llama32-tied-bf16", "LlamaConfig", torch.bfloat16, {"tie_word_embeddings": True}),
    Fixture("mistral-f16", "MistralConfig", torch.float16, {"tie_word_embeddings": False, "sliding_window": None}),
    Fixture("qwen2-bias-f32", "Qwen2Config", torch.float32, {"tie_word_embeddings": False}),
    Fixture("qwen3-qknorm-f32", "Qwen3Config", torch.float32, {"tie_word_embeddings": False, "head_dim": 32}),
    Fixture(
        "llama-sharded-f32",
        "LlamaConfig",
        torch.float32,
        {"tie_word_embeddings": False},
        max_shard_size="200KB",
    ),
]

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def accepts_rope_parameters(config_class: type) -> bool:
    """transformers 5 folds rope_theta and rope_scaling into one rope_parameters dict."""
    fields = getattr(config_class, "__dataclass_fields__", {})
    return "rope_parameters" in fields or "rope_parameters" in inspect.signature(config_class.__init__).parameters


def build_config(fixture: Fixture) -> transformers.PretrainedConfig:
    config_class = getattr(transformers, fixture.config_class)
    kwargs = {**COMMON_SHAPE, **fixture.overrides}
    if fixture.rope_theta is not None or fixture.rope_scaling is not None:
        theta = fixture.rope_theta if fixture.rope_theta is not None else 10000.0
        if accepts_rope_parameters(config_class):
            rope = {"rope_type": "default", **(fixture.rope_scaling or {}), "rope_theta": theta}
            kwargs["rope_parameters"] = rope
        else:
            kwargs["rope_theta"] = theta
            kwargs["rope_scaling"] = fixture.rope_scaling
    return config_class(**kwargs)


def randomize_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter from one seeded generator, at scales that give peaked logits.

    transformers initializes biases to zero and norm weights to one, which would leave the Qwen2 bias path
    and every norm weight untested; here each gets random values.
    """
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                value = 1.0 + NORM_JITTER_STD * noise
            elif name.endswith(".bias"):
                value = BIAS_STD * noise
            elif "embed_tokens" in name or "lm_head" in name:
                value = EMBEDDING_STD * noise
            else:
                value = MATRIX_STD * noise
            parameter.copy_(value.to(parameter.dtype))


def check_llama3_rope_is_active(model: torch.nn.Module, fixture: Fixture) -> None:
    """The llama3 rule must leave high frequencies alone and scale low ones; fail if the config lost it."""
    head_dim = model.config.head_dim
    theta = fixture.rope_theta
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    actual = model.model.rotary_emb.inv_freq.to(torch.float64)
    ratio = actual / plain
    unchanged = torch.isclose(ratio, torch.ones_like(ratio), rtol=1e-5)
    divided = torch.isclose(ratio, torch.full_like(ratio, 1.0 / fixture.rope_scaling["factor"]), rtol=1e-5)
    smoothed = ~(unchanged | divided)
    if not (unchanged.any() and divided.any() and smoothed.any()):
        raise AssertionError(
            f"{fixture.name}: rope scaling should leave some frequencies unchanged, divide some by the factor "
            f"and smooth some in between; inv_freq/plain = {ratio.tolist()}"
        )


def logits_of(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], dtype=torch.long)).logits[0].to(torch.float32)


def relative_margin(row: torch.Tensor) -> float:
    top2 = torch.topk(row, 2).values
    return float((top2[0] - top2[1]) / top2[0].abs().clamp_min(1e-6))


def greedy_with_margins(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], float]:
    """transformers' greedy continuation: argmax of the model's float32 logits, one token at a time.

    A plain loop rather than generate(): generate stops at eos_token_id, which random weights hit by
    chance, and the fixtures want exactly NEW_TOKENS tokens.
    """
    sequence = list(prompt)
    worst_margin = float("inf")
    for _ in range(NEW_TOKENS):
        last_row = logits_of(model, sequence)[-1]
        worst_margin = min(worst_margin, relative_margin(last_row))
        sequence.append(int(torch.argmax(last_row)))
    return sequence[len(prompt) :], worst_margin


def choose_prompts(model: torch.nn.Module, rng: np.random.Generator) -> tuple[list[list[int]], list[list[int]]]:
    prompts: list[list[int]] = []
    continuations: list[list[int]] = []
    for length in PROMPT_LENGTHS:
        for _ in range(MAX_PROMPT_DRAWS):
            prompt = [int(x) for x in rng.integers(0, VOCAB_SIZE, size=length)]
            greedy, margin = greedy_with_margins(model, prompt)
            if margin > MIN_RELATIVE_MARGIN:
                prompts.append(prompt)
                continuations.append(greedy)
                break
        else:
            raise AssertionError(
                f"no prompt of length {length} in {MAX_PROMPT_DRAWS} draws has a greedy continuation whose "
                f"top-1/top-2 relative margin exceeds {MIN_RELATIVE_MARGIN}: scale the weights up"
            )
    return prompts, continuations


def shard_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def make_fixture(fixture: Fixture, index: int, out_dir: Path) -> dict:
    torch.manual_seed(SEED + index)
    config = build_config(fixture)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_weights(model, torch.Generator().manual_seed(SEED + index))
    model = model.to(fixture.dtype)

    target = out_dir / fixture.name
    if target.exists():
        shutil.rmtree(target)
    save_kwargs = {"max_shard_size": fixture.max_shard_size} if fixture.max_shard_size else {}
    model.save_pretrained(target, **save_kwargs)

    # Everything below reads the checkpoint back from disk: the reference is computed from the exact
    # stored (possibly rounded) weights, upcast to float32.
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32, attn_implementation="eager")
    reloaded.eval()
    if fixture.rope_scaling is not None:
        check_llama3_rope_is_active(reloaded, fixture)

    files = shard_files(target)
    if fixture.max_shard_size:
        if len(files) < 2 or not (target / "model.safetensors.index.json").exists():
            raise AssertionError(f"{fixture.name}: expected >= 2 shards and an index, got {files}")
    elif files != ["model.safetensors"]:
        raise AssertionError(f"{fixture.name}: expected one model.safetensors, got {files}")

    rng = np.random.default_rng(SEED + index)
    prompts, greedy = choose_prompts(reloaded, rng)

    rows = [logits_of(reloaded, prompt) for prompt in prompts]
    all_logits = torch.cat(rows, dim=0)
    max_probs = torch.softmax(all_logits.to(torch.float64), dim=-1).max(dim=-1).values
    median_max_prob = float(max_probs.median())
    if median_max_prob <= MIN_MEDIAN_MAX_PROB:
        raise AssertionError(f"{fixture.name}: median max softmax prob {median_max_prob:.4f} is near-uniform")
    if not torch.isfinite(all_logits).all():
        raise AssertionError(f"{fixture.name}: non-finite logits")

    logits_path = target / "logits.bin"
    all_logits.numpy().astype("<f4").tofile(logits_path)

    reference = {
        "name": fixture.name,
        "architecture": reloaded.config.architectures[0],
        "dtype": DTYPE_NAMES[fixture.dtype],
        "prompts": prompts,
        "logits_file": "logits.bin",
        "vocab_size": VOCAB_SIZE,
        "greedy": greedy,
    }
    (target / "reference.json").write_text(json.dumps(reference) + "\n")

    size = sum(p.stat().st_size for p in target.iterdir())
    config_json = json.loads((target / "config.json").read_text())
    print(
        f"{fixture.name}: {reference['architecture']} {reference['dtype']} files={files} "
        f"bytes={size} median_max_prob={median_max_prob:.3f} rows={all_logits.shape[0]}"
    )
    print(f"  config.json: {json.dumps(config_json, sort_keys=True)}")
    return {"name": fixture.name, "bytes": size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("test/fixtures"))
    parser.add_argument("--only", nargs="*", help="fixture names to build (default: all)")
    args = parser.parse_args()

    torch.set_num_threads(max(1, min(8, torch.get_num_threads())))
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")

    known = {f.name for f in FIXTURES}
    unknown = set(args.only or []) - known
    if unknown:
        parser.error(f"unknown fixture(s) {sorted(unknown)}; known: {sorted(known)}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for index, fixture in enumerate(FIXTURES):
        if args.only and fixture.name not in args.only:
            continue
        total += make_fixture(fixture, index, args.out_dir)["bytes"]
    print(f"total bytes: {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
