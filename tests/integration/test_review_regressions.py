"""Regressions found in review: breaker probes, stale counts, erasure, rotation, filler, withheld races."""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from avr_llm_proxy.calls import CallRecord, CallRegistry
from avr_llm_proxy.config import SettingsError, load_settings
from avr_llm_proxy.identity import parse_caller
from avr_llm_proxy.privacy import Sealer
from avr_llm_proxy.simulate import http_request, play_call, register_caller
from avr_llm_proxy.stores import open_store

from ..conftest import clean_environ, make_settings, running_api, running_proxy


def body(call: str, said: str = "hola") -> bytes:
    return orjson.dumps({"uuid": call, "message": said, "messages": [{"role": "user", "content": said}]})


async def test_half_open_probe_with_empty_answer_closes_the_circuit(tmp_path: Path) -> None:
    """A probe answered with nothing speakable still proves the API is up: the circuit closes."""
    answers = [web.Response(status=503), web.json_response({"message": ""}), web.json_response({"message": "Hola."})]

    async def scripted(request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        return answers.pop(0)

    async with running_api() as api:
        api.custom = scripted
        settings = make_settings(tmp_path, api_url=api.url, caller_wait_ms=0, breaker_failures=1,
                                 breaker_cooldown_ms=200)
        async with running_proxy(settings) as proxy:
            await http_request(f"{proxy.url}/prompt-stream", body(str(uuidlib.uuid4())))
            await asyncio.sleep(0.3)
            await http_request(f"{proxy.url}/prompt-stream", body(str(uuidlib.uuid4())))
            heard = await play_call(proxy.url, str(uuidlib.uuid4()), ["hola"])
    assert heard[0].sentences == ["Hola."] and len(api.received) == 3


async def test_turn_count_never_undoes_call_ended(tmp_path: Path) -> None:
    """A reply still pending at hang-up does not bring back the full retention or clear ended_at."""
    async def slow(request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.json_response({"message": "Adiós."})

    call = str(uuidlib.uuid4())
    async with running_api() as api:
        api.custom = slow
        settings = make_settings(tmp_path, api_url=api.url, caller_ttl_seconds=7200)
        async with running_proxy(settings) as proxy:
            await register_caller(proxy.url, call, "0987654321", None, None, "json")
            pending = asyncio.create_task(play_call(proxy.url, call, ["adiós"]))
            await asyncio.sleep(0.2)
            event = {"uuid": call, "type": "call_ended", "timestamp": "", "payload": {}}
            await http_request(f"{proxy.url}/events", orjson.dumps(event))
            await pending
            await asyncio.sleep(0.3)
    with sqlite3.connect(settings.sqlite_path or "") as conn:
        (expires_at,) = conn.execute("SELECT expires_at FROM calls WHERE key = ?", (call,)).fetchone()
    assert expires_at - time.time() < 301


async def test_forget_while_serving_is_final(tmp_path: Path) -> None:
    """Erasing a number while the proxy serves the call: the next turn no longer has it."""
    call = str(uuidlib.uuid4())
    settings = make_settings(tmp_path)
    async with running_proxy(settings) as proxy:
        await register_caller(proxy.url, call, "0987654321", None, None, "json")
        assert "Juan" in (await play_call(proxy.url, call, ["hola"]))[0].sentences[0]
        env = clean_environ(STORE_URL=settings.store_url, CALLERID_DIR="")
        result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "avr_llm_proxy", "forget",
                                                          "0987654321"], env=env, capture_output=True, text=True,
                                         timeout=60, cwd=tmp_path)
        assert result.stdout.startswith("erased 1 record(s)"), result.stderr
        heard = await play_call(proxy.url, call, ["hola"])
    assert "No pude identificar" in " ".join(heard[0].sentences)


async def test_forget_after_key_rotation(tmp_path: Path) -> None:
    """Records tagged under the old key are still erased after a new primary key is put first."""
    old, new = ("old", os.urandom(32)), ("new", os.urandom(32))
    store = open_store(f"sqlite:///{tmp_path / 'calls.db'}")
    try:
        before = Sealer([old])
        registry = CallRegistry(store, 3600, (), before, before.hash_key)
        caller = parse_caller("+593987654321", source="http")
        await registry.put(CallRecord(uuid=str(uuidlib.uuid4()), caller=caller))
        after = Sealer([new, old])
        rotated = CallRegistry(store, 3600, (), after, after.hash_key, after.hash_keys[1:])
        await rotated.put(CallRecord(uuid=str(uuidlib.uuid4()), caller=caller))
        assert await rotated.forget_number(caller) == 2
    finally:
        await store.close()


async def test_no_filler_in_the_middle_of_an_answer(tmp_path: Path) -> None:
    """The first sentence came before FILLER_AFTER_MS: the filler is never spoken."""
    async def streamed(request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"Primera frase. ")
        await asyncio.sleep(0.6)
        await response.write(b"Segunda frase.")
        await response.write_eof()
        return response

    async with running_api() as api:
        api.custom = streamed
        settings = make_settings(tmp_path, api_url=api.url, caller_wait_ms=0, filler_after_ms=200)
        async with running_proxy(settings) as proxy:
            heard = await play_call(proxy.url, str(uuidlib.uuid4()), ["hola"])
    assert heard[0].sentences == ["Primera frase.", "Segunda frase."]


async def test_withheld_capture_replaces_avr_core_payload(tmp_path: Path) -> None:
    """avr-core's call_initiated (no presentation) first, then the dialplan's CURL() saying prohib: withheld wins,
    and the number is not forwarded in the event to EVENTS_URL."""
    call = str(uuidlib.uuid4())
    async with running_api("raw") as events, running_api() as api:
        events.answer = (200, {"Content-Type": "application/json"}, b"{}")
        settings = make_settings(tmp_path, api_url=api.url, events_url=events.url)
        async with running_proxy(settings) as proxy:
            initiated = {"uuid": call, "type": "call_initiated", "timestamp": "", "payload": {"from": "0987654321"}}
            await http_request(f"{proxy.url}/events", orjson.dumps(initiated))
            form = f"uuid={call}&num=0987654321&pres=prohib".encode()
            reply = await http_request(f"{proxy.url}/call", form, "application/x-www-form-urlencoded")
            assert reply.status == 200
            await play_call(proxy.url, call, ["hola"])
            ended = {"uuid": call, "type": "call_ended", "timestamp": "", "payload": {"from": "0987654321"}}
            await http_request(f"{proxy.url}/events", orjson.dumps(ended))
            await asyncio.sleep(0.3)
    assert api.received[0]["caller_number"] == "anonymous"
    assert events.received[-1]["type"] == "call_ended" and "from" not in events.received[-1]["payload"]
    assert "0987654321" not in orjson.dumps(events.received[-1]).decode()


def test_redis_store_needs_a_shared_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """STORE_URL=redis:// without ENCRYPTION_KEY would store numbers in clear: start-up refuses it."""
    monkeypatch.setenv("STORE_URL", "redis://127.0.0.1:6379/0")
    with pytest.raises(SettingsError, match="ENCRYPTION_KEY"):
        load_settings(_env_file=None)
    monkeypatch.setenv("ENCRYPTION_KEY", base64.b64encode(os.urandom(32)).decode())
    assert load_settings(_env_file=None).store_url.startswith("redis://")
