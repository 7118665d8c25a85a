"""Completion text equals transformers' decode with `clean_up_tokenization_spaces` on a served
WordPiece model: whole, streamed, echoed, with logprobs offsets, and with stop strings matched on the
cleaned text. The MegatronBertForCausalLM fixture's greedy generations, biased towards punctuation
and contractions, come from tests/fixtures/make_detokenize_fixtures.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from support import FIXTURE_DIR, STOP_TIMEOUT_S, launch_server

FIXTURES = FIXTURE_DIR.parent.parent
SERVED = json.loads((FIXTURES / "detokenize" / "wordpiece" / "served.json").read_text(encoding="utf-8"))
MODEL = FIXTURES / SERVED["model"]
RUNS = SERVED["runs"]


@pytest.fixture(scope="module")
def client(candlewick_bin: Path, log_dir: Path) -> Iterator[OpenAI]:
    server = launch_server(name="wordpiece-lm", args=[], log_dir=log_dir, model=MODEL, binary=candlewick_bin)
    try:
        yield OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    finally:
        try:
            code = server.stop(STOP_TIMEOUT_S)
        finally:
            server.kill()
        assert code == 0, f"{server.name} exited with {code}:\n{server.log_tail()}"


def complete(client: OpenAI, run: dict, **params):
    return client.completions.create(
        model="causal-lm",
        prompt=run["prompt_ids"],
        max_tokens=len(run["generated_ids"]),
        temperature=0,
        logit_bias=SERVED["logit_bias"],
        **params,
    )


def test_the_fixture_exercises_the_cleanup() -> None:
    assert sum(run["text"] != run["raw_text"] for run in RUNS) == len(RUNS)
    assert all(run["min_margin"] > 1e-3 for run in RUNS)


@pytest.mark.parametrize("run", RUNS, ids=lambda run: str(run["prompt_ids"]))
def test_whole_and_streamed_text_and_offsets_equal_transformers(client: OpenAI, run: dict) -> None:
    whole = complete(client, run, logprobs=0)
    choice = whole.choices[0]
    assert choice.text == run["text"]
    offsets = choice.logprobs.text_offset
    assert len(offsets) == len(run["generated_ids"])
    assert offsets == sorted(offsets) and offsets[-1] <= len(choice.text)

    chunks = list(complete(client, run, logprobs=0, stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == run["text"]
    streamed_offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed_offsets == offsets
    # Each chunk's text starts at its first token's offset.
    at = 0
    for chunk in chunks:
        if not chunk.choices or not chunk.choices[0].logprobs or not chunk.choices[0].logprobs.text_offset:
            continue
        assert chunk.choices[0].logprobs.text_offset[0] == at
        at += len(chunk.choices[0].text)


def test_echo_shows_the_cleaned_prompt(client: OpenAI) -> None:
    run = RUNS[0]
    echoed = complete(client, run, echo=True)
    plain = complete(client, run)
    # The prompt's text as transformers decodes it: all words, no punctuation to clean up here.
    assert echoed.choices[0].text.endswith(plain.choices[0].text)
    assert echoed.choices[0].text == "the city of" + run["text"]


def test_stop_strings_match_the_cleaned_text(client: OpenAI) -> None:
    run = next(run for run in RUNS if "'re" in run["text"])
    stopped = complete(client, run, stop=["'re"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == run["text"][: run["text"].index("'re")]
    streamed = "".join(c.choices[0].text for c in complete(client, run, stop=["'re"], stream=True) if c.choices)
    assert streamed == stopped.choices[0].text
