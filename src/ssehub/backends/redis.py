"""Redis Streams EventLog: one stream per topic, one id sequence shared by every node.

Keys, all under ``{prefix}:``:

* ``seq``: the last id issued (a counter), and ``origin``: the id just before the first
  one; both seeded from Redis ``TIME`` in microseconds when ``seq`` is missing (a new or
  wiped Redis), so ids never repeat and resume points from before a wipe are "unknown";
* ``t:{topic}``: the topic's stream; an entry's stream id is ``<event id>-0``, so the
  stream order is the id order and ``XRANGE (<after>-0 +`` reads what follows a resume
  point;
* ``topics``: the set of topics ever appended to (retention walks it);
* ``floors``: per topic, the highest id retention removed. (``XINFO STREAM`` has a
  ``max-deleted-entry-id``, but Redis 7.0 only moves it on ``XDEL``, not on trimming,
  so the log records its floors itself, in the same script that trims.)

Every operation is one Lua script, so it is atomic across nodes: ``append`` takes the
ids (``INCRBY``), adds the entries, applies retention to the topics it touched and
``PUBLISH``-es the batch on ``{prefix}:events``; ``read_after`` checks the resume point
against ``origin``, ``seq`` and the floors and reads, in one snapshot. Ids, storage order
and the order of the announcements on ``{prefix}:events`` therefore agree on every node,
and consecutive announcements carry consecutive ids (a jump means one was missed).

Run Redis with ``maxmemory-policy noeviction``: an evicted key loses events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Final, final

import redis.asyncio
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from .._exceptions import BackendError, BackendUnavailableError, ConfigError, HistoryGoneError
from .._models import Event, NewEvent, Topic
from . import Retention
from .memory import _check_bounds, _check_limit, _trimmed

__all__ = ["RedisStreamsEventLog", "decode_announcement", "map_redis_errors"]

logger = logging.getLogger("ssehub.backends.redis")

DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"

SOCKET_TIMEOUT: Final = 1.5
"""Seconds to connect, and to wait for any reply, before Redis counts as unavailable."""

READY_TIMEOUT: Final = 1.0
"""Seconds ``check_ready`` waits for ``PING``."""

TRIM_INTERVAL: Final = 10.0
"""Seconds between background retention passes over every topic (0 = none)."""

APPEND_TRIM_BUDGET: Final = 1_000
"""Entries one append may remove per topic (the rest goes in the next pass)."""

TRIM_BUDGET: Final = 10_000
"""Entries one trim script may remove per topic before it yields to other clients."""

TRIM_TOPICS_PER_CALL: Final = 200
"""Topics handled by one trim script call."""

MAX_ID: Final = 2**53 - 1
"""Ids are handled as Lua numbers (doubles) inside the scripts: exact up to here."""

_LUA_COMMON: Final = r"""
local function fmt(n)
  return string.format('%.0f', n)
end

-- "123-0" -> "123"
local function id_of(entry_id)
  return string.match(entry_id, '^(%d+)')
end

