"""A bare Redis connection for a lean work process's own loop: commands packed by hand.

The loop sends the same few commands for every task (a finish-and-take script,
``BLMOVE``, ``XADD``). Through redis-py's client each of them pays for a pool
checkout, an encoder pass over every argument and its observability hooks:
about twice the CPU of the round trip itself, measured in a work process. Here
a command is packed into RESP in one join and sent on one
:class:`redis.connection.Connection` (which still does the connecting, ``AUTH``,
``SELECT`` and the reply parsing). Nothing is retried behind the caller's back:
a failed command raises, and the caller (which must know whether a take may
have happened) decides.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import redis
from redis.exceptions import NoScriptError

Arg = bytes | str | int | float


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        else:
            data = repr(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Wire:
    """One connection of ``client``'s pool settings, used by one thread."""

    def __init__(self, client: redis.Redis, reply_timeout: Optional[float] = None) -> None:
        """``reply_timeout``: the longest wait for a reply before the connection counts as dead (a
        ``TimeoutError``, and a new connection for the next call)."""
        self._connection = client.connection_pool.make_connection()
        if reply_timeout is not None:
            self._connection.socket_timeout = reply_timeout

    def call(self, *args: Arg) -> Any:
        """Send one command and return its reply (raises what redis-py raises for it)."""
        self._send(args)
        try:
            return self._connection.read_response()
        except (redis.ConnectionError, redis.TimeoutError):
            self._drop()
            raise

    def _send(self, args: Sequence[Arg]) -> None:
        try:
            self._connection.send_packed_command([pack(args)], check_health=False)
        except (redis.ConnectionError, redis.TimeoutError):
            self._drop()
            raise
        except OSError as exc:
            self._drop()
            raise redis.ConnectionError(str(exc)) from exc

    def _drop(self) -> None:
        self._connection.disconnect()

    def script(self, source: str) -> "WireScript":
        return WireScript(self, source)

    def close(self) -> None:
        self._drop()


class WireScript:
    """A Lua script called by its SHA1, loaded again if the server lost it (a restart, a flush)."""

    def __init__(self, wire: Wire, source: str) -> None:
        self._wire = wire
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return self._wire.call("EVALSHA", self._sha, len(keys), *keys, *args)
        except NoScriptError:
            self._wire.call("SCRIPT", "LOAD", self._source)
            return self._wire.call("EVALSHA", self._sha, len(keys), *keys, *args)
