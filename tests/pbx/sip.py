"""SIP calls into the real Asterisk with sipp (Debian's sip-tester), carrying the headers carriers send.

Each call is one sipp process running a scenario written here: an INVITE with the case's From and
identity headers and an A-law SDP offer, ACK, an RTP stream (so AudioSocket has audio to carry, as
a caller speaking would), then the BYE Asterisk sends when avr-core's stand-in hangs up.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.machine import apt_install, which
from tests.pbx.stir import PROFILE

ENDPOINT = "carrier"
ALAW_SILENCE = b"\xd5" * 8000  # one second of A-law silence; sipp loops it


def sipp_program() -> str | None:
    """The sipp binary, installed from Debian's sip-tester when missing; None when it cannot be had."""
    found = which("sipp")
    if found is None and apt_install("sip-tester") is None:
        found = which("sipp")
    return found


def pjsip(sip_port: int) -> str:
    """pjsip.conf: a loopback UDP transport and one carrier trunk, trusted for identity headers and
    verified for STIR/SHAKEN."""
    return (
        f"[udp]\ntype = transport\nprotocol = udp\nbind = 127.0.0.1:{sip_port}\n\n"
        f"[{ENDPOINT}]\ntype = endpoint\ntransport = udp\ncontext = sip-in\ndisallow = all\nallow = alaw\n"
        "identify_by = ip\ntrust_id_inbound = yes\nrtp_symmetric = yes\ndirect_media = no\n"
        # Asterisk verifies STIR/SHAKEN Identity headers of this trunk (tests/pbx/stir.py).
        f"stir_shaken_profile = {PROFILE}\n\n"
        f"[{ENDPOINT}-ip]\ntype = identify\nendpoint = {ENDPOINT}\nmatch = 127.0.0.1\n"
    )


def scenario(headers: tuple[str, ...], audio: Path) -> str:
    """A sipp UAC scenario: INVITE with `headers` (the first is From), ACK, RTP, answer Asterisk's BYE."""
    sender, *extra = headers
    head = "".join(f"      {line}\n" for line in extra)  # no blank line: it would end the headers
    dialog = (
        f"      {sender};tag=[pid]SIPpTag[call_number]\n"
        "      To: <sip:[service]@[remote_ip]:[remote_port]>"
    )
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="avr-llm-proxy caller">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
{dialog}
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:caller@[local_ip]:[local_port]>
      Max-Forwards: 70
{head}      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=caller 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 8
      a=rtpmap:8 PCMA/8000
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rrs="true"/>
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
{dialog}[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: <sip:caller@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <nop><action><exec rtp_stream="{audio},-1,8"/></action></nop>
  <recv request="BYE" timeout="60000"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
</scenario>
"""


async def place(program: str, folder: Path, sip_port: int, exten: str, headers: tuple[str, ...], local_port: int,
                media_port: int) -> tuple[int, str]:
    """Run one sipp call to `exten`; its exit code and the end of its output."""
    audio = folder / "silence.alaw"
    if not audio.exists():
        audio.write_bytes(ALAW_SILENCE)
    path = folder / f"{exten}.xml"
    path.write_text(scenario(headers, audio))
    process = await asyncio.create_subprocess_exec(
        program, f"127.0.0.1:{sip_port}", "-sf", str(path), "-s", exten, "-m", "1", "-l", "1",
        "-i", "127.0.0.1", "-p", str(local_port), "-mp", str(media_port), "-timeout", "90s", "-nostdin",
        "-trace_err", "-error_file", str(folder / f"{exten}.errors"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=folder,
    )
    output, _ = await process.communicate()
    errors = folder / f"{exten}.errors"
    detail = output.decode(errors="replace")[-1500:] + (errors.read_text()[-1500:] if errors.exists() else "")
    return process.returncode or 0, detail
