"""deploy/Containerfile, built and run for real with podman on this machine.

The image is built from a local Debian base (debootstrap, then `podman import`: no registry is reachable) and a
wheelhouse made on the host (a build step cannot reach the package index), both cached between runs. The
container then runs read-only, unprivileged, with published ports and a /data volume; the test checks /healthz
and the HEALTHCHECK, registers a caller with POST /call, plays turns against a fake business API on the host,
runs one FastAGI session, restarts the container and shows the SQLite record survived, and reports the size.

Podman is used as this machine needs it (the global flags below and lowered ulimits); AVR_LLM_PROXY_PODMAN
overrides the command. Caches: AVR_LLM_PROXY_CACHE (default ~/.cache/avr-llm-proxy). AVR_LLM_PROXY_TEST_BASE
names an existing Python 3.11 base image to use instead of building one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.machine import CACHE, apt_install, cache_lock, report, which

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
# The test's images, containers and volumes live in their own storage in the cache: its runs never touch (or
# prune) anybody else's images, and removing the cache directory removes everything they left.
PODMAN = [
    *shlex.split(os.environ.get("AVR_LLM_PROXY_PODMAN") or "podman --runtime runc --cgroup-manager cgroupfs"),
    "--root", str(CACHE / "storage"),
    "--runroot", str(Path(tempfile.gettempdir()) / f"avr-llm-proxy-podman-{os.geteuid()}"),
]
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
BASE_TAG = "localhost/avr-llm-proxy-base:bookworm"
IMAGE_TAG = "localhost/avr-llm-proxy:test"
BUILD_STAGE_TAG = "localhost/avr-llm-proxy:test-build"  # tagged so its layers stay cached and the rest is pruned
SUITE = "bookworm"
HOST_PYTHON = "/usr/bin/python3"  # Debian's, the same 3.11.2 as the base image: its wheels fit the image.
APT_PACKAGES = ("podman", "runc", "debootstrap", "slirp4netns")
CALLER = "+593987654321"
HOST_LOOPBACK = "10.0.2.2"  # the host's loopback, from a container on slirp4netns:allow_host_loopback=true


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args[:3])} … failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def ensure_podman() -> None:
    if any(which(name) is None for name in APT_PACKAGES):
        problem = apt_install(*APT_PACKAGES)
        if problem and which(PODMAN[0]) is None:
            pytest.skip(f"podman cannot run here: it is not installed and {problem}")
    try:
        info = subprocess.run([*PODMAN, "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"podman cannot run here: `{' '.join(PODMAN)} info` failed: {exc}")
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: `{' '.join(PODMAN)} info` failed: {info.stderr.strip()[-500:]}")


def build_base(config: pytest.Config) -> str:
    """The local Debian base image: made once with debootstrap, kept as a tarball in the cache and in podman."""
    if os.environ.get("AVR_LLM_PROXY_TEST_BASE"):
        return os.environ["AVR_LLM_PROXY_TEST_BASE"]
    if podman("image", "exists", BASE_TAG, check=False).returncode == 0:
        return BASE_TAG
    tarball = CACHE / f"base-{SUITE}-{platform.machine()}.tar"
    if not tarball.exists():
        if os.geteuid() != 0:
            pytest.skip("making the base image needs root (debootstrap); or set AVR_LLM_PROXY_TEST_BASE")
        debootstrap = which("debootstrap")
        if debootstrap is None:
            pytest.fail(f"debootstrap is missing: {apt_install('debootstrap') or 'installed, but not found'}")
        started = time.monotonic()
        rootfs = CACHE / f"rootfs-{SUITE}.partial"
        shutil.rmtree(rootfs, ignore_errors=True)
        result = subprocess.run(
            [debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates", SUITE, str(rootfs)],
            capture_output=True, text=True, timeout=1200,
        )
        if result.returncode != 0:
            pytest.fail(f"debootstrap failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        # What a container never needs: package caches and lists, documentation, translations.
        for part in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*", "usr/share/doc/*",
                     "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*"):
            for child in rootfs.glob(part):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], check=True,
                       capture_output=True, timeout=600)
        partial.rename(tarball)
        shutil.rmtree(rootfs)
        report(config, "deploy", f"base image made with debootstrap in {time.monotonic() - started:.0f} s")
    with open(tarball, "rb") as source:
        imported = subprocess.run(
            [*PODMAN, "import",
             "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["/bin/bash"]', "-", BASE_TAG],
            stdin=source, capture_output=True, text=True, timeout=600,
        )
    if imported.returncode != 0:
        pytest.fail(f"podman import of the base failed: {imported.stderr[-2000:]}")
    return BASE_TAG


def wheel_python() -> str:
    """A venv of Debian's python3 with pip, in the cache: it builds the wheelhouse."""
    version = subprocess.run([HOST_PYTHON, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, timeout=60, check=False).stdout.strip()
    if not version:
        pytest.fail(f"{HOST_PYTHON} is missing: the wheelhouse is built with Debian's python3")
    venv = CACHE / f"wheel-python-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        if subprocess.run([HOST_PYTHON, "-c", "import ensurepip, venv"], capture_output=True).returncode != 0:
            problem = apt_install("python3-venv")
            if problem:
                pytest.fail(f"python3-venv is needed for the wheelhouse and {problem}")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([HOST_PYTHON, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    return str(python)


def wheelhouse_dir(python: str) -> Path:
    """The cached wheelhouse, keyed by pyproject.toml, the interpreter and the machine; older ones removed."""
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + f"{version} {platform.machine()}".encode())
    path = CACHE / f"wheelhouse-{digest.hexdigest()[:16]}"
    for old in CACHE.glob("wheelhouse-*"):
        if old != path and not old.name.endswith(".partial"):
            shutil.rmtree(old, ignore_errors=True)
    return path


@dataclass
class Image:
    tag: str
    size: int
    config: dict[str, Any]


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Image:
    """The image, built by deploy/build-image.sh from the cached base and wheelhouse."""
    config = request.config
    ensure_podman()
    started = time.monotonic()
    with cache_lock():
        base = build_base(config)
        python = wheel_python()
        wheels = wheelhouse_dir(python)
        # Podman itself must be able to run a container, or nothing below can work.
        probe = podman("run", "--rm", *ULIMITS, "--network", "none", base, "/bin/true", check=False, timeout=180)
        if probe.returncode != 0:
            pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-800:]}")
        script = str(ROOT / "deploy" / "build-image.sh")
        pull = "--pull=missing" if os.environ.get("AVR_LLM_PROXY_TEST_BASE") else "--pull=never"
        for tag, target in ((BUILD_STAGE_TAG, ["--target", "build"]), (IMAGE_TAG, [])):
            build = subprocess.run(
                [script, "--tag", tag, "--base", base, "--wheelhouse", str(wheels), "--python", python,
                 "--", *ULIMITS, pull, *target],
                capture_output=True, text=True, timeout=1800, env={**os.environ, "ENGINE": shlex.join(PODMAN)},
            )
            if build.returncode != 0:
                pytest.fail(f"deploy/build-image.sh failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}")
        # What earlier builds left (untagged images nothing refers to), in the test's own storage only.
        podman("image", "prune", "--force", check=False, timeout=300)
    inspected = json.loads(podman("image", "inspect", IMAGE_TAG).stdout)[0]
    # podman shows the HEALTHCHECK beside Config, docker inside it.
    healthcheck = inspected.get("Healthcheck") or inspected["Config"].get("Healthcheck")
    built = Image(IMAGE_TAG, int(inspected["Size"]), {**inspected["Config"], "Healthcheck": healthcheck})
    report(config, "deploy", f"image {IMAGE_TAG} built in {time.monotonic() - started:.0f} s (base {base}): "
                   f"{built.size / 1e6:.1f} MB")
    return built