local function entry_time(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'ts' then
      return tonumber(fields[i + 1])
    end
  end
  return 0
end

-- Seed seq and origin when seq is missing (a new or wiped Redis): the clock in
-- microseconds, and above every id still stored under the prefix.
local function ensure_seeded(seq_key, origin_key, topics_key, stream_prefix)
  local seq = redis.call('GET', seq_key)
  if seq then
    if not redis.call('GET', origin_key) then
      redis.call('SET', origin_key, seq)
    end
    return
  end
  local now = redis.call('TIME')
  local seed = tonumber(now[1]) * 1000000 + tonumber(now[2])
  for _, topic in ipairs(redis.call('SMEMBERS', topics_key)) do
    local key = stream_prefix .. topic
    if redis.call('EXISTS', key) == 1 then
      local info = redis.call('XINFO', 'STREAM', key)
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
          local last = tonumber(id_of(info[i + 1]))
          if last > seed then
            seed = last
          end
        end
      end
    end
  end
  redis.call('SET', seq_key, fmt(seed))
  redis.call('SET', origin_key, fmt(seed))
end

-- Remove the oldest entries of one topic: the excess over max_events when the stream
-- is longer than threshold, then those older than cutoff (nil: no age limit); at most
-- budget entries. The highest removed id becomes the topic's floor.
-- Returns {removed, remaining length, 1 if the budget ran out else 0}.
local function trim_topic(key, floors_key, topic, max_events, threshold, cutoff, budget)
  local len = redis.call('XLEN', key)
  if len == 0 then
    return {0, 0, 0}
  end
  local cut = nil
  local taken = 0
  local more = 0
  if len > threshold then
    local excess = len - max_events
    if excess > budget then
      excess = budget
      more = 1
    end
    local entries = redis.call('XRANGE', key, '-', '+', 'COUNT', excess)
    if #entries > 0 then
      cut = entries[#entries][1]
      taken = #entries
    end
  end
  if cutoff and more == 0 then
    local count = 1 -- the oldest entry first: usually young enough
    while true do
      if taken >= budget then
        more = 1
        break
      end
      if count > budget - taken then
        count = budget - taken
      end
      local start = '-'
      if cut then
        start = '(' .. cut
      end
      local entries = redis.call('XRANGE', key, start, '+', 'COUNT', count)
      local young = false
      for _, entry in ipairs(entries) do
        if entry_time(entry[2]) >= cutoff then
          young = true
          break
        end
        cut = entry[1]
        taken = taken + 1
      end
      if young or #entries < count then
        break
      end
      count = 100
    end
  end
  if not cut then
    return {0, len, more}
  end
  local floor = id_of(cut)
  -- Our ids are all "<n>-0": MINID <n>-1 removes every entry up to and including cut.
  local removed = redis.call('XTRIM', key, 'MINID', '=', floor .. '-1')
  redis.call('HSET', floors_key, topic, floor)
  return {removed, len - removed, more}
end
"""

_LUA_INIT: Final = (
    _LUA_COMMON
    + r"""
-- KEYS: seq, origin, topics.  ARGV: stream key prefix.
ensure_seeded(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
return {redis.call('GET', KEYS[2]), redis.call('GET', KEYS[1])}
"""
)

_LUA_APPEND: Final = (
    _LUA_COMMON
    + r"""
-- KEYS: seq, origin, topics, floors, then one stream per distinct topic of the batch.
-- ARGV: stream key prefix, channel, max_events, threshold, cutoff ('' = none), budget,
--       number of topics T, T topic names, number of events N, then per event:
--       topic number (1..T), announcement tail, field count F, F fields and values.
ensure_seeded(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
local ntopics = tonumber(ARGV[7])
local pos = 8 + ntopics
local nevents = tonumber(ARGV[pos])
pos = pos + 1
local last = redis.call('INCRBY', KEYS[1], nevents)
local first = last - nevents + 1
local items = {}
for i = 0, nevents - 1 do
  local k = tonumber(ARGV[pos])
  local nfields = tonumber(ARGV[pos + 2])
  local id = fmt(first + i)
  redis.call('XADD', KEYS[4 + k], id .. '-0', unpack(ARGV, pos + 3, pos + 2 + nfields))
  items[#items + 1] = '[' .. id .. ARGV[pos + 1]
  pos = pos + 3 + nfields
end
local max_events = tonumber(ARGV[3])
local threshold = tonumber(ARGV[4])
local cutoff = nil
if ARGV[5] ~= '' then
  cutoff = tonumber(ARGV[5])
end
local budget = tonumber(ARGV[6])
local removed = 0
for k = 1, ntopics do
  local topic = ARGV[7 + k]
  redis.call('SADD', KEYS[3], topic)
  removed = removed + trim_topic(
    KEYS[4 + k], KEYS[4], topic, max_events, threshold, cutoff, budget)[1]
end
redis.call('PUBLISH', ARGV[2], '[' .. table.concat(items, ',') .. ']')
return {fmt(first), removed, redis.call('GET', KEYS[2])}
"""
)

_LUA_TRIM: Final = (
    _LUA_COMMON
    + r"""
-- KEYS: floors, then one stream per topic.
-- ARGV: max_events, cutoff ('' = none), budget, then the topic names.
-- Returns {removed, remaining in the topics done, numbers of the topics with work left...}.
local max_events = tonumber(ARGV[1])
local cutoff = nil
if ARGV[2] ~= '' then
  cutoff = tonumber(ARGV[2])
end
local budget = tonumber(ARGV[3])
local removed, remaining = 0, 0
local result = {0, 0}
for k = 1, #KEYS - 1 do
  local r = trim_topic(KEYS[1 + k], KEYS[1], ARGV[3 + k], max_events, max_events, cutoff, budget)
  removed = removed + r[1]
  if r[3] == 1 then
    result[#result + 1] = k
  else
    remaining = remaining + r[2]
  end
end
result[1] = removed
result[2] = remaining
return result
"""
)

_LUA_READ: Final = r"""
-- KEYS: origin, seq, floors, topics, then one stream per topic.
-- ARGV: after, limit, page size, then the topic names.
-- Returns {'unseeded'} | {'unknown'|'future', origin, seq}
--       | {'trimmed', origin, seq, topic, floor} | {'ok', origin, seq, entries}
local origin = redis.call('GET', KEYS[1])
local seq = redis.call('GET', KEYS[2])
if not origin or not seq then
  return {'unseeded'}
end
local after = tonumber(ARGV[1])
if after < tonumber(origin) then
  return {'unknown', origin, seq}
end
if after > tonumber(seq) then
  return {'future', origin, seq}
end
local n = #KEYS - 4
if n == 0 or after == tonumber(seq) then
  return {'ok', origin, seq, {}}
end
for lo = 1, n, 1000 do
  local hi = math.min(n, lo + 999)
  local floors = redis.call('HMGET', KEYS[3], unpack(ARGV, 3 + lo, 3 + hi))
  for i = 1, hi - lo + 1 do
    local floor = floors[i]
    if floor and tonumber(floor) > after then
      return {'trimmed', origin, seq, ARGV[2 + lo + i], floor}
    end
  end
end

local function num(entry)
  return tonumber(string.match(entry[1], '^(%d+)'))
end

-- A binary min-heap of {id, topic number}: a k-way merge of the topics' streams.
local heap = {}
local function sift_down(i)
  local size = #heap
  while true do
    local l, r, m = 2 * i, 2 * i + 1, i
    if l <= size and heap[l][1] < heap[m][1] then m = l end
    if r <= size and heap[r][1] < heap[m][1] then m = r end
    if m == i then return end
    heap[i], heap[m] = heap[m], heap[i]
    i = m
  end
end
local function push(node)
  heap[#heap + 1] = node
  local i = #heap
  while i > 1 do
    local p = math.floor(i / 2)
    if heap[p][1] <= heap[i][1] then return end
    heap[i], heap[p] = heap[p], heap[i]
    i = p
  end
end
local function pop()
  heap[1] = heap[#heap]
  heap[#heap] = nil
  if #heap > 1 then sift_down(1) end
end

local limit = tonumber(ARGV[2])
local page = tonumber(ARGV[3])
local start = '(' .. ARGV[1] .. '-0'
local bufs, pos = {}, {}
for k = 1, n do
  local key = KEYS[4 + k]
  local entries = redis.call('XRANGE', key, start, '+', 'COUNT', page)
  if #entries > 0 then
    bufs[k] = entries
    pos[k] = 1
    push({num(entries[1]), k})
  elseif redis.call('EXISTS', key) == 0 and redis.call('SISMEMBER', KEYS[4], ARGV[3 + k]) == 1 then
    -- The topic had events but its stream is gone (deleted or evicted).
    return {'trimmed', origin, seq, ARGV[3 + k], seq}
  end
end

local out = {}
while #out < limit and #heap > 0 do
  local k = heap[1][2]
  local buf, i = bufs[k], pos[k]
  out[#out + 1] = buf[i]
  i = i + 1
  if i > #buf then
    if #buf < page or #out >= limit then
      buf = {}
    else
      buf = redis.call('XRANGE', KEYS[4 + k], '(' .. buf[#buf][1], '+', 'COUNT', page)
    end
    bufs[k] = buf
    i = 1
  end
  pos[k] = i
  if i <= #buf then
    heap[1][1] = num(buf[i])
    sift_down(1)
  else
    pop()
  end
end
return {'ok', origin, seq, out}
"""

_UNAVAILABLE: Final = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica answering during a failover
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
    TimeoutError,
    ConnectionError,
)


@contextmanager
def map_redis_errors(action: str) -> Iterator[None]:
    """Turn redis-py errors raised inside the block into ssehub errors.

    Connection problems and time-outs (and a replica refusing writes during a failover)
    become :class:`~ssehub.BackendUnavailableError` (transient); rejected credentials
    and any other :class:`redis.RedisError` become :class:`~ssehub.BackendError`.
    """
    try:
        yield
    except (redis_errors.AuthenticationError, redis_errors.AuthorizationError) as exc:
        raise BackendError(f"Redis refused the credentials while {action}: {exc}") from exc
    except _UNAVAILABLE as exc:
        detail = str(exc) or type(exc).__name__
        raise BackendUnavailableError(f"Redis unavailable while {action}: {detail}") from exc
    except redis_errors.RedisError as exc:
        raise BackendError(f"Redis failed while {action}: {exc}") from exc


def decode_announcement(payload: bytes | str) -> list[Event]:
    """The events of one ``PUBLISH`` on ``{prefix}:events``, in id order.

    The payload is a compact JSON list of ``[id, topic, event, data, retry, time]``.
    """
    return [
        Event(int(id_), topic, data, event, retry, float(stamp))
        for id_, topic, event, data, retry, stamp in json.loads(payload)
    ]


@final
class RedisStreamsEventLog:
    """An :class:`~ssehub.backends.EventLog` in Redis Streams, shared by many hub nodes.

    ``url`` is a redis-py URL (``redis://host:port/db``, ``rediss://`` for TLS); or pass
    a ready ``client`` (it must not decode responses; the log does not close it).
    ``prefix`` namespaces every key, so several hubs (or tests) can share one Redis.

    Retention by count is applied by every append to the topics it touches (a topic may
    exceed ``max_events`` by up to 10 %, at most 100 events, until the next trim), and by
    age to those topics too; :meth:`trim` applies both exactly to every topic, and runs
    in the background every :data:`TRIM_INTERVAL` seconds (``trim_interval``; 0 = off).
    ``clock`` (Unix seconds) stamps events (the time is stored with each event, so nodes'
    clocks should agree) and sets the age cutoff; tests may replace it.

    Needs Redis 6.2 or later (exclusive ``XRANGE`` ranges, ``XTRIM MINID``).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        prefix: str = "ssehub",
        retention: Retention | None = None,
        client: redis.asyncio.Redis | None = None,
        clock: Callable[[], float] = time.time,
        trim_interval: float = TRIM_INTERVAL,
    ) -> None:
        if not prefix:
            raise ConfigError("the Redis key prefix must not be empty")
        if trim_interval < 0:
            raise ConfigError("trim_interval must be >= 0 seconds (0 = no background trim)")
        self._url = url
        self._prefix = prefix
        self._retention = retention or Retention()
        self._clock = clock
        self._trim_interval = trim_interval
        self._client = client
        self._own_client = client is None
        self._seq_key = f"{prefix}:seq"
        self._origin_key = f"{prefix}:origin"
        self._topics_key = f"{prefix}:topics"
        self._floors_key = f"{prefix}:floors"
        self._stream_prefix = f"{prefix}:t:"
        self._channel = f"{prefix}:events"
        self._scripts: dict[str, AsyncScript] = {}
        self._origin = 0
        self._head = 0
        self._event_count = 0
        self._started = False
        self._closed = False
        self._trimmer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RedisStreamsEventLog(prefix={self._prefix!r}, retention={self._retention!r})"

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def channel(self) -> str:
        """The pub/sub channel every append announces its batch on."""
        return self._channel

    @property
    def client(self) -> redis.asyncio.Redis:
        """The redis-py client (after :meth:`start`)."""
        if self._client is None:
            raise BackendError("the Redis event log is not started; call start() first")
        return self._client

    def backplane(self) -> RedisStreamsBackplane:
        """A backplane that feeds this node every node's appends (SupportsBackplane)."""
        return RedisStreamsBackplane(self)

    def topic_key(self, topic: Topic) -> str:
        """The key of ``topic``'s stream."""
        return self._stream_prefix + topic

    # -- EventLog -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, load the scripts and read (or seed) the id sequence."""
        self._check_not_closed()
        if self._started:
            return
        client = self._client
        if client is None:
            try:
                client = redis.asyncio.Redis.from_url(
                    self._url,
                    decode_responses=False,
                    socket_connect_timeout=SOCKET_TIMEOUT,
                    socket_timeout=SOCKET_TIMEOUT,
                    # No automatic retries: an append that timed out may have run, and
                    # running it again would store the batch twice.
                    retry=Retry(NoBackoff(), 0),
                )
            except ValueError as exc:
                raise ConfigError(f"invalid Redis URL {self._url!r}: {exc}") from exc
            self._client = client
        elif client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigError("the Redis client for the event log must not decode responses")
        sources = {"init": _LUA_INIT, "append": _LUA_APPEND, "trim": _LUA_TRIM, "read": _LUA_READ}
        self._scripts = {name: client.register_script(src) for name, src in sources.items()}
        with map_redis_errors("loading the scripts"):
            for name, src in sources.items():
                self._scripts[name].sha = await client.script_load(src)
        await self._refresh("starting")
        self._started = True
        if self._trim_interval:
            self._trimmer = asyncio.create_task(self._trim_periodically(), name="ssehub-redis-trim")

    async def append(self, events: Sequence[NewEvent]) -> list[Event]:
        """Append ``events`` atomically with consecutive ids; return them stored.

        One script takes the ids, adds the entries, trims and publishes. If Redis does not
        answer in time this raises :class:`~ssehub.BackendUnavailableError`, and the batch
        may or may not have been stored. The call finishes even if the caller is
        cancelled meanwhile (``head()`` then still moves past it).
        """
        self._check_usable()
        batch = tuple(events)
        if not batch:
            return []
        task = asyncio.ensure_future(self._append(batch))
        task.add_done_callback(_retrieve)  # no "exception never retrieved" if we were cancelled
        return await asyncio.shield(task)

    async def read_after(self, topics: Sequence[Topic], after: int, *, limit: int) -> list[Event]:
        """Events of ``topics`` with ``id > after``, in id order, at most ``limit``.

        The bounds check (against the current ``origin`` and head in Redis, not this
        node's cached view), the floor check and the read are one script, one snapshot.
        The script merges the topics' streams by id and reads about ``limit`` entries
        plus one small page per topic, whatever the backlog. Raises
        :class:`~ssehub.HistoryGoneError` as the protocol describes.
        """
        self._check_usable()
        _check_limit(limit)
        wanted = list(dict.fromkeys(topics))
        if not 0 <= after <= MAX_ID:
            origin, head = await self._refresh("reading events")
            _check_bounds(after, origin, head)
        n = len(wanted)
        page = limit if n <= 1 else max(8, min(limit, -(-2 * limit // n)))
        keys = [self._origin_key, self._seq_key, self._floors_key, self._topics_key]
        keys += [self._stream_prefix + topic for topic in wanted]
        args: list[str | int] = [after, limit, page, *wanted]
        for attempt in range(2):
            with map_redis_errors("reading events"):
                reply = await self._scripts["read"](keys=keys, args=args)
            status = reply[0]
            if status == b"unseeded" and attempt == 0:
                await self._refresh("reading events")  # Redis lost its data: seed again
                continue
            if status == b"unseeded":
                raise BackendError("Redis lost the event log's id sequence while reading")
            origin, head = int(reply[1]), int(reply[2])
            self._seen(origin, head)
            if status == b"trimmed":
                raise _trimmed(reply[3].decode(), after, int(reply[4]))
            _check_bounds(after, origin, head)
            return [_decode_entry(entry) for entry in reply[3]]
        raise AssertionError("unreachable")  # pragma: no cover

    def head(self) -> int:
        """The last id this node knows to be issued (``origin`` before any append).

        Other nodes append too, so this is this node's view, as of its last append, read
        or :meth:`current_head`; ``await current_head()`` asks Redis.
        """
        self._check_started()
        return self._head

    async def current_head(self) -> int:
        """The last id issued by any node, read from Redis now."""
        self._check_usable()
        return (await self._refresh("reading the head"))[1]

    def origin(self) -> int:
        """The id just before the first id of the sequence in Redis (as last seen)."""
        self._check_started()
        return self._origin

    async def trim(self) -> int:
        """Apply retention by count and age to every topic now (exactly); return the number
        of events removed. Work per script call is bounded, so Redis stays responsive."""
        self._check_usable()
        client = self.client
        max_events = self._retention.max_events
        max_age = self._retention.max_age
        cutoff = repr(float(self._clock()) - max_age) if max_age else ""
        removed = 0
        remaining = 0
        seen: set[bytes] = set()
        with map_redis_errors("trimming"):
            page: list[bytes] = []
            async for topic in client.sscan_iter(self._topics_key, count=TRIM_TOPICS_PER_CALL):
                if topic not in seen:
                    seen.add(topic)
                    page.append(topic)
                if len(page) >= TRIM_TOPICS_PER_CALL:
                    r, left = await self._trim_topics(page, max_events, cutoff)
                    removed, remaining, page = removed + r, remaining + left, []
            if page:
                r, left = await self._trim_topics(page, max_events, cutoff)
                removed, remaining = removed + r, remaining + left
        self._event_count = remaining
        return removed

    def event_count(self) -> int:
        """Events retained over all topics, as of the last trim plus this node's appends
        since (SupportsSize; approximate when several nodes append)."""
        return self._event_count

    async def check_ready(self) -> None:
        """``PING`` Redis; raise :class:`~ssehub.BackendUnavailableError` if it does not
        answer within :data:`READY_TIMEOUT` seconds."""
        if self._closed or not self._started:
            raise BackendUnavailableError("the Redis event log is not open")
        try:
            with map_redis_errors("checking readiness"):
                async with asyncio.timeout(READY_TIMEOUT):
                    await self.client.ping()
        except BackendUnavailableError:
            raise
        except BackendError as exc:
            raise BackendUnavailableError(exc.detail) from exc

    async def aclose(self) -> None:
        """Stop the background trim and close the client (if the log created it).
        Idempotent."""
        self._closed = True
        trimmer, self._trimmer = self._trimmer, None
        if trimmer is not None:
            trimmer.cancel()
            with suppress(asyncio.CancelledError):
                await trimmer
        client = self._client
        if client is not None and self._own_client:
            self._own_client = False
            await client.aclose()

    # -- internals ----------------------------------------------------------------------

    async def _append(self, batch: tuple[NewEvent, ...]) -> list[Event]:
        now = float(self._clock())
        stamp = repr(now)
        topics = list(dict.fromkeys(new.topic for new in batch))
        number = {topic: i for i, topic in enumerate(topics, 1)}
        retention = self._retention
        max_events = retention.max_events
        threshold = max_events + max(1, min(max_events // 10, 100))
        cutoff = repr(now - retention.max_age) if retention.max_age else ""
        args: list[str | int] = [
            self._stream_prefix,
            self._channel,
            max_events,
            threshold,
            cutoff,
            APPEND_TRIM_BUDGET,
            len(topics),
            *topics,
            len(batch),
        ]
        for new in batch:
            fields: list[str | int] = ["ts", stamp, "t", new.topic, "d", new.data]
            if new.event is not None:
                fields += ("e", new.event)
            if new.retry is not None:
                fields += ("r", new.retry)
            tail = json.dumps(
                [new.topic, new.event, new.data, new.retry, now],
                ensure_ascii=False,
                separators=(",", ":"),
            )
            args += (number[new.topic], "," + tail[1:], len(fields), *fields)
        keys = [self._seq_key, self._origin_key, self._topics_key, self._floors_key]
        keys += [self._stream_prefix + topic for topic in topics]
        with map_redis_errors("appending"):
            first_id, removed, origin = await self._scripts["append"](keys=keys, args=args)
        first = int(first_id)
        self._seen(int(origin), first - 1)
        stored = [
            Event(first + i, new.topic, new.data, new.event, new.retry, now)
            for i, new in enumerate(batch)
        ]
        self._head = max(self._head, stored[-1].id)
        self._event_count = max(0, self._event_count + len(batch) - int(removed))
        return stored

    async def _refresh(self, action: str) -> tuple[int, int]:
        """Read ``origin`` and the head from Redis, seeding them if Redis lost them."""
        with map_redis_errors(action):
            origin_b, seq_b = await self._scripts["init"](
                keys=[self._seq_key, self._origin_key, self._topics_key],
                args=[self._stream_prefix],
            )
        origin, head = int(origin_b), int(seq_b)
        self._seen(origin, head)
        return origin, head

    def _seen(self, origin: int, head: int) -> None:
        """Update this node's view of the sequence from values read in Redis."""
        if not self._started:
            self._origin, self._head = origin, head
            return
        if origin != self._origin:
            # Redis was wiped and seeded again: the sequence starts over above every
            # id this node knew, and older resume points are now unknown.
            logger.warning(
                "the Redis event log's sequence was reset (origin %d, was %d)",
                origin,
                self._origin,
            )
            self._origin = origin
        self._head = max(self._head, head)

    async def _trim_topics(
        self, topics: list[bytes], max_events: int, cutoff: str
    ) -> tuple[int, int]:
        removed = 0
        remaining = 0
        todo = topics
        while todo:
            keys = [self._floors_key.encode()]
            keys += [self._stream_prefix.encode() + topic for topic in todo]
            args: list[bytes | str | int] = [max_events, cutoff, TRIM_BUDGET, *todo]
            reply: list[Any] = await self._scripts["trim"](keys=keys, args=args)
            removed += int(reply[0])
            remaining += int(reply[1])  # of the topics done; the others come round again
            todo = [todo[int(k) - 1] for k in reply[2:]]
        return removed, remaining

    async def _trim_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._trim_interval)
            try:
                await self.trim()
            except BackendError as exc:
                logger.warning("background trim of the Redis event log failed: %s", exc.detail)
            except Exception:
                logger.exception("background trim of the Redis event log failed")

    def _check_not_closed(self) -> None:
        if self._closed:
            raise BackendError("the Redis event log is closed")

    def _check_started(self) -> None:
        if not self._started:
            raise BackendError("the Redis event log is not started; call start() first")

    def _check_usable(self) -> None:
        self._check_not_closed()
        self._check_started()


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _decode_entry(entry: list[Any]) -> Event:
    entry_id, flat = entry
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    event = fields.get(b"e")
    retry = fields.get(b"r")
    return Event(
        int(entry_id.partition(b"-")[0]),
        fields[b"t"].decode(),
        fields[b"d"].decode(),
        None if event is None else event.decode(),
        None if retry is None else int(retry),
        float(fields[b"ts"]),
    )


BACKPLANE_PAGE: Final = 1000
"""Events read per page when a backplane fills a gap from the streams."""
RECONNECT_DELAYS: Final = (0.1, 0.25, 0.5, 1.0, 2.0)
"""Back-off between backplane reconnects (the last one repeats)."""


@final
class RedisStreamsBackplane:
    """Carries every node's appends to this node, in id order, without gaps.

    Every append announces its batch on the log's pub/sub channel, and the ids of all
    nodes form one gapless sequence, so a gap in what arrives is always visible: after a
    reconnect (pub/sub drops messages while a connection is down) or a dropped message,
    the missing events are read from the streams before anything newer is delivered.
    Only the topics the node has subscribers on are read (``topics()``); if the streams no
    longer hold what was missed, ``on_gap`` is told which topics lost events.
    """

    def __init__(self, log: RedisStreamsEventLog) -> None:
        self._log = log
        self.last_id = 0
        """The newest id delivered (every id up to it has been seen or filled)."""
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Return once the backplane listens (events appended from now on arrive)."""
        await self._connected.wait()

    async def run(
        self,
        start_after: int,
        deliver: Callable[[list[Event], int], None],
        topics: Callable[[], Sequence[Topic]],
        on_gap: Callable[[Sequence[Topic], HistoryGoneError], None],
    ) -> None:
        """Deliver every event after ``start_after`` forever (cancel to stop).

        ``deliver(events, through)``: ``events`` (maybe none) and the id through which
        everything has now been delivered (events of topics without subscribers are
        skipped when filling a gap, yet count as seen).
        """
        self.last_id = start_after
        failures = 0
        while True:
            pubsub = self._log.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._log.channel)
                self._connected.set()
                failures = 0
                # Whatever was announced while we were not listening comes from the log.
                await self._fill(await self._log.current_head(), deliver, topics, on_gap)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None or message["type"] != "message":
                        continue
                    events = decode_announcement(message["data"])
                    if not events or events[-1].id <= self.last_id:
                        continue
                    if events[0].id > self.last_id + 1:
                        await self._fill(events[0].id - 1, deliver, topics, on_gap)
                    fresh = [e for e in events if e.id > self.last_id]
                    self.last_id = events[-1].id
                    deliver(fresh, self.last_id)
            except (redis_errors.RedisError, OSError, BackendError) as exc:
                self._connected.clear()
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                logger.warning(
                    "backplane connection lost; reconnecting",
                    extra={"error": repr(exc), "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
            finally:
                self._connected.clear()
                with suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _fill(
        self,
        upto: int,
        deliver: Callable[[list[Event], int], None],
        topics: Callable[[], Sequence[Topic]],
        on_gap: Callable[[Sequence[Topic], HistoryGoneError], None],
    ) -> None:
        """Deliver the events of ``topics()`` in ``(last_id, upto]`` from the streams."""
        while self.last_id < upto:
            wanted = list(topics())
            if not wanted:
                self.last_id = upto
                deliver([], upto)
                return
            try:
                page = await self._log.read_after(wanted, self.last_id, limit=BACKPLANE_PAGE)
            except HistoryGoneError as exc:
                if exc.reason != "trimmed" and exc.reason != "unknown":
                    raise
                self.last_id = upto
                deliver([], upto)
                on_gap(wanted, exc)
                return
            page = [e for e in page if e.id <= upto]
            if len(page) < BACKPLANE_PAGE:
                self.last_id = upto
                deliver(page, upto)
                return
            self.last_id = page[-1].id
            deliver(page, self.last_id)
