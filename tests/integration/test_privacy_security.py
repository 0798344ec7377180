"""Privacy and security over real sockets: sealed SQLite, erasure, who may capture, signed requests, limits."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import stat
import subprocess
import sys
import uuid as uuidlib
from pathlib import Path

import orjson
import pytest

from avr_llm_proxy.capture.files import LegacyCallerFiles
from avr_llm_proxy.privacy import KEY_FILE_NAME, Sealer, parse_keys
from avr_llm_proxy.simulate import http_request, play_call, register_caller

from ..conftest import clean_environ, make_settings, running_api, running_proxy

NUMBERS = ("593987654321", "0987654321", "987654321")


def database_bytes(directory: Path) -> bytes:
    """The SQLite file and its WAL, as bytes."""
    return b"".join(path.read_bytes() for path in directory.glob("calls.db*"))


async def test_sqlite_file_holds_no_number_or_name(tmp_path: Path) -> None:
    """After captures and turns, the database file's bytes contain neither the number nor the name."""
    settings = make_settings(tmp_path)
    async with running_proxy(settings) as proxy:
        for way in ("json", "form"):
            call = str(uuidlib.uuid4())
            await register_caller(proxy.url, call, "+593987654321", "Juan Perez", "5551000", way)
            await play_call(proxy.url, call, ["hola"])
    data = database_bytes(tmp_path)
    assert len(data) > 4096
    for secret in (*NUMBERS, "Juan Perez", "Juan"):
        assert secret.encode() not in data
    key_file = tmp_path / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


async def test_key_file_is_reused_and_rotation_keeps_old_records(tmp_path: Path) -> None:
    """A restart reads the same key file; a new primary ENCRYPTION_KEY still opens records of the old one."""
    call = str(uuidlib.uuid4())
    async with running_proxy(make_settings(tmp_path)) as proxy:
        await register_caller(proxy.url, call, "+593987654321", None, None, "json")
    file_key = (tmp_path / KEY_FILE_NAME).read_text().strip()
    async with running_proxy(make_settings(tmp_path)) as proxy:
        assert (await play_call(proxy.url, call, ["hola"]))[0].sentences[0].startswith("Hola Juan")
    new = "k2:" + base64.b64encode(os.urandom(32)).decode()
    async with running_proxy(make_settings(tmp_path, encryption_key=f"{new},{file_key}")) as proxy:
        assert (await play_call(proxy.url, call, ["hola"]))[0].sentences[0].startswith("Hola Juan")
    async with running_proxy(make_settings(tmp_path, encryption_key=new)) as proxy:
        # Without the old key the record cannot be opened: the call goes on as unknown, never crashes.
        heard = await play_call(proxy.url, call, ["hola"])
        assert heard[0].problems == [] and "No pude identificar" in " ".join(heard[0].sentences)


def test_sealer_rotation_and_tamper() -> None:
    """The first key seals, every key opens, a flipped byte is refused."""
    old, new = parse_keys(base64.b64encode(b"o" * 32).decode())[0], ("k2", b"n" * 32)
    sealed_old = Sealer([old]).seal(b"record")
    both = Sealer([new, old])
    assert both.open(sealed_old) == b"record" and both.seal(b"x").startswith(b"k2:")
    tampered = sealed_old[:-1] + bytes([sealed_old[-1] ^ 1])
    with pytest.raises(Exception, match="decrypt"):
        both.open(tampered)


async def test_forget_erases_every_record_of_a_number(tmp_path: Path) -> None:
    """`avr-llm-proxy forget` removes every record and caller file of a number, and says how many."""
    settings = make_settings(tmp_path)
    calls = [str(uuidlib.uuid4()) for _ in range(3)]
    async with running_proxy(settings) as proxy:
        await register_caller(proxy.url, calls[0], "+593987654321", None, None, "json")
        await register_caller(proxy.url, calls[1], "0987654321", None, None, "form")
        await register_caller(proxy.url, calls[2], "+34612345678", None, None, "json")
    (Path(settings.callerid_dir) / f"callerid-{uuidlib.uuid4()}.txt").write_text("0987654321\n")
    env = clean_environ(STORE_URL=settings.store_url, CALLERID_DIR=settings.callerid_dir)
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "avr_llm_proxy", "forget", "098 765 4321"], env=env,
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "erased 2 record(s) and 1 caller file(s) of +593*****4321 from sqlite"
    async with running_proxy(settings) as proxy:
        for call, expected in zip(calls, ("No pude identificar", "No pude identificar", "Hola Ana"), strict=True):
            assert expected in " ".join((await play_call(proxy.url, call, ["hola"]))[0].sentences)


