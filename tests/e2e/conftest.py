"""Fixtures for the end-to-end tests: a `candlewick serve` on the w8-gqa2 fixture shared by the
session, a factory for servers with other flags, clients, and the reference outputs.

Servers write their stdout and stderr to log files (under pytest's temporary directory, or
$CANDLEWICK_E2E_LOG_DIR); a failing test's report ends with the last lines of every server
still running.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from types import FrameType

import httpx
import pytest
from openai import OpenAI
from tokenizers import Tokenizer

from support import (
    FIXTURE_DIR,
    MAIN_SERVER_ARGS,
    REQUEST_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Reference,
    Server,
    ServerFactory,
    ServerStartError,
    find_binary,
    launch_server,
    load_reference,
    load_tokenizer,
)

# No single test may run longer than this (seconds); requests have their own, shorter bounds.
TEST_DEADLINE_S = 120

_live_servers: list[Server] = []
_live_lock = threading.Lock()


def _track(server: Server) -> Server:
    with _live_lock:
        _live_servers.append(server)
    return server


def _untrack(server: Server) -> None:
    with _live_lock:
        if server in _live_servers:
            _live_servers.remove(server)


@atexit.register
def _kill_leftovers() -> None:
    # Belt and braces for an interrupted run: no server outlives pytest.
    with _live_lock:
        for server in _live_servers:
            server.kill()


def _stop_and_check(server: Server) -> None:
    """SIGTERM; the server must exit within STOP_TIMEOUT_S, with status 0."""
    try:
        code = server.stop(STOP_TIMEOUT_S)
    finally:
        server.kill()
        _untrack(server)
    assert code is not None, (
        f"{server.name} did not exit within {STOP_TIMEOUT_S} s of SIGTERM (killed); "
        f"log {server.log_path}:\n{server.log_tail()}"
    )
    assert code == 0, (
        f"{server.name} exited with status {code} after SIGTERM; "
        f"log {server.log_path}:\n{server.log_tail()}"
    )


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    override = os.environ.get("CANDLEWICK_E2E_LOG_DIR")
    if override:
        path = Path(override)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("candlewick-logs")


@pytest.fixture(scope="session")
def candlewick_bin() -> Path:
    try:
        return find_binary()
    except FileNotFoundError as error:
        message = str(error)
    pytest.fail(message, pytrace=False)


def _launch(binary: Path, log_dir: Path, name: str, args: list[str], model: Path | None) -> Server:
    try:
        server = launch_server(name=name, args=args, log_dir=log_dir, model=model, binary=binary)
    except ServerStartError as error:
        message = str(error)
    else:
        return _track(server)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def server(candlewick_bin: Path, log_dir: Path) -> Iterator[Server]:
    """The shared server: w8-gqa2, --max-running 16, --max-input-tokens MAX_INPUT_TOKENS."""
    started = _launch(candlewick_bin, log_dir, "main", MAIN_SERVER_ARGS, FIXTURE_DIR)
    try:
        yield started
    finally:
        _stop_and_check(started)


@pytest.fixture(scope="session")
def base_url(server: Server) -> str:
    return server.url


@pytest.fixture
def spawn_server(candlewick_bin: Path, log_dir: Path) -> Iterator[ServerFactory]:
    """Starts extra servers for one test: `spawn_server("--max-waiting", "1", model=...)`.

    Each is stopped with SIGTERM when the test ends (and killed if it does not exit)."""
    started: list[Server] = []

    def spawn(*args: str, model: Path | None = FIXTURE_DIR, name: str = "extra") -> Server:
        server = _launch(candlewick_bin, log_dir, name, list(args), model)
        started.append(server)
        return server

    yield spawn
    errors: list[str] = []
    for server in started:
        try:
            _stop_and_check(server)
        except AssertionError as error:
            errors.append(str(error))
    assert not errors, "\n\n".join(errors)


@pytest.fixture(scope="session")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="session")
def client(base_url: str) -> OpenAI:
    """The official client, without retries (a retried 429 or 5xx would hide the failure)."""
    return OpenAI(
        base_url=f"{base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
    )


@pytest.fixture(scope="session")
def reference() -> Reference:
    return load_reference()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="session")
def model_name(server: Server) -> str:
    return server.model_name


@pytest.fixture(autouse=True)
def _deadline() -> Iterator[None]:
    """Fails a test that runs longer than TEST_DEADLINE_S instead of hanging the run."""
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"test ran longer than {TEST_DEADLINE_S} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_DEADLINE_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        with _live_lock:
            servers = list(_live_servers)
        for server in servers:
            state = "running" if server.alive() else f"exited {server.process.returncode}"
            report.sections.append(
                (f"candlewick {server.name} ({state}) log {server.log_path}", server.log_tail(40))
            )
    return report
