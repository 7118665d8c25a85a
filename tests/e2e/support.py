"""Helpers shared by the end-to-end tests: the reference fixture, the text a server should
stream for given token ids, launching `candlewick serve`, SSE and Prometheus parsing, and the
OpenAI error envelope.

Only the standard library, httpx and tokenizers are used here; no torch, no transformers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tokenizers import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "mistral" / "w8-gqa2"
# `serve --model DIR` names the model after the folder unless --served-model-name is given.
MODEL_NAME = FIXTURE_DIR.name

BOS_ID = 1
EOS_ID = 2
REPLACEMENT = "\ufffd"

# Every request a test sends is bounded by this (seconds).
REQUEST_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

# Flags of the server shared by the session (besides --model, --host and --port). Tests rely on
# --max-input-tokens being MAX_INPUT_TOKENS.
MAX_INPUT_TOKENS = 100
MAIN_SERVER_ARGS = [
    "--max-running", "16",
    "--max-waiting", "64",
    "--max-input-tokens", str(MAX_INPUT_TOKENS),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# The reference fixture


@dataclass(frozen=True)
class GreedyCase:
    """One prompt of reference.json's "greedy" section and what transformers generated for it."""

    index: int
    prompt: list[int]
    # Generated ids, cut after the end-of-sequence id when the model produced it.
    generated: list[int]

    @property
    def ends_with_eos(self) -> bool:
        return bool(self.generated) and self.generated[-1] == EOS_ID

    def finish_reason(self, max_tokens: int | None = None) -> str:
        """OpenAI's finish_reason for a greedy request of `max_tokens` (default: the full
        reference length)."""
        ids = self.generated if max_tokens is None else self.generated[:max_tokens]
        return "stop" if ids and ids[-1] == EOS_ID else "length"

    def generated_up_to(self, max_tokens: int) -> list[int]:
        return self.generated[:max_tokens]


@dataclass(frozen=True)
class Reference:
    max_new_tokens: int
    cases: list[GreedyCase]


def load_reference(fixture_dir: Path = FIXTURE_DIR) -> Reference:
    data = json.loads((fixture_dir / "reference.json").read_text())
    greedy = data["greedy"]
    cases = [
        GreedyCase(index=i, prompt=list(prompt), generated=list(alone))
        for i, (prompt, alone) in enumerate(zip(greedy["prompts"], greedy["alone"], strict=True))
    ]
    return Reference(max_new_tokens=int(greedy["max_new_tokens"]), cases=cases)


def load_tokenizer(fixture_dir: Path = FIXTURE_DIR) -> Tokenizer:
    return Tokenizer.from_file(str(fixture_dir / "tokenizer.json"))


# --------------------------------------------------------------------------------------------
# The text a server streams for generated ids
#
# Decoding the generated ids in one go is *not* what a streaming server can show: a
# SentencePiece decoder strips the leading space of whatever comes first (so the continuation
# must be decoded after some prompt context), and a byte-fallback decoder turns a run of byte
# tokens that is invalid UTF-8 as a whole into U+FFFD for every byte, even bytes (like "`")
# that were valid, and already streamed, on their own. Text once streamed cannot be taken
# back, so the expected text is what an incremental detokenizer emits: decode a short window
# (the last emitted tokens, or the last prompt tokens) without and with the new token, and
# emit the difference once it does not end in an unfinished character. This is the contract
# of candlewick's engine (crates/engine/src/detokenizer.rs), restated here independently.

_PROMPT_CONTEXT_TOKENS = 4
_STEPWISE_PROMPT_CONTEXT_TOKENS = 8


def _decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _new_suffix(emitted: str, text: str) -> str:
    if text.startswith(emitted):
        return text[len(emitted) :]
    for at, (a, b) in enumerate(zip(emitted, text, strict=False)):
        if a != b:
            return text[at:]
    return ""


