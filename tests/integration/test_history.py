"""Caller history (`HISTORY_DAYS`) over real HTTP with the SQLite store: off by default, erased by `forget`,
and what the built-in demo API makes of it."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import uuid as uuidlib
from pathlib import Path
from typing import Any

from avr_llm_proxy.simulate import play_call, register_caller

from ..conftest import clean_environ, make_settings, running_api, running_proxy

NUMBER = "+593987654321"


def rows(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("history", "history_seen")}


async def one_call(url: str, number: str = NUMBER) -> str:
    call = str(uuidlib.uuid4())
    await register_caller(url, call, number, "Juan Perez", None, "json")
    for turn in await play_call(url, call, ["hola", "gracias"]):
        assert turn.sentences and not turn.problems
    return call


def history_of(received: list[dict[str, Any]], call: str) -> list[Any]:
    return [payload["caller"].get("history", "absent") for payload in received if payload["conversation_id"] == call]


async def test_off_by_default_nothing_is_kept(tmp_path: Path) -> None:
    """Without HISTORY_DAYS the payload has no `caller.history` and no history row is written."""
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        calls = [await one_call(proxy.url) for _ in range(2)]
    assert all(history_of(api.received, call) == ["absent", "absent"] for call in calls)
    assert rows(tmp_path / "calls.db") == {"history": 0, "history_seen": 0}


async def test_forget_erases_the_history(tmp_path: Path) -> None:
    """`avr-llm-proxy forget <number>` erases a number's history with its calls: the next call is a first one.
    Unknown and invalid numbers get null and leave no row."""
    async with running_api() as api, running_proxy(settings := make_settings(
            tmp_path, api_url=api.url, history_days=30,
            encryption_key="MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")) as proxy:
        first, second = await one_call(proxy.url), await one_call(proxy.url)
        forgotten = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "avr_llm_proxy", "forget", NUMBER], cwd=tmp_path, text=True,
            capture_output=True, timeout=60, env=clean_environ(STORE_URL=settings.store_url,
                                                               ENCRYPTION_KEY=settings.encryption_key))
        assert forgotten.returncode == 0, forgotten.stderr
        before = rows(tmp_path / "calls.db")
        third = await one_call(proxy.url)
        invalid = await one_call(proxy.url, "12")
        unknown = str(uuidlib.uuid4())
        await play_call(proxy.url, unknown, ["hola"])
    assert [history_of(api.received, call)[0]["calls"] for call in (first, second, third)] == [0, 1, 0]
    assert before == {"history": 0, "history_seen": 0}
    assert history_of(api.received, invalid) == [None, None] and history_of(api.received, unknown) == [None]
    assert rows(tmp_path / "calls.db") == {"history": 1, "history_seen": 1}


async def test_demo_api_welcomes_a_returning_caller(tmp_path: Path) -> None:
    """The built-in demo API greets a caller it has heard from before differently from a first-time one."""
    async with running_proxy(make_settings(tmp_path, history_days=30, api_url="")) as proxy:
        greetings = []
        for _ in range(2):
            call = str(uuidlib.uuid4())
            await register_caller(proxy.url, call, NUMBER, None, None, "json")
            greetings.append((await play_call(proxy.url, call, ["hola"]))[0].sentences[0])
    assert greetings[0].startswith("Hola Juan, gracias por llamar")
    assert greetings[1].startswith("Hola de nuevo Juan")