def test_containerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    """What the Containerfile promises, read from the file (no podman needed)."""
    text = (ROOT / "deploy" / "Containerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    assert stages == [("${BASE_IMAGE}", "build"), ("${BASE_IMAGE}", "")]
    assert re.search(r"^COPY --from=build /opt/avr-llm-proxy /opt/avr-llm-proxy$", text, re.M)
    final = text[text.rindex("\nFROM "):]
    assert "pip install" not in final and "apt-get" not in final, "the final stage installs nothing"
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert re.search(r"^EXPOSE 6017 4573$", final, re.M) and 'VOLUME ["/data"]' in final
    assert re.search(r"^HEALTHCHECK .*\n?.*urllib\.request.*/healthz", final, re.M)
    assert "curl" not in final.split("HEALTHCHECK", 1)[1]
    assert "ARG WHEELHOUSE=" in text and "--no-index --find-links=/wheels" in text


def test_image_is_unprivileged_small_and_has_no_build_tools(image: Image, request: pytest.FixtureRequest) -> None:
    config = image.config
    assert config["User"] == "10001:10001"
    assert config["Healthcheck"], "no HEALTHCHECK: podman build needs --format docker to keep it"
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    assert set(config["ExposedPorts"]) == {"6017/tcp", "4573/tcp"}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOST"] == "0.0.0.0" and env["AGI_LISTEN"] == "0.0.0.0:4573" and env["CALLERID_DIR"] == ""
    assert env["STORE_URL"] == "sqlite:////data/avr-llm-proxy.db"
    assert config["Entrypoint"] == ["avr-llm-proxy"] and config["Cmd"] == ["serve"]
    tools = podman(
        "run", "--rm", *ULIMITS, "--network", "none", "--health-cmd", "none", "--entrypoint", "/bin/sh", image.tag,
        "-c", "id -u; for t in gcc cc make pip pip3; do command -v $t; done; "
              "python3 -m pip --version 2>/dev/null; avr-llm-proxy check | head -1",
    ).stdout.split("\n")
    assert tools[0] == "10001"
    assert [line for line in tools[1:] if line.startswith("/")] == [], f"build tools in the image: {tools}"
    assert not any(line.startswith("pip ") for line in tools), "pip in the image's Python"
    assert any(line.startswith("ok   settings: HTTP 0.0.0.0:6017") for line in tools), tools
    report(request.config, "deploy", f"image size: {image.size / 1e6:.1f} MB ({image.size} bytes)")
    assert image.size < 400e6


@dataclass
class FakeApi:
    """The business API, on the host's loopback; the container reaches it as 10.0.2.2."""

    received: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST_LOOPBACK}:{self.port}/api/bot/client/call/message/566895"


