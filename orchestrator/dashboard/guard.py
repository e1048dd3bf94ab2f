"""The dashboard's outer layer (plain ASGI): what every request and response goes through.

- **Host check** (:func:`orchestrator.dashboard.security.host_allowed`): a dashboard without a
  login answers only to the names it was bound for, against DNS rebinding.
- **Body limit**: a request body over :data:`MAX_BODY` bytes is refused with 413 before it is
  read into memory (the largest honest one, the login form, is well under 1 KiB).
- **Headers**: ``Content-Security-Policy`` (scripts only from the dashboard itself or the page's
  own inline script, which carries this response's nonce; no framing, no other origin),
  ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff``, ``Referrer-Policy``.
- **Secure cookies behind https**: when the request came over https (uvicorn takes the
  scheme from ``X-Forwarded-Proto`` of a proxy on this machine), the session cookie is
  marked ``Secure``.
"""
from __future__ import annotations

import json
import secrets
from typing import Any, Awaitable, Callable, MutableMapping, Optional

from orchestrator.dashboard.security import host_allowed

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY = 64 * 1024
"""Bytes a request body may have: every form of the dashboard is a few hundred."""
NONCE_KEY = "csp_nonce"
"""Where the response's script nonce waits in ``scope["state"]`` for the templates."""


def content_security_policy(nonce: str) -> str:
    return (f"default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self'; "
            f"img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
            f"frame-ancestors 'none'")


class BodyTooLarge(Exception):
    """A request body past :data:`MAX_BODY`."""


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware applying the checks and headers above to every HTTP request."""

    def __init__(self, app: ASGIApp, allowed_hosts: Optional[frozenset[str]] = None,
                 max_body: int = MAX_BODY) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if not host_allowed(headers.get("host"), self.allowed_hosts):
            await _refuse(send, 421, "this dashboard does not answer to that Host name (it has no login, so it "
                                     "answers only to the names it was started for: see --allowed-host)")
            return
        length = headers.get("content-length", "")
        if (length.isdigit() and int(length) > self.max_body) or (length and not length.isdigit()):
            await _refuse(send, 413, f"request body over {self.max_body} bytes")
            return
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})[NONCE_KEY] = nonce
        secure = scope.get("scheme") == "https"
        started = False
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = _with_security_headers(list(message.get("headers", [])), nonce, secure)
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, 413, f"request body over {self.max_body} bytes")


def _with_security_headers(headers: list[tuple[bytes, bytes]], nonce: str, secure: bool) -> list[tuple[bytes, bytes]]:
    """``headers`` with the security headers added (and ``Secure`` on cookies over https)."""
    out = []
    for name, value in headers:
        if secure and name.lower() == b"set-cookie" and b"; secure" not in value.lower():
            value += b"; secure"
        out.append((name, value))
    present = {name.lower() for name, _ in out}
    for name, value in ((b"content-security-policy", content_security_policy(nonce).encode()),
                        (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"same-origin")):
        if name not in present:
            out.append((name, value))
    return out
