"""The operator console in a real headless Chromium: the live table, a call's timeline, the login.

The proxies are real (uvicorn on loopback ports, one SQLite file shared by two of them, as two
workers or replicas share a store); calls are captured and played as the dialplan and avr-core do.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from pathlib import Path

import aiohttp
import orjson
from playwright.async_api import Page, expect

from avr_llm_proxy.simulate import http_request, play_call, register_caller

from ..conftest import make_settings, running_api, running_proxy
from ..integration.test_replicas import Replica
from .conftest import screenshot

NUMBER = "+593987654321"
DIGITS = "593987654321"


async def sse_sample(url: str, seconds: float) -> bytes:
    """What /console/events sends in `seconds`."""
    received = b""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/console/events") as answer:
        assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/event-stream")
        try:
            async with asyncio.timeout(seconds):
                async for chunk in answer.content.iter_any():
                    received += chunk
        except TimeoutError:
            pass
    return received


def ended(call: str) -> bytes:
    return orjson.dumps({"uuid": call, "type": "call_ended", "timestamp": "2026-12-06T05:00:00Z", "payload": {}})


async def test_live_table_follows_another_replicas_call(page: Page, tmp_path: Path) -> None:
    """A call served wholly by another process sharing the store appears, counts its turns and ends in
    the table of the console on this one, without a reload; no full number in the page or the stream."""
    call = str(uuidlib.uuid4())
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url)
        async with running_proxy(settings) as watched, running_proxy(settings) as other:
            await page.goto(f"{watched.url}/console")
            await expect(page.locator("#feed")).to_have_text("live")
            await page.evaluate("window.loadedOnce = true")
            await register_caller(other.url, call, NUMBER, "Juan Perez", "5551000", "json")
            row = page.locator(f'tr[data-uuid="{call}"]')
            await expect(row).to_be_visible()
            await expect(row.locator(".caller")).to_have_text("+593*****4321")
            await play_call(other.url, call, ["hola"])
            await expect(row.locator(".turns")).to_have_text("1")
            await play_call(other.url, call, ["hola", "mi pedido 1043221"])
            await expect(row.locator(".turns")).to_have_text("3")
            await expect(row.locator(".status")).to_have_text("live")
            stream = await sse_sample(watched.url, 1.5)
            assert (await http_request(f"{other.url}/events", ended(call))).status == 200
            await expect(row.locator(".status")).to_have_text("ended")
            assert await page.evaluate("window.loadedOnce") is True  # the same page all along
            await screenshot(page, "console-live-table")
            html = await page.content()
            refused = list(errors)  # while the proxies run (their shutdown cuts the stream, which Chromium logs)
    assert call.encode() in stream and DIGITS.encode() not in stream
    assert DIGITS not in html and "1043221" not in html
    assert refused == []  # no script refused by the Content-Security-Policy, no failed request


async def test_timeline_shows_turns_in_order_masked(page: Page, tmp_path: Path) -> None:
    """A call's page: the capture, then each turn with what was said and spoken, masked, in order."""
    call = str(uuidlib.uuid4())
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        await register_caller(proxy.url, call, NUMBER, "Juan Perez", "5551000", "json")
        await play_call(proxy.url, call, ["hola", "mi pedido es 1043221", "gracias"])
        await page.goto(f"{proxy.url}/console")
        await page.locator(f'tr[data-uuid="{call}"] a').click()
        await expect(page).to_have_url(f"{proxy.url}/console/calls/{call}")
        items = page.locator("#timeline li")
        await expect(items).to_have_count(4)
        await expect(items.locator(".kind")).to_have_text(["captured", "turn 1", "turn 2", "turn 3"])
        await expect(items.nth(2).locator(".said")).to_have_text("caller: mi pedido es ***3221")
        await expect(items.nth(1).locator(".spoken").first).to_have_text("bot: Hola +593*****4321.")
        await expect(page.locator("#turns")).to_have_text("3")
        await screenshot(page, "console-timeline")
        html = await page.content()
        title = await page.title()
    assert DIGITS not in html and "1043221" not in html
    assert DIGITS not in title and call not in title


async def test_login_with_the_debug_token(page: Page, tmp_path: Path) -> None:
    """With DEBUG_TOKEN, a client without a session gets the login form and no data; the token signs it
    in with an HttpOnly, SameSite=Strict cookie, never in a URL; a wrong token is refused."""
    token = "console-token-0123456789"
    async with running_proxy(make_settings(tmp_path, debug_token=token)) as proxy:
        answer = await page.goto(f"{proxy.url}/console")
        assert answer is not None and answer.status == 401
        await expect(page.locator("input#token")).to_be_visible()
        assert await page.locator("#calls").count() == 0
        data = await page.request.get(f"{proxy.url}/console/events")
        assert data.status == 401 and await data.body() == b""
        await page.fill("#token", "wrong-token")
        await page.click("button[type=submit]")
        await expect(page.locator("input#token")).to_be_visible()
        await page.fill("#token", token)
        await page.click("button[type=submit]")
        await expect(page.locator("#feed")).to_have_text("live")
        assert page.url == f"{proxy.url}/console" and token not in page.url
        cookies = await page.context.cookies()
        assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [("avrlp_console", True, "Strict")]
        assert token not in cookies[0]["value"]
        headers = answer.headers
    policy = headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy


