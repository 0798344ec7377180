"""The console's test call: a caller and utterances played through the real path, as `simulate` does.

The proxy calls itself over HTTP: the caller is captured by `POST /call`, then each utterance goes to
`/prompt-stream` as avr-core sends it, and what avr-core would speak comes back. Beside it, the
body the business API received for the last utterance, built by the function that built it, with
every number masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ..avr import AvrTurn
from ..calls import CallRecord, CallRegistry
from ..simulate import new_call_uuid, play_call, register_caller
from ..upstream import UpstreamRequest, build_payload

MAX_UTTERANCES, MAX_CHARS = 10, 500
# Payload fields that hold no caller data: the call's identifiers, the bot's number, the dialled DID.
KEPT = frozenset({"conversation_id", "last_conversation_id", "phone", "called_number"})
PRESENTATIONS = ("allowed", "withheld")


class TrialError(ValueError):
    """A test call the form asks for that cannot be placed; the message says which field."""


@dataclass(frozen=True, slots=True)
class TrialCall:
    number: str
    name: str | None
    presentation: str
    called: str | None
    utterances: tuple[str, ...]


def _field(data: dict[str, Any], name: str, limit: int = 64) -> str | None:
    value = data.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise TrialError(f"{name}: a text of at most {limit} characters")
    return value.strip() or None


def parse_trial(data: object) -> TrialCall:
    """The form's JSON; raises TrialError naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise TrialError("the body must be a JSON object")
    utterances = data.get("utterances")
    if (not isinstance(utterances, list) or not 0 < len(utterances) <= MAX_UTTERANCES
            or not all(isinstance(text, str) and 0 < len(text.strip()) <= MAX_CHARS for text in utterances)):
        raise TrialError(f"utterances: 1 to {MAX_UTTERANCES} lines of at most {MAX_CHARS} characters")
    presentation = _field(data, "presentation") or "allowed"
    if presentation not in PRESENTATIONS:
        raise TrialError("presentation: allowed or withheld")
    return TrialCall(_field(data, "number") or "", _field(data, "name"), presentation, _field(data, "called"),
                    tuple(text.strip() for text in utterances))


class TrialCalls:
    """Places test calls on this proxy and reports them masked, as the console shows everything."""

    def __init__(self, registry: CallRegistry, ask: Callable[[AvrTurn, CallRecord | None], UpstreamRequest],
                 masked: Callable[[str], str], capture_token: str = "") -> None:
        self.registry = registry
        self.ask = ask
        self.masked = masked  # the console's masking of numbers in what was said
        self.capture_token = capture_token

    async def run(self, base_url: str, call: TrialCall) -> dict[str, Any]:
        uuid = new_call_uuid()
        presentation = "prohib" if call.presentation == "withheld" else "allowed"
        captured = await register_caller(base_url, uuid, call.number, call.name, call.called, "json",
                                         self.capture_token or None, presentation)
        heard = await play_call(base_url, uuid, list(call.utterances))
        record = await self.registry.get(uuid)
        turn = AvrTurn(uuid, call.utterances[-1], len(call.utterances))
        sent = self._masked(build_payload(self.ask(turn, record)))
        return {
            "uuid": uuid, "captured": captured.status,
            "turns": [{"said": self.masked(turn.said), "spoken": [self.masked(text) for text in turn.sentences],
                       "problems": turn.problems} for turn in heard],
            "api_received": orjson.dumps(sent, option=orjson.OPT_INDENT_2).decode(),
        }

    def _masked(self, value: object, key: str = "") -> object:
        """The payload with the caller's numbers masked wherever they are (and digit runs in what was
        said), the call's and the bot's own identifiers as they are."""
        if isinstance(value, dict):
            return {name: self._masked(item, name) for name, item in value.items()}
        if isinstance(value, list):
            return [self._masked(item, key) for item in value]
        if isinstance(value, str) and key not in KEPT:
            return self.masked(value)
        return value
