#!/usr/bin/env python3
"""Random-weight checkpoints with the real shapes of Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-7B and Llama-3.1-70B,
plus the Hugging Face transformers eager baseline on the same weights and the card's measured memory bandwidth.

Run on the CUDA machine (PyTorch + transformers, no network; no weights are downloaded):

    python3 tools/make_shapes.py --out-dir /tmp/shapes --shapes llama-3.2-1b,llama-3.1-8b \
        --baseline-json $OUT/hf_baseline.json

Each shape becomes <out-dir>/<shape>/ (config.json + bf16 safetensors written by save_pretrained, sharded at
5 GB) so that benchmarks go through pearl's real loader. Weights are N(0, 0.02) like transformers' own
initializer: the numbers are meaningless, the bytes moved per step are what a real checkpoint moves.

A shape whose weights exceed half the GPU's memory (70B: 141 GB) is written tensor by tensor from a model built
on the meta device, without a baseline (it does not fit one GPU); it needs that much free disk.

The baseline times transformers' eager generate() (batch 1, greedy, a fixed number of new tokens forced
with min_new_tokens) with the model still on the GPU, so no second load is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

LLAMA3_ROPE_1B = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA3_ROPE_8B = dict(LLAMA3_ROPE_1B, factor=8.0)

SHAPES = {
    "llama-3.2-1b": lambda: LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=LLAMA3_ROPE_1B,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.1-8b": lambda: LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=LLAMA3_ROPE_8B,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.1-70b": lambda: LlamaConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=LLAMA3_ROPE_8B,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "qwen2.5-7b": lambda: Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
}


def log(message: str) -> None:
    print(f"[make_shapes] {message}", flush=True)


def measure_bandwidth(device: torch.device) -> dict:
    """Read bandwidth (sum over 8 GiB of bf16) and copy bandwidth (bytes read + written), median of 10."""
    source = torch.randn(4 << 30, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    nbytes = source.numel() * source.element_size()

    def timed(body) -> float:
        for _ in range(3):
            body()
        times = []
        for _ in range(10):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            body()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    read_s = timed(lambda: source.sum(dtype=torch.float32))
    copy_s = timed(lambda: target.copy_(source))
    del source, target
    torch.cuda.empty_cache()
    return {"read_bytes_per_s": nbytes / read_s, "copy_bytes_per_s": 2 * nbytes / copy_s}


def hf_decode_ms_per_token(model, vocab_size: int, prompt_length: int, new_tokens: int, batch: int) -> float:
    generator = torch.Generator(device="cpu").manual_seed(7)
    prompt = torch.randint(0, vocab_size, (batch, prompt_length), generator=generator).to(model.device)
    attention_mask = torch.ones_like(prompt)

    def run(tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(
            prompt,
            attention_mask=attention_mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(4)  # warm-up
    with_decode = run(new_tokens)
    prefill_only = run(1)
    return (with_decode - prefill_only) / (new_tokens - 1) * 1e3


def write_streamed(config, out: Path, device: torch.device, shard_bytes: int = 5 << 30) -> dict:
    """Writes a checkpoint too large for the GPU one tensor at a time: names and shapes from a model on the meta
    device, each weight drawn on the GPU (N(0, 0.02); norms ones, as the initializer does), shards of ~5 GB and
    the index save_pretrained would write."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    names = [(name, tuple(param.shape), param.numel()) for name, param in model.named_parameters()]
    shards: list[list[tuple[str, tuple]]] = [[]]
    shard_size = 0
    for name, shape, count in names:
        if shard_size and shard_size + 2 * count > shard_bytes:
            shards.append([])
            shard_size = 0
        shard_size += 2 * count
        shards[-1].append((name, shape))
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16, device=device)
            else:
                tensor = torch.randn(shape, dtype=torch.bfloat16, device=device) * 0.02
            tensors[name] = tensor.cpu()
            weight_map[name] = file
        save_file(tensors, out / file, metadata={"format": "pt"})
        log(f"{out.name}: wrote {file}")
    parameters = sum(count for _, _, count in names)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * parameters}, "weight_map": weight_map}, indent=1))
    return {"parameters": parameters, "weight_bytes": 2 * parameters}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--baseline-json", type=Path, help="write the HF baseline and bandwidth here")
    parser.add_argument("--baseline-batches", default="1", help="batch sizes of the HF baseline (comma list)")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    names = [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; known: {sorted(SHAPES)}")
    if not torch.cuda.is_available():
        print("make_shapes.py needs a CUDA device (weights are initialized on the GPU)", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    torch.manual_seed(1234)

    report: dict = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bandwidth": measure_bandwidth(device),
        "shapes": {},
    }
    log(f"bandwidth {report['bandwidth']}")
    batches = [int(value) for value in args.baseline_batches.split(",") if value]
    for name in names:
        config = SHAPES[name]()
        started = time.perf_counter()
        with torch.device("meta"):
            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if 2 * parameters > torch.cuda.get_device_properties(device).total_memory // 2:
            entry = write_streamed(config, args.out_dir / name, device)
            entry["write_s"] = time.perf_counter() - started
            log(f"{name}: wrote {args.out_dir / name} in {entry['write_s']:.1f} s (streamed; no HF baseline)")
            report["shapes"][name] = entry
            continue
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager")
        model.eval()
        out = args.out_dir / name
        model.save_pretrained(out, max_shard_size="5GB")
        saved_s = time.perf_counter() - started
        log(f"{name}: wrote {out} in {saved_s:.1f} s")
        entry = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "write_s": saved_s,
            "hf_eager_ms_per_token": {},
        }
        with torch.inference_mode():
            for batch in batches:
                ms = hf_decode_ms_per_token(model, config.vocab_size, args.prompt_length, args.new_tokens, batch)
                entry["hf_eager_ms_per_token"][str(batch)] = ms
                log(f"{name}: HF eager batch {batch}: {ms:.2f} ms/token")
        report["shapes"][name] = entry
        del model
        torch.cuda.empty_cache()
    if args.baseline_json:
        args.baseline_json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