class IncrementalText:
    """Text deltas for tokens generated after `prompt`, as a streaming server shows them."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        context = _PROMPT_CONTEXT_TOKENS
        while True:
            start = max(0, len(prompt) - context)
            text = _decode(tokenizer, prompt[start:])
            if start == 0 or not (text == "" or text.startswith(REPLACEMENT)):
                break
            context = context + 1 if context < _STEPWISE_PROMPT_CONTEXT_TOKENS else context * 2
        self._window = list(prompt[start:])
        self._emitted = len(self._window)
        self._emitted_text = text

    def push(self, token: int) -> str:
        self._window.append(token)
        text = _decode(self._tokenizer, self._window)
        if text.endswith(REPLACEMENT):
            return ""
        delta = _new_suffix(self._emitted_text, text)
        if delta:
            self._mark_emitted()
        return delta

    def flush(self) -> str:
        if self._emitted == len(self._window):
            return ""
        delta = _new_suffix(self._emitted_text, _decode(self._tokenizer, self._window))
        self._mark_emitted()
        return delta

    def _mark_emitted(self) -> None:
        if not self._emitted_text.endswith(REPLACEMENT):
            del self._window[: self._emitted]
        self._emitted = len(self._window)
        self._emitted_text = _decode(self._tokenizer, self._window)


def expected_text(
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    generated: Sequence[int],
    *,
    ignore_eos: bool = False,
) -> str:
    """The completion text for `generated` (ids produced after `prompt`).

    A final end-of-sequence id adds no text; special tokens are skipped."""
    decoder = IncrementalText(tokenizer, prompt)
    parts: list[str] = []
    for i, token in enumerate(generated):
        last = i == len(generated) - 1
        if last and token == EOS_ID and not ignore_eos:
            break
        parts.append(decoder.push(token))
    parts.append(decoder.flush())
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# OpenAI error envelope


def assert_error(
    response: httpx.Response, status: int, *, mentions: Iterable[str] = ()
) -> dict[str, Any]:
    """Checks an OpenAI-style error response and returns its "error" object.

    Each string of `mentions` must appear in the message (or be the `param`)."""
    body_preview = response.text[:800]
    assert response.status_code == status, (
        f"expected HTTP {status}, got {response.status_code}: {body_preview}"
    )
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith("application/json"), (
        f"error content-type is {content_type!r}: {body_preview}"
    )
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body_preview
    error: dict[str, Any] = body["error"]
    missing = {"message", "type", "param", "code"} - error.keys()
    assert not missing, f"error object lacks {sorted(missing)}: {body_preview}"
    assert isinstance(error["message"], str) and error["message"], body_preview
    assert isinstance(error["type"], str) and error["type"], body_preview
    for word in mentions:
        assert word in error["message"] or error.get("param") == word, (
            f"error does not mention {word!r}: {body_preview}"
        )
    return error


# --------------------------------------------------------------------------------------------
# Server-sent events


@dataclass
class StreamResult:
    """A streamed completion or chat completion, gathered."""

    status: int
    chunks: list[dict[str, Any]] = field(default_factory=list)
    # Seconds after the request was sent at which each chunk arrived.
    arrival_s: list[float] = field(default_factory=list)
    saw_done: bool = False
    # Lines that were not `data:` lines, comments or blank (should stay empty).
    stray_lines: list[str] = field(default_factory=list)
    error_body: str = ""

    def texts(self) -> dict[int, str]:
        """Concatenated text per choice index (`text` for completions, `delta.content` for
        chat)."""
        out: dict[int, str] = {}
        for chunk in self.chunks:
            for choice in chunk.get("choices") or []:
                index = int(choice.get("index", 0))
                if "delta" in choice:
                    piece = (choice.get("delta") or {}).get("content") or ""
                else:
                    piece = choice.get("text") or ""
                out[index] = out.get(index, "") + piece
        return out

    @property
    def text(self) -> str:
        return self.texts().get(0, "")

    def finish_reasons(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for chunk in self.chunks:
            for choice in chunk.get("choices") or []:
                reason = choice.get("finish_reason")
                if reason is not None:
                    index = int(choice.get("index", 0))
                    assert index not in out, f"choice {index} finished twice: {self.chunks}"
                    out[index] = reason
        return out

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons().get(0)

    @property
    def usage(self) -> dict[str, Any] | None:
        for chunk in reversed(self.chunks):
            usage = chunk.get("usage")
            if isinstance(usage, dict) and usage:
                return usage
        return None


def _parse_sse_line(line: str, result: StreamResult, arrived: float) -> bool:
    """Adds one SSE line to `result`; returns True at `data: [DONE]`."""
    line = line.rstrip("\r")
    if not line or line.startswith(":"):
        return False
    if not line.startswith("data:"):
        if not line.startswith(("event:", "id:", "retry:")):
            result.stray_lines.append(line)
        return False
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        result.saw_done = True
        return True
    result.chunks.append(json.loads(payload))
    result.arrival_s.append(arrived)
    return False


async def astream(
    client: httpx.AsyncClient,
    path: str,
    body: Mapping[str, Any],
    *,
    timeout: float = REQUEST_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
    on_chunk: Callable[[], object] | None = None,
) -> StreamResult:
    """POSTs `body` with stream=true and gathers the SSE chunks until `data: [DONE]`.

    `on_chunk` is called after each chunk (and once more at the end, whatever happened)."""
    payload = {**body, "stream": True}
    start = time.perf_counter()

    async def run() -> StreamResult:
        async with client.stream(
            "POST", path, json=payload, headers=headers, timeout=timeout
        ) as response:
            result = StreamResult(status=response.status_code)
            if response.status_code != 200:
                result.error_body = (await response.aread()).decode("utf-8", "replace")
                return result
            content_type = response.headers.get("content-type", "")
            assert content_type.startswith("text/event-stream"), content_type
            async for line in response.aiter_lines():
                done = _parse_sse_line(line, result, time.perf_counter() - start)
                if on_chunk is not None:
                    on_chunk()
                if done:
                    break
            return result

    try:
        return await asyncio.wait_for(run(), timeout)
    finally:
        if on_chunk is not None:
            on_chunk()


def stream_sync(
    client: httpx.Client,
    path: str,
    body: Mapping[str, Any],
    *,
    timeout: float = REQUEST_TIMEOUT_S,
) -> StreamResult:
    """The blocking twin of `astream`."""
    payload = {**body, "stream": True}
    start = time.perf_counter()
    with client.stream("POST", path, json=payload, timeout=timeout) as response:
        result = StreamResult(status=response.status_code)
        if response.status_code != 200:
            result.error_body = response.read().decode("utf-8", "replace")
            return result
        for line in response.iter_lines():
            if _parse_sse_line(line, result, time.perf_counter() - start):
                break
        return result


# --------------------------------------------------------------------------------------------
# Prometheus text format


@dataclass(frozen=True)
class MetricSample:
    name: str
    labels: Mapping[str, str]
    value: float


_SAMPLE_RE = re.compile(
    r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL_RE = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_metrics(text: str) -> list[MetricSample]:
    samples: list[MetricSample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        assert match, f"not a Prometheus sample line: {raw!r}"
        labels: dict[str, str] = {}
        if match.group("labels"):
            for key, value in _LABEL_RE.findall(match.group("labels")):
                labels[key] = value.replace(r"\"", '"').replace(r"\n", "\n").replace("\\\\", "\\")
        samples.append(MetricSample(match.group("name"), labels, float(match.group("value"))))
    return samples


class Metrics:
    """One scrape of /metrics."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = parse_metrics(text)

    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)

    def histogram(self, name: str) -> Histogram:
        buckets: dict[float, float] = {}
        for s in self.samples:
            if s.name == f"{name}_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
        return Histogram(
            buckets=dict(sorted(buckets.items())),
            count=self.value(f"{name}_count"),
            total=self.value(f"{name}_sum"),
        )


