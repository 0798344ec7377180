"""A real Asterisk 22 for the tests, run from a Debian sid root in a chroot (PBX.md).

The root is made once with debootstrap (about 45 s, 500 MB) and kept in the tests' cache. Each test
run writes its own configuration into a throwaway folder inside the root, starts `asterisk -f -n`
as root without `-U` (which would drop the capabilities Asterisk needs to read its own files), and
stops it at the end. Every listener is on 127.0.0.1; the chroot shares the host's network.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.machine import CACHE, apt_install, cache_lock, which
from tests.pbx.stir import stir_shaken_conf

SUITE = "sid"
PACKAGES = ("asterisk", "asterisk-modules", "uuid-runtime")
ROOT = CACHE / f"asterisk-{SUITE}-{platform.machine()}"
READY_MARK = ".avr-llm-proxy-root-ready"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What the product's dialplans and these tests use, and what those modules need; autoload stays off, so
# nothing else listens (chan_iax2, res_hep, …) and start-up takes half a second.
MODULES = (
    "res_sorcery_config", "res_sorcery_memory", "res_sorcery_astdb", "res_timing_timerfd", "res_rtp_asterisk",
    "res_pjproject", "res_pjsip", "res_pjsip_session", "res_pjsip_sdp_rtp", "res_pjsip_caller_id",
    "res_pjsip_endpoint_identifier_ip", "res_pjsip_header_funcs", "res_pjsip_pubsub", "res_pjsip_outbound_publish",
    "chan_pjsip", "codec_alaw", "codec_ulaw", "bridge_simple", "pbx_config", "app_stack", "app_dial", "app_exec",
    "app_milliwatt", "res_speech", "res_agi", "res_curl", "func_curl", "func_env", "func_strings", "func_uri",
    "func_uuid", "func_callerid", "func_logic", "func_channel", "func_cut", "res_audiosocket", "chan_audiosocket",
    "app_audiosocket", "res_stir_shaken", "res_pjsip_stir_shaken",
)


class PbxUnavailable(Exception):
    """No real Asterisk can be had on this machine (the reason says why, in one line)."""


def _mirror() -> str:
    """The Debian mirror this machine's apt uses (its first `URIs:` or `deb` line), else deb.debian.org."""
    for source in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in source.read_text().splitlines():
            if line.startswith("URIs:") and "debian" in line and "security" not in line:
                return line.split()[1]
    return DEFAULT_MIRROR


def ensure_root() -> tuple[Path, float | None]:
    """The cached Debian sid root with Asterisk; the seconds it took to make, or None when it was cached."""
    if (ROOT / READY_MARK).exists():
        return ROOT, None
    if os.geteuid() != 0:
        raise PbxUnavailable("making the Asterisk root needs root (debootstrap and chroot)")
    with cache_lock(".asterisk.lock"):
        if (ROOT / READY_MARK).exists():
            return ROOT, None
        debootstrap = which("debootstrap")
        if debootstrap is None:
            problem = apt_install("debootstrap")
            debootstrap = which("debootstrap")
            if debootstrap is None:
                raise PbxUnavailable(f"debootstrap is missing: {problem}")
        started = time.monotonic()
        partial = ROOT.with_name(ROOT.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(partial), _mirror()],
            capture_output=True, text=True, timeout=1200,
        )
        if result.returncode != 0 or not (partial / "usr/sbin/asterisk").exists():
            log = (result.stdout + result.stderr).strip().splitlines()[-3:]
            raise PbxUnavailable(f"debootstrap of Debian {SUITE} with Asterisk failed: {' | '.join(log)}")
        for part in ("var/cache/apt/archives/*.deb", "usr/share/doc/*", "usr/share/man/*"):
            for child in partial.glob(part):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        (partial / READY_MARK).write_text(f"{SUITE} {' '.join(PACKAGES)}\n")
        shutil.rmtree(ROOT, ignore_errors=True)
        partial.rename(ROOT)
        return ROOT, time.monotonic() - started


@dataclass(frozen=True)
class Ports:
    """Where Asterisk listens (both on 127.0.0.1)."""

    ami: int
    sip: int


AMI_USER, AMI_SECRET = "tests", "tests-secret-0123456789"
PROXY_AMI_USER, PROXY_AMI_SECRET = "avr-llm-proxy", "proxy-secret-0123456789"
READONLY_AMI_USER = "avr-llm-proxy-readonly"


