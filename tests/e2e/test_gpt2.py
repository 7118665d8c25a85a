"""GPT-2 is served like Mistral: greedy completions through the openai client equal transformers'
(alone, concurrently, streamed), a folder with only vocab.json + merges.txt serves, a request past
n_positions is a 400 naming both numbers, and the classification, token-classification and
question-answering heads answer their routes as transformers' pipelines do."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from support import REPO_ROOT, REQUEST_TIMEOUT_S, Server, assert_error, served
from test_encoders import assert_same, post_case

GPT2 = REPO_ROOT / "tests" / "fixtures" / "gpt2"
HEADS = REPO_ROOT / "tests" / "fixtures" / "encoders" / "gpt2"
ROUTES = {
    "sequence-classification": "classify",
    "token-classification": "token-classify",
    "question-answering": "question-answering",
}


@pytest.fixture(scope="module")
def servers(candlewick_bin: Path, log_dir: Path) -> Iterator[dict[str, Server]]:
    fixtures = {"gelu-new-tied": GPT2 / "gelu-new-tied", "bpe-files": GPT2 / "bpe-files"}
    fixtures.update({head: HEADS / head for head in ROUTES})
    with served(fixtures, prefix="gpt2", log_dir=log_dir, binary=candlewick_bin) as started:
        yield started


def greedy_reference(name: str) -> dict:
    return json.loads((GPT2 / name / "reference.json").read_text(encoding="utf-8"))["greedy"]


def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


@pytest.mark.parametrize("name", ["gelu-new-tied", "bpe-files"])
def test_greedy_completions_equal_transformers_alone_concurrently_and_streamed(servers, name: str) -> None:
    greedy = greedy_reference(name)
    openai = client(servers[name])

    def complete(row: int) -> tuple[str, str, list[str]]:
        response = openai.completions.create(
            model=name, prompt=greedy["prompts"][row], max_tokens=greedy["max_new_tokens"], temperature=0,
            logprobs=0,
        )
        choice = response.choices[0]
        return choice.text, choice.finish_reason, choice.logprobs.tokens

    rows = range(len(greedy["prompts"]))
    alone = [complete(row) for row in rows]
    assert [text for text, _, _ in alone] == greedy["texts"]
    for (_, finish, tokens), generated in zip(alone, greedy["alone"], strict=True):
        assert len(tokens) == len(generated)
        assert finish == ("stop" if generated[-1] == 1256 else "length")
    with ThreadPoolExecutor(len(rows)) as pool:
        assert list(pool.map(complete, rows)) == alone
    for row in rows:
        stream = openai.completions.create(
            model=name, prompt=greedy["prompts"][row], max_tokens=greedy["max_new_tokens"], temperature=0,
            stream=True,
        )
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == greedy["texts"][row]


def test_a_text_prompt_is_tokenized_as_transformers_does(servers) -> None:
    greedy = greedy_reference("gelu-new-tied")
    openai = client(servers["gelu-new-tied"])
    by_text = openai.completions.create(model="gelu-new-tied", prompt="The quick brown fox jumps over",
                                        max_tokens=greedy["max_new_tokens"], temperature=0)
    assert by_text.usage.prompt_tokens == len(greedy["prompts"][1])
    assert by_text.choices[0].text == greedy["texts"][1]


def test_a_request_past_n_positions_is_refused_with_both_numbers(servers) -> None:
    prompt = greedy_reference("gelu-new-tied")["prompts"][4]
    response = httpx.post(
        f"{servers['gelu-new-tied'].url}/v1/completions",
        json={"model": "gelu-new-tied", "prompt": prompt, "max_tokens": 128},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert_error(response, 400)
    message = response.json()["error"]["message"]
    assert str(len(prompt) + 128) in message and "128" in message, message
    # Within the context the same prompt is served.
    ok = httpx.post(
        f"{servers['gelu-new-tied'].url}/v1/completions",
        json={"model": "gelu-new-tied", "prompt": prompt, "max_tokens": 128 - len(prompt)},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("head", list(ROUTES))
def test_heads_answer_their_routes_as_transformers_pipelines(servers, head: str) -> None:
    cases = json.loads((HEADS / head / "pipeline.json").read_text(encoding="utf-8"))
    assert cases
    for case in cases:
        got = post_case(servers[head], ROUTES[head], case)
        expected = case["output"]
        if head == "sequence-classification" and not isinstance(case["inputs"], list):
            expected = [expected if isinstance(expected, list) else [expected]]
        assert_same(got, expected, f"{head} {case['parameters']}")
