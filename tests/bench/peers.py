#!/usr/bin/env python3
"""Generation speed of Candlewick beside the engines a CPU user would pick instead, in one run, on
the same checkpoint, prompt ids and thread count: transformers (f32, eager), CTranslate2 (float32
and int8), llama.cpp (f32 and q8_0 GGUF, an f32 KV cache) and Candlewick (f32, q8_0, q4k). Prints one table with each figure's ratio to
transformers and the CPU model; an engine that cannot run is listed with the reason.

Like for like: --family mistral (default) measures the ~100M Mistral of compare_transformers.py
(random weights, the real Mistral tokenizer); --family gpt2 the GPT-2 medium shape (345M) that
megatron_gpt2_medium.py makes as a Megatron-LM checkpoint and converts with `candlewick convert`
(float16 weights, every engine computing in f32). Prompts of random ids from a fixed seed, 128 prompt tokens + 64 new ones (inside the
sliding window, where no engine's window handling matters), greedy. Before timing, each peer's f32
greedy tokens are checked against transformers' on the same prompt.

Requires: pip install torch transformers==4.37.2 sentencepiece protobuf ctranslate2 gguf, and
llama-cpp-python (`pip install` builds it from source with cmake; its converter ships in the
source distribution: `pip download --no-binary :all: --no-deps llama-cpp-python`, unpack, and
pass its vendor/llama.cpp folder as --llama-cpp-src)
Usage: python tests/bench/peers.py [--family mistral|gpt2] [--threads 2] [--batch-sizes 1,16]
       [--llama-cpp-src DIR]
(build first: cargo build --release)
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_transformers import make_model  # noqa: E402
import megatron_gpt2_medium  # noqa: E402

FAMILIES = {
    "mistral": "Mistral ~100M f32 checkpoint",
    "gpt2": "GPT-2 medium (345M) converted from a Megatron-LM checkpoint, f32 compute",
}

VOCAB = 32000


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return " ".join(shown) or "no AVX2"


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random prompt ids (3..VOCAB), the same for every engine."""
    state = 0x9E3779B97F4A7C15 ^ seed
    rows = []
    for _ in range(batch):
        row = []
        for _ in range(length):
            state ^= (state << 13) & 0xFFFFFFFFFFFFFFFF
            state ^= state >> 7
            state ^= (state << 17) & 0xFFFFFFFFFFFFFFFF
            row.append(3 + state % (VOCAB - 3))
        rows.append(row)
    return rows


def timed(run, *args):
    start = time.perf_counter()
    result = run(*args)
    return time.perf_counter() - start, result


class Transformers:
    name = "transformers f32"

    def __init__(self, path: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                          torch_dtype=torch.float32).eval()

    def generate(self, rows, new_tokens):
        ids = self.torch.tensor(rows)
        with self.torch.no_grad():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()


class CTranslate2:
    def __init__(self, path: Path, family: str, threads: int, compute_type: str):
        import ctranslate2
        import torch
        from ctranslate2.converters import TransformersConverter
        from transformers import AutoTokenizer

        class Converter(TransformersConverter):
            # The converter passes `dtype=` (transformers 4.37 takes `torch_dtype=`) and reads
            # `config.head_dim`, which 4.37's MistralConfig does not have (GPT-2's ignores it).
            def load_model(self, model_class, model_name_or_path, **kwargs):
                if "dtype" in kwargs:
                    kwargs["torch_dtype"] = kwargs.pop("dtype")
                model = super().load_model(model_class, model_name_or_path, **kwargs)
                config = model.config
                config.head_dim = config.hidden_size // config.num_attention_heads
                return model

            # Megatron pads GPT-2's vocabulary (50257 tokens) to the embedding's 50304 rows; the
            # converter wants a token per row: placeholders past the tokenizer, never generated
            # by a prompt's ids.
            def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
                tokenizer = super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)
                rows = json.loads((Path(model_name_or_path) / "config.json").read_text())["vocab_size"]
                tokenizer.add_tokens([f"<|row {i}|>" for i in range(len(tokenizer), rows)])
                return tokenizer

        out = ROOT / ".bench" / f"ct2-{family}"
        if not (out / "model.bin").exists():
            with torch.no_grad():
                Converter(str(path)).convert(str(out), force=True)
        self.name = f"CTranslate2 {compute_type.split('_')[0]}"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute_type,
                                               intra_threads=threads)

    def generate(self, rows, new_tokens):
        tokens = [self.tokenizer.convert_ids_to_tokens(row) for row in rows]
        results = self.generator.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens,
                                                sampling_topk=1, include_prompt_in_result=False)
        return [result.sequences_ids[0] for result in results]


