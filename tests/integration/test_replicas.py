"""Several `serve` processes sharing state: Redis (database 15, cleaned before and after) and SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import redis

from avr_llm_proxy.simulate import http_request, play_call, register_caller

from ..conftest import FIXTURES, clean_environ, closed_port, running_api

REDIS_URL = "redis://127.0.0.1:6379/15"
KEY = "dGVzdC1rZXktMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY="  # 32 bytes, shared by the replicas


def redis_up(url: str = REDIS_URL) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return False
    return True


def start_redis(command: list[str], url: str) -> subprocess.Popen[bytes]:
    """A private redis-server, once it answers."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not redis_up(url):
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    return process


class PrivateRedis:
    """A redis-server of the test's own on a free port, without persistence: stopped, it loses everything."""

    def __init__(self, server: str) -> None:
        port = closed_port()
        self.command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.process = await asyncio.to_thread(start_redis, self.command, self.url)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@contextlib.asynccontextmanager
async def private_redis() -> AsyncIterator[PrivateRedis]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    private = PrivateRedis(server)
    await private.start()
    try:
        yield private
    finally:
        private.stop()


@pytest.fixture
def clean_redis() -> Iterator[None]:
    if not redis_up():
        pytest.skip("Redis is not answering on 127.0.0.1:6379")
    redis.Redis.from_url(REDIS_URL).flushdb()
    yield
    redis.Redis.from_url(REDIS_URL).flushdb()


class Replica:
    """One `avr-llm-proxy serve` process on its own HTTP and FastAGI ports."""

    def __init__(self, workdir: Path, *args: str, **env: str) -> None:
        self.args = args  # serve's options
        self.port, self.agi_port = closed_port(), closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.env = clean_environ(PORT=str(self.port), AGI_LISTEN=f"127.0.0.1:{self.agi_port}", CALLERID_DIR="",
                                 ENCRYPTION_KEY=KEY, CALLER_WAIT_MS="3000", API_TIMEOUT_MS="30000",
                                 API_FIRST_BYTE_TIMEOUT_MS="30000", API_CONNECT_TIMEOUT_MS="30000", **env)
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> Replica:
        self.process = await asyncio.to_thread(self._spawn)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if (await http_request(f"{self.url}/healthz", b"", method="GET", limit_s=2)).status == 200:
                    return self
            assert self.process.poll() is None and time.monotonic() < deadline, "serve did not start"
            await asyncio.sleep(0.1)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with (self.workdir / f"serve-{self.port}.log").open("ab") as log:
            return subprocess.Popen([sys.executable, "-m", "avr_llm_proxy", "serve", *self.args], cwd=self.workdir,
                                    env=self.env, stderr=log, stdout=log)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


@contextlib.asynccontextmanager
async def replicas(workdir: Path, count: int, **env: str) -> AsyncIterator[list[Replica]]:
    started = [await Replica(workdir, **env).start() for _ in range(count)]
    try:
        yield started
    finally:
        for replica in started:
            replica.stop()


async def agi_capture(port: int, number: str) -> str:
    """A FastAGI session like Asterisk's; returns the UUID the proxy set."""
    env = (FIXTURES / "agi-env-pjsip.txt").read_bytes().replace(b"agi_network_script: test",
                                                                b"agi_network_script: callerid")
    env = env.replace(b"+593987654321", number.encode()).replace(b"agi_arg_1: 858675a8-e2f7-4c71-ad18-2c76b7927da2\n",
                                                                 b"")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(env)
    call = ""
    while line := await asyncio.wait_for(reader.readline(), 10):
        if line.startswith(b"SET VARIABLE UUID"):
            call = line.split(b'"')[1].decode()
        writer.write(b"200 result=1 (allowed_not_screened)\n" if line.startswith(b"GET") else b"200 result=1\n")
    writer.close()
    return call


async def greeting(url: str, call: str) -> str:
    turns = await play_call(url, call, ["hola"])
    assert turns[0].problems == [] and turns[0].status == 200
    return turns[0].sentences[0]


