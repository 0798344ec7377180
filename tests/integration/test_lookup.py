"""The CRM lookup (`LOOKUP_URL`) over real HTTP: once per call across processes, `caller.contact` on every
turn, sealed at rest, and every way it can fail leaving `caller.contact: null` with one log line."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web

from avr_llm_proxy.calls import CallRecord, CallRegistry
from avr_llm_proxy.identity import parse_caller
from avr_llm_proxy.lookup import Lookup
from avr_llm_proxy.simulate import play_call, register_caller
from avr_llm_proxy.stores import open_store

from ..conftest import FakeApi, closed_port, make_settings, running_api, running_proxy
from .test_replicas import KEY, REDIS_URL, redis_up

NUMBER = "+593987654321"
CONTACT = {"customer_id": "C-1043", "tier": "gold", "open_orders": [1043]}


def settings_for(tmp_path: Path, api: FakeApi, lookup_url: str, **extra: Any) -> Any:
    return make_settings(tmp_path, api_url=api.url, lookup_url=lookup_url, api_token="api-token",
                         api_signing_secret="signing-secret", **extra)


def contacts(api: FakeApi, call: str) -> list[Any]:
    return [payload["caller"].get("contact", "absent") for payload in api.received
            if payload["conversation_id"] == call]


async def answering(_: web.Request, __: dict[str, Any]) -> web.StreamResponse:
    return web.json_response(CONTACT)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_one_lookup_per_call_across_two_processes(tmp_path: Path, store: str) -> None:
    """Captured on one process, turns on two sharing SQLite or Redis: the CRM is asked once, signed and
    authorised like the API, and every turn carries its answer; the answer is sealed in the store."""
    call = str(uuidlib.uuid4())
    extra = {"store_url": REDIS_URL, "encryption_key": KEY} if store == "redis" else {}
    if store == "redis" and not redis_up():
        pytest.skip("Redis is not answering on 127.0.0.1:6379")
    async with running_api() as api, running_api() as crm:
        crm.custom = answering
        settings = settings_for(tmp_path, api, crm.url, **extra)
        async with running_proxy(settings) as first, running_proxy(settings) as second:
            await register_caller(first.url, call, NUMBER, "Juan Perez", None, "json")
            for url in (second.url, first.url, second.url):
                assert (await play_call(url, call, ["hola"]))[0].sentences
    assert crm.received == [{"caller_number": NUMBER, "caller_name": "Juan Perez", "called_number": None,
                             "conversation_id": call}]
    headers = crm.headers[0]
    assert headers["Authorization"] == "Bearer api-token"
    stamp, digest = (part.split("=", 1)[1] for part in headers["X-Signature"].split(","))
    body = b'{"caller_number":"+593987654321","caller_name":"Juan Perez","called_number":null,"conversation_id":"' \
        + call.encode() + b'"}'
    assert digest == hmac.new(b"signing-secret", stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert contacts(api, call) == [CONTACT] * 3
    if store == "redis":
        stored = redis.Redis.from_url(REDIS_URL).get(f"avrlp:call:{call}") or b""
    else:
        with sqlite3.connect(tmp_path / "calls.db") as db:
            stored = b"".join(bytes(row[0]) for row in db.execute("SELECT value FROM calls"))
    assert stored and b"C-1043" not in stored and b"gold" not in stored


async def hanging(_: web.Request, __: dict[str, Any]) -> web.StreamResponse:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


async def server_error(_: web.Request, __: dict[str, Any]) -> web.StreamResponse:
    return web.Response(status=500, text="boom")


async def html(_: web.Request, __: dict[str, Any]) -> web.StreamResponse:
    return web.Response(text="<html>login</html>", content_type="text/html")


async def a_list(_: web.Request, __: dict[str, Any]) -> web.StreamResponse:
    return web.json_response([CONTACT])


async def too_large(_: web.Request, __: dict[str, Any]) -> web.StreamResponse:
    return web.json_response({"notes": "x" * 20_000})


FAILURES: dict[str, tuple[Callable[..., Any] | None, str]] = {
    "hangs": (hanging, '"lookup_late"'),
    "500": (server_error, '"http_status"'),
    "html": (html, '"invalid_json"'),
    "list": (a_list, '"not_an_object"'),
    "too_large": (too_large, '"answer_too_large"'),
    "refused": (None, '"unreachable"'),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_a_failing_lookup_leaves_contact_null(tmp_path: Path, failure: str,
                                                    logs: Callable[[], list[str]]) -> None:
    """Whatever goes wrong with the CRM, the call's turns are answered with `caller.contact: null` and the
    reason is logged; a hanging CRM holds a turn no later than the lookup's deadline after the capture."""
    handler, reason = FAILURES[failure]
    call = str(uuidlib.uuid4())
    async with running_api() as api, running_api() as crm:
        crm.custom = handler
        url = crm.url if handler else f"http://127.0.0.1:{closed_port()}/lookup"
        async with running_proxy(settings_for(tmp_path, api, url, lookup_timeout_ms=300)) as proxy:
            await register_caller(proxy.url, call, NUMBER, "Juan Perez", None, "json")
            async with asyncio.timeout(10):  # a liveness bound, far from the 0.3 s deadline
                turns = await play_call(proxy.url, call, ["hola", "gracias"])
    assert all(turn.sentences and not turn.problems for turn in turns)
    assert contacts(api, call) == [None, None]
    assert any(reason in line and '"lookup_' in line for line in logs())


async def test_no_lookup_for_a_withheld_or_unknown_caller(tmp_path: Path) -> None:
    """A withheld or never-captured caller is never looked up; its turns carry `caller.contact: null`."""
    withheld, unknown = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    async with running_api() as api, running_api() as crm:
        crm.custom = answering
        async with running_proxy(settings_for(tmp_path, api, crm.url, caller_wait_ms=0)) as proxy:
            await register_caller(proxy.url, withheld, "anonymous", None, None, "json")
            await play_call(proxy.url, withheld, ["hola"])
            await play_call(proxy.url, unknown, ["hola"])
    assert crm.received == []
    assert contacts(api, withheld) == [None] and contacts(api, unknown) == [None]


async def test_off_by_default(tmp_path: Path) -> None:
    """Without LOOKUP_URL the payload has no `caller.contact`."""
    call = str(uuidlib.uuid4())
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        await register_caller(proxy.url, call, NUMBER, None, None, "json")
        await play_call(proxy.url, call, ["hola"])
    assert contacts(api, call) == ["absent"]


async def test_two_processes_starting_the_same_lookup_ask_once(tmp_path: Path) -> None:
    """Two processes told of the same capture at the same moment (a FastAGI and an AMI capture, say): the
    claim in the record lets one of them ask, and both see its answer."""
    path = tmp_path / "calls.db"
    async with running_api() as crm:
        crm.custom = answering
        registries = [CallRegistry(open_store(f"sqlite:///{path}"), 3600) for _ in range(2)]
        lookups = [Lookup(registry, crm.url, 5.0, "e164") for registry in registries]
        try:
            for lookup in lookups:
                await lookup.start()
            record = await registries[0].put(CallRecord(uuid=str(uuidlib.uuid4()),
                                                        caller=parse_caller(NUMBER, None, "0", source="agi")))
            for lookup in lookups:  # the second process's own capture of the call
                lookup.captured(record)
            seen = await asyncio.gather(*(lookup.contact(record) for lookup in lookups))
        finally:
            for lookup, registry in zip(lookups, registries, strict=True):
                await lookup.close()
                await registry.store.close()
    assert len(crm.received) == 1
    assert [found.contact for found in seen] == [CONTACT, CONTACT]
