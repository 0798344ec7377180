"""`avr-llm-proxy simulate` finds and authenticates to the proxy `serve` runs on the same settings."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import AliasChoices

from avr_llm_proxy.config import Settings
from avr_llm_proxy.simulate import proxy_url

from .conftest import clean_environ, serve_process

COMMAND = [str(Path(sys.executable).with_name("avr-llm-proxy"))]
TOKEN = "capture-token-for-tests-0123"
# A documentation-only network: loopback is outside it, so /call from the tests needs CAPTURE_TOKEN.
NOT_LOOPBACK = "192.0.2.0/24"


def _setting_names() -> set[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names.update(str(choice).lower() for choice in (alias.choices if isinstance(alias, AliasChoices) else [alias]))
    return names


def environ(**extra: str) -> dict[str, str]:
    """The machine's environment without any setting (names are case-insensitive), plus `extra`."""
    names = _setting_names()
    env = {key: value for key, value in clean_environ().items() if key.lower() not in names}
    env.update(extra)
    return env


def free_port(family: socket.AddressFamily = socket.AF_INET) -> int:
    with socket.socket(family) as sock:
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_env_file(cwd: Path, **settings: str) -> None:
    (cwd / ".env").write_text("".join(f"{name}={value}\n" for name, value in settings.items()))


@contextmanager
def serving(cwd: Path, health_url: str, *args: str, **env: str) -> Iterator[Path]:
    """`avr-llm-proxy serve` in `cwd` (where its .env is); yields the path of its log once it answers."""
    with serve_process([*COMMAND, "serve", *args], cwd, environ(**env), health_url):
        yield cwd / "serve.log"


def simulate(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, "simulate", "--caller", "0987654321", *args, "hola"], cwd=cwd,
                          env=environ(**env), capture_output=True, text=True, timeout=60)


def assert_answered(result: subprocess.CompletedProcess[str], log_path: Path) -> None:
    """The capture was accepted and the turn carried the caller, on the proxy whose log is `log_path`."""
    assert result.returncode == 0, result.stdout + result.stderr
    assert "caller registered via /call (json): HTTP 200" in result.stdout
    assert "< Hola Juan, gracias por llamar." in result.stdout
    found = re.match(r"call (\S+)\n", result.stdout)
    assert found, result.stdout
    captured = [line for line in log_path.read_text().splitlines() if "event=caller_captured" in line]
    assert any(f"uuid={found.group(1)}" in line for line in captured), captured


def test_simulate_uses_port_and_token_of_env_file(tmp_path: Path) -> None:
    """With only a .env (PORT, CAPTURE_TOKEN), simulate reaches serve's port and its capture is accepted."""
    port = free_port()
    write_env_file(tmp_path, PORT=str(port), CAPTURE_TOKEN=TOKEN, TRUSTED_NETWORKS=NOT_LOOPBACK,
                   AGI_LISTEN="", CALLERID_DIR=str(tmp_path))
    with serving(tmp_path, f"http://127.0.0.1:{port}") as log_path:
        without_token = simulate(tmp_path, CAPTURE_TOKEN="")  # the environment overrides .env
        assert without_token.returncode == 1
        assert "HTTP 403" in without_token.stdout and "untrusted_client" in without_token.stdout
        assert_answered(simulate(tmp_path), log_path)


@pytest.mark.parametrize(("host", "family"), [("0.0.0.0", socket.AF_INET), ("::", socket.AF_INET6)])
def test_simulate_connects_to_loopback_of_wildcard_host(
    tmp_path: Path, host: str, family: socket.AddressFamily
) -> None:
    """With HOST a wildcard address in the environment, simulate connects to that family's loopback."""
    if not socket.has_ipv6 and family == socket.AF_INET6:
        pytest.skip("no IPv6 on this machine")
    port = free_port(family)
    env = {"HOST": host, "PORT": str(port), "CAPTURE_TOKEN": TOKEN, "TRUSTED_NETWORKS": NOT_LOOPBACK,
           "AGI_LISTEN": "", "CALLERID_DIR": str(tmp_path)}
    loopback = "http://[::1]" if family == socket.AF_INET6 else "http://127.0.0.1"
    with serving(tmp_path, f"{loopback}:{port}", **env) as log_path:
        assert_answered(simulate(tmp_path, **env), log_path)


def test_url_wins_over_host_and_port(tmp_path: Path) -> None:
    """--url picks the proxy even when PORT points elsewhere; CAPTURE_TOKEN is still sent."""
    elsewhere, port = free_port(), free_port()
    write_env_file(tmp_path, PORT=str(elsewhere), CAPTURE_TOKEN=TOKEN, TRUSTED_NETWORKS=NOT_LOOPBACK,
                   AGI_LISTEN="", CALLERID_DIR=str(tmp_path))
    with serving(tmp_path, f"http://127.0.0.1:{port}", "--port", str(port)) as log_path:
        assert_answered(simulate(tmp_path, "--url", f"http://127.0.0.1:{port}/"), log_path)
        missed = simulate(tmp_path)
        assert missed.returncode == 1 and f"cannot reach http://127.0.0.1:{elsewhere}" in missed.stderr


@pytest.mark.parametrize(("host", "url"), [
    ("127.0.0.1", "http://127.0.0.1:6017"),
    ("0.0.0.0", "http://127.0.0.1:6017"),
    ("", "http://127.0.0.1:6017"),
    ("::", "http://[::1]:6017"),
    ("::1", "http://[::1]:6017"),
    ("fd00::5", "http://[fd00::5]:6017"),
    ("proxy.internal", "http://proxy.internal:6017"),
])
def test_proxy_url(host: str, url: str) -> None:
    """HOST as serve binds it becomes the address a client connects to."""
    assert proxy_url(host, 6017) == url