async def test_shutdown_does_not_wait_for_an_open_console(tmp_path: Path) -> None:
    """An event stream never ends by itself: at shutdown its connection is closed at once, instead of the
    process waiting out the 30 s graceful period for it (turns in flight still get theirs)."""
    async with aiohttp.ClientSession() as session:
        proxy_cm = running_proxy(make_settings(tmp_path))
        proxy = await proxy_cm.__aenter__()
        stream = await session.get(f"{proxy.url}/console/events", headers={"Accept": "text/event-stream"})
        assert stream.status == 200
        stopping = asyncio.create_task(proxy_cm.__aexit__(None, None, None))
        async with asyncio.timeout(20):  # well inside the 30 s graceful period it would otherwise wait out
            with contextlib.suppress(aiohttp.ClientPayloadError):  # cut mid-stream, as it should be
                while await stream.content.readany():
                    pass
            await stopping
        stream.release()


async def test_live_table_of_serve_with_two_workers(page: Page, tmp_path: Path) -> None:
    """`serve --workers 2`: one worker holds the page's stream, turns land on both, and every call shows
    with all its turns; the timelines name the worker of each turn, and there are two."""
    async with running_api() as api:
        served = await Replica(tmp_path, "--workers", "2", STORE_URL=f"sqlite:///{tmp_path / 'calls.db'}",
                               API_URL=api.url).start()
        try:
            await page.goto(f"{served.url}/console")
            await expect(page.locator("#feed")).to_have_text("live")
            workers: set[int] = set()
            calls: list[str] = []
            while len(workers) < 2:
                assert len(calls) < 40, "every turn went to one worker"
                batch = [str(uuidlib.uuid4()) for _ in range(4)]
                for call in batch:
                    await register_caller(served.url, call, NUMBER, None, None, "json")
                await asyncio.gather(*(play_call(served.url, call, ["hola", "gracias"]) for call in batch))
                calls += batch
                for call in batch:
                    await expect(page.locator(f'tr[data-uuid="{call}"] .turns')).to_have_text("2")
                    answer = await page.request.get(f"{served.url}/console/api/calls/{call}")
                    workers |= {event["worker"] for event in (await answer.json())["events"] if event["kind"] == "turn"}
            await expect(page.locator("#calls tbody tr")).to_have_count(len(calls))
            await screenshot(page, "console-two-workers")
        finally:
            served.stop()


async def test_test_call_panel_plays_the_real_path(page: Page, tmp_path: Path) -> None:
    """The panel's call is captured and played like `simulate`: the page shows what avr-core would speak
    and the body the API received, masked; the call joins the live table; no CSRF token, no call."""
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        await page.goto(f"{proxy.url}/console")
        await page.fill("input[name=number]", NUMBER)
        await page.fill("input[name=name]", "Juan Perez")
        await page.fill("textarea[name=utterances]", "hola\nmi pedido es 1043221")
        await page.click("#trial-form button")
        turns = page.locator("#trial-turns li")
        await expect(turns).to_have_count(2)
        await expect(turns.nth(0).locator(".spoken").first).to_have_text("bot: Hola +593*****4321.")
        await expect(turns.nth(1).locator(".said")).to_have_text("turn 2, caller: mi pedido es ***3221")
        sent = await page.locator("#trial-sent").text_content() or ""
        await expect(page.locator("#calls tbody tr")).to_have_count(1)
        await screenshot(page, "console-test-call")
        html = await page.content()
        forged = [await page.request.post(f"{proxy.url}/console/api/test-call", data={"utterances": ["hola"]},
                                          headers=headers)
                  for headers in ({}, {"X-CSRF-Token": "0" * 64})]
    assert [payload["text"] for payload in api.received] == ["hola", "mi pedido es 1043221"]
    assert '"caller_number": "+593*****4321"' in sent and '"called_number": "5551000"' in sent
    assert '"national": "******4321"' in sent and '"text": "mi pedido es ***3221"' in sent
    assert DIGITS not in sent and DIGITS not in html and "1043221" not in html
    assert [answer.status for answer in forged] == [403, 403] and len(api.received) == 2


async def test_latency_chart_draws_the_last_hours_turns(page: Page, tmp_path: Path) -> None:
    """The chart is inline SVG drawn by the page from /console/api/latency: the four series, with a point
    for the minute the turns happened, counting them all."""
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        for _ in range(3):
            call = str(uuidlib.uuid4())
            await register_caller(proxy.url, call, NUMBER, None, None, "json")
            await play_call(proxy.url, call, ["hola", "gracias"])
        await asyncio.sleep(0.5)  # turns reach the store in the background
        await page.goto(f"{proxy.url}/console")
        chart = page.locator("#chart svg")
        await expect(chart).to_have_attribute("data-turns", "6")
        lines = chart.locator("polyline")
        await expect(lines).to_have_count(4)
        points = [int(await line.get_attribute("data-points") or 0) for line in await lines.all()]
        assert all(0 < count <= 2 for count in points)  # the minute of the turns (two, across a minute's turn)
        await screenshot(page, "console-chart")
