"""A store in Redis, shared by every replica: one key per call with its expiry, nothing scanned.

Keys (prefix `avrlp:`), every one with an expiry: `call:<uuid>` holds the sealed record with a TTL;
`count:<uuid>` its counter (the turns) and `timeline:<uuid>` its list (turns and events), expiring
with it; `history:<hash>` a number's earlier calls (`HISTORY_DAYS`) and `seen:<hash>` what each of
its live calls was told of them; `tag:<hash>` is the set of calls of one number (for erasure),
expiring with its newest call; `erased:<hash>` the time that number was erased (kept 7 days);
`recent` is a sorted set of call ids trimmed to the last 1,000 (for `avr-llm-proxy calls`), living
as long as its newest call. A capture is published on `captured`, so a turn waiting on another
replica wakes at once instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from . import DEADLINE_S, ERASURE_KEPT_S, MAX_ENTRIES, TAG_ERASED, HistoryRow, StoreError

log = structlog.get_logger("avr_llm_proxy.stores.redis")

PREFIX = "avrlp:"
CHANNEL = PREFIX + "captured"
RECENT = PREFIX + "recent"
CALL = PREFIX + "call:"
TAG = PREFIX + "tag:"
ERASED = PREFIX + "erased:"
COUNT = PREFIX + "count:"
HISTORY = PREFIX + "history:"
SEEN = PREFIX + "seen:"
TIMELINE = PREFIX + "timeline:"
RECENT_SIZE = 1000
MAX_CONNECTIONS = 64
POOL_WAIT_S = 2.0
# Writes are Lua scripts: each value is written with its indexes (the tag erasure finds it by, the
# recent-calls list) and its news in one step, so no record is ever in Redis without its tag. KEYS:
# the value, its tag's set, the recent-calls index, the erasure mark, the counter (its expiry follows
# the value's, the index's the newest value's); ARGV[4..8]: the key, its expiry (the index's
# score), tagged, notify, the channel. PTTL instead of SET KEEPTTL or PEXPIRE NX/GT: those need
# Redis 6 and 7; Redis 5 refuses a write after PTTL (a "random" command) unless effects are replicated.
_INDEXED = f"""
redis.replicate_commands()
local function indexed(ttl)
  if ARGV[6] == '1' then
    redis.call('SADD', KEYS[2], ARGV[4])
    -- the set lives as long as the number's longest-living call: only ever extended
    if redis.call('PTTL', KEYS[2]) < tonumber(ttl) then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -{RECENT_SIZE + 1})
  if redis.call('PTTL', KEYS[3]) < tonumber(ttl) then redis.call('PEXPIRE', KEYS[3], ttl) end
  if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('PEXPIRE', KEYS[5], ttl) end
  if redis.call('EXISTS', KEYS[6]) == 1 then redis.call('PEXPIRE', KEYS[6], ttl) end
  if ARGV[7] == '1' then redis.call('PUBLISH', ARGV[8], ARGV[4]) end
end
"""
# ARGV[1..3]: the value, its time to live (ms), only if absent; ARGV[9]: when the value came to be,
# refused when KEYS[4] says its tag was erased since (or empty).
_PUT = _INDEXED + """
if ARGV[9] ~= '' then
  local erased = redis.call('GET', KEYS[4])
  if erased and tonumber(erased) >= tonumber(ARGV[9]) then return 0 end
end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[5], KEYS[6]) end  -- a new value starts afresh
local written
if ARGV[3] == '1' then
  written = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
else
  written = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if not written then return 0 end
indexed(ARGV[2])
return 1
"""
# Erasure by number in one step (no capture of that number lands between the look-up and the
# deletion, unindexed): the mark of when (so no copy captured before it is written back), every call
# of the tag with its index entries, the news for replicas (each call, then the tag: they drop the
# copies they hold). KEYS: the tag's set, its erasure mark, the recent calls, its history and notes;
# ARGV: when, how long the mark is kept (ms), the calls' key prefix, the channel, the tag's message,
# the counters' prefix, the lists' prefix.
_ERASE = """
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[4], KEYS[5])
local deleted = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  deleted = deleted + redis.call('DEL', ARGV[3] .. member)
  redis.call('DEL', ARGV[6] .. member, ARGV[7] .. member)
  redis.call('ZREM', KEYS[3], member)
  redis.call('PUBLISH', ARGV[4], '-' .. member)
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return deleted
"""
# Compare-and-set: another replica's write between a read and this one wins. ARGV[1..3]: the value
# read, the new one, its time to live (ms; empty: the value alone, its expiry and indexes stay).
_SWAP = _INDEXED + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
  local left = redis.call('PTTL', KEYS[1])
  if left >= 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', math.max(left, 1))
  else
    redis.call('SET', KEYS[1], ARGV[2])
  end
  if ARGV[7] == '1' then redis.call('PUBLISH', ARGV[8], ARGV[4]) end
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  indexed(ARGV[3])
end
return 1
"""