@contextlib.contextmanager
def fake_api() -> Iterator[FakeApi]:
    api = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            payload = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
            api.received.append(payload)
            body = json.dumps({"message": f"Hola, le atiende el bot {payload.get('phone')}."}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    api.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="fake-business-api", daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def http(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def published(name: str, port: int) -> str:
    """host:port podman published the container's `port` on."""
    mapping = podman("port", name, f"{port}/tcp").stdout.strip().splitlines()
    assert mapping, f"port {port} is not published"
    return mapping[0].replace("0.0.0.0", "127.0.0.1")


def wait_healthy(name: str, url: str, deadline_s: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        with contextlib.suppress(OSError):
            if http("GET", f"{url}/healthz", timeout=2)[0] == 200:
                return time.monotonic() - started
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state in ("exited", "stopped"):
            break
        time.sleep(0.2)
    logs = podman("logs", name, check=False)
    pytest.fail(f"the container did not answer /healthz:\n{logs.stdout[-3000:]}\n{logs.stderr[-3000:]}")


def turn(url: str, call_uuid: str, message: str) -> bytes:
    """One avr-core turn: its body, its framing read whole."""
    status, body = http("POST", f"{url}/prompt-stream", {
        "uuid": call_uuid, "message": message, "messages": [{"role": "user", "content": message}],
    })
    assert status == 200, body
    return body


def agi_session(address: str) -> str:
    """One FastAGI session as Asterisk 22 runs AGI(agi://…/callerid,${UUID}) with no UUID yet; the UUID set."""
    environment = (FIXTURES / "agi-env-pjsip.txt").read_text(encoding="utf-8")
    environment = re.sub(r"(?m)^agi_network_script: .*$", "agi_network_script: callerid", environment)
    environment = re.sub(r"(?m)^agi_request: .*$", f"agi_request: agi://{address}/callerid", environment)
    environment = re.sub(r"(?m)^agi_arg_1: .*\n", "agi_arg_1: \n", environment)
    environment = re.sub(r"(?m)^agi_arg_2: .*\n", "", environment)
    assert environment.endswith("\n\n") and "agi_callerid: +593987654321\n" in environment
    host, port = address.rsplit(":", 1)
    commands: list[str] = []
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(environment.encode())
        buffer = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = line.decode().strip()
                commands.append(command)
                if command.startswith("GET FULL VARIABLE"):
                    sock.sendall(b"200 result=1 (allowed_not_screened)\n")
                elif command.startswith("SET VARIABLE"):
                    sock.sendall(b"200 result=1\n")
                else:
                    sock.sendall(b"510 Invalid or unknown command\n")
    assert commands[0] == "GET FULL VARIABLE ${CALLERID(num-pres)}", commands
    match = re.fullmatch(r'SET VARIABLE UUID "([0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})"',
                         commands[-1])
    assert match, commands
    return match.group(1)


def test_container_end_to_end(image: Image, request: pytest.FixtureRequest) -> None:
    """Run it read-only with a volume; /healthz, /call, turns, FastAGI; restart; the caller is still there."""
    name = f"avr-llm-proxy-test-{os.getpid()}-{uuidlib.uuid4().hex[:6]}"
    volume = f"{name}-data"
    started = time.monotonic()
    with fake_api() as api:
        try:
            podman(
                "run", "-d", "--name", name, *ULIMITS,
                "--network", "slirp4netns:allow_host_loopback=true",
                "-p", "127.0.0.1::6017", "-p", "127.0.0.1::4573", "-v", f"{volume}:/data",
                "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--env-file", str(ROOT / "deploy" / "avr-llm-proxy.env.example"),
                "-e", f"API_URL={api.url}", "-e", "BOT_PHONE=593985059132",
                image.tag,
            )
            url = f"http://{published(name, 6017)}"
            ready_s = wait_healthy(name, url)
            assert podman("healthcheck", "run", name, check=False).returncode == 0, "the HEALTHCHECK fails"
            assert http("GET", f"{url}/debug")[0] in (401, 403), "/debug must refuse clients of the published port"

            # A caller registered by POST /call, then a turn: the business API gets the number.
            first_call = str(uuidlib.uuid4())
            status, body = http("POST", f"{url}/call", {"uuid": first_call, "caller_number": CALLER})
            assert status == 200, body
            reply = turn(url, first_call, "hola, necesito ayuda")
            assert b"Hola, le atiende el bot 593985059132." in reply, reply
            sent = api.received[-1]
            assert sent["caller_number"] == CALLER and sent["conversation_id"] == first_call
            assert sent["text"] == "hola, necesito ayuda" and sent["phone"] == "593985059132"

            # One FastAGI session, as Asterisk runs AGI(agi://avr-llm-proxy:4573/callerid,${UUID}).
            agi_call = agi_session(published(name, 4573))
            turn(url, agi_call, "quiero saber de mi pedido")
            sent = api.received[-1]
            assert sent["conversation_id"] == agi_call and sent["caller_number"] == CALLER
            assert sent["caller_name"] == "Juan Perez" and sent["called_number"] == "5551000"
            assert sent["caller"]["source"] == "agi" and sent["caller"]["presentation"] == "allowed"

            # Restart: the record is read back from SQLite on the volume.
            podman("restart", "--time", "10", name, timeout=120)
            url = f"http://{published(name, 6017)}"
            restart_s = wait_healthy(name, url)
            turn(url, first_call, "sigo aquí")
            sent = api.received[-1]
            assert sent["conversation_id"] == first_call and sent["caller_number"] == CALLER, sent
            assert sent["caller"]["source"] == "http", "the record captured before the restart"
            turn(url, agi_call, "y el de la otra llamada")
            sent = api.received[-1]
            assert sent["conversation_id"] == agi_call and sent["caller_number"] == CALLER, sent
            files = podman("exec", name, "ls", "/data").stdout.split()
            assert "avr-llm-proxy.db" in files, files
            assert len(api.received) == 4

            logs = podman("logs", name, check=False)
            assert "593987654321" not in logs.stdout + logs.stderr, "a caller number in the container's log"
            assert "event=turn" in logs.stdout + logs.stderr
        finally:
            podman("rm", "--force", "--time", "0", name, check=False)
            podman("volume", "rm", "--force", volume, check=False)
    report(request.config, "deploy",
           f"container: healthy {ready_s:.1f} s after start, {restart_s:.1f} s after restart; "
                           f"whole run {time.monotonic() - started:.0f} s")

