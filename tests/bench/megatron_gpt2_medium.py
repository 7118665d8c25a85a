#!/usr/bin/env python3
"""A real-size Megatron-LM GPT-2 checkpoint, converted by `candlewick convert megatron-gpt2` and
served: the converter's time and peak memory, the server's load time and resident memory, and
checks that what it made is transformers' model.

The checkpoint has nvidia/megatron-gpt2-345m's shape and format (24 layers, hidden 1024, 16 heads,
n_positions 1024, the GPT-2 vocabulary padded to 50304, float16, checkpoint_version 3.0 with args,
one model_optim_rng.pt) and random weights from a fixed seed. The tokenizer is GPT-2's own
(../shared/tokenizers/gpt2_vocab.json, gpt2_merges.txt).

Checked in the same run:
- the converted tensors equal those of transformers 4.37.2's convert_megatron_gpt2_checkpoint on
  the same file, bit for bit, and its config values are the same;
- the served model's greedy completion of a prompt equals transformers' (GPT2LMHeadModel, f32).

The converted folder (.bench/gpt2-medium) is what tests/bench/peers.py --family gpt2 measures.

Requires: pip install torch transformers==4.37.2 safetensors httpx; cargo build --release
Usage: python tests/bench/megatron_gpt2_medium.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / ".bench"
SHARED = Path(os.environ.get("CANDLEWICK_SHARED_TOKENIZERS", ROOT.parent / "shared" / "tokenizers"))
BINARY = ROOT / "target" / "release" / "candlewick"

LAYERS, HIDDEN, HEADS, POSITIONS = 24, 1024, 16, 1024
VOCAB, PADDED_VOCAB = 50257, 50304  # make_vocab_size_divisible_by 128
CHECKPOINT = BENCH / "megatron-gpt2-medium" / "model_optim_rng.pt"
CONVERTED = BENCH / "gpt2-medium"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def make_checkpoint(path: Path) -> None:
    """A Megatron-LM (>= 2.0 layout) GPT-2 medium checkpoint with random float16 weights."""
    import argparse as ap

    import torch

    g = torch.Generator().manual_seed(345)

    # Three times GPT-2's initializer range: large enough that greedy decoding does not settle on
    # one token at once, so the comparison with transformers covers varied steps.
    std = 0.06

    def rand(*shape, scale=std):
        return (torch.randn(*shape, generator=g) * scale).half()

    def norm():
        return (1 + rand(HIDDEN, scale=0.1).float()).half(), rand(HIDDEN, scale=0.02)

    layers = {}
    for i in range(LAYERS):
        p = f"layers.{i}."
        layers[p + "input_layernorm.weight"], layers[p + "input_layernorm.bias"] = norm()
        layers[p + "self_attention.query_key_value.weight"] = rand(3 * HIDDEN, HIDDEN)
        layers[p + "self_attention.query_key_value.bias"] = rand(3 * HIDDEN)
        layers[p + "self_attention.dense.weight"] = rand(HIDDEN, HIDDEN, scale=std / (2 * LAYERS) ** 0.5)
        layers[p + "self_attention.dense.bias"] = rand(HIDDEN)
        layers[p + "post_attention_layernorm.weight"], layers[p + "post_attention_layernorm.bias"] = norm()
        layers[p + "mlp.dense_h_to_4h.weight"] = rand(4 * HIDDEN, HIDDEN)
        layers[p + "mlp.dense_h_to_4h.bias"] = rand(4 * HIDDEN)
        layers[p + "mlp.dense_4h_to_h.weight"] = rand(HIDDEN, 4 * HIDDEN, scale=std / (2 * LAYERS) ** 0.5)
        layers[p + "mlp.dense_4h_to_h.bias"] = rand(HIDDEN)
    layers["final_layernorm.weight"], layers["final_layernorm.bias"] = norm()
    args = ap.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=4 * HIDDEN, num_attention_heads=HEADS,
        kv_channels=HIDDEN // HEADS, max_position_embeddings=POSITIONS, seq_length=POSITIONS,
        padded_vocab_size=PADDED_VOCAB, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, tokenizer_type="GPT2BPETokenizer", vocab_file="gpt2-vocab.json",
        merge_file="gpt2-merges.txt", layernorm_epsilon=1e-5, apply_query_key_layer_scaling=True,
        bias_gelu_fusion=True, openai_gelu=False, fp16=True, bf16=False, params_dtype=torch.float16)
    state = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 0,
        "model": {"language_model": {
            "embedding": {"word_embeddings": {"weight": rand(PADDED_VOCAB, HIDDEN)},
                          "position_embeddings": {"weight": rand(POSITIONS, HIDDEN, scale=std / 2)}},
            "encoder": layers,
        }},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def convert(checkpoint: Path, out: Path) -> dict:
    """Runs our converter; its wall time and peak resident memory."""
    start = time.perf_counter()
    child = subprocess.Popen([str(BINARY), "convert", "megatron-gpt2", "--checkpoint", str(checkpoint),
                              "--vocab", str(SHARED / "gpt2_vocab.json"), "--merges",
                              str(SHARED / "gpt2_merges.txt"), "--out", str(out)], stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"candlewick convert failed ({status})")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def check_against_transformers_converter(checkpoint: Path, out: Path) -> str:
    """transformers' converter on the same file: every tensor bit for bit, every config value."""
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2Config
    from transformers.models.megatron_gpt2 import convert_megatron_gpt2_checkpoint as converter

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    ds_args = state["args"]
    activation = "gelu_fast" if ds_args.bias_gelu_fusion else "gelu_new" if ds_args.openai_gelu else "gelu"
    # main()'s defaults without --config_file; convert_megatron_checkpoint overrides the sizes from args.
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16, n_inner=4096,
                        activation_function=activation, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                        layer_norm_epsilon=1e-5, initializer_range=0.02, summary_type="cls_index",
                        summary_use_proj=True, summary_activation=None, summary_proj_to_labels=True,
                        summary_first_dropout=0.1, scale_attn_weights=True, use_cache=True,
                        bos_token_id=50256, eos_token_id=50256)
    config.architectures = ["GPT2LMHeadModel"]
    ns = argparse.Namespace(print_checkpoint_structure=False)
    expected = converter.convert_megatron_checkpoint(ns, state, config)
    ours = load_file(out / "model.safetensors")
    if set(expected) != set(ours):
        return f"tensor names differ: {sorted(set(expected) ^ set(ours))[:5]}"
    for name, tensor in expected.items():
        mine = ours[name]
        if tensor.dtype != mine.dtype or tensor.shape != mine.shape or not torch.equal(tensor, mine):
            return f"{name} differs"
    # What save_pretrained writes; tokenizer_class comes from the hub's gpt2 tokenizer in main().
    written = json.loads((out / "config.json").read_text())
    reference = json.loads(config.to_json_string(use_diff=True))
    skipped = {"transformers_version", "tokenizer_class"}
    differing = sorted(k for k in set(reference) | set(written)
                       if k not in skipped and written.get(k) != reference.get(k))
    if differing:
        return f"config values differ: {[(k, written.get(k), reference.get(k)) for k in differing]}"
    return f"{len(expected)} tensors bit for bit and every config value equal to transformers' converter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def serve(folder: Path, threads: int, prompt: list[int], new_tokens: int) -> dict:
    """Starts the server on the folder: seconds to /ready, memory after load and after a request,
    and the request's greedy completion."""
    import httpx

    port = free_port()
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    start = time.perf_counter()
    server = subprocess.Popen([str(BINARY), "serve", "--model", str(folder), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        ready = time.perf_counter() - start
        loaded = memory(server.pid)
        response = httpx.post(f"{url}/v1/completions", timeout=600, json={
            "model": folder.name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
            "logprobs": 1})
        response.raise_for_status()
        choice = response.json()["choices"][0]
        return {"ready_seconds": ready, "after_load": loaded, "after_request": memory(server.pid),
                "text": choice["text"], "logprobs": choice["logprobs"]["token_logprobs"]}
    finally:
        server.terminate()
        server.wait(timeout=60)


def transformers_greedy(folder: Path, prompt: list[int], new_tokens: int, threads: int):
    """transformers' greedy text, the log-probability of each chosen token, and its load time."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)
        logits = model(out[:, :-1]).logits[0, len(prompt) - 1:]
    chosen = out[0, len(prompt):]
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
    return tokenizer.decode(chosen), logprobs, seconds


def transformers_memory(folder: Path, threads: int) -> dict:
    """transformers' load in a process of its own: seconds for import + from_pretrained, RSS after
    it, and the process's peak."""
    script = (
        "import sys, time, torch\n"
        f"torch.set_num_threads({threads})\n"
        "from transformers import GPT2LMHeadModel\n"
        "start = time.perf_counter()\n"
        "model = GPT2LMHeadModel.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()\n"
        "seconds = time.perf_counter() - start\n"
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]\n"
        "print(seconds, int(rss) / 1024)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, _, usage = os.wait4(child.pid, 0)
    seconds, rss = map(float, output.split())
    return {"seconds": seconds, "rss_mib": rss, "peak_mib": usage.ru_maxrss / 1024}


def ensure_converted() -> Path:
    """The converted folder, making the checkpoint and converting it when missing."""
    if not CHECKPOINT.exists():
        make_checkpoint(CHECKPOINT)
    if not (CONVERTED / "model.safetensors").exists():
        if not BINARY.exists():
            raise RuntimeError(f"{BINARY} not found: run `cargo build --release` first")
        convert(CHECKPOINT, CONVERTED)
    return CONVERTED


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()
    if not BINARY.exists():
        sys.exit(f"{BINARY} not found: run `cargo build --release` first")

    if not CHECKPOINT.exists():
        make_checkpoint(CHECKPOINT)
    # Always convert afresh, to time it.
    if CONVERTED.exists():
        for child in CONVERTED.iterdir():
            child.unlink()
    converted = convert(CHECKPOINT, CONVERTED)
    equality = check_against_transformers_converter(CHECKPOINT, CONVERTED)

    prompt = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 383, 2068, 286, 262, 1110, 318]
    served = serve(CONVERTED, args.threads, prompt, args.new_tokens)
    peer = transformers_memory(CONVERTED, args.threads)
    expected, expected_logprobs, _ = transformers_greedy(CONVERTED, prompt, args.new_tokens,
                                                                         args.threads)

    size = lambda p: p.stat().st_size / 2**20  # noqa: E731
    print(f"CPU: {cpu_model()}; {args.threads} threads")
    print(f"Megatron-LM GPT-2 medium checkpoint ({LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, n_positions "
          f"{POSITIONS}, vocab {PADDED_VOCAB}, float16): {size(CHECKPOINT):.0f} MiB")
    print(f"convert: {converted['seconds']:.1f} s, peak RSS {converted['peak_rss_mib']:.0f} MiB; "
          f"model.safetensors {size(CONVERTED / 'model.safetensors'):.0f} MiB")
    print(f"  {equality}")
    load, request = served["after_load"], served["after_request"]
    print(f"serve (f32 on CPU): ready in {served['ready_seconds']:.2f} s; RSS after load {load['VmRSS']:.0f} MiB "
          f"(anonymous {load.get('RssAnon', 0):.0f}, file-backed {load.get('RssFile', 0):.0f}), after a "
          f"{len(prompt)}+{args.new_tokens}-token request {request['VmRSS']:.0f} MiB, peak {request['VmHWM']:.0f} MiB")
    print(f"transformers (f32), same folder: from_pretrained {peer['seconds']:.2f} s, RSS after load "
          f"{peer['rss_mib']:.0f} MiB, peak {peer['peak_mib']:.0f} MiB; Candlewick's RSS / transformers' "
          f"{load['VmRSS'] / peer['rss_mib']:.2f}, peak / peak {request['VmHWM'] / peer['peak_mib']:.2f}")
    verdict = "equal to" if served["text"] == expected else "DIFFERENT from"
    print(f"greedy completion of {args.new_tokens} tokens {verdict} transformers': {served['text']!r}")
    largest = max(abs(a - b) for a, b in zip(served["logprobs"], expected_logprobs))
    print(f"  largest |logprob - transformers'| of the chosen tokens: {largest:.2e}")
    if served["text"] != expected:
        print(f"  transformers: {expected!r}")
        sys.exit(1)


if __name__ == "__main__":
    main()
