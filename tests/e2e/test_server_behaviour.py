"""The server under concurrency and abuse, with raw HTTP: batched decoding gives the same text
as decoding alone, disconnects free their sequences, limits answer with the right status and
OpenAI's error envelope, and nothing malformed brings the server down.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AuthenticationError, OpenAI
from tokenizers import Tokenizer

from support import (
    FIXTURE_DIR,
    MAX_INPUT_TOKENS,
    REQUEST_TIMEOUT_S,
    Reference,
    ServerFactory,
    StreamResult,
    assert_error,
    astream,
    expected_text,
    scrape,
    stream_sync,
    wait_for_gauge,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

METRIC_NAMES = [
    "candlewick_requests_total",
    "candlewick_queue_depth",
    "candlewick_running_sequences",
    "candlewick_decode_batch_size_bucket",
    "candlewick_decode_batch_size_sum",
    "candlewick_decode_batch_size_count",
    "candlewick_time_to_first_token_seconds_bucket",
    "candlewick_time_to_first_token_seconds_count",
    "candlewick_inter_token_latency_seconds_bucket",
    "candlewick_inter_token_latency_seconds_count",
    "candlewick_prompt_tokens_total",
    "candlewick_generated_tokens_total",
]


def completion_body(model: str, prompt: Any, **fields: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, **fields}


def ok_completion(client: httpx.Client, model: str) -> None:
    """A small request that must succeed: the server is still serving."""
    response = client.post(
        COMPLETIONS,
        json=completion_body(model, [1, 382], max_tokens=4, temperature=0),
        timeout=REQUEST_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text[:500]
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def run_streams(
    base_url: str,
    bodies: list[dict[str, Any]],
    *,
    background: dict[str, Any] | None = None,
    n_background: int = 2,
) -> list[StreamResult]:
    """Sends all `bodies` as streamed completions at once and gathers them.

    With `background`, `n_background` streams of it are started first, and `bodies` are sent
    once each of them has streamed a chunk: the model is then decoding those sequences while
    `bodies` arrive, so the requests share decode steps however fast the model is. The
    background streams must finish too (their results are not returned)."""

    async def main() -> list[StreamResult]:
        limits = httpx.Limits(max_connections=len(bodies) + n_background + 4)
        async with httpx.AsyncClient(base_url=base_url, limits=limits) as client:
            # Open the connections first, so that the requests themselves arrive together.
            await asyncio.gather(*(client.get("/health") for _ in range(len(bodies))))
            longs: list[asyncio.Task[StreamResult]] = []
            if background is not None:
                started = [asyncio.Event() for _ in range(n_background)]
                longs = [
                    asyncio.create_task(astream(client, COMPLETIONS, background, on_chunk=ev.set))
                    for ev in started
                ]
                waiting = asyncio.gather(*(ev.wait() for ev in started))
                await asyncio.wait_for(waiting, REQUEST_TIMEOUT_S)
            results = await asyncio.gather(*(astream(client, COMPLETIONS, b) for b in bodies))
            for k, result in enumerate(await asyncio.gather(*longs)):
                assert_stream_ok(result, f"background stream {k}")
            return list(results)

    return asyncio.run(main())


def background_body(model: str, reference: Reference) -> dict[str, Any]:
    """A long greedy stream: 480 tokens after a 2-token prompt, inside the 512-token context."""
    return completion_body(
        model, reference.cases[0].prompt, max_tokens=480, temperature=0, ignore_eos=True
    )


def assert_stream_ok(result: StreamResult, what: str) -> None:
    assert result.status == 200, f"{what}: HTTP {result.status} {result.error_body[:500]}"
    assert result.saw_done, f"{what}: no data: [DONE]"
    assert not result.stray_lines, f"{what}: unexpected SSE lines {result.stray_lines[:3]}"
    assert result.finish_reason in ("stop", "length"), f"{what}: {result.chunks[-3:]}"


# --------------------------------------------------------------------------------------------
# Probes and metrics


def test_health_ready_and_metrics(http: httpx.Client, model_name: str) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200
    ok_completion(http, model_name)
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers.get("content-type", "").startswith("text/plain")
    metrics = scrape(http)
    names = metrics.names()
    missing = [name for name in METRIC_NAMES if name not in names]
    assert not missing, f"/metrics lacks {missing}:\n{response.text[:3000]}"
    assert metrics.value("candlewick_requests_total", status="200") >= 1
    assert metrics.value("candlewick_prompt_tokens_total") >= 2
    assert metrics.value("candlewick_generated_tokens_total") >= 1


# --------------------------------------------------------------------------------------------
# Concurrency


def test_concurrent_streams_match_each_request_alone(
    base_url: str, http: httpx.Client, tokenizer: Tokenizer, reference: Reference, model_name: str
) -> None:
    """16 greedy streams at once give what each gives alone, and what transformers gave; the
    decode steps meanwhile batch several sequences.

    Two long ignore_eos streams run throughout, so the short ones are decoded in batches with
    them (and with each other) however fast the model is."""
    cases = reference.cases
    bodies = [
        completion_body(
            model_name,
            cases[i % len(cases)].prompt,
            max_tokens=8 + i,
            temperature=0,
            stream_options={"include_usage": True},
        )
        for i in range(16)
    ]
    alone = [run_streams(base_url, [body])[0] for body in bodies]
    for i, result in enumerate(alone):
        assert_stream_ok(result, f"request {i} alone")
        case = cases[i % len(cases)]
        max_tokens = bodies[i]["max_tokens"]
        assert result.text == expected_text(
            tokenizer, case.prompt, case.generated_up_to(max_tokens)
        ), f"request {i} alone differs from the reference"
        assert result.finish_reason == case.finish_reason(max_tokens)

    before = scrape(http).histogram("candlewick_decode_batch_size")
    concurrent = run_streams(base_url, bodies, background=background_body(model_name, reference))
    for i, (a, c) in enumerate(zip(alone, concurrent, strict=True)):
        assert_stream_ok(c, f"request {i} concurrent")
        assert c.text == a.text, f"request {i}: batched text differs from alone"
        assert c.finish_reason == a.finish_reason
        assert c.usage == a.usage, f"request {i}: {c.usage} != {a.usage}"

    after = scrape(http).histogram("candlewick_decode_batch_size")
    delta = after.minus(before)
    assert delta.count > 0, "no decode steps observed"
    assert delta.at_most(1.0) < delta.count, (
        f"every decode step had batch size 1: {dict(delta.buckets)}"
    )


def test_seeded_sample_is_the_same_alone_and_beside_others(
    base_url: str, reference: Reference, model_name: str
) -> None:
    cases = reference.cases
    seeded = completion_body(model_name, cases[2].prompt, max_tokens=24, temperature=0.9, seed=11)
    # 13 short requests, greedy and sampled, plus 2 long background streams: 15 others.
    others = [
        completion_body(
            model_name,
            cases[i % len(cases)].prompt,
            max_tokens=16 + 8 * (i % 4),
            temperature=0.0 if i % 2 else 1.0,
            seed=100 + i,
            ignore_eos=True,
        )
        for i in range(13)
    ]
    alone = run_streams(base_url, [seeded])[0]
    assert_stream_ok(alone, "seeded alone")
    crowd = run_streams(
        base_url,
        others[:6] + [seeded] + others[6:],
        background=background_body(model_name, reference),
    )
    for i, result in enumerate(crowd):
        assert_stream_ok(result, f"concurrent request {i}")
    assert crowd[6].text == alone.text
    assert crowd[6].finish_reason == alone.finish_reason
    assert crowd[6].text != "", "24 sampled tokens with no text"


def test_client_disconnect_frees_the_sequence(
    base_url: str, http: httpx.Client, reference: Reference, model_name: str
) -> None:
    body = completion_body(
        model_name,
        reference.cases[0].prompt,
        max_tokens=480,
        temperature=0,
        ignore_eos=True,
        stream=True,
    )
    for _ in range(4):
        with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
            with client.stream("POST", COMPLETIONS, json=body) as response:
                assert response.status_code == 200
                chunks = 0
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        chunks += 1
                        if chunks == 2:
                            break
                assert chunks == 2
        # Leaving both blocks closes the connection mid-stream.
    wait_for_gauge(http, "candlewick_running_sequences", 0, within_s=5.0)
    wait_for_gauge(http, "candlewick_queue_depth", 0, within_s=5.0)
    ok_completion(http, model_name)
    assert http.get("/health").status_code == 200


# --------------------------------------------------------------------------------------------
# Limits


def test_full_queue_answers_429_at_once(spawn_server: ServerFactory, reference: Reference) -> None:
    server = spawn_server(
        "--max-running", "1", "--max-waiting", "1", "--max-total-tokens", "512", name="queue"
    )
    body = background_body(server.model_name, reference)
    n = 12

    async def fire() -> list[tuple[int, float, httpx.Response]]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=server.url, limits=limits) as client:
            # Open the connections first, so the requests themselves arrive together.
            await asyncio.gather(*(client.get("/health", timeout=5) for _ in range(n)))

            async def one(i: int) -> tuple[int, float, httpx.Response]:
                start = time.perf_counter()
                response = await client.post(COMPLETIONS, json=body, timeout=REQUEST_TIMEOUT_S)
                return i, time.perf_counter() - start, response

            return list(await asyncio.gather(*(one(i) for i in range(n))))

    results = asyncio.run(fire())
    rejected = [(elapsed, r) for _, elapsed, r in results if r.status_code == 429]
    served = [r for _, _, r in results if r.status_code != 429]
    assert rejected, f"no 429 with --max-running 1 --max-waiting 1 and {n} requests at once"
    for elapsed, response in rejected:
        assert_error(response, 429)
        assert elapsed < 2.0, f"a 429 took {elapsed:.2f} s"
    assert served, "every request was rejected"
    for response in served:
        assert response.status_code == 200, response.text[:500]
        payload = response.json()
        assert payload["choices"][0]["finish_reason"] == "length"
        assert payload["usage"]["completion_tokens"] == 480
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        metrics = wait_for_gauge(http, "candlewick_running_sequences", 0)
        assert metrics.value("candlewick_requests_total", status="429") >= len(rejected)
        assert metrics.value("candlewick_queue_depth") == 0
        ok_completion(http, server.model_name)


def test_oversized_body_is_413(spawn_server: ServerFactory) -> None:
    server = spawn_server("--max-body-bytes", "1000", name="body-limit")
    big = json.dumps(completion_body(server.model_name, "x" * 5000, max_tokens=4)).encode()
    assert len(big) > 5000
    headers = {"content-type": "application/json"}
    # Each on a connection of its own: the server may close one after refusing its body.
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        assert_error(http.post(COMPLETIONS, content=big, headers=headers), 413)
    # Without a Content-Length (chunked upload) the limit holds as well.
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        assert_error(http.post(COMPLETIONS, content=iter([big]), headers=headers), 413)
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        ok_completion(http, server.model_name)  # a body under the limit is fine


def test_api_key(spawn_server: ServerFactory) -> None:
    server = spawn_server("--api-key", "secret", name="api-key")
    body = completion_body(server.model_name, [1, 382], max_tokens=4, temperature=0)
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        assert_error(http.post(COMPLETIONS, json=body), 401)
        assert_error(
            http.post(COMPLETIONS, json=body, headers={"authorization": "Bearer wrong"}), 401
        )
        assert_error(http.post(COMPLETIONS, json=body, headers={"authorization": "secret"}), 401)
        assert_error(http.get("/v1/models"), 401)
        good = {"authorization": "Bearer secret"}
        response = http.post(COMPLETIONS, json=body, headers=good)
        assert response.status_code == 200, response.text[:500]
        assert http.get("/v1/models", headers=good).status_code == 200
        # Probes stay open: orchestrators call them without credentials.
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 200
    wrong = OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(AuthenticationError):
        wrong.completions.create(model=server.model_name, prompt=[1, 382], max_tokens=4)
    right = OpenAI(base_url=f"{server.url}/v1", api_key="secret", max_retries=0, timeout=30)
    assert right.completions.create(model=server.model_name, prompt=[1, 382], max_tokens=4)


def test_served_model_name(spawn_server: ServerFactory) -> None:
    server = spawn_server("--served-model-name", "tiny", name="renamed")
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        ids = [model["id"] for model in http.get("/v1/models").json()["data"]]
        assert ids == ["tiny"]
        ok_completion(http, "tiny")
        body = completion_body("w8-gqa2", [1, 382], max_tokens=4)
        assert_error(http.post(COMPLETIONS, json=body), 404)


# --------------------------------------------------------------------------------------------
# Malformed requests


def _bad_requests(model: str) -> list[tuple[str, str, dict[str, Any] | bytes, int, list[str]]]:
    """(id, path, body, expected status, words the message must contain)."""
    base = completion_body(model, [1, 382], max_tokens=4)
    too_long = [1] + [382] * (MAX_INPUT_TOKENS + 57 - 1)  # MAX_INPUT_TOKENS + 57 tokens
    return [
        ("invalid-json", COMPLETIONS, b'{"model": "x", "prompt": ', 400, []),
        ("not-an-object", COMPLETIONS, b"[1, 2, 3]", 400, []),
        ("missing-prompt", COMPLETIONS, {"model": model, "max_tokens": 4}, 400, []),
        ("negative-temperature", COMPLETIONS, {**base, "temperature": -1}, 400, ["temperature"]),
        ("zero-max-tokens", COMPLETIONS, {**base, "max_tokens": 0}, 400, ["max_tokens"]),
        ("negative-max-tokens", COMPLETIONS, {**base, "max_tokens": -5}, 400, ["max_tokens"]),
        ("string-max-tokens", COMPLETIONS, {**base, "max_tokens": "ten"}, 400, []),
        ("top-p-above-one", COMPLETIONS, {**base, "top_p": 1.5}, 400, ["top_p"]),
        ("unknown-model", COMPLETIONS, {**base, "model": "no-such-model"}, 404, []),
        ("suffix", COMPLETIONS, {**base, "suffix": "tail"}, 400, ["suffix"]),
        ("best-of-above-n", COMPLETIONS, {**base, "best_of": 3, "n": 1}, 400, ["best_of"]),
        ("prompt-object", COMPLETIONS, {**base, "prompt": {}}, 400, []),
        ("prompt-mixed-list", COMPLETIONS, {**base, "prompt": [1, "a"]}, 400, []),
        ("token-id-out-of-vocab", COMPLETIONS, {**base, "prompt": [1, 10**6]}, 400, []),
        (
            "prompt-too-long",
            COMPLETIONS,
            {**base, "prompt": too_long},
            400,
            [str(len(too_long)), str(MAX_INPUT_TOKENS)],
        ),
        ("chat-missing-messages", CHAT, {"model": model, "max_tokens": 4}, 400, []),
        ("chat-messages-not-a-list", CHAT, {"model": model, "messages": "hi"}, 400, []),
        (
            "chat-role-not-in-template",
            CHAT,
            {"model": model, "messages": [{"role": "system", "content": "be brief"}]},
            400,
            [],
        ),
        (
            "chat-unknown-model",
            CHAT,
            {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
            404,
            [],
        ),
    ]


BAD_IDS = [case[0] for case in _bad_requests("m")]


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_malformed_request_is_rejected(http: httpx.Client, model_name: str, bad_id: str) -> None:
    _, path, body, status, words = next(c for c in _bad_requests(model_name) if c[0] == bad_id)
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert_error(response, status, mentions=words)
    # Streamed, the same request fails the same way before any event is sent.
    if isinstance(body, dict):
        streamed = stream_sync(http, path, body)
        assert streamed.status == status, streamed.error_body[:500]
    ok_completion(http, model_name)


def test_server_survives_all_malformed_requests(http: httpx.Client, model_name: str) -> None:
    for _, path, body, _, _ in _bad_requests(model_name):
        if isinstance(body, bytes):
            http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            http.post(path, json=body)
    assert http.get("/health").status_code == 200
    ok_completion(http, model_name)


def test_unknown_route_is_404(http: httpx.Client) -> None:
    assert http.get("/v1/nope").status_code == 404


def test_two_models_from_one_config_file(spawn_server: ServerFactory, tmp_path: Any) -> None:
    """A Mistral generator and a token-classification encoder from [[models]], side by side."""
    tagger = FIXTURE_DIR.parents[1] / "encoders" / "mobilebert-layernorm" / "token-classification"
    config = tmp_path / "two.toml"
    config.write_text(
        "[limits]\nmax_running = 2\n\n"
        f'[[models]]\nmodel = "{FIXTURE_DIR}"\nserved_model_name = "writer"\nmax_running = 3\n\n'
        f'[[models]]\nmodel = "{tagger}"\nserved_model_name = "tagger"\n'
    )
    server = spawn_server("--config", str(config), model=None, name="two-models")
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        ids = [model["id"] for model in http.get("/v1/models").json()["data"]]
        assert ids == ["writer", "tagger"]
        response = http.post(COMPLETIONS, json=completion_body("writer", [1, 382], max_tokens=4))
        assert response.status_code == 200, response.text[:500]
        assert response.json()["model"] == "writer"
        tagged = http.post(
            "/v1/token-classify", json={"model": "tagger", "inputs": "Sarah lives in London"}
        )
        assert tagged.status_code == 200, tagged.text[:500]
        assert isinstance(tagged.json(), list)
        # Each name on the other's route: the model's-task 400.
        wrong = http.post(CHAT, json={"model": "tagger", "messages": [{"role": "user", "content": "hi"}]})
        assert_error(wrong, 400)
        assert wrong.json()["error"]["code"] == "unsupported_task"
        assert_error(http.post("/v1/token-classify", json={"model": "writer", "inputs": "x"}), 400)
        assert_error(http.post(COMPLETIONS, json=completion_body("nobody", [1], max_tokens=1)), 404)
        assert http.get("/ready").status_code == 200


def test_schemathesis_against_our_own_openapi_description(
    spawn_server: ServerFactory, tmp_path: Any
) -> None:
    """A bounded, seeded schemathesis run on the bundled model: no 5xx, and every response
    conforms to /openapi.json."""
    server = spawn_server(model=None, name="schemathesis")
    schemathesis = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "10",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        # Its cache goes to the working directory.
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "generated" in result.stdout and " 0 passed" not in result.stdout, result.stdout[-2000:]
