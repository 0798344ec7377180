"""A circuit breaker per upstream: when the API keeps failing, callers hear the fallback at once.

Closed: every turn goes to the API. After `threshold` failures in a row it opens: turns get the
fallback without waiting out a deadline each. After `cooldown` one turn is let through (half-open);
its success closes the circuit, its failure opens it again.
"""

from __future__ import annotations

import time
from typing import Literal

from .observability import BREAKER_STATE

State = Literal["closed", "open", "half_open"]
_GAUGE = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    def __init__(self, name: str, threshold: int = 5, cooldown: float = 10.0) -> None:
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._set("closed")

    def _set(self, state: State) -> None:
        self._state: State = state
        BREAKER_STATE.labels(upstream=self.name).set(_GAUGE[state])

    @property
    def state(self) -> State:
        if self._state == "open" and time.monotonic() - self._opened_at >= self.cooldown:
            self._set("half_open")
            self._probing = False
        return self._state

    def allow(self) -> bool:
        """Whether this turn may call the API; in half-open state only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        if self._state != "closed":
            self._set("closed")

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self._state == "half_open" or self.failures >= self.threshold:
            self._opened_at = time.monotonic()
            self._set("open")

    def release(self) -> None:
        """A probe that ended without a verdict (the turn was superseded): let another one try."""
        self._probing = False

    def describe(self) -> dict[str, object]:
        return {"state": self.state, "consecutive_failures": self.failures}
