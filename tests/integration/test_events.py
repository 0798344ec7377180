"""POST /events (avr-core's webhooks), EVENTS_URL forwarding and `avr-llm-proxy calls`, over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import orjson

from avr_llm_proxy.app import keys_for
from avr_llm_proxy.calls import CallRegistry
from avr_llm_proxy.config import Settings
from avr_llm_proxy.simulate import http_request, play_call, register_caller
from avr_llm_proxy.stores import open_store

from ..conftest import FakeApi, clean_environ, make_settings, running_api, running_proxy


async def counted(settings: Settings, call: str, turns: int) -> None:
    """Until the store holds the call's turn count (written in the background, after each answer)."""
    sealer = keys_for(settings).sealer
    registry = CallRegistry(open_store(settings.store_url), settings.caller_ttl_seconds, sealer=sealer)
    try:
        for _ in range(200):
            if await registry.turns(call) >= turns:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"turn count {turns} never stored")
    finally:
        await registry.store.close()


async def forwarded(api: FakeApi, events: int) -> None:
    """Until EVENTS_URL has received that many events (they are sent in the background), 2.5 s at most."""
    for _ in range(50):
        if len(api.received) >= events:
            return
        await asyncio.sleep(0.05)


def event(call: str, kind: str, payload: dict[str, object] | None = None) -> bytes:
    return orjson.dumps({"uuid": call, "type": kind, "timestamp": "2026-11-29T23:00:00.000Z", "payload": payload or {}})


async def test_webhook_secret_is_checked(tmp_path: Path) -> None:
    """With WEBHOOK_SECRET, only requests carrying it in X-AVR-WEBHOOK-SECRET are taken."""
    call = str(uuidlib.uuid4())
    async with running_proxy(make_settings(tmp_path, webhook_secret="hook-secret")) as proxy:
        missing = await http_request(f"{proxy.url}/events", event(call, "call_started"))
        wrong = await http_request(f"{proxy.url}/events", event(call, "call_started"),
                                   headers={"X-AVR-WEBHOOK-SECRET": "nope"})
        right = await http_request(f"{proxy.url}/events", event(call, "call_started"),
                                   headers={"X-AVR-WEBHOOK-SECRET": "hook-secret"})
        bad = await http_request(f"{proxy.url}/events", orjson.dumps({"uuid": call, "type": "other"}),
                                 headers={"X-AVR-WEBHOOK-SECRET": "hook-secret"})
    assert (missing.status, wrong.status, right.status, bad.status) == (401, 401, 200, 400)


async def test_lifecycle_and_forwarding(tmp_path: Path) -> None:
    """call_initiated captures avr-core's payload, turns are counted, events reach EVENTS_URL enriched and signed."""
    call = str(uuidlib.uuid4())
    async with running_api("raw") as api:
        api.answer = (200, {"Content-Type": "application/json"}, b"{}")
        events_url = api.url
        settings = make_settings(tmp_path, events_url=events_url, api_signing_secret="sign-secret")
        async with running_proxy(settings) as proxy:
            payload = {"from": "0987654321", "to": "5551000", "uniqueid": "1770758888.32", "channel": "PJSIP/2000-1"}
            assert (await http_request(f"{proxy.url}/events", event(call, "call_initiated", payload))).status == 200
            assert (await http_request(f"{proxy.url}/events", event(call, "call_started"))).status == 200
            heard = await play_call(proxy.url, call, ["hola", "mi pedido"])
            assert "Juan" in heard[0].sentences[0]
            await counted(settings, call, 2)
            assert (await http_request(f"{proxy.url}/events", event(call, "call_ended"))).status == 200
            await forwarded(api, 3)
        env = clean_environ(STORE_URL=settings.store_url)
        listing = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "avr_llm_proxy", "calls"],
                                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    kinds = [body["type"] for body in api.received]
    assert kinds == ["call_initiated", "call_started", "call_ended"]
    ended = api.received[-1]
    assert ended["caller_number"] == "+593987654321" and ended["called_number"] == "5551000" and ended["turns"] == 2
    fields = dict(part.split("=", 1) for part in api.headers[-1]["X-Signature"].split(","))
    expected = hmac.new(b"sign-secret", fields["t"].encode() + b"." + orjson.dumps(ended), hashlib.sha256).hexdigest()
    assert fields["v1"] == expected
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(call))
    assert "+593*****4321" in row and "avr-core" in row and row.split()[-2:] == ["2", "-"]
    assert "593987654321" not in listing.stdout


