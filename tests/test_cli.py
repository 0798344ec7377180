"""The `avr-llm-proxy` command as an operator runs it: real processes, real ports."""

from __future__ import annotations

import asyncio
import base64
import socket
import subprocess
import sys
import time
import urllib.request
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from avr_llm_proxy.simulate import play_call, register_caller

from .conftest import clean_environ, closed_port, serve_process

COMMAND = [sys.executable, "-m", "avr_llm_proxy"]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=clean_environ(**env), capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """`avr-llm-proxy serve` on its embedded defaults (SQLite in the working directory, demo API)."""
    port = closed_port()
    extra = getattr(request, "param", [])
    scratch = tmp_path / "tmp"  # serve's temporary files (the workers' metrics): nothing may stay
    scratch.mkdir()
    url = f"http://127.0.0.1:{port}"
    with serve_process([*COMMAND, "serve", "--port", str(port), *extra], tmp_path,
                       clean_environ(CALLERID_DIR=str(tmp_path), AGI_LISTEN="", TMPDIR=str(scratch)), url):
        yield url
    assert list(scratch.iterdir()) == []


def test_invalid_setting_stops_startup_with_one_line(tmp_path: Path) -> None:
    """A bad value stops serve before it binds, with one line naming the setting."""
    result = run(["serve"], tmp_path, PORT="abc")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "invalid setting PORT" in result.stderr and "'abc'" in result.stderr


