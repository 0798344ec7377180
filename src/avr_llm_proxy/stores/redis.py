"""A store in Redis, shared by every replica: one key per call with its expiry, nothing scanned.

Keys (prefix `avrlp:`): `call:<uuid>` holds the sealed record with a TTL; `tag:<hash>` is the set of
calls of one number (for erasure), expiring with its newest call; `recent` is a sorted set of call
ids trimmed to the last 1,000 (for `avr-llm-proxy calls`). A capture is published on `captured`, so
a turn waiting on another replica wakes at once instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from . import TAG_ERASED, StoreError

log = structlog.get_logger("avr_llm_proxy.stores.redis")

PREFIX = "avrlp:"
CHANNEL = PREFIX + "captured"
RECENT = PREFIX + "recent"
RECENT_SIZE = 1000
MAX_CONNECTIONS = 64
POOL_WAIT_S = 2.0
# A Redis that accepts but stops answering must not keep a caller in silence: redis-py's own socket
# timeout and retries could add up to several seconds, so a turn's read has one deadline of its own.
READ_DEADLINE_S = 1.0
# Compare-and-set in one step on the server: another replica's write between a read and this one wins.
_SWAP = """
redis.replicate_commands()  -- Redis 5 without it refuses a write after PTTL (a "random" command)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
  -- the expiry it had (PTTL, not SET's KEEPTTL: that needs Redis 6)
  local left = redis.call('PTTL', KEYS[1])
  if left >= 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', math.max(left, 1))
  else
    redis.call('SET', KEYS[1], ARGV[2])
  end
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


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

    def __init__(self, url: str) -> None:
        self.url = url
        # A blocking pool: under a burst, a turn waits briefly for a connection instead of failing
        # (the default pool refused with MaxConnectionsError at 200 concurrent calls).
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S, socket_timeout=2.0, socket_connect_timeout=2.0,
            health_check_interval=15, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3), retry_on_timeout=True,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._swap = self._client.register_script(_SWAP)
        self._listener: asyncio.Task[None] | None = None

    async def put(self, key: str, value: bytes, expires_at: float, tag: str | None = None, replace: bool = True,
                  ) -> bool:
        ttl_ms = max(1, int((expires_at - time.time()) * 1000))
        try:
            stored = await self._client.set(PREFIX + "call:" + key, value, px=ttl_ms, nx=not replace)
            if stored:
                await self._stored(key, expires_at, tag, ttl_ms)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis write failed: {type(exc).__name__}: {exc}") from exc
        return bool(stored)

    async def swap(self, key: str, expected: bytes, value: bytes, expires_at: float | None, tag: str | None = None,
                   notify: bool = True) -> bool:
        ttl_ms = "" if expires_at is None else max(1, int((expires_at - time.time()) * 1000))
        try:
            swapped = await self._swap(keys=[PREFIX + "call:" + key], args=[expected, value, ttl_ms])
            if swapped and expires_at is not None:
                await self._stored(key, expires_at, tag, int(ttl_ms), notify)
            elif swapped and notify:
                await self._client.publish(CHANNEL, key)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis write failed: {type(exc).__name__}: {exc}") from exc
        return bool(swapped)

    def stamp(self, key: str) -> bytes | None:
        return None  # every turn reads: a replica's write is seen at once, whatever its pub/sub connection

    async def _stored(self, key: str, expires_at: float, tag: str | None, ttl_ms: int, notify: bool = True) -> None:
        """The indexes of a value just written, and the news of it for the other replicas."""
        async with self._client.pipeline(transaction=False) as pipe:
            if tag:
                # The set lives as long as the number's longest-living call: set once, only ever extended.
                pipe.sadd(PREFIX + "tag:" + tag, key)
                pipe.pexpire(PREFIX + "tag:" + tag, ttl_ms, nx=True)
                pipe.pexpire(PREFIX + "tag:" + tag, ttl_ms, gt=True)
            pipe.zadd(RECENT, {key: expires_at})
            pipe.zremrangebyrank(RECENT, 0, -RECENT_SIZE - 1)
            if notify:
                pipe.publish(CHANNEL, key)
            await pipe.execute()

    async def get(self, key: str) -> bytes | None:
        try:
            async with asyncio.timeout(READ_DEADLINE_S):
                value = await self._client.get(PREFIX + "call:" + key)
        except TimeoutError:
            raise StoreError(f"Redis read timed out after {READ_DEADLINE_S:g} s") from None
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis read failed: {type(exc).__name__}: {exc}") from exc
        return None if value is None else _bytes(value)

    async def delete(self, key: str) -> bool:
        try:
            deleted = bool(await self._client.delete(PREFIX + "call:" + key))
            await self._client.publish(CHANNEL, "-" + key)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis delete failed: {type(exc).__name__}: {exc}") from exc
        return deleted

    async def delete_tagged(self, tag: str) -> int:
        try:
            keys = [_text(member) for member in await self._client.smembers(PREFIX + "tag:" + tag)]
            deleted = int(await self._client.delete(*[PREFIX + "call:" + key for key in keys])) if keys else 0
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.delete(PREFIX + "tag:" + tag)
                if keys:
                    pipe.zrem(RECENT, *keys)
                for key in keys:
                    pipe.publish(CHANNEL, "-" + key)  # replicas drop their copies: erased means erased
                # And every copy of that number's calls they hold, found here or not: after Redis lost
                # its data, a replica would otherwise write its copy back on the call's next turn.
                pipe.publish(CHANNEL, TAG_ERASED + tag)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis erase failed: {type(exc).__name__}: {exc}") from exc
        return deleted

    async def recent(self, limit: int) -> list[bytes]:
        try:
            keys = [_text(member) for member in await self._client.zrevrange(RECENT, 0, limit - 1)]
            values = await self._client.mget([PREFIX + "call:" + key for key in keys]) if keys else []
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis read failed: {type(exc).__name__}: {exc}") from exc
        return [_bytes(value) for value in values if value is not None]

    async def purge_expired(self, now: float) -> int:
        """Redis expires call keys itself; only the recent-calls index needs trimming."""
        try:
            return int(await self._client.zremrangebyscore(RECENT, "-inf", now))
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis purge failed: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        try:
            await self._client.ping()
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
