"""Connecting to Redis: URL checking, a ping, and reconnection with backoff."""
from __future__ import annotations

import functools
from typing import Any
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.errors import InvalidRedisUrlError, RedisUnavailableError

_SCHEMES = {"redis", "rediss", "unix"}


def connect(url: str, *, check: bool = True, socket_timeout: float | None = None) -> redis.Redis:
    """A client for ``url`` that retries dropped connections with exponential backoff.

    Raises :class:`InvalidRedisUrlError` for a malformed URL and, when ``check``,
    :class:`RedisUnavailableError` if the server does not answer a PING.
    """
    if not isinstance(url, str) or not url:
        raise InvalidRedisUrlError(str(url), "empty")
    parsed = urlparse(url)
    if parsed.scheme not in _SCHEMES:
        raise InvalidRedisUrlError(url, "expected redis://HOST[:PORT][/DB], rediss:// or unix://PATH")
    try:
        parsed.port  # noqa: B018 - raises on a bad port
        client = redis.Redis.from_url(
            url,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            socket_timeout=socket_timeout,
            socket_connect_timeout=5,
            **_driver_info(),
        )
    except ValueError as exc:
        raise InvalidRedisUrlError(url, str(exc)) from None
    if check:
        try:
            # One plain try: a server that is down should fail a submit now, not after the backoff.
            probe = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
            probe.ping()
            probe.close()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise RedisUnavailableError(_safe(url), str(exc).split("\n")[0]) from None
        except redis.ResponseError as exc:
            raise RedisUnavailableError(_safe(url), str(exc)) from None
    return client


@functools.cache
def _driver_info() -> dict[str, Any]:
    """redis-py's description of itself, made once per process and given to every connection.

    Recent redis-py (8 here) otherwise makes it anew for each connection it opens, reading its own package
    metadata from disk: a few milliseconds and hundreds of page faults, paid by every RQ work
    horse (a forked process opens a connection of its own) and by nothing else it does per job.
    Older redis-py reads it once, at import, and has no such argument (nor this cost).
    """
    try:
        from redis.driver_info import DriverInfo
    except ImportError:
        return {}
    return {"driver_info": DriverInfo()}


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url
