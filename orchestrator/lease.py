"""The lease that makes one coordinator, and only one, drive a run.

A coordinator holds ``orch:run:{id}:lease`` (its random token, with a TTL) and
renews it every second. Every write of a step is fenced: the step's MULTI runs
under ``WATCH`` of the lease key after checking the token, so a coordinator
that paused past its lease and woke up after another adopted the run has its
EXEC refused instead of corrupting the run (:class:`LeaseLost`).
"""
from __future__ import annotations

import secrets
from typing import Optional

import redis
from redis.client import Pipeline

from shared import keys
from shared.errors import WorkflowError

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


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
        self._renew = connection.register_script(_RENEW)
        self._release = connection.register_script(_RELEASE)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it (or we already do)."""
        if self.connection.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return True
        return self.renew()

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.token])

    def holder(self) -> Optional[str]:
        value = self.connection.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def fence(self, pipe: Pipeline) -> None:
        """Put ``pipe`` in WATCH on the lease, check it is ours, start its MULTI and renew it in there.

        The caller then queues its writes and calls ``pipe.execute()``; a
        ``redis.WatchError`` from that means the lease changed hands meanwhile.
        """
        pipe.watch(self.key)
        current = pipe.get(self.key)
        if isinstance(current, bytes):
            current = current.decode()
        if current != self.token:
            if current is None and pipe.set(self.key, self.token, nx=True, px=self.ttl_ms):
                pipe.unwatch()
                pipe.watch(self.key)
            else:
                pipe.reset()
                raise LeaseLost(self.run_id)
        pipe.multi()
        pipe.pexpire(self.key, self.ttl_ms)
