#!/usr/bin/env python3
"""Encoder classification throughput of Candlewick beside transformers' text-classification
pipeline and ONNX Runtime, on the same weights and thread count, in one run.

Makes (once) a MobileBertForSequenceClassification with google/mobilebert-uncased's sizes (24
layers, hidden 512, bottleneck 128, 4 feed-forward networks, trigram input, no_norm) and random
weights, with the real bert-base-uncased vocabulary, then classifies the same texts of exactly
--seq-len tokens both ways:
- transformers: `pipeline("text-classification")(texts, batch_size=B)`, which tokenizes, runs the
  model and turns logits into labels and scores;
- Candlewick: `candlewick serve` on the same folder, `POST /v1/classify` with B texts a request,
  one request at a time, so tokenizing, HTTP and JSON are counted too.
- ONNX Runtime: the model exported once with torch.onnx.export (opset 17, dynamic batch and
  length), B texts tokenized and run a session call (tokenizing counted, no HTTP).
All answer with the same labels and scores (checked to 1e-4), so the weights and inputs are the same.
An engine that cannot run is listed with the reason.

Requires: pip install torch transformers==4.37.2 httpx onnxruntime onnx
Usage: python tests/bench/encoder_vs_pipeline.py [--threads 2] [--batch-sizes 1,32] [--seq-len 128]
(build first: cargo build --release)
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_model(path: Path, vocab: Path) -> None:
    import torch
    from transformers import BertTokenizerFast, MobileBertConfig, MobileBertForSequenceClassification

    if (path / "config.json").exists():
        return
    # google/mobilebert-uncased's config.json, with two labels.
    config = MobileBertConfig(
        vocab_size=30522,
        embedding_size=128,
        hidden_size=512,
        intra_bottleneck_size=128,
        num_hidden_layers=24,
        num_attention_heads=4,
        intermediate_size=512,
        num_feedforward_networks=4,
        true_hidden_size=128,
        trigram_input=True,
        use_bottleneck=True,
        use_bottleneck_attention=False,
        key_query_shared_bottleneck=True,
        normalization_type="no_norm",
        hidden_act="relu",
        max_position_embeddings=512,
        type_vocab_size=2,
        num_labels=2,
        classifier_activation=False,
    )
    torch.manual_seed(0)
    model = MobileBertForSequenceClassification(config).eval()
    # transformers initialises NoNorm to the identity; random scales keep every operation in play.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "LayerNorm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param) if name.endswith("weight") else 0.05 * torch.randn_like(param))
    model.save_pretrained(path, safe_serialization=True)
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=512).save_pretrained(path)


def make_texts(path: Path, count: int, seq_len: int) -> list:
    """`count` texts of whole vocabulary words that tokenize to exactly `seq_len` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    words = [w for w in tokenizer.vocab if w.isalpha() and w.isascii() and len(w) > 2]
    words.sort()
    rng = random.Random(0)
    texts = []
    while len(texts) < count:
        text = " ".join(rng.choice(words) for _ in range(seq_len - 2))
        ids = tokenizer(text)["input_ids"]
        if len(ids) == seq_len:
            texts.append(text)
    return texts


def bench_transformers(path: Path, texts, batch_sizes, threads, repeats):
    import torch
    from transformers import pipeline

    torch.set_num_threads(threads)
    classifier = pipeline("text-classification", model=str(path), device="cpu")
    results, outputs = [], None
    for batch in batch_sizes:
        classifier(texts[:batch], batch_size=batch)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = classifier(texts, batch_size=batch)
            best = min(best, time.perf_counter() - start)
        results.append({"batch": batch, "sequences_per_s": len(texts) / best})
    return results, outputs


