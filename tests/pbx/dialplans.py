"""The tests' own dialplan around the shipped subroutines, written as an operator following the README would.

A context `<way>-<form>-<argument>-<presentation>` answers every extension: it runs the shipped
subroutine of `<way>` (`agi`, `curl`, `legacy`, `ami`) with the argument its usage line shows
(`usage`) or none (`none`), and hands the call to avr-core in one of two forms: the seed's
`Dial(AudioSocket/host:port/${UUID})` (`dial`) or FreePBX's `AudioSocket(${AS_UUID},host:port)`
application (`app`). `<presentation>` is `plain`, or `before`/`after`: the caller is withheld with
`Set(CALLERID(num-pres)=prohib)` before or after the subroutine.
"""

from __future__ import annotations

import itertools

WAYS = ("agi", "curl", "legacy", "ami")
SOURCES = {"agi": "agi", "curl": "curl", "legacy": "file", "ami": "ami"}  # the caller.source each way gives
FORMS = ("dial", "app")
ARGUMENTS = ("usage", "none")
PRESENTATIONS = ("plain", "before", "after")
# The argument each subroutine's usage line shows (dialplan/*.conf); AMI's takes none.
USAGE = {"agi": "avr-llm-proxy:4573", "curl": "avr-llm-proxy:6017", "legacy": "/tmp", "ami": ""}
INCLUDES = (*(f"avr-callerid-{way}.conf" for way in WAYS), "avr-transfer.conf")
WITHHOLD = "Set(CALLERID(num-pres)=prohib)"
FREEPBX_VARIABLE = "AS_UUID"


def context(way: str, form: str, argument: str, presentation: str) -> str:
    return f"{way}-{form}-{argument}-{presentation}"


def _steps(way: str, form: str, argument: str, presentation: str, audiosocket: str) -> list[str]:
    value = USAGE[way] if argument == "usage" else ""
    steps = ["Answer()"] if form == "app" else []
    if presentation == "before":
        steps.append(WITHHOLD)
    if way == "ami" and form == "app":
        # AMI only, FreePBX's form: the UUID line alone, with ${UUID()} where the guide had SHELL(uuidgen).
        steps.append(f"Set({FREEPBX_VARIABLE}=${{UUID()}})")
    elif form == "app":
        # Without the first argument, written as an operator might: a space after the comma.
        steps.append(f"Gosub(avr-callerid-{way},s,1({value},{FREEPBX_VARIABLE}))" if value
                     else f"Gosub(avr-callerid-{way},s,1(, {FREEPBX_VARIABLE}))")
    else:
        steps.append(f"Gosub(avr-callerid-{way},s,1({value}))" if value else f"Gosub(avr-callerid-{way},s,1)")
    if presentation == "after":
        steps.append(WITHHOLD)
    if form == "app":
        steps.append(f"AudioSocket(${{{FREEPBX_VARIABLE}}},{audiosocket})")
    else:
        steps.append(f"Dial(AudioSocket/{audiosocket}/${{UUID}},120,gKk)")
    return [*steps, "Hangup()"]


def extensions(audiosocket_port: int) -> str:
    """extensions.conf: the shipped files by `#include`, as the README says, then the test contexts."""
    lines = ["[general]", "static = yes", "writeprotect = yes", ""]
    lines += [f"#include avr-llm-proxy/{name}" for name in INCLUDES]
    # SIP calls (pjsip endpoint `carrier`) dial 7<way><nn>: way 1-4 in the order of WAYS, then as the Local calls.
    lines += ["", "[sip-in]"]
    lines += [f"exten => _7{n}XX,1,Goto({context(way, 'dial', 'usage', 'plain')},${{EXTEN}},1)"
              for n, way in enumerate(WAYS, 1)]
    for way, form, argument, presentation in itertools.product(WAYS, FORMS, ARGUMENTS, PRESENTATIONS):
        steps = _steps(way, form, argument, presentation, f"127.0.0.1:{audiosocket_port}")
        lines += ["", f"[{context(way, form, argument, presentation)}]", f"exten => _X.,1,{steps[0]}"]
        lines += [f" same => n,{step}" for step in steps[1:]]
    return "\n".join(lines) + "\n"