async def test_forwarded_event_counts_turns_another_worker_answered(tmp_path: Path) -> None:
    """Two workers on one SQLite file: the one forwarding a mid-call event has the other's turn count."""
    call = str(uuidlib.uuid4())
    async with running_api("raw") as api:
        api.answer = (200, {"Content-Type": "application/json"}, b"{}")
        settings = make_settings(tmp_path, events_url=api.url)
        async with running_proxy(settings) as counting, running_proxy(settings) as forwarding:
            initiated = event(call, "call_initiated", {"from": "0987654321", "to": "5551000"})
            assert (await http_request(f"{forwarding.url}/events", initiated)).status == 200
            # A turn here leaves the record held by the forwarding worker; three more turns go to the
            # other worker: four answered in all, whatever the bodies' histories say.
            heard = await play_call(forwarding.url, call, ["hola"])
            await counted(settings, call, 1)
            heard += await play_call(counting.url, call, ["hola", "mi pedido", "gracias"])
            assert "Juan" in heard[0].sentences[0] and len(heard) == 4 and all(turn.sentences for turn in heard)
            await counted(settings, call, 4)
            assert (await http_request(f"{forwarding.url}/events", event(call, "transcription"))).status == 200
            await forwarded(api, 2)
    assert [(body["type"], body["turns"]) for body in api.received] == [("call_initiated", 0), ("transcription", 4)]


async def test_call_ended_shortens_retention(tmp_path: Path) -> None:
    """After call_ended the record expires within minutes instead of CALLER_TTL_SECONDS."""
    call = str(uuidlib.uuid4())
    settings = make_settings(tmp_path, caller_ttl_seconds=7200)
    async with running_proxy(settings) as proxy:
        await register_caller(proxy.url, call, "0987654321", None, None, "json")
        await http_request(f"{proxy.url}/events", event(call, "call_ended"))
    with sqlite3.connect(settings.sqlite_path or "") as conn:
        (expires_at,) = conn.execute("SELECT expires_at FROM calls WHERE key = ?", (call,)).fetchone()
    assert expires_at - time.time() < 301


async def test_initiated_does_not_replace_a_dialplan_capture(tmp_path: Path) -> None:
    """avr-core's payload (no presentation) never overrides what the dialplan captured (it may be withheld)."""
    call = str(uuidlib.uuid4())
    async with running_proxy(make_settings(tmp_path)) as proxy:
        body = orjson.dumps({"uuid": call, "caller_number": "+593987654321", "presentation": "prohib"})
        await http_request(f"{proxy.url}/call", body)
        await http_request(f"{proxy.url}/events", event(call, "call_initiated", {"from": "+593987654321"}))
        heard = await play_call(proxy.url, call, ["hola"])
    assert "oculto" in " ".join(heard[0].sentences)


async def test_start_up_warns_when_no_capture_way_knows_presentation(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """With FastAGI, AMI and the legacy file off, start-up says once that withheld callers depend on CURL()."""
    async with running_proxy(make_settings(tmp_path, agi_listen="", ami_url="", callerid_dir="")):
        pass
    warned = [line for line in logs() if '"presentation_not_captured"' in line]
    assert len(warned) == 1 and "call_initiated carries no presentation" in warned[0]
    (tmp_path / "files").mkdir()
    async with running_proxy(make_settings(tmp_path / "files", agi_listen="")):
        pass
    assert len([line for line in logs() if '"presentation_not_captured"' in line]) == 1
