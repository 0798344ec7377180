"""What the tests that need this machine's own programs share: the cache, its lock, apt-get, report lines.

The deploy tests (podman) and the PBX tests (a real Asterisk in a chroot) both make large things once
(a Debian root, an image) and keep them in one cache, AVR_LLM_PROXY_CACHE (default ~/.cache/avr-llm-proxy).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

CACHE = Path(
    os.environ.get("AVR_LLM_PROXY_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avr-llm-proxy"
)


def report(config: pytest.Config, topic: str, line: str) -> None:
    """A line in pytest's own output (not captured), shown with -q too."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.write_line(f"\n[{topic}] {line}")


@contextlib.contextmanager
def cache_lock(name: str = ".lock") -> Iterator[None]:
    """One test run at a time fills (a part of) the cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def apt_install(*packages: str) -> str | None:
    """Install Debian packages, as CI must; None when done, else why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"cannot install {' '.join(packages)}: not root, or no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900, env=env)
    result = subprocess.run(["apt-get", "install", "-y", "-q", *packages], capture_output=True, text=True,
                            timeout=900, env=env)
    return None if result.returncode == 0 else f"apt-get install failed: {result.stderr.strip()[-500:]}"


def which(program: str) -> str | None:
    return shutil.which(program, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