def for_llama_cpp(path: Path) -> Path:
    """The folder itself, or for a GPT-2 folder a copy that llama.cpp's converter takes: without
    the causal-mask buffers (`attn.bias`, `attn.masked_bias`; transformers' Megatron converter
    keeps them, save_pretrained does not, and llama.cpp maps every tensor it is given) and with
    `n_ctx`, which it reads and GPT2Config no longer writes."""
    from safetensors.torch import load_file, save_file

    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "gpt2":
        return path
    copy = path.parent / f"{path.name}-for-llama-cpp"
    copy.mkdir(exist_ok=True)
    for file in path.iterdir():
        if file.name not in ("model.safetensors", "config.json"):
            (copy / file.name).write_bytes(file.read_bytes())
    (copy / "config.json").write_text(json.dumps(dict(config, n_ctx=config["n_positions"]), indent=2))
    tensors = load_file(path / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    save_file(kept, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: every row its own sequence id in one
    batch, the whole prefill one micro-batch, an f32 KV cache, greedy by argmax of the logits."""

    def __init__(self, path: Path, family: str, threads: int, outtype: str, src: Path | None, max_batch: int,
                 context: int):
        import llama_cpp as L
        import numpy as np

        if src is None or not (src / "convert_hf_to_gguf.py").exists():
            raise RuntimeError("needs llama.cpp's convert_hf_to_gguf.py: pass --llama-cpp-src, the vendor/llama.cpp "
                               "folder of the llama-cpp-python source distribution")
        gguf = ROOT / ".bench" / f"{family}-{outtype}.gguf"
        if not gguf.exists():
            env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
            source = for_llama_cpp(path)
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(source), "--outtype", outtype,
                            "--outfile", str(gguf)], check=True, capture_output=True, env=env)
        self.L, self.np, self.name = L, np, f"llama.cpp {outtype}"
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx = max_batch * context
        params.n_batch = params.n_ubatch = max_batch * context
        params.n_seq_max = max_batch
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = 0  # GGML_TYPE_F32
        self.ctx = L.llama_init_from_model(self.model, params)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def _decode(self, entries):
        """entries: (token, position, sequence); returns the logits of every entry."""
        L = self.L
        batch = L.llama_batch_init(len(entries), 0, 1)
        try:
            for i, (token, position, sequence) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
                batch.seq_id[i][0], batch.logits[i] = sequence, 1
            batch.n_tokens = len(entries)
            if L.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            return [self.np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,))
                    for i in range(len(entries))]
        finally:
            L.llama_batch_free(batch)

    def generate(self, rows, new_tokens):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        entries = [(t, p, s) for s, row in enumerate(rows) for p, t in enumerate(row)]
        logits = self._decode(entries)
        ends = self.np.cumsum([len(row) for row in rows]) - 1
        last = [logits[e] for e in ends]
        out = [[] for _ in rows]
        for step in range(new_tokens):
            tokens = [int(row.argmax()) for row in last]
            for o, t in zip(out, tokens):
                o.append(t)
            if step + 1 < new_tokens:
                last = self._decode([(t, len(rows[s]) + step, s) for s, t in enumerate(tokens)])
        return out


def measure(engine, batch_sizes, prompt_len, new_tokens):
    """Prefill tok/s (a one-token generation) and decode tok/s (the rest), per batch size."""
    figures = {}
    engine.generate(prompts(1, 8, seed=99), 2)  # warm-up
    for batch in batch_sizes:
        rows = prompts(batch, prompt_len)
        prefill, _ = timed(engine.generate, rows, 1)
        total, _ = timed(engine.generate, rows, new_tokens + 1)
        decode = max(total - prefill, 1e-9)
        figures[batch] = (batch * prompt_len / prefill, batch * new_tokens / decode)
    return figures


def candlewick(path: Path, batch_sizes, prompt_len, new_tokens, threads, quantize):
    binary = ROOT / "target" / "release" / "candlewick"
    if not binary.exists():
        raise RuntimeError(f"{binary} not found: run `cargo build --release` first")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    env.pop("CANDLEWICK_GENERIC_KERNELS", None)
    command = [str(binary), "bench", "--model", str(path), "--batch-sizes", ",".join(map(str, batch_sizes)),
               "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--json"]
    if quantize:
        command += ["--quantize", quantize]
    report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout)
    figures = {r["batch"]: (r["prefill_tokens_per_s"], r["decode_tokens_per_s"]) for r in report["results"]}
    return figures, report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mistral")
    parser.add_argument("--model-dir", type=Path, help="default: .bench/mistral-100m, or .bench/gpt2-medium")
    parser.add_argument("--llama-cpp-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC"),
                        help="vendor/llama.cpp of the llama-cpp-python sdist, for its converter ($LLAMA_CPP_SRC)")
    parser.add_argument("--sp-model", type=Path, default=Path(os.environ.get(
        "MISTRAL_SP_MODEL", ROOT.parent / "shared" / "tokenizers" / "mistral_tokenizer.model")))
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    # Idle OpenMP workers of an engine already measured must not spin on the cores the next one
    # runs on (on 2 cores they halve it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "0")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    if args.family == "gpt2":
        args.model_dir = megatron_gpt2_medium.ensure_converted()
    else:
        args.model_dir = args.model_dir or ROOT / ".bench" / "mistral-100m"
        make_model(args.model_dir, args.sp_model)

    rows, skipped, checks = {}, {}, {}
    # Candlewick first, in its own process, before any engine of this one has started threads.
    costs, candlewick_rows = {}, {}
    for quantize in (None, "q8_0", "q4k"):
        name = f"Candlewick {quantize or 'f32'}"
        try:
            figures, report = candlewick(args.model_dir, batch_sizes, args.prompt_len, args.new_tokens,
                                         args.threads, quantize)
        except Exception as error:
            skipped[name] = f"{type(error).__name__}: {error}"
            continue
        candlewick_rows[name] = figures
        if report.get("quantization_cost"):
            cost = report["quantization_cost"]
            costs[name] = (f"max |logit - f32| {cost['max_logit_difference']:.3f}, greedy agreement "
                           f"{cost['greedy_agreement']:.3f} over {cost['steps']} steps")
        if quantize is None:
            floor = report["memory_read_gb_per_s"] * 1e9 / report["decode_weight_bytes"]

    reference = Transformers(args.model_dir, args.threads)
    check_prompt = prompts(1, args.prompt_len, seed=7)
    expected = reference.generate(check_prompt, 16)[0]
    rows[reference.name] = measure(reference, batch_sizes, args.prompt_len, args.new_tokens)

    # (name, how to start it, whether its greedy tokens are checked against transformers')
    context = args.prompt_len + args.new_tokens + 2
    peers = [
        (f"CTranslate2 {compute_type}",
         lambda compute_type=compute_type: CTranslate2(args.model_dir, args.family, args.threads, compute_type),
         compute_type == "float32")
        for compute_type in ("float32", "int8_float32")
    ] + [
        (f"llama.cpp {outtype}",
         lambda outtype=outtype: LlamaCpp(args.model_dir, args.family, args.threads, outtype,
                                          args.llama_cpp_src, max(batch_sizes), context),
         outtype == "f32")
        for outtype in ("f32", "q8_0")
    ]
    for name, start, checked in peers:
        try:
            engine = start()
        except Exception as error:  # the reason is printed, never dropped
            skipped[name] = f"{type(error).__name__}: {error}"
            continue
        if checked:
            got = engine.generate(check_prompt, 16)[0]
            checks[engine.name] = "greedy = transformers" if got == expected else f"greedy differs: {got} vs {expected}"
        rows[engine.name] = measure(engine, batch_sizes, args.prompt_len, args.new_tokens)
        del engine

    rows.update(candlewick_rows)

    print(f"CPU: {cpu_model()} ({cpu_flags()}); {args.threads} threads; {FAMILIES[args.family]}; "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy")
    base = rows[reference.name]
    header = " | ".join(f"prefill b{b:<3} x    decode b{b:<3} x  " for b in batch_sizes)
    print(f"{'engine':<22} | {header}")
    for name, figures in rows.items():
        cells = []
        for b in batch_sizes:
            prefill, decode = figures[b]
            cells.append(f"{prefill:>9.1f} {prefill / base[b][0]:>4.2f} {decode:>9.1f} {decode / base[b][1]:>4.2f}")
        print(f"{name:<22} | " + " | ".join(cells))
    if "Candlewick f32" in rows:
        print(f"\nbatch-1 decode floor (weights / read bandwidth): {floor:.1f} tok/s; Candlewick f32 at "
              f"{rows['Candlewick f32'][batch_sizes[0]][1] / floor:.2f} of it")
    for name, check in checks.items():
        print(f"{name}: {check} over 16 tokens")
    for name, cost in costs.items():
        print(f"{name}: {cost}")
    for name, reason in skipped.items():
        print(f"not run: {name}: {reason}")


if __name__ == "__main__":
    main()
