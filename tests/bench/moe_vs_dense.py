#!/usr/bin/env python3
"""Decode throughput of a Mixtral-shaped model (8 experts, top-2) beside the dense Mistral with the
same active parameters per token, both random-weight, both run by `candlewick bench`.

The dense model is compare_transformers.py's ~100M Mistral (MLP width 2048); the Mixtral has the
same attention and 8 experts of width 1024, so a token runs 2 x 1024 = 2048 MLP columns in both.
Requires: pip install torch transformers==4.37.2 sentencepiece protobuf; cargo build --release.
Usage: python tests/bench/moe_vs_dense.py [--batch-sizes 1,16]
"""

import argparse
import json
import os
import subprocess
from pathlib import Path

import compare_transformers as dense_bench

ROOT = Path(__file__).resolve().parents[2]


def make_mixtral(path: Path, sp_model: Path) -> None:
    import torch
    from transformers import LlamaTokenizerFast, MixtralConfig, MixtralForCausalLM

    if (path / "config.json").exists():
        return
    config = MixtralConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=1024, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=True, torch_dtype="float32",
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    LlamaTokenizerFast(vocab_file=str(sp_model), from_slow=True).save_pretrained(path)


def bench(path: Path, batch_sizes, prompt_len, new_tokens):
    out = subprocess.run(
        [str(ROOT / "target" / "release" / "candlewick"), "bench", "--model", str(path), "--batch-sizes",
         ",".join(map(str, batch_sizes)), "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--json"],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sp-model", type=Path, default=Path(os.environ.get(
        "MISTRAL_SP_MODEL", ROOT.parent / "shared" / "tokenizers" / "mistral_tokenizer.model")))
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    dense_dir = ROOT / ".bench" / "mistral-100m"
    moe_dir = ROOT / ".bench" / "mixtral-8x-top2"
    dense_bench.make_model(dense_dir, args.sp_model)
    make_mixtral(moe_dir, args.sp_model)
    dense = bench(dense_dir, batch_sizes, args.prompt_len, args.new_tokens)
    moe = bench(moe_dir, batch_sizes, args.prompt_len, args.new_tokens)
    print(f"weights: dense {dense['decode_weight_bytes'] / 1e6:.0f} MB, mixtral {moe['decode_weight_bytes'] / 1e6:.0f} MB "
          f"(all experts); memory read bandwidth {dense['memory_read_gb_per_s']:.1f} GB/s")
    print(f"{'batch':>5} | {'dense decode tok/s':>18} | {'mixtral decode tok/s':>20} | {'ratio':>5}")
    for d, m in zip(dense["results"], moe["results"]):
        print(f"{d['batch']:>5} | {d['decode_tokens_per_s']:>18.1f} | {m['decode_tokens_per_s']:>20.1f} | "
              f"{m['decode_tokens_per_s'] / d['decode_tokens_per_s']:>5.2f}")


if __name__ == "__main__":
    main()