def configuration(folder: str, ports: Ports) -> dict[str, str]:
    """The files every test run's configuration has; `folder` is its path inside the root."""
    directories = {
        "astetcdir": f"{folder}/etc", "astvarlibdir": f"{folder}/lib", "astdbdir": f"{folder}/lib",
        "astkeydir": f"{folder}/lib", "astcachedir": f"{folder}/lib", "astspooldir": f"{folder}/spool",
        "astrundir": f"{folder}/run", "astlogdir": f"{folder}/log",
        "astmoddir": f"/usr/lib/{platform.machine()}-linux-gnu/asterisk/modules",
        "astdatadir": "/usr/share/asterisk", "astagidir": "/usr/share/asterisk/agi-bin", "astsbindir": "/usr/sbin",
    }
    return {
        "asterisk.conf": "[directories]\n" + "".join(f"{key} => {value}\n" for key, value in directories.items())
        + "[options]\nverbose = 3\n",
        "modules.conf": "[modules]\nautoload = no\n" + "".join(f"load = {name}.so\n" for name in MODULES),
        "logger.conf": "[logfiles]\nmessages.log => notice,warning,error,verbose\n",
        "stir_shaken.conf": stir_shaken_conf(folder),
        "manager.conf": (
            f"[general]\nenabled = yes\nbindaddr = 127.0.0.1\nport = {ports.ami}\n\n"
            f"[{AMI_USER}]\nsecret = {AMI_SECRET}\ndeny = 0.0.0.0/0.0.0.0\npermit = 127.0.0.1/255.255.255.255\n"
            "read = all\nwrite = all\n\n"
            # The proxy's user has exactly the rights dialplan/avr-callerid-ami.conf asks for.
            f"[{PROXY_AMI_USER}]\nsecret = {PROXY_AMI_SECRET}\ndeny = 0.0.0.0/0.0.0.0\n"
            "permit = 127.0.0.1/255.255.255.255\nread = call,dialplan\nwrite = call,reporting\n\n"
            # A user set up by half: it reads the events but may not ask Getvar.
            f"[{READONLY_AMI_USER}]\nsecret = {PROXY_AMI_SECRET}\ndeny = 0.0.0.0/0.0.0.0\n"
            "permit = 127.0.0.1/255.255.255.255\nread = call,dialplan\nwrite = system\n"
        ),
    }


# Asterisk runs in a mount namespace of its own: /proc, /dev and this run's /etc/hosts are mounted
# there only, so they vanish with the process (nothing stays mounted on the cached root, whatever
# happens to the test run), and two runs sharing the root each resolve names their own way.
_LAUNCH = ('mount -t proc proc "$1/proc" && mount --bind /dev "$1/dev" && mount --bind "$2" "$1/etc/hosts" '
           '&& exec chroot "$1" asterisk -f -n -C "$3"')
STALE_S = 24 * 3600


class Asterisk:
    """One running Asterisk in the root; `cli` runs a console command, `log` reads its messages.

    `hosts`: this run's /etc/hosts lines (the names its dialplans reach).
    """

    def __init__(self, root: Path, ports: Ports, files: dict[str, str], includes: dict[str, str],
                 hosts: str = "") -> None:
        self.root = root
        self.ports = ports
        for old in (root / "tmp").glob("avr-pbx-*"):  # what killed runs left
            if time.time() - old.stat().st_mtime > STALE_S:
                shutil.rmtree(old, ignore_errors=True)
        self.folder = tempfile.mkdtemp(prefix="avr-pbx-", dir=root / "tmp")
        self.inside = "/" + str(Path(self.folder).relative_to(root))
        for sub in ("etc", "lib", "spool", "run", "log"):
            Path(self.folder, sub).mkdir()
        for name, text in {**configuration(self.inside, ports), **files}.items():
            Path(self.folder, "etc", name).write_text(text)
        for name, text in includes.items():
            path = Path(self.folder, "etc", name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.hosts = Path(self.folder, "hosts")
        self.hosts.write_text(f"127.0.0.1 localhost\n{hosts}")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> str:
        return f"{self.inside}/etc/asterisk.conf"

    def path(self, inside: str) -> Path:
        """A path inside the chroot, seen from the host."""
        return self.root / inside.lstrip("/")

    def start(self, within: float = 30.0) -> None:
        unshare = which("unshare")
        if unshare is None:
            raise PbxUnavailable("unshare (util-linux) is missing")
        (self.root / "run/asterisk").mkdir(parents=True, exist_ok=True)
        (self.root / "etc/hosts").touch()  # a mount point for this run's hosts file
        launch_log = Path(self.folder, "launch.log")
        with open(launch_log, "wb") as output:
            self.process = subprocess.Popen(
                [unshare, "--mount", "--propagation", "private", "sh", "-c", _LAUNCH, "sh", str(self.root),
                 str(self.hosts), self.conf],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
            )
        deadline = time.monotonic() + within
        while "fully booted" not in self.cli("core waitfullybooted", check=False).lower():
            if self.process.poll() is not None or time.monotonic() > deadline:
                launched = launch_log.read_text(errors="replace").strip()[-300:]
                raise PbxUnavailable(f"Asterisk did not start: {launched} {self.log()[-800:]}")
            time.sleep(0.1)

    def cli(self, command: str, check: bool = True) -> str:
        try:
            result = subprocess.run(["chroot", str(self.root), "asterisk", "-C", self.conf, "-rx", command],
                                    capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            if check:
                raise
            return ""
        if check and result.returncode != 0:
            raise RuntimeError(f"asterisk -rx {command!r} failed: {result.stderr.strip()}")
        return result.stdout

    def log(self) -> str:
        path = Path(self.folder, "log", "messages.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.cli("core stop now", check=False)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)