def bench_onnxruntime(path: Path, texts, batch_sizes, threads, repeats):
    import numpy as np
    import onnxruntime
    import torch
    from transformers import AutoTokenizer, MobileBertForSequenceClassification

    onnx_path = path / "model.onnx"
    if not onnx_path.exists():
        model = MobileBertForSequenceClassification.from_pretrained(path).eval()
        example = torch.ones((1, 8), dtype=torch.int64)
        dynamic = {0: "batch", 1: "length"}
        export = dict(input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["logits"], opset_version=17,
                      dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic,
                                    "token_type_ids": dynamic, "logits": {0: "batch"}})
        inputs = (example, example, torch.zeros_like(example))
        try:  # the TorchScript exporter, where torch also has the dynamo one
            torch.onnx.export(model, inputs, str(onnx_path), dynamo=False, **export)
        except TypeError:
            torch.onnx.export(model, inputs, str(onnx_path), **export)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(path)

    def classify(batch_texts):
        encoded = tokenizer(batch_texts, padding=True, return_tensors="np")
        feeds = {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
        logits = session.run(["logits"], feeds)[0]
        shifted = np.exp(logits - logits.max(-1, keepdims=True))
        return shifted / shifted.sum(-1, keepdims=True)

    results, outputs = [], None
    for batch in batch_sizes:
        classify(texts[:batch])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            got = []
            start = time.perf_counter()
            for i in range(0, len(texts), batch):
                got.extend(classify(texts[i:i + batch]))
            best = min(best, time.perf_counter() - start)
        outputs = got
        results.append({"batch": batch, "sequences_per_s": len(texts) / best})
    return results, outputs


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def bench_candlewick(path: Path, texts, batch_sizes, threads, repeats, seq_len):
    import httpx
    from load import SpawnedServer, find_binary

    os.environ.update(RAYON_NUM_THREADS=str(threads), RUST_LOG="warn")
    log = Path(tempfile.mkstemp(prefix="candlewick-bench-", suffix=".log")[1])
    # One forward pass per request: the per-step token budget holds the largest batch.
    budget = max(batch_sizes) * seq_len
    server = SpawnedServer(find_binary(None), str(path), [
        "--max-batch-tokens", str(budget), "--max-request-tokens", str(max(budget, len(texts) * seq_len)),
    ], log)
    try:
        server.wait_ready(120)
        with httpx.Client(base_url=server.url, timeout=600) as client:
            results, outputs = [], None
            for batch in batch_sizes:
                client.post("/v1/classify", json={"inputs": texts[:batch]}).raise_for_status()  # warm-up
                best = float("inf")
                for _ in range(repeats):
                    got = []
                    start = time.perf_counter()
                    for i in range(0, len(texts), batch):
                        response = client.post("/v1/classify", json={"inputs": texts[i:i + batch]})
                        response.raise_for_status()
                        got.extend(response.json())
                    best = min(best, time.perf_counter() - start)
                outputs = got
                results.append({"batch": batch, "sequences_per_s": len(texts) / best})
            return results, outputs
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sequences", type=int, default=64, help="texts classified per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per batch size; the best counts")
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".bench" / "mobilebert-uncased-cls")
    parser.add_argument(
        "--vocab",
        type=Path,
        default=Path(os.environ.get("BERT_VOCAB", ROOT.parent / "shared" / "tokenizers" / "bert_uncased_vocab.txt")),
    )
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    make_model(args.model_dir, args.vocab)
    texts = make_texts(args.model_dir, args.sequences, args.seq_len)
    ours, our_outputs = bench_candlewick(args.model_dir, texts, batch_sizes, args.threads, args.repeats, args.seq_len)
    theirs, their_outputs = bench_transformers(args.model_dir, texts, batch_sizes, args.threads, args.repeats)

    # A list of texts is answered with the top label of each, as the pipeline does.
    worst = 0.0
    for got, expected in zip(our_outputs, their_outputs):
        if got["label"] != expected["label"]:
            sys.exit(f"labels differ: {got} != {expected}")
        worst = max(worst, abs(got["score"] - expected["score"]))
    if worst > 1e-4:
        sys.exit(f"scores differ by {worst:.2e}")
    try:
        onnx, onnx_outputs = bench_onnxruntime(args.model_dir, texts, batch_sizes, args.threads, args.repeats)
        config = json.loads((args.model_dir / "config.json").read_text())
        id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
        for got, probabilities in zip(our_outputs, onnx_outputs):
            best = int(probabilities.argmax())
            if got["label"] != id2label[str(best)] or abs(got["score"] - float(probabilities[best])) > 1e-4:
                sys.exit(f"ONNX Runtime differs: {got} vs {probabilities}")
        onnx_reason = None
    except Exception as error:  # the reason is printed, never dropped
        onnx, onnx_reason = None, f"{type(error).__name__}: {error}"

    print(f"MobileBERT (google/mobilebert-uncased sizes), sequence classification, {args.seq_len} tokens a text")
    print(f"CPU: {cpu_model()}; threads: {args.threads}; {args.sequences} texts per measurement; "
          f"largest score difference {worst:.1e}")
    print()
    print(f"{'batch':>5} | {'candlewick seq/s':>16} {'pipeline seq/s':>15} {'x':>5} | {'onnxruntime seq/s':>17} {'x':>5}")
    for i, (o, t) in enumerate(zip(ours, theirs)):
        line = (f"{o['batch']:>5} | {o['sequences_per_s']:>16.1f} {t['sequences_per_s']:>15.1f} "
                f"{o['sequences_per_s'] / t['sequences_per_s']:>5.2f}")
        if onnx:
            r = onnx[i]["sequences_per_s"]
            line += f" | {r:>17.1f} {o['sequences_per_s'] / r:>5.2f}"
        print(line)
    if onnx_reason:
        print(f"not run: ONNX Runtime: {onnx_reason}")
    print(json.dumps({"candlewick": ours, "transformers_pipeline": theirs, "onnxruntime": onnx}))


if __name__ == "__main__":
    main()
