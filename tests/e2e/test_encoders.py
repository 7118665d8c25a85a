"""The encoder task routes against the real binary: huggingface_hub's InferenceClient gets the
transformers pipelines' outputs (from each fixture's pipeline.json), the openai client gets
embeddings equal to transformers' mean-pooled hidden states, and malformed inputs get clear 4xx
errors."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

from support import REPO_ROOT, REQUEST_TIMEOUT_S, Server, assert_error, served

ENCODERS = REPO_ROOT / "tests" / "fixtures" / "encoders"
SCORE_TOLERANCE = 1e-4

# head -> the fixture a server is started on
TASKS = {
    "sequence-classification": ENCODERS / "mobilebert-nonorm-trigram" / "sequence-classification",
    "token-classification": ENCODERS / "mobilebert-layernorm" / "token-classification",
    "question-answering": ENCODERS / "megatron-bert" / "question-answering",
    "masked-lm": ENCODERS / "mobilebert-nonorm-trigram" / "masked-lm",
    "base": ENCODERS / "megatron-bert" / "base",
}


@pytest.fixture(scope="module")
def servers(candlewick_bin: Path, log_dir: Path) -> Iterator[dict[str, Server]]:
    with served(TASKS, prefix="encoder", log_dir=log_dir, binary=candlewick_bin) as started:
        yield started


def cases(head: str) -> list[dict[str, Any]]:
    return json.loads((TASKS[head] / "pipeline.json").read_text(encoding="utf-8"))


def post_case(server: Server, route: str, case: dict[str, Any]) -> Any:
    """POSTs a pipeline case's inputs and parameters to a task route; returns the 200 answer."""
    response = httpx.post(f"{server.url}/v1/{route}",
                          json={"inputs": case["inputs"], "parameters": case["parameters"]},
                          timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def client_for(server: Server, route: str) -> InferenceClient:
    return InferenceClient(model=f"{server.url}/v1/{route}", timeout=REQUEST_TIMEOUT_S)


def assert_same(actual: Any, expected: Any, where: str = "") -> None:
    """Equal structure and values; floats named "score" within SCORE_TOLERANCE."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not an object"
        assert set(actual) == set(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (
            f"{where}: {json.dumps(actual)[:300]} != {json.dumps(expected)[:300]}"
        )
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert abs(actual - expected) <= SCORE_TOLERANCE, f"{where}: {actual} != {expected}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def as_plain(elements: Any) -> Any:
    """InferenceClient's dataclasses back to plain JSON values."""
    if isinstance(elements, list):
        return [as_plain(e) for e in elements]
    if hasattr(elements, "__dataclass_fields__"):
        return {k: v for k, v in vars(elements).items() if v is not None or k in ("word",)}
    return elements


def test_inference_client_text_classification(servers: dict[str, Server]) -> None:
    client = client_for(servers["sequence-classification"], "classify")
    checked = 0
    for case in cases("sequence-classification"):
        if not isinstance(case["inputs"], str):
            continue
        params = case["parameters"]
        if "top_k" in params and params["top_k"] is None:
            continue  # the client cannot send top_k=None (it drops None parameters)
        got = client.text_classification(
            case["inputs"], top_k=params.get("top_k"), function_to_apply=params.get("function_to_apply")
        )
        expected = case["output"]
        assert_same(as_plain(got), expected, f"classify {params}")
        checked += 1
    assert checked >= 1


def test_classify_http_matches_every_pipeline_case(servers: dict[str, Server]) -> None:
    for case in cases("sequence-classification"):
        got = post_case(servers["sequence-classification"], "classify", case)
        expected = case["output"]
        if not isinstance(case["inputs"], list):
            # One input is answered as a list holding its result, as the Inference API does.
            expected = [expected if isinstance(expected, list) else [expected]]
        assert_same(got, expected, f"classify {case['parameters']}")


def test_inference_client_token_classification(servers: dict[str, Server]) -> None:
    client = client_for(servers["token-classification"], "token-classify")
    for case in cases("token-classification"):
        params = case["parameters"]
        got = post_case(servers["token-classification"], "token-classify", case)
        assert_same(got, case["output"], f"token-classify {params}")
        if isinstance(case["inputs"], str):
            got = client.token_classification(
                case["inputs"], aggregation_strategy=params.get("aggregation_strategy"),
                ignore_labels=params.get("ignore_labels"),
            )
            assert_same([{k: v for k, v in g.items() if v is not None} for g in as_plain(got)],
                        case["output"], f"client token-classify {params}")


def test_inference_client_question_answering(servers: dict[str, Server]) -> None:
    client = client_for(servers["question-answering"], "question-answering")
    for case in cases("question-answering"):
        params = case["parameters"]
        got = client.question_answering(question=case["inputs"]["question"], context=case["inputs"]["context"],
                                        **params)
        assert_same(as_plain(got), case["output"], f"question-answering {params}")


def test_inference_client_fill_mask(servers: dict[str, Server]) -> None:
    client = client_for(servers["masked-lm"], "fill-mask")
    for case in cases("masked-lm"):
        params = case["parameters"]
        assert_same(post_case(servers["masked-lm"], "fill-mask", case), case["output"], f"fill-mask {params}")
        if case["inputs"].count("[MASK]") == 1:
            got = client.fill_mask(case["inputs"], top_k=params.get("top_k"), targets=params.get("targets"))
            assert_same(as_plain(got), case["output"], f"client fill-mask {params}")


def read_safetensors(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """The f32/i64 tensors of a safetensors file, as (shape, flat values), without numpy."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    body = data[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        code = {"F32": "f", "I64": "q"}[info["dtype"]]
        count = (end - start) // struct.calcsize(code)
        tensors[name] = (info["shape"], list(struct.unpack(f"<{count}{code}", body[start:end])))
    return tensors


def test_openai_embeddings_equal_transformers_mean_pooling(servers: dict[str, Server]) -> None:
    reference = read_safetensors(TASKS["base"] / "reference.safetensors")
    (batch, length), ids = reference["input_ids"]
    _, mask = reference["attention_mask"]
    (_, width), pooled = reference["mean_pooled"]
    inputs = [[ids[r * length + t] for t in range(length) if mask[r * length + t]] for r in range(batch)]
    client = OpenAI(base_url=f"{servers['base'].url}/v1", api_key="unused", max_retries=0,
                    timeout=REQUEST_TIMEOUT_S)
    response = client.embeddings.create(model="base", input=inputs)
    assert [d.index for d in response.data] == list(range(batch))
    assert response.usage.prompt_tokens == sum(len(i) for i in inputs)
    for r, item in enumerate(response.data):
        expected = pooled[r * width:(r + 1) * width]
        assert len(item.embedding) == width
        assert max(abs(a - b) for a, b in zip(item.embedding, expected)) <= SCORE_TOLERANCE
    # The openai client asks for base64 by default when numpy is present; both formats agree.
    raw = httpx.post(f"{servers['base'].url}/v1/embeddings",
                     json={"model": "base", "input": inputs[:1], "encoding_format": "base64"},
                     timeout=REQUEST_TIMEOUT_S).json()
    decoded = struct.unpack(f"<{width}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, response.data[0].embedding)) <= 1e-6


def test_a_bad_embeddings_request_never_fails_the_good_ones_beside_it(servers: dict[str, Server]) -> None:
    """Fifteen good requests and one with a token id past the vocabulary, all at once: the bad
    one is refused with a 400 before it can join a batch, and every good one gets its
    embedding, equal to transformers' mean pooling."""
    reference = read_safetensors(TASKS["base"] / "reference.safetensors")
    (batch, length), ids = reference["input_ids"]
    _, mask = reference["attention_mask"]
    (_, width), pooled = reference["mean_pooled"]
    vocab_size = json.loads((TASKS["base"] / "config.json").read_text())["vocab_size"]
    rows = [[ids[r * length + t] for t in range(length) if mask[r * length + t]] for r in range(batch)]
    url = f"{servers['base'].url}/v1/embeddings"

    def embed(tokens: list[int]) -> httpx.Response:
        return httpx.post(url, json={"model": "base", "input": [tokens]}, timeout=REQUEST_TIMEOUT_S)

    good = [rows[i % batch] for i in range(15)]
    bad = rows[0][:-1] + [vocab_size]
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(embed, tokens) for tokens in good[:8] + [bad] + good[8:]]
        responses = [future.result() for future in futures]
    refused = responses.pop(8)
    assert_error(refused, 400, mentions=[f"token id {vocab_size}"])
    assert refused.json()["error"]["param"] == "input"
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        embedding = response.json()["data"][0]["embedding"]
        expected = pooled[(i % batch) * width:((i % batch) + 1) * width]
        assert max(abs(a - b) for a, b in zip(embedding, expected)) <= SCORE_TOLERANCE


@pytest.mark.parametrize(
    ("head", "route", "body", "status", "mentions"),
    [
        ("sequence-classification", "classify", {"inputs": ""}, 400, ["inputs"]),
        ("sequence-classification", "classify", {"inputs": 42}, 400, []),
        ("sequence-classification", "classify", {"inputs": "hi", "parameters": {"function_to_apply": "relu"}},
         400, ["function_to_apply"]),
        ("sequence-classification", "classify", {"text": "hi"}, 400, []),
        ("sequence-classification", "fill-mask", {"inputs": "a [MASK]"}, 400, ["text-classification"]),
        ("token-classification", "token-classify", {"inputs": {"text": "a", "text_pair": "b"}}, 400, []),
        ("token-classification", "token-classify",
         {"inputs": "hi", "parameters": {"aggregation_strategy": "longest"}}, 400, ["aggregation_strategy"]),
        ("question-answering", "question-answering", {"inputs": {"question": "Who?"}}, 400, []),
        ("question-answering", "question-answering",
         {"inputs": {"question": "Who?", "context": "word " * 200_000}}, 400, []),
        ("masked-lm", "fill-mask", {"inputs": "no mask here"}, 400, ["[MASK]"]),
        ("masked-lm", "fill-mask", {"inputs": ["a [MASK]", 3]}, 400, []),
        ("base", "embeddings", {"model": "base", "input": ""}, 400, ["input"]),
        ("base", "embeddings", {"model": "base", "input": "hi", "encoding_format": "int8"}, 400,
         ["encoding_format"]),
        ("base", "embeddings", {"model": "other", "input": "hi"}, 404, []),
        ("base", "classify", {"inputs": "hi"}, 400, ["feature-extraction"]),
    ],
)
def test_malformed_inputs_get_clear_errors(servers, head, route, body, status, mentions) -> None:
    response = httpx.post(f"{servers[head].url}/v1/{route}", json=body, timeout=REQUEST_TIMEOUT_S)
    assert_error(response, status, mentions=mentions)


def test_encoders_refuse_generation_and_stay_up(servers: dict[str, Server]) -> None:
    server = servers["sequence-classification"]
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "sequence-classification",
                                                               "prompt": "hi"}, timeout=REQUEST_TIMEOUT_S)
    assert_error(response, 400, mentions=["text-classification"])
    assert httpx.get(f"{server.url}/ready", timeout=REQUEST_TIMEOUT_S).status_code == 200
    models = httpx.get(f"{server.url}/v1/models", timeout=REQUEST_TIMEOUT_S).json()
    assert models["data"][0]["id"] == "sequence-classification"
