"""The PBX tests' parts: one real Asterisk per test run, and per test the proxy, the business API and avr-core.

Asterisk reaches the proxy by the name the shipped dialplans use by default, `avr-llm-proxy`: the
root's /etc/hosts maps it to a loopback address of this run (127.x.y.z), where the proxy listens on
its default ports (FastAGI 4573, HTTP 6017). So the usage lines of dialplan/*.conf run as written.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FakeApi, Proxy, make_settings, running_api, running_proxy
from tests.machine import report
from tests.pbx.asterisk import (
    AMI_SECRET,
    AMI_USER,
    PROXY_AMI_SECRET,
    PROXY_AMI_USER,
    Asterisk,
    PbxUnavailable,
    Ports,
    ensure_root,
)
from tests.pbx.avr_core import AvrCore
from tests.pbx.dialplans import extensions
from tests.pbx.manager import Manager, manager
from tests.pbx.sip import pjsip
from tests.pbx.stir import CA_FILE, Stir, start_stir

DIALPLAN = Path(__file__).resolve().parents[2] / "dialplan"
PROXY_NAME = "avr-llm-proxy"
AGI_PORT, HTTP_PORT = 4573, 6017
REQUIRED = "AVR_LLM_PROXY_REQUIRE_PBX"  # CI sets it: there, a PBX that cannot start is a failure, not a skip


def _free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _proxy_address() -> str:
    """A loopback address of this run where the proxy's default ports are free."""
    for _ in range(50):
        address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        try:
            for port in (AGI_PORT, HTTP_PORT):
                with socket.socket() as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        return address
    raise PbxUnavailable("no loopback address with ports 4573 and 6017 free")


@dataclass
class Pbx:
    """The running Asterisk, and where the calls it places go."""

    asterisk: Asterisk
    proxy_address: str
    audiosocket_port: int
    stir: Stir

    @property
    def callerid_dir(self) -> Path:
        """The legacy files' folder: /tmp inside the root, the subroutine's default."""
        return self.asterisk.path("/tmp")


@pytest.fixture(scope="session")
def pbx(request: pytest.FixtureRequest) -> Iterator[Pbx]:
    """One real Asterisk 22 for the whole run, with the shipped dialplans included as the README says."""
    asterisk: Asterisk | None = None
    stir = start_stir()
    try:
        root, made_in = ensure_root()
        if made_in is not None:
            report(request.config, "pbx", f"Asterisk root made with debootstrap in {made_in:.0f} s: {root}")
        address = _proxy_address()
        ports = Ports(ami=_free_port(), sip=_free_port(kind=socket.SOCK_DGRAM))
        audiosocket_port = _free_port()
        includes = {f"avr-llm-proxy/{path.name}": path.read_text() for path in DIALPLAN.glob("*.conf")}
        files = {"extensions.conf": extensions(audiosocket_port), "pjsip.conf": pjsip(ports.sip),
                 CA_FILE: stir.ca_pem}
        asterisk = Asterisk(root, ports, files, includes, hosts=f"{address} {PROXY_NAME}\n")
        asterisk.start()
        version = asterisk.cli("core show version").split()[1]
    except PbxUnavailable as exc:
        stir.close()
        if asterisk is not None:
            asterisk.stop()
        if os.environ.get(REQUIRED):
            pytest.fail(f"no real Asterisk here, and {REQUIRED} is set: {exc}")
        pytest.skip(f"no real Asterisk here: {exc}")
    except BaseException:
        stir.close()
        if asterisk is not None:
            asterisk.stop()
        raise
    try:
        report(request.config, "pbx", f"Asterisk {version} running, AMI 127.0.0.1:{ports.ami}, "
                                      f"SIP 127.0.0.1:{ports.sip}")
        yield Pbx(asterisk, address, audiosocket_port, stir)
    finally:
        asterisk.stop()
        stir.close()


@dataclass
class Stack:
    """What one test drives: the proxy, the business API it calls, avr-core, and the PBX's manager."""

    pbx: Pbx
    proxy: Proxy
    api: FakeApi
    avr: AvrCore
    ami: Manager


@contextlib.asynccontextmanager
async def stack(pbx: Pbx, tmp_path: Path, ami: bool = False, linger: float = 0.0,
                **settings: Any) -> AsyncIterator[Stack]:
    """The proxy on the address the dialplans name, with FastAGI, the legacy folder and, with `ami`, AMI;
    avr-core's stand-in keeps each call `linger` seconds after its last turn."""
    address = pbx.proxy_address
    values: dict[str, Any] = {
        "host": address, "port": HTTP_PORT, "agi_listen": f"{address}:{AGI_PORT}",
        "callerid_dir": str(pbx.callerid_dir), "caller_wait_ms": 2000, "trusted_networks": "127.0.0.0/8",
    }
    if ami:
        values["ami_url"] = f"ami://{PROXY_AMI_USER}:{PROXY_AMI_SECRET}@127.0.0.1:{pbx.asterisk.ports.ami}"
    values.update(settings)
    async with running_api() as api:
        values.setdefault("api_url", api.url)
        async with running_proxy(make_settings(tmp_path, **values), bind=(address, HTTP_PORT)) as proxy:
            avr = AvrCore(proxy.url, port=pbx.audiosocket_port, linger=linger)
            await avr.start()
            try:
                async with manager(pbx.asterisk.ports.ami, AMI_USER, AMI_SECRET) as client:
                    yield Stack(pbx, proxy, api, avr, client)
            finally:
                await avr.stop()
