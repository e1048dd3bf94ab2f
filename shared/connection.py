"""Connecting to Redis: URL checking, TLS and credentials, a ping, and reconnection with backoff.

Every process that takes a Redis URL (CLI, ``run(redis_url=...)``, workers,
coordinators) connects here, so they all accept the same URLs:

- ``redis://[[user]:password@]host[:port][/db]`` (a password, or an ACL user and
  its password), ``unix:///path/to/socket``;
- ``rediss://...`` for TLS, with the CA that signed the server's certificate,
  and for mutual TLS the client certificate and key, as query parameters
  ``?ca=PATH&cert=PATH&key=PATH`` or as settings ``ORCH_REDIS_CA``,
  ``ORCH_REDIS_CERT``, ``ORCH_REDIS_KEY`` (the URL wins). redis-py's own
  ``ssl_*`` parameters are accepted too.

A password never appears in a message: :func:`redacted` shows it as ``***``.
"""
from __future__ import annotations

import copy
import functools
import os
from typing import Any, Mapping, Optional
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.errors import InvalidRedisUrlError, RedisAccessError, RedisUnavailableError

_SCHEMES = {"redis", "rediss", "unix"}
TLS_FILES = {"ca": ("ORCH_REDIS_CA", "ssl_ca_certs"), "cert": ("ORCH_REDIS_CERT", "ssl_certfile"),
             "key": ("ORCH_REDIS_KEY", "ssl_keyfile")}
"""URL parameter -> (setting, redis-py option) of each TLS file."""


def redacted(url: str) -> str:
    """``url`` with its password shown as ``***``: the only form of a URL any message may carry."""
    try:
        parsed = urlparse(url)
        password = parsed.password
    except ValueError:
        return "<malformed URL>"
    if not password:
        return url
    user = parsed.username or ""
    host = parsed.hostname or ""
    port = f":{parsed.port}" if parsed.port else ""
    return urlunparse(parsed._replace(netloc=f"{user}:***@{host}{port}"))


def _tls_options(url: str, parsed: Any, environ: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """Take orch's TLS parameters out of ``url`` (redis-py would reject them) as redis-py options."""
    query = parse_qsl(parsed.query, keep_blank_values=True)
    ours = {name: value for name, value in query if name in TLS_FILES}
    rest = [(name, value) for name, value in query if name not in TLS_FILES]
    options: dict[str, Any] = {}
    if parsed.scheme != "rediss":
        if ours:
            raise InvalidRedisUrlError(redacted(url), f"'{next(iter(ours))}=' is for TLS: use a rediss:// URL")
        return url, options
    for name, (setting, option) in TLS_FILES.items():
        path = ours.get(name) or environ.get(setting)
        if not path:
            continue
        if not os.path.isfile(path):
            where = f"the URL's '{name}='" if name in ours else setting
            raise InvalidRedisUrlError(redacted(url), f"{where} names {path!r}, which is not a readable file")
        options[option] = path
    if "ssl_cert_reqs" not in dict(rest):
        options["ssl_cert_reqs"] = "required"
    return urlunparse(parsed._replace(query=urlencode(rest))), options


def connect(url: str, *, check: bool = True, socket_timeout: float | None = None,
            environ: Optional[Mapping[str, str]] = None) -> redis.Redis:
    """A client for ``url`` that retries dropped connections with exponential backoff.

    Raises :class:`InvalidRedisUrlError` for a malformed URL and, when ``check``,
    :class:`RedisUnavailableError` if the server does not answer a PING, or
    :class:`RedisAccessError` if it refuses this client (wrong password, unknown user).
    """
    if not isinstance(url, str) or not url:
        raise InvalidRedisUrlError(str(url), "empty")
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise InvalidRedisUrlError(redacted(url), str(exc)) from None
    if parsed.scheme not in _SCHEMES:
        raise InvalidRedisUrlError(redacted(url), "expected redis://HOST[:PORT][/DB], rediss:// or unix://PATH")
    clean, tls = _tls_options(url, parsed, os.environ if environ is None else environ)
    try:
        client = redis.Redis.from_url(
            clean,
            retry=_Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            socket_timeout=socket_timeout,
            socket_connect_timeout=5,
            **tls,
            **_handshake_options(),
        )
    except (ValueError, TypeError) as exc:
        raise InvalidRedisUrlError(redacted(url), str(exc)) from None
    if check:
        _probe(url, clean, tls)
    return client


class _Retry(Retry):
    """redis-py deep-copies a client's ``Retry`` for every connection it makes: in a forked RQ work horse,
    which makes one per job, about 0.25 ms of copying. Nothing in this one is changed in place
    (``ExponentialBackoff`` keeps no state; the error tuple is replaced, not changed), so a shallow copy
    is a deep one."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Retry":
        return copy.copy(self)


def _probe(url: str, clean: str, tls: dict[str, Any]) -> None:
    """One plain try: a server that is down should fail a submit now, not after the backoff."""
    try:
        probe = redis.Redis.from_url(clean, socket_connect_timeout=3, socket_timeout=5, **tls, **_handshake_options())
        try:
            probe.ping()
        finally:
            probe.close()
    except redis.AuthenticationError as exc:
        raise RedisAccessError(redacted(url), _first_line(exc)) from None
    except redis.ResponseError as exc:  # NOPERM for PING, NOAUTH...
        raise RedisAccessError(redacted(url), _first_line(exc)) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailableError(redacted(url), _first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@functools.cache
def _handshake_options() -> dict[str, Any]:
    """Connection options that keep a new connection's handshake to what orch needs: one round trip
    (``HELLO``), not two. Given to every client orch makes, so paid by nothing per job or per task.

    - No ``CLIENT SETINFO`` (the library's name and version in ``CLIENT LIST``). Recent redis-py
      (8 here) would also make its description anew for each connection, reading its own package
      metadata from disk: milliseconds and hundreds of page faults in every RQ work horse (a forked
      process opens a connection of its own for each job).
    - No ``CLIENT MAINT_NOTIFICATIONS`` (redis-py 8 asks by default; only managed Redis Enterprise
      clusters answer, self-hosted Redis refuses it, one round trip wasted per connection).

    Older redis-py knows neither argument (nor sends the second command): its ``lib_name=None``
    turns the first off.
    """
    options: dict[str, Any] = {}
    try:
        from redis.driver_info import DriverInfo  # noqa: F401 - redis-py 7+
        options["driver_info"] = None
    except ImportError:
        options.update(lib_name=None, lib_version=None)
    try:
        from redis.maint_notifications import MaintNotificationsConfig
        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    except ImportError:
        pass
    return options