KEY = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    ("args", "env", "name", "secret"),
    [
        (["serve"], {"ENCRYPTION_KEY": "not-base64-SECRETVALUE123"}, "ENCRYPTION_KEY", "SECRETVALUE123"),
        (["check"], {"AMI_URL": "ami://user:S3cretPw@host:notaport"}, "AMI_URL", "S3cretPw"),
        (["serve"], {"STORE_URL": "redis://:S3cretPw@host:bad", "ENCRYPTION_KEY": KEY}, "STORE_URL", "S3cretPw"),
        (["check"], {"API_URL": "ftp://user:S3cretPw@api.example/bot"}, "API_URL", "S3cretPw"),
        (["simulate", "--caller", "1", "hola"], {"HASH_KEY": "S3cretPw"}, "HASH_KEY", "S3cretPw"),
        (["serve"], {"API_TOKEN": "tok-S3cretPw\r\nX-Injected: yes"}, "API_TOKEN", "S3cretPw"),
        (["check"], {"OPENAI_API_KEY": "sk-S3cretPw\nX-Injected: yes"}, "OPENAI_API_KEY", "X-Injected"),
    ],
)
def test_invalid_secret_is_not_echoed(tmp_path: Path, args: list[str], env: dict[str, str], name: str,
                                      secret: str) -> None:
    """A refused key, token or URL stops start-up with one line naming it, and none of its secret."""
    result = run(args, tmp_path, **env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"invalid setting {name}" in result.stderr
    assert secret not in result.stdout + result.stderr


def test_store_and_api_urls_shown_without_password(tmp_path: Path) -> None:
    """serve and check name an unusable Redis or a business API by URL, never with its password."""
    store = f"redis://:S3cretPw@127.0.0.1:{closed_port()}/0"
    served = run(["serve"], tmp_path, STORE_URL=store, ENCRYPTION_KEY=KEY)
    assert served.returncode == 2 and "redis://***@127.0.0.1" in served.stderr
    with socket.create_server(("127.0.0.1", 0)) as api:
        api_url = f"http://bot:S3cretPw@127.0.0.1:{api.getsockname()[1]}/api"
        checked = run(["check"], tmp_path, CALLERID_DIR=str(tmp_path), API_URL=api_url)
    assert checked.returncode == 0 and "ok   business API reachable: http://***@127.0.0.1" in checked.stdout
    assert "S3cretPw" not in served.stdout + served.stderr + checked.stdout + checked.stderr


def test_workers_with_memory_store_refused(tmp_path: Path) -> None:
    """Several workers cannot share a memory store; serve says so and which setting to change."""
    result = run(["serve", "--workers", "2"], tmp_path, STORE_URL="memory://")
    assert result.returncode == 2 and "STORE_URL" in result.stderr and "sqlite" in result.stderr


def test_serve_and_simulate_on_defaults(served: str, tmp_path: Path) -> None:
    """serve alone gives caller-aware answers (demo API); simulate prints what the caller hears."""
    result = run(["simulate", "--url", served, "--caller", "0987654321", "--name", "Juan Perez",
                  "hola, necesito ayuda", "quiero saber el estado de mi pedido"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "< Hola Juan, gracias por llamar." in result.stdout
    assert "< Su pedido 1043 está en camino y llega mañana." in result.stdout.split("> quiero")[1]
    assert "!" not in "".join(line[:1] for line in result.stdout.splitlines())
    assert (tmp_path / "avr-llm-proxy.db").exists()
    log = (tmp_path / "serve.log").read_text()
    assert "event=turn" in log and "caller_number=+593*****4321" in log and "593987654321" not in log


def test_simulate_withheld_caller_via_form(served: str, tmp_path: Path) -> None:
    """A withheld caller registered the CURL() way is answered as such."""
    result = run(["simulate", "--url", served, "--register", "form", "--caller", "anonymous", "hola"], tmp_path)
    assert result.returncode == 0 and "Su número está oculto" in result.stdout


def test_simulate_reports_unreachable_proxy(tmp_path: Path) -> None:
    """Pointing simulate at nothing gives an error line and a failing exit code."""
    result = run(["simulate", "--url", f"http://127.0.0.1:{closed_port()}", "--caller", "1", "hola"], tmp_path)
    assert result.returncode == 1 and "cannot reach" in result.stderr


def test_check(tmp_path: Path) -> None:
    """check passes on defaults and fails, naming it, when the business API is not reachable."""
    good = run(["check"], tmp_path, CALLERID_DIR=str(tmp_path))
    assert good.returncode == 0 and "ok   store" in good.stdout
    bad = run(["check"], tmp_path, API_URL=f"http://127.0.0.1:{closed_port()}/api")
    assert bad.returncode == 1 and "FAIL business API reachable" in bad.stdout


@pytest.mark.parametrize("served", [["--workers", "2"]], indirect=True)
def test_workers_share_sqlite(served: str) -> None:
    """With two worker processes, a caller captured by one is carried by turns served by either."""

    async def calls() -> None:
        async def one(index: int) -> None:
            call = str(uuidlib.uuid4())
            await register_caller(served, call, "+593987654321" if index % 2 else "anonymous", None, None, "json")
            for heard in await play_call(served, call, ["hola", "pedido", "gracias"]):
                assert heard.problems == []
                expected = "Hola Juan" if index % 2 else "Su número está oculto"
                assert expected in " ".join(heard.sentences) or "Su pedido 1043" in " ".join(heard.sentences) \
                    or "Entendido, Juan" in " ".join(heard.sentences)

        await asyncio.gather(*(one(index) for index in range(40)))

    asyncio.run(calls())
    # Whichever worker answers the scrape reports both workers' turns (each new connection may go to either).
    # A turn's bookkeeping follows its last byte by a millisecond: the first scrapes may come before it.
    def scrape() -> str:
        with urllib.request.urlopen(f"{served}/metrics", timeout=5) as response:
            return str(response.read().decode())

    settled = 'avr_llm_proxy_turns_total{outcome="answered"} 120.0', "\navr_llm_proxy_active_turns 0.0\n"
    deadline = time.monotonic() + 10
    while not all(line in scrape() for line in settled) and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(8):
        text = scrape()
        assert all(line in text for line in settled), text


def test_unusable_store_stops_startup(tmp_path: Path) -> None:
    """A SQLite path that cannot be created stops serve with one line naming STORE_URL."""
    result = run(["serve"], tmp_path, STORE_URL="sqlite:////proc/nonexistent/calls.db")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "invalid setting STORE_URL" in result.stderr


def test_serve_raises_its_open_files_limit(tmp_path: Path) -> None:
    """Started with a soft limit of 256 open files, serve takes the hard limit (8192) as its own."""
    port = closed_port()
    with serve_process(["prlimit", "--nofile=256:8192", *COMMAND, "serve", "--port", str(port)], tmp_path,
                       clean_environ(CALLERID_DIR=str(tmp_path), AGI_LISTEN=""), f"http://127.0.0.1:{port}") as process:
        limits = Path(f"/proc/{process.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == ["8192", "8192"], line
