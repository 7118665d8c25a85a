#!/usr/bin/env python3
"""Load generator for candlewick's OpenAI-compatible server.

For each concurrency level it sends a fixed number of streamed /v1/completions requests, keeping
that many in flight (a closed loop), and reports per level: requests, errors, generated tokens,
throughput, time to first token and inter-token latency percentiles. Latencies come from the
arrival times of the SSE chunks: TTFT is the time from sending a request to its first chunk,
and an inter-token latency is the gap between two consecutive chunks of one stream.

Prompts are token-id lists (a BOS, then ids drawn from --token-ids, different for every
request) so their length is exact; requests use temperature 0 and ignore_eos, so every request
generates exactly --max-tokens tokens. --shared-prefix N puts the same N tokens after every BOS,
as a chat's system prompt, to measure prefix caching (run the server with and without
--prefix-cache-bytes 0).

    # against a running server
    python tests/bench/load.py --url http://127.0.0.1:8000 --concurrency 1,8,32 --requests 64
    # start one itself (and stop it afterwards)
    python tests/bench/load.py --spawn --model tests/fixtures/mistral/w8-gqa2 \\
        --server-args "--max-running 32 --max-waiting 256" --json results.json

Only httpx is needed (pip install httpx).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
PERCENTILES = (50, 90, 99)


# --------------------------------------------------------------------------------------------
# Measurements


@dataclass
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    generated_tokens: int = 0
    error: str | None = None


@dataclass
class LevelReport:
    concurrency: int
    requests: int
    errors: int
    generated_tokens: int
    duration_s: float
    throughput_tokens_per_s: float
    requests_per_s: float
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    latency_ms: dict[str, float | None]
    first_errors: list[str]
    timed_out: bool


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), interpolating linearly between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in PERCENTILES:
        value = percentile(values_s, q)
        out[f"p{q}"] = None if value is None else value * 1000.0
    return out


# --------------------------------------------------------------------------------------------
# Requests


def make_prompt(rng: random.Random, length: int, low: int, high: int, bos: int) -> list[int]:
    return [bos] + [rng.randrange(low, high) for _ in range(max(0, length - 1))]


async def one_request(
    client: httpx.AsyncClient, body: dict[str, Any], timeout: float
) -> RequestResult:
    start = time.perf_counter()
    arrivals: list[float] = []
    usage_tokens: int | None = None

    async def stream() -> str | None:
        """Reads the stream; returns an error, or None."""
        nonlocal usage_tokens
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                return f"HTTP {response.status_code}: {text[:200]}"
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    return None
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"].get("completion_tokens", 0))
                if chunk.get("choices"):
                    arrivals.append(now - start)
            return "stream ended without data: [DONE]"

    try:
        error = await asyncio.wait_for(stream(), timeout)
    except (httpx.HTTPError, asyncio.TimeoutError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    latency = time.perf_counter() - start
    if error is not None:
        return RequestResult(ok=False, latency_s=latency, error=error)
    return RequestResult(
        ok=True,
        latency_s=latency,
        ttft_s=arrivals[0] if arrivals else None,
        itl_s=[b - a for a, b in zip(arrivals, arrivals[1:], strict=False)],
        generated_tokens=usage_tokens if usage_tokens is not None else len(arrivals),
    )


@dataclass
class LoadConfig:
    base_url: str
    model: str
    requests: int
    prompt_len: int
    max_tokens: int
    token_low: int
    token_high: int
    bos: int
    request_timeout_s: float
    level_timeout_s: float
    seed: int
    api_key: str | None = None
    shared_prefix: int = 0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def prompt(self, rng: random.Random) -> list[int]:
        """BOS, the shared prefix (the same for every request), then --prompt-len own tokens."""
        shared = random.Random(self.seed + 7_777)
        prefix = [shared.randrange(self.token_low, self.token_high) for _ in range(self.shared_prefix)]
        own = make_prompt(rng, self.prompt_len, self.token_low, self.token_high, self.bos)
        return own[:1] + prefix + own[1:]


def request_body(config: LoadConfig, prompt: list[int]) -> dict[str, Any]:
    return {
        "model": config.model,
        "prompt": prompt,
        "max_tokens": config.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **config.extra_body,
    }


async def run_level(config: LoadConfig, concurrency: int) -> LevelReport:
    rng = random.Random(config.seed * 1_000_003 + concurrency)
    prompts = [config.prompt(rng) for _ in range(config.requests)]
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(config.request_timeout_s)
    async with httpx.AsyncClient(
        base_url=config.base_url, limits=limits, timeout=timeout, headers=config.headers()
    ) as client:
        pending = iter(prompts)

        async def worker() -> None:
            for prompt in pending:  # shared by all workers: each prompt is sent once
                results.append(
                    await one_request(
                        client, request_body(config, prompt), config.request_timeout_s
                    )
                )

        start = time.perf_counter()
        timed_out = False
        workers = asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        try:
            await asyncio.wait_for(workers, config.level_timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
        duration = time.perf_counter() - start

    good = [r for r in results if r.ok]
    bad = [r for r in results if not r.ok]
    tokens = sum(r.generated_tokens for r in good)
    return LevelReport(
        concurrency=concurrency,
        requests=len(results),
        errors=len(bad),
        generated_tokens=tokens,
        duration_s=duration,
        throughput_tokens_per_s=tokens / duration if duration > 0 else 0.0,
        requests_per_s=len(good) / duration if duration > 0 else 0.0,
        ttft_ms=summary_ms([r.ttft_s for r in good if r.ttft_s is not None]),
        itl_ms=summary_ms([gap for r in good for gap in r.itl_s]),
        latency_ms=summary_ms([r.latency_s for r in good]),
        first_errors=[r.error or "" for r in bad[:5]],
        timed_out=timed_out,
    )


async def warm_up(config: LoadConfig, count: int) -> None:
    if count <= 0:
        return
    rng = random.Random(config.seed - 1)
    async with httpx.AsyncClient(base_url=config.base_url, headers=config.headers()) as client:
        for _ in range(count):
            prompt = config.prompt(rng)
            result = await one_request(
                client, request_body(config, prompt), config.request_timeout_s
            )
            if not result.ok:
                raise SystemExit(f"warm-up request failed: {result.error}")


def served_model(base_url: str, api_key: str | None) -> str:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    data = response.json().get("data") or []
    if not data:
        raise SystemExit(f"{base_url}/v1/models lists no model")
    return str(data[0]["id"])


# --------------------------------------------------------------------------------------------
# Spawning a server


def find_binary(explicit: str | None) -> Path:
    for candidate in (explicit, os.environ.get("CANDLEWICK_BIN")):
        if candidate:
            return Path(candidate)
    for profile in ("release", "debug"):
        path = REPO_ROOT / "target" / profile / "candlewick"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise SystemExit("no candlewick binary: cargo build --release, or pass --bin")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SpawnedServer:
    def __init__(self, binary: Path, model: str | None, extra: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(binary), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if model:
            command += ["--model", model]
        command += extra
        self.log_path = log_path
        self._log = log_path.open("wb")
        print(f"starting: {shlex.join(command)}  (log {log_path})", file=sys.stderr)
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"server exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"server not ready within {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print("server ignored SIGTERM for 10 s; killing it", file=sys.stderr)
                self.process.kill()
                self.process.wait()
        self._log.close()


# --------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(reports: list[LevelReport], out: TextIO) -> None:
    header = [
        "conc", "reqs", "errs", "tokens", "secs", "tok/s", "req/s",
        "ttft p50", "p90", "p99", "itl p50", "p90", "p99",
    ]  # fmt: skip
    rows = [header]
    for r in reports:
        rows.append(
            [
                str(r.concurrency),
                str(r.requests),
                str(r.errors),
                str(r.generated_tokens),
                _fmt(r.duration_s, 2),
                _fmt(r.throughput_tokens_per_s),
                _fmt(r.requests_per_s, 2),
                *(_fmt(r.ttft_ms[f"p{q}"]) for q in PERCENTILES),
                *(_fmt(r.itl_ms[f"p{q}"], 2) for q in PERCENTILES),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("latencies in ms; tok/s = generated tokens per second of wall time", file=out)
    for row in rows:
        print(
            "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)), file=out
        )
    for r in reports:
        if r.timed_out:
            print(f"concurrency {r.concurrency}: stopped at the level timeout", file=out)
        for error in r.first_errors:
            print(f"concurrency {r.concurrency}: {error}", file=out)


# --------------------------------------------------------------------------------------------
# Command line


def parse_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("expected positive integers like 1,8,32")
    return levels


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high))
    except ValueError:
        raise argparse.ArgumentTypeError("expected LOW-HIGH, e.g. 259-1000") from None
    if not 0 <= bounds[0] < bounds[1]:
        raise argparse.ArgumentTypeError("expected 0 <= LOW < HIGH")
    return bounds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Streamed /v1/completions load at several concurrency levels.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_argument_group("server")
    target.add_argument("--url", default="http://127.0.0.1:8000", help="base URL (%(default)s)")
    target.add_argument("--spawn", action="store_true", help="start `candlewick serve` itself")
    target.add_argument("--model", help="with --spawn: model folder (default: the bundled model)")
    target.add_argument(
        "--bin", help="with --spawn: the binary (default: $CANDLEWICK_BIN, else target/release)"
    )
    target.add_argument(
        "--server-args", default="", help='with --spawn: extra flags, e.g. "--max-running 32"'
    )
    target.add_argument("--server-log", help="with --spawn: its log file (default: a temp file)")
    target.add_argument(
        "--ready-timeout", type=float, default=120.0, help="with --spawn: seconds (%(default)s)"
    )
    target.add_argument("--model-name", help="requests' model field (default: from /v1/models)")
    target.add_argument(
        "--api-key", default=os.environ.get("CANDLEWICK_API_KEY"), help="($CANDLEWICK_API_KEY)"
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency", type=parse_levels, default=[1, 8, 32], help="levels (1,8,32)"
    )
    load.add_argument("--requests", type=int, default=64, help="per level (%(default)s)")
    load.add_argument(
        "--prompt-len", type=int, default=128, help="prompt tokens, BOS included (%(default)s)"
    )
    load.add_argument(
        "--max-tokens", type=int, default=128, help="generated per request (%(default)s)"
    )
    load.add_argument(
        "--token-ids",
        type=parse_range,
        default=(259, 1000),
        metavar="LOW-HIGH",
        help="prompt ids are drawn from [LOW, HIGH), inside the vocabulary (259-1000)",
    )
    load.add_argument("--bos", type=int, default=1, help="first prompt id (%(default)s)")
    load.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        help="tokens after BOS that every prompt shares, as a system prompt (%(default)s)",
    )
    load.add_argument("--warmup", type=int, default=2, help="untimed requests first (%(default)s)")
    load.add_argument("--request-timeout", type=float, default=300.0, help="seconds (%(default)s)")
    load.add_argument(
        "--level-timeout", type=float, default=900.0, help="seconds per level (%(default)s)"
    )
    load.add_argument("--seed", type=int, default=0, help="of the prompts (%(default)s)")
    load.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        metavar="JSON",
        help="fields added to every request, e.g. a response_format, to measure its cost",
    )
    load.add_argument("--json", metavar="PATH", help="also write the results as JSON (- = stdout)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.prompt_len < 1 or args.max_tokens < 1:
        parser.error("--requests, --prompt-len and --max-tokens must be positive")
    if not args.spawn and (args.model or args.bin or args.server_args or args.server_log):
        parser.error("--model, --bin, --server-args and --server-log go with --spawn")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    server: SpawnedServer | None = None
    try:
        if args.spawn:
            log_path = (
                Path(args.server_log)
                if args.server_log
                else Path(tempfile.mkstemp(prefix="candlewick-load-", suffix=".log")[1])
            )
            extra = shlex.split(args.server_args)
            if args.api_key and "--api-key" not in extra:
                extra += ["--api-key", args.api_key]
            server = SpawnedServer(find_binary(args.bin), args.model, extra, log_path)
            server.wait_ready(args.ready_timeout)
            base_url = server.url
        else:
            base_url = args.url.rstrip("/")
        config = LoadConfig(
            base_url=base_url,
            model=args.model_name or served_model(base_url, args.api_key),
            requests=args.requests,
            prompt_len=args.prompt_len,
            max_tokens=args.max_tokens,
            token_low=args.token_ids[0],
            token_high=args.token_ids[1],
            bos=args.bos,
            request_timeout_s=args.request_timeout,
            level_timeout_s=args.level_timeout,
            seed=args.seed,
            api_key=args.api_key,
            shared_prefix=args.shared_prefix,
            extra_body=args.extra_body,
        )
        reports = asyncio.run(_run(config, args.concurrency, args.warmup))
    finally:
        if server is not None:
            server.stop()

    print_table(reports, sys.stdout)
    if args.json:
        document = {
            "config": {
                **{k: v for k, v in asdict(config).items() if k != "api_key"},
                "concurrency": args.concurrency,
            },
            "levels": [asdict(report) for report in reports],
        }
        text = json.dumps(document, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 1 if any(r.errors or r.timed_out for r in reports) else 0


async def _run(config: LoadConfig, levels: list[int], warmup: int) -> list[LevelReport]:
    await warm_up(config, warmup)
    reports = []
    for level in levels:
        print(f"concurrency {level}: {config.requests} requests ...", file=sys.stderr)
        reports.append(await run_level(config, level))
    return reports


if __name__ == "__main__":
    sys.exit(main())