# Turns counted and entries added beside a live value, expiring with it, the newest ARGV[1] entries kept.
# KEYS: the value, its counter, its list; ARGV[2]: how much to count; ARGV[3..]: the entries.
_APPEND = """
redis.replicate_commands()
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then return 0 end
if tonumber(ARGV[2]) ~= 0 then
  redis.call('INCRBY', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
if #ARGV > 2 then
  for i = 3, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[1]), -1)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return 1
"""
# One call counted once among its number's calls; the answer (what was known before it) is kept for
# the call's later notes, in the number's hash of notes, each "<until ms>|<answer>", the expired ones
# dropped as a note is added. KEYS: the number's history, its notes, its erasure mark; ARGV: the call,
# its start, the history's and the note's expiry (Unix ms), now (Unix ms). Answers
# "calls|first|last|key" (empty for none), or nothing when the number was erased since the start.
_NOTE_CALL = """
redis.replicate_commands()
local erased = redis.call('GET', KEYS[3])
if erased and tonumber(erased) >= tonumber(ARGV[2]) then return false end
local now = tonumber(ARGV[5])
local function note_until(note) return tonumber(string.sub(note, 1, string.find(note, '|', 1, true) - 1)) end
local seen = redis.call('HGET', KEYS[2], ARGV[1])
if seen and note_until(seen) > now then return string.sub(seen, string.find(seen, '|', 1, true) + 1) end
local h = redis.call('HMGET', KEYS[1], 'calls', 'first', 'last', 'key')
local before = (h[1] or '0') .. '|' .. (h[2] or '') .. '|' .. (h[3] or '') .. '|' .. (h[4] or '')
redis.call('HSET', KEYS[1], 'calls', tonumber(h[1] or '0') + 1, 'first', h[2] or ARGV[2], 'last', ARGV[2],
           'key', ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
local notes = redis.call('HGETALL', KEYS[2])
for i = 1, #notes, 2 do
  if note_until(notes[i + 1]) <= now then redis.call('HDEL', KEYS[2], notes[i]) end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4] .. '|' .. before)
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) - now then redis.call('PEXPIREAT', KEYS[2], ARGV[4]) end
return before
"""


def _history_row(answer: str) -> HistoryRow:
    calls, first, last, key = answer.split("|")
    return int(calls), float(first) if first else None, float(last) if last else None, key or None


def _bytes(value: object) -> bytes:
    """redis-py answers bytes (no decode_responses); its typing also allows str."""
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: object) -> str:
    return value.decode("ascii", errors="replace") if isinstance(value, bytes) else str(value)


