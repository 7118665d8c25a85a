"""Mixtral is served like Mistral: the same endpoints, the same continuous batches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

from support import FIXTURE_DIR, expected_text, load_reference, load_tokenizer

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
