"""The live-worker registry: which workers are up, of which kind, serving which queues.

Every worker, whatever its kind, renews ``orch:alive:{name}`` every second with
a short TTL (``Settings.heartbeat_ttl``), and the key's value describes it
(:class:`WorkerInfo` as JSON); its name is in the ``orch:workers`` set. A worker
is live exactly while its key exists. The coordinator reads this to send each
queue's jobs in the form its live workers run, and to say when a queue has no
live worker at all; ``LossWatch`` reads the same keys to notice dead workers.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from shared import keys

LEAN = "lean"
"""The default worker: persistent work processes serving orch's own queues."""
RQ = "rq"
"""The RQ-compatible worker: an RQ worker, a forked work horse per job."""
KINDS = (LEAN, RQ)


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    kind: str
    queues: tuple[str, ...]
    concurrency: int = 1
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        fields = asdict(self)
        fields["queues"] = list(self.queues)
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> "WorkerInfo":
        """Raises ``ValueError`` for anything that is not a descriptor a worker wrote."""
        try:
            fields = json.loads(raw)
            info = cls(name=str(fields["name"]), kind=str(fields["kind"]),
                       queues=tuple(str(q) for q in fields["queues"]),
                       concurrency=int(fields.get("concurrency", 1)), host=str(fields.get("host", "?")),
                       pid=int(fields.get("pid", 0)), started_at=float(fields.get("started_at", 0.0)))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a worker descriptor: {exc}") from None
        return info


def beat(target: Any, info: WorkerInfo, ttl: float) -> None:
    """Queue (on a pipeline) or send this worker's heartbeat: its descriptor with a TTL."""
    target.set(keys.alive(info.name), info.to_json(), px=int(ttl * 1000))
    target.sadd(keys.WORKERS, info.name)


def retire(target: Any, name: str) -> None:
    """A worker that stops cleanly leaves the registry at once instead of after its TTL."""
    target.delete(keys.alive(name))
    target.srem(keys.WORKERS, name)


def live_workers(connection: redis.Redis) -> list[WorkerInfo]:
    """Every live worker (two round trips). Names whose key lapsed leave the set; a worker
    that was only cut off for a while adds itself back with its next heartbeat."""
    names = sorted(n.decode() if isinstance(n, bytes) else n for n in connection.smembers(keys.WORKERS))
    if not names:
        return []
    values = connection.mget([keys.alive(n) for n in names])
    live, gone = [], []
    for name, raw in zip(names, values):
        if raw is None:
            gone.append(name)
            continue
        try:
            live.append(WorkerInfo.from_json(raw))
        except ValueError:
            continue  # an old worker's "1", or a forged value: not a worker this registry knows
    if gone:
        try:
            connection.srem(keys.WORKERS, *gone)
        except redis.exceptions.NoPermissionError:
            pass  # a read-only ACL user (orch status): the next worker or coordinator cleans up
    return live


def kinds_by_queue(workers: list[WorkerInfo]) -> dict[str, set[str]]:
    """queue -> kinds of the live workers serving it."""
    served: dict[str, set[str]] = {}
    for info in workers:
        for queue in info.queues:
            served.setdefault(queue, set()).add(info.kind)
    return served