@dataclass(frozen=True)
class Histogram:
    # Cumulative counts by upper bound (`le`), +Inf included.
    buckets: Mapping[float, float]
    count: float
    total: float

    def at_most(self, bound: float) -> float:
        """Observations <= `bound`, read from the largest bucket bound not above it."""
        eligible = [le for le in self.buckets if le <= bound + 1e-9]
        assert eligible, f"no bucket at or below {bound}: {sorted(self.buckets)}"
        return self.buckets[max(eligible)]

    def minus(self, before: Histogram) -> Histogram:
        return Histogram(
            buckets={le: c - before.buckets.get(le, 0.0) for le, c in self.buckets.items()},
            count=self.count - before.count,
            total=self.total - before.total,
        )


def scrape(client: httpx.Client) -> Metrics:
    response = client.get("/metrics", timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text[:500]
    return Metrics(response.text)


def wait_for_gauge(
    client: httpx.Client, name: str, expected: float, *, within_s: float = 5.0
) -> Metrics:
    """Polls /metrics until gauge `name` reads `expected`; fails after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        metrics = scrape(client)
        if metrics.has(name) and metrics.value(name) == expected:
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{name} is {metrics.value(name) if metrics.has(name) else 'absent'}, "
                f"not {expected}, after {within_s} s"
            )
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# Launching `candlewick serve`


def find_binary() -> Path:
    """$CANDLEWICK_BIN, else target/release/candlewick, else target/debug/candlewick."""
    override = os.environ.get("CANDLEWICK_BIN")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"CANDLEWICK_BIN={override} is not an executable file")
        return path
    for profile in ("release", "debug"):
        path = REPO_ROOT / "target" / profile / "candlewick"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "no candlewick binary: run `cargo build --release` first, or set CANDLEWICK_BIN"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A `candlewick serve` process on 127.0.0.1."""

    name: str
    args: list[str]
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    model_name: str
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"(cannot read {self.log_path}: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then wait up to `timeout` s; kills it and returns None if it did not exit."""
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


# `spawn_server(*flags, model=DIR, name="...")`, the conftest fixture's factory.
ServerFactory = Callable[..., Server]


class ServerStartError(RuntimeError):
    pass


def launch_server(
    *,
    name: str,
    args: Sequence[str],
    log_dir: Path,
    model: Path | None = FIXTURE_DIR,
    binary: Path | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
    attempts: int = 3,
) -> Server:
    """Starts `candlewick serve` on a free port and waits until GET /ready answers 200.

    `args` are the extra flags (limits, --api-key, ...). A port taken between choosing it and
    binding it is retried on another one."""
    binary = binary or find_binary()
    model_name = model.name if model is not None else "tiny-mistral"
    args = list(args)
    if "--served-model-name" in args:
        model_name = args[args.index("--served-model-name") + 1]
    api_key = args[args.index("--api-key") + 1] if "--api-key" in args else None
    last_error = ""
    for _ in range(attempts):
        port = free_port()
        command = [str(binary), "serve", "--host", "127.0.0.1", "--port", str(port)]
        if model is not None:
            command += ["--model", str(model)]
        command += args
        log_path = log_dir / f"{name}-{port}.log"
        with log_path.open("wb") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            # The server reads CANDLEWICK_* variables (CANDLEWICK_API_KEY, CANDLEWICK_CONFIG,
            # ...): the tests' flags alone must decide how it runs.
            env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEWICK_")}
            env.update(HF_HUB_OFFLINE="1", NO_COLOR="1")
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        server = Server(
            name=name,
            args=args,
            port=port,
            process=process,
            log_path=log_path,
            model_name=model_name,
            api_key=api_key,
        )
        try:
            _wait_ready(server, ready_timeout)
            return server
        except ServerStartError as error:
            server.kill()
            last_error = str(error)
            if "in use" not in server.log_tail().lower():
                break
    raise ServerStartError(last_error)


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=1.0) as client:
        while True:
            code = server.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"candlewick serve exited with {code} before it was ready; "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )
            try:
                if client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"candlewick serve was not ready within {timeout} s; "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )
            time.sleep(0.1)


@contextlib.contextmanager
def served(fixtures: Mapping[str, Path], *, prefix: str, log_dir: Path, binary: Path) -> Iterator[dict[str, Server]]:
    """One server per fixture, by the same keys; each stopped with SIGTERM at the end, which it must
    answer by exiting 0."""
    started: dict[str, Server] = {}
    try:
        for key, fixture in fixtures.items():
            started[key] = launch_server(name=f"{prefix}-{key}", args=[], log_dir=log_dir, model=fixture, binary=binary)
        yield started
    finally:
        for server in started.values():
            try:
                code = server.stop(STOP_TIMEOUT_S)
            finally:
                server.kill()
            assert code == 0, f"{server.name} exited with {code}:\n{server.log_tail()}"
