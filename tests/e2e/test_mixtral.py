"""Mixtral is served like Mistral: the same endpoints, the same continuous batches; the Mistral
and Mixtral sequence classifiers are served by the text-classification route."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from support import (
    FIXTURE_DIR,
    REQUEST_TIMEOUT_S,
    assert_error,
    expected_text,
    load_reference,
    load_tokenizer,
)

MIXTRAL_DIR = FIXTURE_DIR.parent.parent / "mixtral" / "e4-w8-gqa2"


def test_mixtral_greedy_completions_match_transformers_alone_and_concurrently(spawn_server) -> None:
    server = spawn_server(model=MIXTRAL_DIR, name="mixtral")
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    reference = load_reference(MIXTRAL_DIR)
    tokenizer = load_tokenizer(MIXTRAL_DIR)

    def complete(case) -> str:
        response = client.completions.create(
            model="e4-w8-gqa2", prompt=case.prompt, max_tokens=reference.max_new_tokens, temperature=0
        )
        return response.choices[0].text

    expected = [expected_text(tokenizer, case.prompt, case.generated) for case in reference.cases]
    assert [complete(case) for case in reference.cases] == expected
    with ThreadPoolExecutor(len(reference.cases)) as pool:
        assert list(pool.map(complete, reference.cases)) == expected
    chat = client.chat.completions.create(
        model="e4-w8-gqa2", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.completion_tokens >= 1


CLASSIFIERS = FIXTURE_DIR.parent.parent / "classifiers"


@pytest.mark.parametrize("name", ["mistral-cls2", "mixtral-cls5"])
def test_decoder_classifiers_are_served_by_the_classify_route(spawn_server, name: str) -> None:
    """MistralForSequenceClassification and MixtralForSequenceClassification answer /v1/classify
    with transformers' scores for every label, one text at a time and all texts in one request."""
    fixture = CLASSIFIERS / name
    reference = json.loads((fixture / "classification.json").read_text(encoding="utf-8"))
    server = spawn_server(model=fixture, name=name)
    url = f"{server.url}/v1/classify"
    texts = [case["text"] for case in reference["cases"]]

    def post(inputs, parameters=None) -> list:
        body = {"inputs": inputs} if parameters is None else {"inputs": inputs, "parameters": parameters}
        response = httpx.post(url, json=body, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, response.text
        return response.json()

    def check(answer: list[dict], case: dict) -> None:
        scores = {item["label"]: item["score"] for item in answer}
        assert set(scores) == set(reference["labels"])
        for label, expected in zip(reference["labels"], case["scores"]):
            assert abs(scores[label] - expected) <= 1e-4, (case["text"], label, scores[label], expected)
        assert [item["score"] for item in answer] == sorted(scores.values(), reverse=True)

    for case in reference["cases"]:
        (answer,) = post(case["text"], {"top_k": None})
        check(answer, case)
    answers = post(texts, {"top_k": None})
    assert len(answers) == len(texts)
    for answer, case in zip(answers, reference["cases"]):
        check(answer, case)
    # The best label alone by default, as the pipeline answers.
    best = post(texts[0])
    first = reference["cases"][0]["scores"]
    assert best[0][0]["label"] == reference["labels"][first.index(max(first))]
    # A classifier does not generate.
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": name, "prompt": "hi"},
                         timeout=REQUEST_TIMEOUT_S)
    assert_error(refused, 400, mentions=["text-classification"])
