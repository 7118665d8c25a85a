#!/usr/bin/env python3
"""Generation speed of Candlewick beside transformers' `generate`, on the same weights and thread
count, in one run.

Makes (once) a Mistral-shaped model of about 100M parameters with random weights and the real
Mistral tokenizer, then measures prefill and decode tokens/s at each batch size for both, and the
floor that reading every weight once per decode step sets (weight bytes / measured memory read
bandwidth, measured by `candlewick bench`). Candlewick runs twice: on its CPU kernels, and on the
device-generic code (CANDLEWICK_GENERIC_KERNELS=1, what CUDA runs) for the step times of both.

Requires: pip install torch transformers==4.37.2 sentencepiece protobuf
Usage: python tests/bench/compare_transformers.py [--threads 2] [--batch-sizes 1,16]
(build first: cargo build --release)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_model(path: Path, sp_model: Path) -> None:
    import torch
    from transformers import LlamaTokenizerFast, MistralConfig, MistralForCausalLM

    if (path / "config.json").exists():
        return
    config = MistralConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        sliding_window=4096,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer = LlamaTokenizerFast(vocab_file=str(sp_model), from_slow=True)
    tokenizer.save_pretrained(path)


def bench_transformers(path: Path, batch_sizes, prompt_len, new_tokens, threads):
    import torch
    from transformers import MistralForCausalLM

    torch.set_num_threads(threads)
    model = MistralForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch in batch_sizes:
        ids = torch.randint(3, 32000, (batch, prompt_len), generator=generator)
        mask = torch.ones_like(ids)

        def run(n):
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            return time.perf_counter() - start

        run(2)  # warm-up
        prefill = run(1)
        total = run(new_tokens + 1)
        decode = max(total - prefill, 1e-9)
        results.append(
            {
                "batch": batch,
                "prefill_tokens_per_s": batch * prompt_len / prefill,
                "decode_tokens_per_s": batch * new_tokens / decode,
            }
        )
    return params, results


def bench_candlewick(path: Path, batch_sizes, prompt_len, new_tokens, threads, generic=False):
    binary = ROOT / "target" / "release" / "candlewick"
    if not binary.exists():
        sys.exit(f"{binary} not found: run `cargo build --release` first")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    env.pop("CANDLEWICK_GENERIC_KERNELS", None)
    if generic:
        env["CANDLEWICK_GENERIC_KERNELS"] = "1"
    out = subprocess.run(
        [
            str(binary),
            "bench",
            "--model",
            str(path),
            "--batch-sizes",
            ",".join(map(str, batch_sizes)),
            "--prompt-len",
            str(prompt_len),
            "--new-tokens",
            str(new_tokens),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".bench" / "mistral-100m")
    parser.add_argument(
        "--sp-model",
        type=Path,
        default=Path(os.environ.get("MISTRAL_SP_MODEL", ROOT.parent / "shared" / "tokenizers" / "mistral_tokenizer.model")),
    )
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    make_model(args.model_dir, args.sp_model)
    ours = bench_candlewick(args.model_dir, batch_sizes, args.prompt_len, args.new_tokens, args.threads)
    generic = bench_candlewick(args.model_dir, batch_sizes, args.prompt_len, args.new_tokens, args.threads,
                               generic=True)
    params, theirs = bench_transformers(args.model_dir, batch_sizes, args.prompt_len, args.new_tokens, args.threads)

    floor = ours["memory_read_gb_per_s"] * 1e9 / ours["decode_weight_bytes"]
    print(f"model: {params / 1e6:.1f}M parameters, {ours['decode_weight_bytes'] / 1e6:.0f} MB of weights read per decode step")
    print(f"threads: {args.threads}; prompt {args.prompt_len} tokens; {args.new_tokens} new tokens")
    print(f"memory read bandwidth: {ours['memory_read_gb_per_s']:.1f} GB/s -> batch-1 decode floor {floor:.1f} tokens/s")
    print()
    print(f"{'batch':>5} | {'prefill tok/s':>27} | {'decode tok/s':>27}")
    print(f"{'':>5} | {'candlewick':>10} {'transformers':>12} {'x':>3} | {'candlewick':>10} {'transformers':>12} {'x':>3}")
    for o, t in zip(ours["results"], theirs):
        print(
            f"{o['batch']:>5} | {o['prefill_tokens_per_s']:>10.1f} {t['prefill_tokens_per_s']:>12.1f} {o['prefill_tokens_per_s'] / t['prefill_tokens_per_s']:>4.1f}"
            f" | {o['decode_tokens_per_s']:>10.1f} {t['decode_tokens_per_s']:>12.1f} {o['decode_tokens_per_s'] / t['decode_tokens_per_s']:>4.1f}"
        )
    print()
    print("the device-generic path (CANDLEWICK_GENERIC_KERNELS=1: what CUDA runs), on these CPUs:")
    print(f"{'batch':>5} | {'prefill tok/s':>24} | {'decode step ms':>24}")
    print(f"{'':>5} | {'generic':>10} {'cpu kernels':>11} {'x':>3} | {'generic':>10} {'cpu kernels':>11} {'x':>3}")
    for g, o in zip(generic["results"], ours["results"]):
        print(
            f"{g['batch']:>5} | {g['prefill_tokens_per_s']:>10.1f} {o['prefill_tokens_per_s']:>11.1f}"
            f" {g['prefill_tokens_per_s'] / o['prefill_tokens_per_s']:>4.2f}"
            f" | {g['decode_step_ms']:>10.2f} {o['decode_step_ms']:>11.2f} {g['decode_step_ms'] / o['decode_step_ms']:>4.2f}"
        )
    one = ours["results"][0]
    print()
    print(f"batch-1 decode: {one['decode_tokens_per_s'] / floor:.2f} of the bandwidth floor")
    for o in ours["results"][1:]:
        print(f"batch-{o['batch']} decode aggregate: {o['decode_tokens_per_s'] / one['decode_tokens_per_s']:.1f}x batch 1")


if __name__ == "__main__":
    main()
