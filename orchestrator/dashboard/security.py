"""Who may use the dashboard, and from where: logins, password hashes, CSRF tokens, the bind check.

Pure functions and small records, no web framework: :mod:`orchestrator.dashboard.app`
applies them. Passwords are kept as scrypt hashes (``hashlib.scrypt``, the standard
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

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


@dataclass(frozen=True)
class Users:
    """The users who may log in (name -> password hash); empty: no login (local use only)."""

    hashes: Mapping[str, str] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return bool(self.hashes)

    def verify(self, user: str, password: str) -> bool:
        stored = self.hashes.get(user)
        if stored is None:
            check_password(password, hash_password("not a user"))  # the same time whether or not the user exists
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
    """Whether a POST's ``Origin`` header (when the browser sent one) names the host the page came from."""
    if not origin:
        return True  # old browsers and non-browser clients: the CSRF token alone decides
    if not host:
        return False
    return origin.split("://", 1)[-1].rstrip("/") == host
