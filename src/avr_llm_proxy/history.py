"""A caller's earlier calls (`HISTORY_DAYS`): what each turn of a call tells the API as `caller.history`.

Kept per number by the store, under the keyed hash of the E.164 number only (never the number), and
only for allowed, valid numbers. A call is counted once, when its first turn asks, and what was
known before it is kept in the call's record, so every later turn reads it from there.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from .identity import CallerId
from .stores import HistoryRow


@dataclass(frozen=True, slots=True)
class CallerHistory:
    """The calls of this number before this one."""

    calls: int
    first_call_at: float | None = None
    last_call_at: float | None = None
    last_conversation_id: str | None = None

    @classmethod
    def from_row(cls, row: HistoryRow) -> CallerHistory:
        return cls(*row)

    def as_list(self) -> list[Any]:
        """Compact, for the sealed call record."""
        return [self.calls, self.first_call_at, self.last_call_at, self.last_conversation_id]

    def payload(self) -> dict[str, Any]:
        """`caller.history` as the API receives it: times in ISO-8601 UTC."""
        return {"calls": self.calls, "first_call_at": _iso(self.first_call_at),
                "last_call_at": _iso(self.last_call_at), "last_conversation_id": self.last_conversation_id}


def kept_for(caller: CallerId) -> bool:
    """Only a number the caller let us see, and a real one, has a history."""
    return caller.presentation == "allowed" and caller.valid and caller.e164 is not None


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(stamp, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
