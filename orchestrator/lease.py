"""The lease that makes one coordinator, and only one, drive a run.

A coordinator holds ``orch:run:{id}:lease`` (its random token, with a TTL) and
renews it every second. Every write of a step is fenced: the step's commands
run inside one Lua script that first checks the token (and renews the lease),
so a coordinator that paused past its lease and woke up after another adopted
the run has its writes refused instead of corrupting the run
(:class:`LeaseLost`). One script call is one atomic round trip, where WATCH +
GET + MULTI/EXEC took three.

A coordinator whose lease merely lapsed (a pause, a Redis outage) takes it back
only if nobody else held it meanwhile and the run is still active: every
adoption records the adopter's token in the run's hash (``lease_holder``), so
a coordinator that wakes up after another adopted the run, or after the run
finished, finds someone else's token there (or the run gone from
``orch:active``) and stops with :class:`LeaseLost` instead of driving the run
again from its stale view.
"""
from __future__ import annotations

import secrets
from typing import Optional

import redis

from shared import keys
from shared.errors import WorkflowError

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_ACQUIRE = """
-- KEYS: lease, run hash, active set. ARGV: token, ttl ms, run id, '1' if this Lease held the run before
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if current then
  return 0
end
if ARGV[4] == '1' then
  if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 0 then
    return 0
  end
  local holder = redis.call('HGET', KEYS[2], 'lease_holder')
  if holder and holder ~= ARGV[1] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'lease_holder', ARGV[1])
end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


EXPIRE_MEMBERS = "ORCH.EXPIREMEMBERS"
"""A command only the fenced scripts know: ``(EXPIRE_MEMBERS, set key, seconds)`` sets that TTL on
every key the set names (a run's logs, named by its log index), in the write itself instead of
a read of the set one round trip before it."""


def run_commands_lua(first: int) -> str:
    """The Lua that runs the commands :func:`flatten` laid out in ``ARGV`` from index ``first`` on,
    then returns 1: the tail of every fenced write script (a run's step here, a schedule's tick in
    :mod:`orchestrator.schedules`)."""
    return f"""local i = {first}
local n = #ARGV
while i <= n do
  local count = tonumber(ARGV[i])
  if ARGV[i + 1] == '{EXPIRE_MEMBERS}' then
    for _, key in ipairs(redis.call('SMEMBERS', ARGV[i + 2])) do
      redis.call('EXPIRE', key, ARGV[i + 3])
    end
  else
    redis.call(unpack(ARGV, i + 1, i + count))
  end
  i = i + count + 1
end
return 1
"""


_APPLY = """
-- KEYS: lease, run hash, active set. ARGV: token, ttl ms, run id, then the commands
-- as count, args..., count, args... A lapsed lease is taken back on the same terms as
-- in _ACQUIRE for a lease that held the run: still active, nobody else adopted it.
local holder = redis.call('GET', KEYS[1])
if holder == false then
  if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 0 then
    return redis.error_reply('ORCH_LEASE_LOST')
  end
  local recorded = redis.call('HGET', KEYS[2], 'lease_holder')
  if recorded and recorded ~= ARGV[1] then
    return redis.error_reply('ORCH_LEASE_LOST')
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif holder ~= ARGV[1] then
  return redis.error_reply('ORCH_LEASE_LOST')
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
""" + run_commands_lua(4)
MAX_ITEMS_PER_COMMAND = 2000
"""Variadic commands longer than this are split: Lua's ``unpack`` takes at most ~8000 values."""
_VARIADIC = {"HSET": 2, "HDEL": 1, "RPUSH": 1, "LPUSH": 1, "SADD": 1, "SREM": 1, "DEL": 1}


def _split(args: tuple) -> list[tuple]:
    """``args`` as one or more commands of at most ``MAX_ITEMS_PER_COMMAND`` values."""
    name = str(args[0]).upper()
    width = _VARIADIC.get(name)
    if width is None or len(args) <= MAX_ITEMS_PER_COMMAND:
        return [args]
    head, items = args[:2], args[2:]
    step = (MAX_ITEMS_PER_COMMAND // width) * width
    return [head + items[i:i + step] for i in range(0, len(items), step)]


def flatten(commands: list[tuple]) -> list:
    """``[count, *args, count, *args, ...]``: commands as the step script reads them."""
    flat: list = []
    for args in commands:
        for part in _split(args):
            flat.append(len(part))
            flat.extend(part)
    return flat


class LeaseLost(WorkflowError):
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id}: another coordinator holds its lease now; this one stopped driving it")


class Lease:
    def __init__(self, connection: redis.Redis, run_id: str, ttl: float, token: Optional[str] = None) -> None:
        self.connection = connection
        self.run_id = run_id
        self.key = keys.lease(run_id)
        self.ttl_ms = max(1, int(ttl * 1000))
        self.token = token or secrets.token_hex(12)
        self.held = False
        """True once this lease has held the run (then it may only take it back if nobody else took it)."""
        self._acquire = connection.register_script(_ACQUIRE)
        self._renew = connection.register_script(_RENEW)
        self._release = connection.register_script(_RELEASE)
        self._apply = connection.register_script(_APPLY)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it (or we already do).

        Once this lease has held the run, a lapsed lease is taken back only if
        no other coordinator adopted the run since and the run is still active.
        """
        taken = bool(self._acquire(keys=[self.key, keys.run(self.run_id), keys.ACTIVE],
                                   args=[self.token, self.ttl_ms, self.run_id, "1" if self.held else "0"]))
        self.held = self.held or taken
        return taken

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.token])

    def holder(self) -> Optional[str]:
        value = self.connection.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def apply(self, commands: list[tuple]) -> None:
        """Run ``commands`` (argument tuples, e.g. a pipeline's command stack) atomically,
        only while this lease is held (re-taking it if it lapsed and nobody took it)."""
        try:
            self._apply(keys=[self.key, keys.run(self.run_id), keys.ACTIVE],
                        args=[self.token, self.ttl_ms, self.run_id, *flatten(commands)])
        except redis.ResponseError as exc:
            if "ORCH_LEASE_LOST" in str(exc):
                raise LeaseLost(self.run_id) from None
            raise