async def test_capture_on_one_replica_turns_on_another(tmp_path: Path, clean_redis: None) -> None:
    """FastAGI on replica A, turns on replica B: the number is there, and a waiting turn wakes at once."""
    async with running_api() as api, replicas(tmp_path, 2, STORE_URL=REDIS_URL, API_URL=api.url) as (a, b):
        call = await agi_capture(a.agi_port, "+593987654321")
        assert await greeting(b.url, call) == "Hola +593987654321."
        # A turn on B that arrives before the capture on A waits for it (pub/sub), not for CALLER_WAIT_MS.
        late = str(uuidlib.uuid4())
        waiting = asyncio.create_task(greeting(b.url, late))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await register_caller(a.url, late, "+34612345678", None, None, "json")
        assert await waiting == "Hola +34612345678." and time.monotonic() - started < 1.5


async def test_replica_killed_mid_call(tmp_path: Path, clean_redis: None) -> None:
    """Replica A dies after turn 1; the call's next turns on B still carry the number."""
    async with running_api() as api, replicas(tmp_path, 2, STORE_URL=REDIS_URL, API_URL=api.url) as (a, b):
        call = await agi_capture(a.agi_port, "+593987654321")
        assert await greeting(a.url, call) == "Hola +593987654321."
        a.kill()
        assert await greeting(b.url, call) == "Hola +593987654321."
        assert await greeting(b.url, call) == "Hola +593987654321."


async def test_redis_restarted_mid_call(tmp_path: Path) -> None:
    """A private Redis restarted (losing everything) mid-call: /readyz says so, turns keep their caller."""
    async with private_redis() as private, running_api() as api, \
            replicas(tmp_path, 1, STORE_URL=private.url, API_URL=api.url) as (proxy,):
        call = await agi_capture(proxy.agi_port, "+593987654321")
        assert await greeting(proxy.url, call) == "Hola +593987654321."
        private.stop()
        ready = await http_request(f"{proxy.url}/readyz", b"", method="GET")
        assert ready.status == 503 and b"unreachable" in b"".join(ready.chunks)
        assert await greeting(proxy.url, call) == "Hola +593987654321."  # Redis down
        await private.start()
        assert await greeting(proxy.url, call) == "Hola +593987654321."  # Redis back, empty
        assert redis.Redis.from_url(private.url).exists(f"avrlp:call:{call}")  # and healed
        ready = await http_request(f"{proxy.url}/readyz", b"", method="GET")
        assert ready.status == 200


async def test_erasure_after_redis_lost_its_data(tmp_path: Path) -> None:
    """Redis restarted empty, then `forget <number>`: the replica holding that call's record hears of it
    and drops its copy, and does not write it back on the next turn (erased means erased)."""
    async with private_redis() as private, running_api() as api, \
            replicas(tmp_path, 1, STORE_URL=private.url, API_URL=api.url) as (proxy,):
        call = await agi_capture(proxy.agi_port, "+593987654321")
        assert await greeting(proxy.url, call) == "Hola +593987654321."
        private.stop()
        await private.start()
        with redis.Redis.from_url(private.url) as direct:
            for _ in range(200):  # the replica subscribes again (backoff after the cut)
                if direct.pubsub_numsub("avrlp:captured")[0][1]:
                    break
                await asyncio.sleep(0.05)
            assert direct.pubsub_numsub("avrlp:captured")[0][1] == 1, "the replica did not subscribe again"
            forget = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "avr_llm_proxy", "forget", "0987654321"],
                env=clean_environ(STORE_URL=private.url, ENCRYPTION_KEY=KEY, CALLERID_DIR=""), capture_output=True,
                text=True, timeout=60, cwd=tmp_path)
            assert forget.returncode == 0, forget.stderr
            log = tmp_path / f"serve-{proxy.port}.log"
            for _ in range(200):  # the erasure's message reaches the replica
                if "event=erased_records_dropped count=1" in log.read_text():
                    break
                await asyncio.sleep(0.05)
            assert "event=erased_records_dropped count=1" in log.read_text()
            assert await greeting(proxy.url, call) == "Hola unknown."
            assert not direct.exists(f"avrlp:call:{call}")


