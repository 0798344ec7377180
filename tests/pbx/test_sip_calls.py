"""Real SIP calls from sipp into chan_pjsip, with the caller-ID headers carriers really send.

The endpoint `carrier` is identified by IP and trusted for identity (`trust_id_inbound=yes`), as a
carrier trunk is: a P-Asserted-Identity with `Privacy: id` gives Asterisk the real number with a
`prohib` presentation, and that number must come out withheld. Every case runs through every
shipped capture way, all calls at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LOG_LINES
from tests.pbx.conftest import REQUIRED, Pbx, stack
from tests.pbx.dialplans import SOURCES, WAYS
from tests.pbx.sip import place, sipp_program
from tests.pbx.verify import Expected, Placed, check, finish

HOST = "carrier.example"


@dataclass(frozen=True)
class SipCall:
    """One INVITE: the headers that carry the caller (From first), and what the business API must see."""

    label: str
    headers: tuple[str, ...]
    expected: Expected
    signed: str | None = None  # a STIR/SHAKEN Identity header of this kind (tests/pbx/stir.py), made when placed


ANONYMOUS = 'From: "Anonymous" <sip:anonymous@anonymous.invalid>'
CASES = (
    SipCall("From user and display name", (f'From: "Maria Lopez" <sip:0987650001@{HOST}>',),
            Expected("+593987650001", "allowed", "Maria Lopez")),
    SipCall("trusted PAI with Privacy: id", (
        ANONYMOUS, f"P-Asserted-Identity: <sip:+593987650002@{HOST};user=phone>", "Privacy: id"),
            Expected("anonymous", "withheld", hidden="+593987650002")),
    SipCall("anonymous@anonymous.invalid", (ANONYMOUS,), Expected("anonymous", "withheld")),
    SipCall("tel: URI", ("From: <tel:+34612340003>",), Expected("+34612340003", "allowed")),
    SipCall("RPID", (f"From: <sip:unknown@{HOST}>",
                     f'Remote-Party-ID: "Carlos Ruiz" <sip:+593987650005@{HOST}>;party=calling;privacy=off;screen=yes'),
            Expected("+593987650005", "allowed", "Carlos Ruiz")),
    SipCall("RPID with privacy=full", (
        ANONYMOUS, f'Remote-Party-ID: "Carlos Ruiz" <sip:+593987650006@{HOST}>;party=calling;privacy=full;screen=yes'),
            Expected("anonymous", "withheld", hidden="+593987650006")),
    SipCall("trusted PAI without privacy", (ANONYMOUS, f'P-Asserted-Identity: "Lucia Vera" <sip:+593987650007@{HOST}>'),
            Expected("+593987650007", "allowed", "Lucia Vera")),
    # The carrier's STIR/SHAKEN verdict, as carriers write it in P-Asserted-Identity.
    SipCall("PAI with verstat=TN-Validation-Passed", (
        ANONYMOUS, f'P-Asserted-Identity: "Ana Mora" <sip:+593987650008@{HOST};verstat=TN-Validation-Passed>'),
            Expected("+593987650008", "allowed", "Ana Mora", verified=True)),
    SipCall("PAI with verstat=TN-Validation-Failed", (
        ANONYMOUS, f"P-Asserted-Identity: <sip:+593987650009@{HOST};user=phone;verstat=TN-Validation-Failed>"),
            Expected("+593987650009", "allowed", verified=False)),
    # Asterisk's own STIR/SHAKEN verification of a signed Identity header (the trunk has a verify profile).
    SipCall("Identity signed, attestation A", ("From: <sip:+593987650010@carrier.example>",),
            Expected("+593987650010", "allowed", verified=True), signed="good"),
    SipCall("Identity signed by another key", ("From: <sip:+593987650011@carrier.example>",),
            Expected("+593987650011", "allowed", verified=False), signed="bad_signature"),
    # An x5u the URL checks refuse: Asterisk 22.10 dies if verify_result is read then; the ways never do.
    SipCall("Identity with a refused x5u", ("From: <sip:+593987650012@carrier.example>",),
            Expected("+593987650012", "allowed", verified=False), signed="bad_url"),
)


def headers(pbx: Pbx, case: SipCall, exten: str) -> tuple[str, ...]:
    """The INVITE's headers: the case's, and a freshly signed Identity header (iat must be recent)."""
    signed = pbx.stir.identity(case.signed, case.expected.number, exten) if case.signed else ()
    return case.headers + signed


def _udp_blocks(count: int) -> list[int]:
    """`count` blocks of 5 free UDP ports, below the kernel's ephemeral range: sipp takes base to base+3 for
    RTP (audio, RTCP, video, video RTCP) and base+4 for SIP. Random, so two test runs seldom meet."""
    blocks: list[int] = []
    for base in random.sample(range(20000, 30000, 8), 400):
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + 5):
                    held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)).bind(("127.0.0.1", port))
            except OSError:
                continue
        blocks.append(base)
        if len(blocks) == count:
            return blocks
    raise RuntimeError("no free UDP ports for sipp")


async def test_sip_callers_through_every_way(pbx: Pbx, tmp_path: Path) -> None:
    """Each carrier header form, through each capture way: the API sees the caller; a withheld one never."""
    program = sipp_program()
    if program is None:
        (pytest.fail if os.environ.get(REQUIRED) else pytest.skip)(
            "sipp (Debian's sip-tester) is not installed and cannot be installed here")
    # The dialplan's ways first, the proxy without AMI; then AMI alone.
    for ways, folder in ((WAYS[:3], tmp_path / "dialplan-ways"), (WAYS[3:], tmp_path / "ami")):
        folder.mkdir()
        calls = [(f"7{WAYS.index(way) + 1}{n:02d}", way, case) for way in ways for n, case in enumerate(CASES)]
        placed = [Placed(exten, f"{way}: {case.label}", case.expected, SOURCES[way]) for exten, way, case in calls]
        blocks = _udp_blocks(len(calls))
        start = len(LOG_LINES)
        async with stack(pbx, folder, ami="ami" in ways) as running:
            outcomes = await asyncio.gather(*(
                place(program, folder, pbx.asterisk.ports.sip, exten, headers(pbx, case, exten), blocks[i] + 4,
                      blocks[i])
                for i, (exten, _, case) in enumerate(calls)))
            uuids = await finish(running, placed, ("UUID",))
            failed = [f"{exten}: sipp exit {code}\n{detail}"
                      for (exten, _, _), (code, detail) in zip(calls, outcomes, strict=True) if code != 0]
            assert not failed, "\n".join(failed)
            await check(running, placed, uuids, LOG_LINES[start:])
