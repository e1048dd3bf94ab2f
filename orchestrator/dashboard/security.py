"""Who may use the dashboard, and from where: logins, password hashes, CSRF tokens, the bind and
Host checks, where a redirect may lead, the failed-login throttle and the basic-credential cache.

Functions and small records, no web framework: :mod:`orchestrator.dashboard.app` and
:mod:`orchestrator.dashboard.guard` apply them. Passwords are kept as scrypt hashes (``hashlib.scrypt``, the standard
library's memory-hard KDF): an auth file holds one ``user:hash`` line per user, the
hash as :func:`hash_password` prints it; ``ORCH_DASHBOARD_USER`` and
``ORCH_DASHBOARD_PASSWORD`` give one user from the environment instead (hashed in
memory at start, so the plain password is not kept).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from shared.errors import DashboardSettingError

_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}
_SCHEME = "scrypt"
USER_ENV = "ORCH_DASHBOARD_USER"
PASSWORD_ENV = "ORCH_DASHBOARD_PASSWORD"


def hash_password(password: str, salt: Optional[bytes] = None) -> str:
    """``scrypt$N$r$p$SALT$HASH`` (hex): the form an auth file holds."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"{_SCHEME}${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (a :func:`hash_password` string); ``False`` for a damaged one."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != _SCHEME:
            return False
        made = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                              dklen=len(digest) // 2, maxmem=2 ** 27)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(made.hex(), digest)


@lru_cache(maxsize=1)
def _decoy_hash() -> str:
    """A hash no password is checked against but to spend, for an unknown user, the time a known one takes."""
    return hash_password(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class Users:
    """The users who may log in (name -> password hash); empty: no login (local use only)."""

    hashes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hashes:
            _decoy_hash()  # made now, so that no login attempt pays for making it

    @property
    def required(self) -> bool:
        return bool(self.hashes)

    def verify(self, user: str, password: str) -> bool:
        stored = self.hashes.get(user)
        if stored is None:
            check_password(password, _decoy_hash())  # one scrypt, as for a user who exists: no timing tell
            return False
        return check_password(password, stored)


def parse_auth_file(text: str, where: str) -> Users:
    """``user:hash`` lines (blank lines and ``#`` comments ignored). Raises :class:`DashboardSettingError`
    naming the line that is not one."""
    hashes: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or not stored.startswith(f"{_SCHEME}$") or stored.count("$") != 5:
            raise DashboardSettingError(f"{where} line {number}: expected USER:scrypt$... (make one with "
                               f"'orch dashboard --hash-password')")
        hashes[user] = stored
    if not hashes:
        raise DashboardSettingError(f"{where} names no user: add USER:HASH lines "
                           f"(make one with 'orch dashboard --hash-password')")
    return Users(hashes)


def load_users(auth_file: Optional[Path], environ: Mapping[str, str] = os.environ) -> Users:
    """The users from ``auth_file``, else from ``ORCH_DASHBOARD_USER``/``ORCH_DASHBOARD_PASSWORD``,
    else none. Raises :class:`DashboardSettingError` for an unreadable file or half of the environment pair."""
    if auth_file is not None:
        try:
            text = auth_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise DashboardSettingError(f"--auth-file {auth_file}: cannot read it ({exc.strerror})") from None
        return parse_auth_file(text, f"--auth-file {auth_file}")
    user, password = environ.get(USER_ENV, ""), environ.get(PASSWORD_ENV, "")
    if bool(user) != bool(password):
        raise DashboardSettingError(f"set both {USER_ENV} and {PASSWORD_ENV} (or neither) to turn on "
                                    f"the dashboard's login")
    return Users({user: hash_password(password)}) if user else Users()


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the dashboard to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, users: Users, insecure_no_auth: bool) -> None:
    """Refuse to serve other machines without a login, unless told to (``--insecure-no-auth``)."""
    if not is_loopback(host) and not users.required and not insecure_no_auth:
        raise DashboardSettingError(f"refusing to bind {host} without a login: anyone who reaches it could "
                                    f"cancel runs. Give --auth-file FILE or set {USER_ENV} and {PASSWORD_ENV} "
                                    f"(or pass --insecure-no-auth behind a proxy that authenticates)")


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: Optional[str], given: Optional[str]) -> bool:
    """Whether a form's token is the session's own (constant time)."""
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