async def test_call_needs_trusted_network_or_token(tmp_path: Path) -> None:
    """Outside TRUSTED_NETWORKS /call is 403; CAPTURE_TOKEN opens it; a wrong token is 401."""
    settings = make_settings(tmp_path, trusted_networks="10.0.0.0/8", capture_token="capture-secret-123")
    body = orjson.dumps({"uuid": str(uuidlib.uuid4()), "caller_number": "0987654321"})
    async with running_proxy(settings) as proxy:
        refused = await http_request(f"{proxy.url}/call", body)
        assert refused.status == 403 and b"untrusted_client" in b"".join(refused.chunks)
        wrong = await http_request(f"{proxy.url}/call", body, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        ok = await http_request(f"{proxy.url}/call", body, headers={"Authorization": "Bearer capture-secret-123"})
        assert ok.status == 200


async def test_captured_record_is_not_overwritten_without_token(tmp_path: Path) -> None:
    """A second /call for a live call cannot replace its caller unless it carries CAPTURE_TOKEN."""
    call = str(uuidlib.uuid4())
    settings = make_settings(tmp_path, capture_token="capture-secret-123")
    async with running_proxy(settings) as proxy:
        await register_caller(proxy.url, call, "0987654321", None, None, "json")
        spoof = await http_request(f"{proxy.url}/call", orjson.dumps({"uuid": call, "caller_number": "+34612345678"}))
        assert spoof.status == 403 and b"already_captured" in b"".join(spoof.chunks)
        assert "Hola Juan" in (await play_call(proxy.url, call, ["hola"]))[0].sentences[0]
        fixed = await http_request(f"{proxy.url}/call", orjson.dumps({"uuid": call, "caller_number": "+34612345678"}),
                                   headers={"Authorization": "Bearer capture-secret-123"})
        assert fixed.status == 200
        assert "Ana" in (await play_call(proxy.url, call, ["hola"]))[0].sentences[0]


async def test_api_token_and_signature(tmp_path: Path) -> None:
    """Every turn carries the Bearer API_TOKEN and an X-Signature the API can verify."""
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, api_token="api-token-1", api_signing_secret="sign-secret")
        async with running_proxy(settings) as proxy:
            await play_call(proxy.url, str(uuidlib.uuid4()), ["hola"])
    headers = api.headers[0]
    assert headers["Authorization"] == "Bearer api-token-1"
    fields = dict(part.split("=", 1) for part in headers["X-Signature"].split(","))
    body = orjson.dumps(api.received[0])
    expected = hmac.new(b"sign-secret", fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)


def test_library_log_lines_are_redacted(tmp_path: Path) -> None:
    """A number in a line logged by a library (uvicorn, aiohttp) is masked by the same chain."""
    code = ("import logging; from avr_llm_proxy.observability import configure_logging; "
            "configure_logging('masked', b'k' * 16); "
            "logging.getLogger('uvicorn.error').error('request from +593987654321 failed'); "
            "import structlog; structlog.get_logger('x').warning('boom', detail='call 0987654321')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=clean_environ())
    assert "+593*****4321" in result.stderr and "******4321" in result.stderr
    assert not any(number in result.stderr for number in NUMBERS)


def test_foreign_owner_file_is_refused(tmp_path: Path) -> None:
    """A caller file owned by a user outside CALLERID_FILE_OWNERS is not believed."""
    call = str(uuidlib.uuid4())
    (tmp_path / f"callerid-{call}.txt").write_text("0987654321\n")
    assert asyncio.run(LegacyCallerFiles(str(tmp_path), 3600, "EC", frozenset({os.getuid() + 4242})).find(call)) \
        is None
    assert asyncio.run(LegacyCallerFiles(str(tmp_path), 3600, "EC", frozenset({os.getuid()})).find(call)) is not None
