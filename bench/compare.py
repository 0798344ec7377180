"""Side by side in one run: the seed's Node proxy and avr-llm-proxy (one process, then --workers N).

All targets post avr-core-shaped turns to the same fast fake business API (bench/fake_api.py, measured
alone first to show it is not the bottleneck), with the same load generator: wrk and
bench/wrk-turns.lua where wrk is installed, otherwise this repository's asyncio keep-alive generator.
A caller is registered for every call (a legacy caller file for the seed, POST /call for us), so our
proxy does its full work. After each of our runs a short pass with the checking generator reads every
reply the way avr-core does; a wrong turn fails the run.

With --console, each of our runs is done twice, the second with an operator console open (a client
reading GET /console/events for the whole run), to show what watching costs, and one process runs
with CONSOLE=off, to show what keeping every turn for the console's timeline costs.

With --src, one process of another source tree (an earlier commit's, which may have no console) runs
too, with no console open: turns/s move with the hour on a shared machine, and so do ratios to the
seed, so a change is judged against older code in the same run. Each target's CPU time per turn (its
processes' user and system time over the load) is printed too: it moves less with the hour than
throughput.

Usage: python bench/compare.py [--seconds 10] [--connections 50] [--workers 2] [--console] [--src PATH]
The seed's proxy comes from ../shared/baseline/seed-node-proxy (SEED_DIR to point elsewhere); it is
copied to a temporary folder and installed with `npm ci`. Without node or that folder it is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from turns import Connection, free_port, saturate, started  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = Path(os.environ.get("SEED_DIR", HERE.parent.parent / "shared" / "baseline" / "seed-node-proxy"))
TICKS = os.sysconf("SC_CLK_TCK")
Row = tuple[float, float, float, float, int]  # turns/s, p50 ms, p99 ms, CPU us per turn, wrong turns


def wrk(url: str, uuids: Path, seconds: float, connections: int) -> tuple[float, float, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s",
                          str(HERE / "wrk-turns.lua"), url, "--", str(uuids)],
                         capture_output=True, text=True, timeout=seconds + 60).stdout

    def latency(label: str) -> float:
        match = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        if not match:
            return float("nan")
        return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rate, latency("50"), latency("99")


async def register(port: int, calls: list[str]) -> None:
    connection = Connection(port)
    for index, call in enumerate(calls):
        await connection.post("/call", orjson.dumps({"uuid": call, "caller_number": f"+59398{index:07d}"}))
    await connection.close()


@contextlib.contextmanager
def console_open(port: int) -> Iterator[None]:
    """A console page's event stream, read in a thread for as long as the block runs."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("GET", "/console/events", headers={"Accept": "text/event-stream"})
    response = connection.getresponse()
    assert response.status == 200, f"/console/events answered {response.status}"

    def read() -> None:
        # Closed under it at the end; http.client may then fail on its own cleared file (AttributeError).
        with contextlib.suppress(OSError, ValueError, AttributeError, http.client.HTTPException):
            while response.read1(65536):
                pass

    threading.Thread(target=read, daemon=True).start()
    try:
        yield
    finally:
        if connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(2)
        connection.close()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its live descendants (serve's workers), from /proc."""
    parents: dict[int, int] = {}
    spent: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the name: state, ppid, ..., utime (12th), stime
        parents[int(entry)] = int(fields[1])
        spent[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
    tree = {pid}
    while grown := {child for child, parent in parents.items() if parent in tree} - tree:
        tree |= grown
    return sum(spent.get(member, 0.0) for member in tree)


def per_turn_us(cpu_s: float, turns: float) -> float:
    return cpu_s / turns * 1e6 if turns else float("nan")


def drive(port: int, pid: int, check: bool, uuids: Path, args: argparse.Namespace) -> Row:
    """Turns/s, p50, p99 (ms), the target's CPU time per turn (us) and, with `check`, the turns
    avr-core would not have heard right."""
    before = cpu_seconds(pid)
    if shutil.which("wrk"):
        rate, p50, p99 = wrk(f"http://127.0.0.1:{port}", uuids, args.seconds, args.connections)
    else:
        rate, tally = uvloop.run(saturate(port, args.connections, args.seconds))
        p50, p99 = tally.pct(0.5), tally.pct(0.99)
    cpu_us = per_turn_us(cpu_seconds(pid) - before, rate * args.seconds)
    wrong = 0
    if check:
        _, checked = uvloop.run(saturate(port, 10, 2))
        wrong = len(checked.wrong)
    return rate, p50, p99, cpu_us, wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--console", action="store_true", help="also run ours with a console page open")
    parser.add_argument("--src", action="append", default=[], metavar="PATH",
                        help="also run one process of avr-llm-proxy from this source folder, e.g. the src/ of a "
                             "`git worktree` of the commit earlier figures came from (repeatable)")
    args = parser.parse_args()
    rows: list[tuple[str, *Row]] = []
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        uuids = work / "uuids.txt"
        calls = [str(uuidlib.uuid4()) for _ in range(args.connections * 4)]
        uuids.write_text("\n".join(calls) + "\n")
        api_port = free_port()
        with started([sys.executable, str(HERE / "fake_api.py"), str(api_port)], api_port) as api:
            if shutil.which("wrk"):
                before = cpu_seconds(api.pid)
                seconds = min(args.seconds, 5)
                rate, p50, p99 = wrk(f"http://127.0.0.1:{api_port}/api", uuids, seconds, args.connections)
                rows.append(("fake business API alone", rate, p50, p99, per_turn_us(cpu_seconds(api.pid) - before,
                                                                            rate * seconds), 0))
            if shutil.which("node") and shutil.which("npm") and SEED.is_dir():
                seed_dir = work / "seed"
                shutil.copytree(SEED, seed_dir)
                subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=seed_dir, check=True,
                               capture_output=True, timeout=300)
                for index, call in enumerate(calls):
                    (work / f"callerid-{call}.txt").write_text(f"+59398{index:07d}\n")
                port = free_port()
                env = {"QUIET": "1", "PORT": str(port), "API_URL": f"http://127.0.0.1:{api_port}/api",
                       "CALLERID_DIR": workdir}
                with started(["node", "server.js"], port, env, str(seed_dir)) as seed_proxy:
                    rows.append(("seed Node proxy", *drive(port, seed_proxy.pid, False, uuids, args)))
            else:
                print(f"seed proxy skipped: needs node, npm and {SEED}")
            targets: list[tuple[str, list[str], dict[str, str]]] = [
                ("avr-llm-proxy, 1 process", [], {}),
                (f"avr-llm-proxy, --workers {args.workers}", ["--workers", str(args.workers)], {}),
            ]
            if args.console:  # what keeping each turn for the console's timeline costs
                targets.append(("avr-llm-proxy, 1 process, CONSOLE=off", [], {"CONSOLE": "off"}))
            # Another tree's code, against this run's seed: a ratio that is comparable across hours.
            targets += [(f"avr-llm-proxy from {src}, 1 process", [], {"PYTHONPATH": str(Path(src).resolve())})
                        for src in args.src]
            for label, extra, setting in targets:
                port = free_port()
                env = {"PORT": str(port), "API_URL": f"http://127.0.0.1:{api_port}/api", "CALLERID_DIR": "",
                       "AGI_LISTEN": "", "STORE_URL": f"sqlite:///{workdir}/calls-{port}.db", **setting}
                with started([sys.executable, "-m", "avr_llm_proxy", "serve", *extra], port, env, workdir) as ours:
                    uvloop.run(register(port, calls))
                    rows.append((label, *drive(port, ours.pid, True, uuids, args)))
                    if args.console and not setting:  # a console open: this tree, default settings
                        with console_open(port):
                            rows.append((f"{label}, console open", *drive(port, ours.pid, True, uuids, args)))
    seed = next((row[1] for row in rows if row[0] == "seed Node proxy"), None)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load: {'wrk' if shutil.which('wrk') else 'asyncio generator'}, {args.connections} connections")
    width = max(44, *(len(row[0]) for row in rows))
    print(f"{'target':<{width}} {'turns/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs seed':>8} {'CPU us/turn':>12} "
          f"{'wrong':>6}")
    for label, rate, p50, p99, cpu_us, wrong in rows:
        ratio = f"{rate / seed:.2f}x" if seed and "proxy" in label else ""
        print(f"{label:<{width}} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f} {ratio:>8} {cpu_us:>12.0f} {wrong:>6}")
    return 1 if any(row[5] for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