async def test_serve_restarted_mid_call_with_sqlite(tmp_path: Path) -> None:
    """serve killed and started again on the same SQLite file: the next turn still carries the number."""
    async with running_api() as api:
        env = {"STORE_URL": f"sqlite:///{tmp_path / 'calls.db'}", "API_URL": api.url}
        async with replicas(tmp_path, 1, **env) as (first,):
            call = await agi_capture(first.agi_port, "+593987654321")
            assert await greeting(first.url, call) == "Hola +593987654321."
            first.kill()
        env.pop("STORE_URL")
        async with replicas(tmp_path, 1, STORE_URL=f"sqlite:///{tmp_path / 'calls.db'}", **env) as (second,):
            assert await greeting(second.url, call) == "Hola +593987654321."


async def test_1000_calls_over_two_replicas(tmp_path: Path, clean_redis: None) -> None:
    """1,000 concurrent calls, captured on one replica and spoken on the other at random: none misattributed."""
    async with running_api() as api, replicas(tmp_path, 2, STORE_URL=REDIS_URL, API_URL=api.url) as pair:
        numbers = {str(uuidlib.uuid4()): f"+59398{index:07d}" for index in range(1000)}
        limit = asyncio.Semaphore(200)

        async def one(index: int, call: str, number: str) -> str:
            async with limit:
                await register_caller(pair[index % 2].url, call, number, None, None, "json")
                return await greeting(pair[(index + 1) % 2].url, call)

        heard = await asyncio.gather(*(one(i, call, number) for i, (call, number) in enumerate(numbers.items())))
    assert heard == [f"Hola {number}." for number in numbers.values()]
    assert {payload["conversation_id"]: payload["caller_number"] for payload in api.received} == numbers


async def test_workers_share_redis_and_the_agi_port(tmp_path: Path, clean_redis: None) -> None:
    """`serve --workers 2` on Redis: FastAGI sessions spread over both workers, every call's turns, on
    whichever worker, carry its own number, and /metrics counts every session whichever worker answers."""
    async with running_api() as api:
        proxy = await Replica(tmp_path, "--workers", "2", STORE_URL=REDIS_URL, API_URL=api.url).start()
        try:
            limit = asyncio.Semaphore(50)

            async def one(index: int) -> tuple[str, str]:
                number = f"+59398{index:07d}"
                async with limit:
                    call = await agi_capture(proxy.agi_port, number)
                    return await greeting(proxy.url, call), f"Hola {number}."

            heard = await asyncio.gather(*(one(index) for index in range(200)))

            async def scrape() -> bytes:
                return b"".join((await http_request(f"{proxy.url}/metrics", b"", method="GET")).chunks)

            counted = b'avr_llm_proxy_agi_sessions_total{outcome="ok"} 200.0'
            for _ in range(200):  # a session is counted as its socket closes: let the last ones land
                if counted in await scrape():
                    break
                await asyncio.sleep(0.05)
            metrics = [await scrape() for _ in range(4)]
        finally:
            proxy.stop()
    assert all(said == expected for said, expected in heard)
    assert all(counted in text for text in metrics)
    assert (tmp_path / f"serve-{proxy.port}.log").read_text().count("event=agi_listening") == 2


