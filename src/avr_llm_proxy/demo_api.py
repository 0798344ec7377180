"""The built-in demo business API: what `serve` answers with when no `API_URL` is set.

It behaves like the seed's example API: it looks the caller up by number (a small SQLite table),
greets a known customer by name and mentions their pending order, and answers unknown and withheld
callers sensibly, so a fresh install already shows caller-aware answers.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

from .breaker import CircuitBreaker
from .upstream import AnswerInfo, UpstreamRequest, build_payload

DEMO_CUSTOMERS = (
    ("+593987654321", "Juan Perez", "1043", "en camino y llega mañana"),
    ("+593991234567", "María López", None, None),
    ("+34612345678", "Ana García", "2210", "listo para retirar en la tienda"),
)
_ORDER_WORDS = ("pedido", "orden", "compra", "envío", "envio", "order")


class DemoApi:
    """An in-process upstream with the seed API's contract: payload in, `{"message": …}` text out."""

    name = "demo"

    def __init__(self) -> None:
        self.breaker = CircuitBreaker(self.name)
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute("CREATE TABLE customers (e164 TEXT PRIMARY KEY, name TEXT, order_id TEXT, status TEXT)")
        self._db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", DEMO_CUSTOMERS)
        self._greeted: OrderedDict[str, None] = OrderedDict()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._db.close()

    async def answer(self, request: UpstreamRequest, info: AnswerInfo) -> AsyncGenerator[str, None]:
        info.status = 200
        yield self.reply(build_payload(request))

    def _first_turn(self, conversation_id: str) -> bool:
        if conversation_id in self._greeted:
            return False
        self._greeted[conversation_id] = None
        if len(self._greeted) > 10_000:
            self._greeted.popitem(last=False)
        return True

    def reply(self, payload: dict[str, Any]) -> str:
        """What the demo business says to one turn."""
        caller = payload.get("caller") or {}
        number = caller.get("e164") or payload.get("caller_number") or "unknown"
        said = str(payload.get("text") or "").strip()
        first = self._first_turn(str(payload.get("conversation_id")))
        asks_order = any(word in said.lower() for word in _ORDER_WORDS)
        if number == "anonymous":
            return ("Hola. Su número está oculto, así que no puedo buscar su cuenta. "
                    "¿Me indica su número de cliente?")
        if number == "unknown":
            return "Hola. No pude identificar su número. ¿Me indica su número de cliente?"
        row = self._db.execute("SELECT name, order_id, status FROM customers WHERE e164 = ?", (number,)).fetchone()
        if row is None:
            digits = "".join(ch for ch in str(number) if ch.isdigit())
            return (f"Hola, gracias por llamar. No encuentro el número terminado en {' '.join(digits[-4:])} "
                    "entre nuestros clientes. ¿Desea registrarse?")
        name, order_id, status = row
        given = str(name).split()[0]
        order = f"Su pedido {order_id} está {status}." if order_id else "No tiene pedidos pendientes."
        if first:
            earlier = (caller.get("history") or {}).get("calls") or 0
            welcome = f"Hola de nuevo {given}, gracias por volver a llamar." if earlier else \
                f"Hola {given}, gracias por llamar."
            return f"{welcome} {order} ¿En qué puedo ayudarle?"
        if asks_order:
            return order
        return f"Entendido, {given}. Usted dijo: {said}. ¿Algo más?"
