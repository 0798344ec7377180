"""The service's other endpoints over real HTTP: /call refusals, /debug, /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import uuid as uuidlib
from pathlib import Path

import orjson
import pytest

from avr_llm_proxy.simulate import http_request, play_call, register_caller

from ..conftest import make_settings, rss, running_proxy


async def test_call_refusals_are_clear(tmp_path: Path) -> None:
    """Bad /call requests get 4xx with a reason, JSON for JSON clients and text for CURL()."""
    async with running_proxy(make_settings(tmp_path)) as proxy:
        reply = await http_request(f"{proxy.url}/call", b'{"uuid": "../x"}')
        assert reply.status == 400 and orjson.loads(b"".join(reply.chunks)) == {"error": "invalid_uuid"}
        reply = await http_request(f"{proxy.url}/call", b"uuid=1&num=2", "application/x-www-form-urlencoded")
        assert reply.status == 400 and b"".join(reply.chunks) == b"ERROR invalid_uuid"
        reply = await http_request(f"{proxy.url}/call", b"x" * 20_000, "application/x-www-form-urlencoded")
        assert reply.status == 413
        reply = await http_request(f"{proxy.url}/call", b"<x/>", "text/xml")
        assert reply.status == 415


async def test_debug_lists_calls_masked(tmp_path: Path) -> None:
    """/debug shows recent calls with masked numbers to a loopback client."""
    call = str(uuidlib.uuid4())
    async with running_proxy(make_settings(tmp_path)) as proxy:
        await register_caller(proxy.url, call, "+593987654321", "Juan Perez", None, "json")
        await play_call(proxy.url, call, ["hola", "pedido"])
        for _ in range(50):  # a turn is noted just after its answer
            reply = await http_request(f"{proxy.url}/debug", b"", method="GET")
            data = orjson.loads(b"".join(reply.chunks))
            if data["calls"] and data["calls"][0]["turns"] == 2:
                break
            await asyncio.sleep(0.01)
    assert reply.status == 200
    entry = data["calls"][0]
    assert entry["uuid"] == call and entry["caller_number"] == "+593*****4321" and entry["turns"] == 2
    assert entry["source"] == "http" and entry["last_status"] == "200"
    assert b"593987654321" not in b"".join(reply.chunks)


@pytest.mark.parametrize(("console", "page", "kept"), [("on", 200, True), ("off", 404, False)])
async def test_console_setting(tmp_path: Path, console: str, page: int, kept: bool) -> None:
    """CONSOLE=off: no console pages or data, and no turn kept for a timeline; the turns are still
    counted, and /debug still lists the call (without a last status)."""
    call = str(uuidlib.uuid4())
    async with running_proxy(make_settings(tmp_path, console=console)) as proxy:
        await register_caller(proxy.url, call, "+593987654321", None, None, "json")
        await play_call(proxy.url, call, ["hola", "pedido"])
        for _ in range(100):  # the turns reach the store in the next 0.25 s batch
            data = orjson.loads(b"".join((await http_request(f"{proxy.url}/debug", b"", method="GET")).chunks))
            if data["calls"] and data["calls"][0]["turns"] == 2:
                break
            await asyncio.sleep(0.02)
        statuses = [(await http_request(f"{proxy.url}{path}", b"", method="GET")).status
                    for path in ("/console", f"/console/api/calls/{call}", "/console/static/console.js")]
    assert data["calls"][0]["uuid"] == call and data["calls"][0]["turns"] == 2
    assert (data["calls"][0]["last_status"] == "200") is kept
    assert statuses == [page] * 3
    with contextlib.closing(sqlite3.connect(tmp_path / "calls.db")) as db:
        assert (db.execute("SELECT COUNT(*) FROM timeline").fetchone()[0] > 0) is kept


@pytest.mark.parametrize(("token", "status"), [("", 401), ("wrong", 401), ("s3cret-token", 200)])
async def test_debug_token(tmp_path: Path, token: str, status: int) -> None:
    """With DEBUG_TOKEN set, only the right bearer token opens /debug."""
    async with running_proxy(make_settings(tmp_path, debug_token="s3cret-token")) as proxy:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        reply = await http_request(f"{proxy.url}/debug", b"", method="GET", headers=headers)
    assert reply.status == status


async def test_startup_objects_are_kept_out_of_garbage_collection(tmp_path: Path) -> None:
    """What start-up loaded is frozen (full collections stay short) while serving, and released after."""
    async with running_proxy(make_settings(tmp_path)):
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0


async def test_health_ready_metrics(tmp_path: Path) -> None:
    """healthz answers, readyz checks the store, metrics count turns without numbers in labels."""
    call = str(uuidlib.uuid4())
    async with running_proxy(make_settings(tmp_path)) as proxy:
        await register_caller(proxy.url, call, "+593987654321", None, None, "json")
        await play_call(proxy.url, call, ["hola"])
        await asyncio.sleep(0.05)  # a turn's metrics are recorded just after its answer
        health = await http_request(f"{proxy.url}/healthz", b"", method="GET")
        ready = await http_request(f"{proxy.url}/readyz", b"", method="GET")
        metrics = await http_request(f"{proxy.url}/metrics", b"", method="GET")
    assert health.status == 200 and ready.status == 200
    assert orjson.loads(b"".join(ready.chunks))["store"] == "ok"
    text = b"".join(metrics.chunks).decode()
    assert 'avr_llm_proxy_turns_total{outcome="answered"}' in text
    assert 'avr_llm_proxy_captures_total{source="http"}' in text
    assert "avr_llm_proxy_upstream_latency_seconds_bucket" in text
    assert "593987654321" not in text and call not in text


async def test_readyz_reports_broken_store(tmp_path: Path) -> None:
    """When the SQLite file becomes unusable, /readyz says so with a 503 and the reason."""
    db = tmp_path / "calls.db"
    async with running_proxy(make_settings(tmp_path, store_url=f"sqlite:///{db}")) as proxy:
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TABLE calls")
        ready = await http_request(f"{proxy.url}/readyz", b"", method="GET")
        assert ready.status == 503 and b"unusable" in b"".join(ready.chunks)
        turn = await play_call(proxy.url, str(uuidlib.uuid4()), ["hola"])
        assert turn[0].status == 200 and turn[0].problems == []


async def test_oversized_headers_are_refused(tmp_path: Path) -> None:
    """More than 32 KiB of headers is a 431 on every endpoint, and the service goes on."""
    async with running_proxy(make_settings(tmp_path)) as proxy:
        headers = {f"X-Junk-{index}": "x" * 1000 for index in range(40)}
        refused = await http_request(f"{proxy.url}/call", b"{}", headers=headers)
        assert refused.status == 431
        healthy = await http_request(f"{proxy.url}/healthz", b"", method="GET")
        assert healthy.status == 200


@pytest.mark.parametrize("piece", [b"X-Junk: 0123456789\r\n", b"0123456789abcdef"], ids=["lines", "one_value"])
async def test_endless_headers_are_cut_off_while_parsed(tmp_path: Path, piece: bytes) -> None:
    """Header lines (or one header value) that never end: 431 and a closed connection after a bounded
    head, not the whole stream kept in memory; the service goes on."""
    async with running_proxy(make_settings(tmp_path)) as proxy:
        before = rss()
        reader, writer = await asyncio.open_connection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))
        try:
            writer.write(b"POST /prompt-stream HTTP/1.1\r\nHost: x\r\n" + (b"X-Start: " if piece[:1] != b"X" else b""))
            chunk, sent = piece * (65536 // len(piece)), 0
            with contextlib.suppress(ConnectionError):  # the server closed: what it took is `sent` at most
                while sent < 64 * 1024 * 1024:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
            answer = b""
            with contextlib.suppress(ConnectionError):  # a reset may drop the 431 the server wrote first
                answer = await asyncio.wait_for(reader.read(), 10)
            grown = rss() - before
        finally:
            writer.close()
        healthy = await http_request(f"{proxy.url}/healthz", b"", method="GET")
    assert not answer or answer.startswith(b"HTTP/1.1 431 ")  # closed either way
    assert healthy.status == 200
    assert sent < 8 * 1024 * 1024, f"{sent} bytes were taken before the connection closed"
    assert grown < 16 * 1024 * 1024, f"the process grew {grown} bytes"
