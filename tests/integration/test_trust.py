"""Caller-ID trust over real sockets: `verstat`, `attestation` and `verified` from `/call` (JSON and the
`CURL()` form) and from a FastAGI session, as the business API receives them on every turn."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from avr_llm_proxy.capture.agi import STIR_ASKED
from avr_llm_proxy.simulate import http_request, play_call

from ..capture.test_agi import ATTESTATION, IDENTITY, PAI, PJSIP, STIR_COUNT, VERIFY, agi_session, with_script
from ..conftest import closed_port, make_settings, running_api, running_proxy

PASSED_PAI = '"Juan" <sip:+593987654321;verstat=TN-Validation-Passed@carrier.example;user=phone>'


def trust_seen(received: list[dict[str, Any]], call: str) -> list[tuple[Any, Any, Any]]:
    return [(payload["caller"]["verstat"], payload["caller"]["attestation"], payload["caller"]["verified"])
            for payload in received if payload["conversation_id"] == call]


@pytest.mark.parametrize(("fields", "expected"), [
    ({"verstat": "TN-Validation-Passed"}, ("TN-Validation-Passed", None, True)),
    ({"verstat": PASSED_PAI.replace("Passed", "Failed")}, ("TN-Validation-Failed", None, False)),
    ({"attestation": "A", "verify_result": "success"}, (None, "A", True)),
    ({"attestation": "C", "verify_result": "success"}, (None, "C", None)),
    ({}, (None, None, None)),
], ids=["verstat", "failed_header", "stir_a", "stir_c", "none"])
@pytest.mark.parametrize("way", ["json", "form"])
async def test_call_capture_carries_the_assertion(tmp_path: Path, way: str, fields: dict[str, str],
                                                  expected: tuple[Any, Any, Any]) -> None:
    """`/call` JSON (`verstat`, `attestation`, `verify_result`) and the form (`verstat`, `attest`, `verify`)
    reach every turn as `caller.verstat`, `caller.attestation` and `caller.verified`."""
    call = str(uuidlib.uuid4())
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url)) as proxy:
        if way == "json":
            body = orjson.dumps({"uuid": call, "caller_number": "+593987654321", **fields})
            reply = await http_request(f"{proxy.url}/call", body)
        else:
            names = {"attestation": "attest", "verify_result": "verify"}
            form = {"uuid": call, "num": "+593987654321",
                    **{names.get(key, key): value for key, value in fields.items()}}
            body = "&".join(f"{key}={quote(value, safe='')}" for key, value in form.items()).encode()
            reply = await http_request(f"{proxy.url}/call", body, "application/x-www-form-urlencoded")
        assert reply.status == 200
        await play_call(proxy.url, call, ["hola", "gracias"])
    assert trust_seen(api.received, call) == [expected, expected]


SIGNED = {STIR_COUNT: "1", IDENTITY: "eyJhbGciOiJFUzI1NiJ9.e30.c2ln;info=<https://cert.example/a.pem>"}


@pytest.mark.parametrize(("variables", "expected", "asked"), [
    ({PAI: PASSED_PAI}, ("TN-Validation-Passed", None, True), 1),
    ({**SIGNED, ATTESTATION: "A", VERIFY: "success"}, (None, "A", True), 3),
    ({**SIGNED, ATTESTATION: "B", VERIFY: "success"}, (None, "B", None), 3),
    # A failed verification: no attestation, and verify_result is never read (it can crash Asterisk 22.10).
    ({**SIGNED, ATTESTATION: "", VERIFY: "would crash"}, (None, None, False), 2),
    # A verify profile records a result for every call; without an Identity header nothing was asserted.
    ({STIR_COUNT: "1", ATTESTATION: "", VERIFY: "missing_identity_hdr"}, (None, None, None), 1),
    ({STIR_COUNT: "0"}, (None, None, None), 1),
], ids=["pai_verstat", "stir_passed", "stir_b", "stir_failed", "no_identity", "nothing"])
async def test_fastagi_reads_the_assertion_from_the_channel(tmp_path: Path, variables: dict[str, str],
                                                            expected: tuple[Any, Any, Any], asked: int) -> None:
    """FastAGI asks a PJSIP channel for its headers and STIR/SHAKEN count, then, only with an Identity
    header, its attestation, and only with an attestation, its verify_result; the turns carry the verdict."""
    port = closed_port()
    async with running_api() as api:
        settings = make_settings(tmp_path, api_url=api.url, agi_listen=f"127.0.0.1:{port}")
        async with running_proxy(settings) as proxy:
            commands = await agi_session(port, with_script(PJSIP), variables=variables)
            call = commands[-1].split('"')[1]
            await play_call(proxy.url, call, ["hola"])
    assert [c for c in commands if "STIR" in c] == [f"GET FULL VARIABLE {e}" for e in STIR_ASKED[:asked]]
    assert trust_seen(api.received, call) == [expected]