class RedisStore:
    # Waiters are woken by pub/sub; the poll is only a safety net for a lost message.
    poll_interval: float | None = 0.5
    durable = True
    volatile = True

    def __init__(self, url: str, deadline_s: float = DEADLINE_S) -> None:
        self.url = url
        self.deadline_s = deadline_s
        # A blocking pool: under a burst, a turn waits briefly for a connection instead of failing
        # (the default pool refused with MaxConnectionsError at 200 concurrent calls).
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S, socket_timeout=2.0, socket_connect_timeout=2.0,
            health_check_interval=15, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3), retry_on_timeout=True,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._put = self._client.register_script(_PUT)
        self._swap = self._client.register_script(_SWAP)
        self._erase = self._client.register_script(_ERASE)
        self._append = self._client.register_script(_APPEND)
        self._note_call = self._client.register_script(_NOTE_CALL)
        self._listener: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def _answered(self, operation: str) -> AsyncIterator[None]:
        """One operation within the deadline, its failures as a StoreError that names it.

        redis-py's own socket timeout and retries add up to about 35 s against a Redis that accepts but
        stops answering. A write that runs late in Redis still checks the erasure marks there: a
        timed-out capture cannot bring an erased number back.
        """
        try:
            async with asyncio.timeout(self.deadline_s):
                yield
        except TimeoutError:
            raise StoreError(f"Redis {operation} timed out after {self.deadline_s:g} s (STORE_TIMEOUT_MS)") from None
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis {operation} failed: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _written(key: str, tag: str | None) -> list[str]:
        """The KEYS of a write: the value, its tag's set (untouched without a tag), the recent calls,
        when the tag was erased, the value's counter and its list."""
        return [CALL + key, TAG + (tag or ""), RECENT, ERASED + (tag or ""), COUNT + key, TIMELINE + key]

    @staticmethod
    def _indexing(key: str, expires_at: float, tag: str | None, notify: bool) -> list[str | float]:
        return [key, expires_at, "1" if tag else "", "1" if notify else "", CHANNEL]

    async def put(self, key: str, value: bytes, expires_at: float, tag: str | None = None, replace: bool = True,
                  born: float | None = None) -> bool:
        ttl_ms = max(1, int((expires_at - time.time()) * 1000))
        async with self._answered("write"):
            stored = await self._put(keys=self._written(key, tag), args=[
                value, ttl_ms, "" if replace else "1", *self._indexing(key, expires_at, tag, True),
                "" if tag is None or born is None else born])
        return bool(stored)

    async def swap(self, key: str, expected: bytes, value: bytes, expires_at: float | None, tag: str | None = None,
                   notify: bool = True) -> bool:
        ttl_ms = "" if expires_at is None else max(1, int((expires_at - time.time()) * 1000))
        async with self._answered("write"):
            swapped = await self._swap(keys=self._written(key, tag), args=[
                expected, value, ttl_ms, *self._indexing(key, expires_at or 0.0, tag, notify)])
        return bool(swapped)

    def stamp(self, key: str) -> bytes | None:
        return None  # every turn reads: a replica's write is seen at once, whatever its pub/sub connection

    async def get(self, key: str) -> bytes | None:
        async with self._answered("read"):
            value = await self._client.get(CALL + key)
        return None if value is None else _bytes(value)

    async def delete(self, key: str) -> bool:
        async with self._answered("delete"):
            async with self._client.pipeline(transaction=True) as together:  # the value, its counter and list
                together.delete(CALL + key)
                together.delete(COUNT + key, TIMELINE + key)
                deleted, _ = await together.execute()
            await self._client.publish(CHANNEL, "-" + key)
        return bool(deleted)

    async def delete_tagged(self, tag: str) -> int:
        async with self._answered("erase"):
            keys = [TAG + tag, ERASED + tag, RECENT, HISTORY + tag, SEEN + tag]
            deleted = await self._erase(keys=keys, args=[
                time.time(), ERASURE_KEPT_S * 1000, CALL, CHANNEL, TAG_ERASED + tag, COUNT, TIMELINE])
        return int(deleted)

    async def counter(self, key: str) -> int | None:
        async with self._answered("read"):
            async with self._client.pipeline(transaction=False) as both:
                both.exists(CALL + key)
                both.get(COUNT + key)
                live, counted = await both.execute()
        return int(counted or 0) if live else None

    async def append(self, lists: Mapping[str, Sequence[bytes]], counts: Mapping[str, int] | None = None) -> set[str]:
        keys = list(set(lists).union(counts or ()))
        by = counts or {}
        async with self._answered("append"):
            async with self._client.pipeline(transaction=False) as together:  # one round trip for them all
                for key in keys:
                    await self._append(keys=[CALL + key, COUNT + key, TIMELINE + key],
                                       args=[MAX_ENTRIES, by.get(key, 0), *lists.get(key, ())], client=together)
                done = await together.execute()
        return {key for key, appended in zip(keys, done, strict=True) if appended}

    async def entries(self, key: str, newest: int | None = None) -> list[bytes]:
        async with self._answered("read"):
            async with self._client.pipeline(transaction=False) as both:
                both.exists(CALL + key)
                both.lrange(TIMELINE + key, 0 if newest is None else -newest, -1)
                live, values = await both.execute()
        return [_bytes(value) for value in values] if live else []

    async def note_call(self, tag: str, key: str, at: float, keep_until: float,
                        seen_until: float) -> HistoryRow | None:
        async with self._answered("history"):
            answer = await self._note_call(keys=[HISTORY + tag, SEEN + tag, ERASED + tag], args=[
                key, repr(at), int(keep_until * 1000), int(seen_until * 1000), int(time.time() * 1000)])
        return None if answer is None else _history_row(_text(answer))

    async def recent(self, limit: int) -> list[tuple[bytes, int]]:
        async with self._answered("read"):
            keys = [_text(member) for member in await self._client.zrevrange(RECENT, 0, limit - 1)]
            values = await self._client.mget([CALL + key for key in keys]) if keys else []
            counts = await self._client.mget([COUNT + key for key in keys]) if keys else []
        return [(_bytes(value), int(count or 0)) for value, count in zip(values, counts, strict=True)
                if value is not None]

    async def purge_expired(self, now: float) -> int:
        """Redis expires call keys itself; only the recent-calls index needs trimming."""
        async with self._answered("purge"):
            return int(await self._client.zremrangebyscore(RECENT, "-inf", now))

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self.deadline_s):
                await self._client.ping()
        except TimeoutError:
            raise StoreError(f"Redis at {self._where()} did not answer within {self.deadline_s:g} s") from None
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis at {self._where()} unreachable: {type(exc).__name__}") from exc

    def _where(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def listen(self, on_key: Callable[[str], None]) -> None:
        """Call `on_key(uuid)` for every capture published by any replica, reconnecting as needed."""
        self._listener = asyncio.create_task(self._listen(on_key), name="redis-captures")

    async def _listen(self, on_key: Callable[[str], None]) -> None:
        delay = 0.1
        while True:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    delay = 0.1
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            on_key(_text(message["data"]))
            except (RedisError, OSError) as exc:
                log.warning("redis_subscription_lost", reason=type(exc).__name__, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._client.aclose()
        await self._client.connection_pool.disconnect()  # a pool passed in is not closed by aclose()
