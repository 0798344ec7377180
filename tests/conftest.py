"""Shared test parts: real loopback servers (the proxy, a fake business API) and captured fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
import uvicorn
from aiohttp import web
from pydantic import AliasChoices

from avr_llm_proxy.app import create_app
from avr_llm_proxy.config import Settings
from avr_llm_proxy.http_protocol import listener_options
from avr_llm_proxy.observability import logging_processors

FIXTURES = Path(__file__).parent / "fixtures"
# Every environment name a setting is read from, aliases included: the model is the one list.
SETTING_NAMES = tuple(
    name for field in Settings.model_fields.values()
    for name in (field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices)
                 else [field.validation_alias])
    if isinstance(name, str)
)
LOG_LINES: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Every test logs through the real chain; the rendered lines are kept for privacy checks."""

    def keep(logger: Any, method: str, event_dict: Any) -> str:
        line = json.dumps(event_dict, default=str, ensure_ascii=False)
        LOG_LINES.append(line)
        return line

    structlog.configure(
        processors=[*logging_processors("masked", b"test-hash-key-0123456789"), keep],
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' settings come from the tests, not from the machine's environment."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)


# The numbers the tests use; none of them may ever appear whole in a log line.
TEST_NUMBERS = ("593987654321", "0987654321", "612345678", "4155550123")


@pytest.fixture(autouse=True)
def _no_number_in_logs() -> Iterator[None]:
    """Whatever a test does, no caller number it used reaches a rendered log line unmasked."""
    start = len(LOG_LINES)
    yield
    leaked = [line for line in LOG_LINES[start:] if any(number in line for number in TEST_NUMBERS)]
    assert not leaked, f"caller number in a log line: {leaked[:3]}"


@pytest.fixture
def logs() -> Callable[[], list[str]]:
    """The log lines (rendered as JSON) written since the test started."""
    start = len(LOG_LINES)
    return lambda: LOG_LINES[start:]


def rss() -> int:
    """This process's resident memory now, in bytes (the proxy or server under test runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def avr_requests() -> list[dict[str, Any]]:
    """Every request the real avr-core 1.4.1 sent (llm-requests.jsonl)."""
    lines = (FIXTURES / "llm-requests.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "store_url": f"sqlite:///{tmp_path / 'calls.db'}",
        "callerid_dir": str(tmp_path / "callerid"),
        "caller_wait_ms": 200,
        "api_timeout_ms": 2000,
        "agi_listen": "",
    }
    values.update(overrides)
    # One process runs the tests' client, the proxy and the fake API: under load its event loop lags,
    # so only the total deadline applies unless a test sets the others.
    values.setdefault("api_first_byte_timeout_ms", values["api_timeout_ms"])
    values.setdefault("api_connect_timeout_ms", values["api_timeout_ms"])
    values.setdefault("store_timeout_ms", 10_000)  # the same lag: a test of the store's deadline sets it
    (tmp_path / "callerid").mkdir(exist_ok=True)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def _listening_socket(bind: tuple[str, int] = ("127.0.0.1", 0)) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(bind)
    sock.listen(512)
    return sock


@dataclass
class Proxy:
    url: str
    settings: Settings


@contextlib.asynccontextmanager
async def running_proxy(settings: Settings, bind: tuple[str, int] = ("127.0.0.1", 0)) -> AsyncIterator[Proxy]:
    """The real app served by uvicorn on a loopback port, for tests that need real HTTP framing."""
    sock = _listening_socket(bind)
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), log_level="warning", lifespan="on", **listener_options())
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    try:
        yield Proxy(f"http://{bind[0]}:{sock.getsockname()[1]}", settings)
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class FakeApi:
    """A business API on a real port; `mode` picks how it answers the next requests."""

    mode: str = "echo"
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    answer: Any = None

    custom: Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]] | None = None
    headers: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.received.append(payload)
        self.headers.append(dict(request.headers))
        if self.custom is not None:
            return await self.custom(request, payload)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "500":
            return web.Response(status=500, text="Internal Server Error")
        if self.mode == "html":
            return web.Response(text="<html><body>Bad Gateway</body></html>", content_type="text/html")
        if self.mode == "invalid_json":
            return web.Response(body=b'{"message": "Hola', content_type="application/json")
        if self.mode == "text":
            return web.Response(text=self.answer or "Hola desde texto plano", content_type="text/plain")
        if self.mode == "close":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        if self.mode == "fixed":
            return web.json_response({"message": self.answer})
        if self.mode == "raw":
            status, headers, body = self.answer
            return web.Response(status=status, headers=headers, body=body)
        return web.json_response({"message": f"Hola {payload['caller_number']}. Usted dijo: {payload['text']}."})


@contextlib.asynccontextmanager
async def running_api(mode: str = "echo") -> AsyncIterator[FakeApi]:
    api = FakeApi(mode=mode)
    app = web.Application()
    app.router.add_post("/api/bot/client/call/message/566895", api.handle)
    app.router.add_post("/v1/chat/completions", api.handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    sock = _listening_socket()
    site = web.SockSite(runner, sock)
    await site.start()
    api.url = f"http://127.0.0.1:{sock.getsockname()[1]}/api/bot/client/call/message/566895"
    try:
        yield api
    finally:
        await runner.cleanup()


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def clean_environ(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: the machine's, minus our settings, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if key not in SETTING_NAMES}
    env.update(extra)
    return env


async def wait_for(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Until `condition()` holds, polled; fails after `limit` seconds."""
    deadline = asyncio.get_running_loop().time() + limit
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def serve_process(command: list[str], cwd: Path, env: dict[str, str], url: str) -> Iterator[subprocess.Popen[Any]]:
    """`command` (an `avr-llm-proxy serve`) run in `cwd` with its stderr in `cwd/serve.log`, once it
    answers /healthz at `url`; fails, with that log, if it exits or takes 30 s. Stopped on the way out."""
    log_path = cwd / "serve.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, cwd=cwd, env=env, stderr=log_file)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"serve did not start: {log_path.read_text()}") from None
                time.sleep(0.1)  # poll interval
        yield process
    finally:
        process.terminate()
        process.wait(timeout=20)