async def test_turns_are_counted_exactly_across_replicas(tmp_path: Path, clean_redis: None) -> None:
    """Eight one-message turns sent in pairs at the same moment to two replicas, then `call_ended` on a
    third: `avr-llm-proxy calls` shows 8 turns (a body's history would say 1), every key the product
    wrote in Redis has an expiry, and without HISTORY_DAYS none is a caller's history."""
    call = str(uuidlib.uuid4())
    async with running_api() as api, replicas(tmp_path, 3, STORE_URL=REDIS_URL, API_URL=api.url) as (a, b, c):
        await register_caller(a.url, call, "+593987654321", "Juan Perez", None, "json")
        for round_ in range(4):
            pair = await asyncio.gather(*(play_call(replica.url, call, [f"mensaje {round_}"]) for replica in (a, b)))
            assert all(turns[0].sentences and not turns[0].problems for turns in pair)
        ended = orjson.dumps({"uuid": call, "type": "call_ended", "timestamp": "2026-12-06T02:00:00.000Z",
                              "payload": {}})
        assert (await http_request(f"{c.url}/events", ended)).status == 200
        client = redis.Redis.from_url(REDIS_URL)
        deadline = time.monotonic() + 10  # each count is written just after its turn's last byte
        while int(client.get(f"avrlp:count:{call}") or 0) < 8:
            assert time.monotonic() < deadline, "the turn counts never reached 8"
            await asyncio.sleep(0.05)
        listed = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "avr_llm_proxy", "calls"], cwd=tmp_path, capture_output=True,
            text=True, timeout=60, env=clean_environ(STORE_URL=REDIS_URL, ENCRYPTION_KEY=KEY))
        keys = {key.decode(): client.pttl(key) for key in client.scan_iter("avrlp:*")}
    row = next(line for line in listed.stdout.splitlines() if line.startswith(call))
    assert listed.returncode == 0 and row.split()[-2:] == ["8", "-"], listed.stdout + listed.stderr
    assert row.split()[-3] != "-"  # the end is marked
    assert {"avrlp:recent", f"avrlp:call:{call}", f"avrlp:count:{call}"} <= set(keys)
    assert all(ttl > 0 for ttl in keys.values()), keys
    assert not [key for key in keys if key.startswith(("avrlp:history:", "avrlp:seen:"))]  # HISTORY_DAYS=0


async def test_caller_history_across_replicas_and_restarts(tmp_path: Path, clean_redis: None) -> None:
    """Three calls from one number over two replicas sharing Redis, both restarted between calls: every turn
    of each carries `caller.history.calls` 0, 1 and 2 with the call before; a withheld call carries null and
    leaves nothing; Redis holds one history, under the number's hash."""
    number, calls = "+593987654321", [str(uuidlib.uuid4()) for _ in range(3)]
    withheld = str(uuidlib.uuid4())
    async with running_api() as api, replicas(tmp_path, 2, STORE_URL=REDIS_URL, API_URL=api.url,
                                              HISTORY_DAYS="30") as pair:
        for index, call in enumerate(calls):
            await register_caller(pair[index % 2].url, call, number, "Juan Perez", None, "json")
            for turn in range(3):
                assert (await greeting(pair[(index + turn) % 2].url, call)).startswith("Hola")
            for replica in pair:  # a restart between calls: the history is in Redis, not in the processes
                replica.stop()
                await replica.start()
        await register_caller(pair[0].url, withheld, "anonymous", None, None, "json")
        await greeting(pair[1].url, withheld)
        keys = sorted(key.decode() for key in redis.Redis.from_url(REDIS_URL).scan_iter("avrlp:history:*"))
    histories: dict[str, list[dict[str, object]]] = {}
    for payload in api.received:
        histories.setdefault(payload["conversation_id"], []).append(payload["caller"]["history"])
    assert [len(histories[call]) for call in calls] == [3, 3, 3]
    assert all(history == histories[calls[0]][0] for history in histories[calls[0]])
    assert histories[calls[0]][0] == {"calls": 0, "first_call_at": None, "last_call_at": None,
                                      "last_conversation_id": None}
    for earlier, (index, call) in zip(calls, enumerate(calls[1:], 1), strict=False):
        assert all(history == histories[call][0] for history in histories[call])
        history = histories[call][0]
        assert history["calls"] == index and history["last_conversation_id"] == earlier
        assert str(history["first_call_at"]).endswith("Z") and str(history["last_call_at"]).endswith("Z")
    assert histories[calls[2]][0]["first_call_at"] == histories[calls[1]][0]["first_call_at"]
    assert histories[withheld] == [None]
    assert len(keys) == 1 and "593987654321" not in keys[0]