def same_origin(origin: Optional[str], host: Optional[str]) -> bool:
    """Whether a POST's ``Origin`` header (when the browser sent one) names the host the page came
    from. ``null`` (a sandboxed frame, a ``data:`` page, some redirects) is another origin."""
    if not origin:
        return True  # old browsers and non-browser clients: the CSRF token alone decides
    if not host:
        return False
    return origin.split("://", 1)[-1].rstrip("/").lower() == host.lower()


def local_path(target: Optional[str]) -> str:
    """``target`` if it is a path of this site, else ``/``: where a form or the login may send the
    browser back to. Refuses ``//host``, ``/\\host`` (a browser reads ``\\`` as ``/``), schemes and
    control characters, so no redirect leads to another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in target):
        return "/"
    return target


def host_allowed(host_header: Optional[str], allowed: Optional[frozenset[str]]) -> bool:
    """Whether a request's ``Host`` (its name, port stripped) is one this dashboard answers to.

    ``allowed`` ``None``: any. Checked when no login is configured, against DNS rebinding: a web
    page of another site whose name the attacker points at 127.0.0.1 would otherwise be the
    dashboard's own origin in the browser, able to read every page and post its forms."""
    if allowed is None:
        return True
    name = (host_header or "").strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name in allowed or is_loopback(name)


def allowed_hosts(bind: str, users: Users, extra: Iterable[str]) -> Optional[frozenset[str]]:
    """The ``Host`` names a dashboard without a login answers to (``None``: any, for one with a login,
    or bound to every address with no ``--allowed-host`` given): the loopback names, the bound
    address, and ``extra`` (``--allowed-host``)."""
    names = frozenset(name.strip().lower().strip("[]") for name in extra if name.strip())
    if users.required or (not names and bind in ("0.0.0.0", "::", "")):
        return None
    return names | {bind.lower().strip("[]"), "localhost"}


class LoginThrottle:
    """Failed logins per client address: after :attr:`free` failures in a row, each further try must
    wait twice as long as the one before (1 s, 2 s, 4 s, ... at most :attr:`longest`), and is refused
    unchecked (no scrypt) until then. A success forgets the address. At most :attr:`remembered`
    addresses are kept (the oldest forgotten first), so a flood of addresses cannot fill memory."""

    free = 5
    longest = 60.0
    remembered = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait(self, address: str) -> float:
        """Seconds ``address`` must still wait before its next try is checked (0: now)."""
        with self._lock:
            failures, until = self._failures.get(address, (0, 0.0))
            return max(0.0, until - self.clock()) if failures >= self.free else 0.0

    def failed(self, address: str) -> None:
        with self._lock:
            failures, _ = self._failures.pop(address, (0, 0.0))
            failures += 1
            delay = min(self.longest, 2.0 ** (failures - self.free)) if failures >= self.free else 0.0
            self._failures[address] = (failures, self.clock() + delay)
            while len(self._failures) > self.remembered:
                self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


class CredentialCache:
    """HTTP basic credentials already checked (a digest of the header -> user), so that Prometheus
    scraping ``/metrics`` every few seconds costs one scrypt, not one a request. Keyed by a keyed
    hash (never the password itself); at most :attr:`size` entries, each kept :attr:`ttl` seconds."""

    size = 256
    ttl = 300.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._key = secrets.token_bytes(32)
        self._known: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _digest(self, header: str) -> bytes:
        return hmac.new(self._key, header.encode(), hashlib.sha256).digest()

    def get(self, header: str) -> Optional[str]:
        digest = self._digest(header)
        with self._lock:
            found = self._known.get(digest)
            if found is None or found[1] < self.clock():
                self._known.pop(digest, None)
                return None
            return found[0]

    def put(self, header: str, user: str) -> None:
        with self._lock:
            self._known[self._digest(header)] = (user, self.clock() + self.ttl)
            while len(self._known) > self.size:
                self._known.popitem(last=False)
