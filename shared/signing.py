"""HMAC-SHA256 signatures on jobs and outcomes, so that Redis access alone cannot forge either.

Optional, one setting: with ``ORCH_SIGNING_KEY`` (or ``ORCH_SIGNING_KEY_FILE``)
set on coordinators and workers, the coordinator signs every job it queues and
every worker signs every outcome it reports; a worker refuses a job whose
signature is missing or wrong before importing anything, and a coordinator
ignores an outcome that fails the check. Each signature covers what it signs,
its kind (``job``, ``outcome``, ``cancel``), the run id and the attempt, so a
signed job copied into another run or attempt fails the check.

Rotation: two keys may be configured at once; the first signs, either
verifies. ``ORCH_SIGNING_KEY`` holds one key, or two separated by a comma (new
first); ``ORCH_SIGNING_KEY_FILE`` names a file with one key per line.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
from typing import Any, Mapping, Optional, Sequence

from shared.errors import SigningKeyError

SIGNATURE_CHARS = 64
"""Length of a signature: SHA-256 in hex."""


class Signer:
    """Signs with the first key, verifies with any of them."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys or not all(keys):
            raise SigningKeyError("a signing key may not be empty (ORCH_SIGNING_KEY, ORCH_SIGNING_KEY_FILE)")
        if len(keys) > 2:
            raise SigningKeyError("at most two signing keys at once in ORCH_SIGNING_KEY or ORCH_SIGNING_KEY_FILE "
                                  "(the new one first, then the old one)")
        self._keys = tuple(keys)
        self._pads = tuple(_pads(key) for key in self._keys)

    @classmethod
    def from_environment(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["Signer"]:
        """The signer the settings ask for, or ``None`` when signing is off."""
        environ = os.environ if environ is None else environ
        path = environ.get("ORCH_SIGNING_KEY_FILE")
        if path:
            try:
                with open(path, "rb") as handle:
                    lines = [line.strip() for line in handle.read().splitlines()]
            except OSError as exc:
                raise SigningKeyError(f"ORCH_SIGNING_KEY_FILE {path!r} cannot be read: {exc.strerror}") from None
            keys = [line for line in lines if line]
            if not keys:
                raise SigningKeyError(f"ORCH_SIGNING_KEY_FILE {path!r} holds no key")
            return cls(keys)
        value = environ.get("ORCH_SIGNING_KEY")
        if not value:
            return None
        return cls([part.strip().encode() for part in value.split(",") if part.strip()])

    @staticmethod
    def _digest(pads: tuple[Any, Any], kind: str, run_id: str, attempt: int, data: bytes) -> str:
        """HMAC-SHA256 (RFC 2104) of the length-prefixed kind, run id and attempt, then ``data``."""
        run = run_id.encode("utf-8", "surrogatepass")
        inner, outer = pads[0].copy(), pads[1].copy()
        inner.update(b"%d:%s%d:%s%d:" % (len(kind), kind.encode(), len(run), run, attempt))
        inner.update(data)
        outer.update(inner.digest())
        return outer.hexdigest()

    def sign(self, kind: str, run_id: str, attempt: int, data: bytes) -> str:
        return self._digest(self._pads[0], kind, run_id, attempt, data)

    def verify(self, kind: str, run_id: str, attempt: int, data: bytes, signature: Optional[str]) -> bool:
        if not isinstance(signature, str) or len(signature) != SIGNATURE_CHARS:
            return False
        return any(hmac.compare_digest(self._digest(pads, kind, run_id, attempt, data), signature)
                   for pads in self._pads)


def _pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states after the inner and the outer padded key: HMAC's fixed part, computed once per
    key (a signature then costs a copy of each and the message: under half of ``hmac.digest``)."""
    block = hashlib.sha256().block_size
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    return (hashlib.sha256(bytes(b ^ 0x36 for b in key)), hashlib.sha256(bytes(b ^ 0x5C for b in key)))


SIGNATURE_FIELD = "sig"
"""The field of a stream entry (an outcome, a cancel request) that holds its signature."""


@functools.cache
def configured_signer() -> Optional[Signer]:
    """This worker process's signer (``None``: signing is off), read once from its settings (the
    ``orch worker`` command reads it before any work process or work horse starts, so that a bad
    key is one ``error:`` line at start, and they all share it)."""
    return Signer.from_environment()


def _raw(text: bytes | str) -> bytes:
    if isinstance(text, bytes):
        return text
    return (text if isinstance(text, str) else str(text)).encode("utf-8", "surrogatepass")


_NAME_PIECES: dict[bytes | str, bytes] = {}
"""A field name (as ``str`` or ``bytes``) -> its netstring: the few names orch writes, made once."""


def _name_piece(name: bytes | str) -> bytes:
    piece = _NAME_PIECES.get(name)
    if piece is None:
        raw = _raw(name)
        piece = b"%d:%s" % (len(raw), raw)
        if len(_NAME_PIECES) < 64:  # bounded: a forged entry may carry any names
            _NAME_PIECES[name] = piece
    return piece


_LENGTHS = [b"%d:" % n for n in range(256)]
"""A netstring's length prefix for each short length (most fields' values are short)."""


def fields_bytes(fields: Mapping[Any, bytes | str], *, leave_out: str = SIGNATURE_FIELD) -> bytes:
    """A stream entry's fields as bytes, in a fixed order, each length-prefixed: what an outcome's
    signature covers (every field but the signature itself). The same bytes whether the names and
    values are ``str`` (as a worker writes them) or ``bytes`` (as a coordinator reads them back).
    Every task's outcome goes through here twice with signing on (signed, then checked): the
    name netstrings and short length prefixes are looked up, not formatted."""
    skip, skip_raw = leave_out, leave_out.encode()
    known = _NAME_PIECES.get
    pieces = []
    for name, value in fields.items():
        if name == skip or name == skip_raw:
            continue
        if type(value) is str:
            value = value.encode("utf-8", "surrogatepass")
        elif type(value) is not bytes:
            value = _raw(value)
        size = len(value)
        pieces.append((known(name) or _name_piece(name)) + (_LENGTHS[size] if size < 256 else b"%d:" % size) + value)
    # Each piece delimits itself (a netstring each for name and value), so the sorted pieces, joined,
    # still say which value goes with which name: sorting them is a canonical order, and cheap.
    pieces.sort()
    return b"".join(pieces)


def sign_fields(signer: Optional[Signer], kind: str, run_id: str, attempt: int,
                fields: dict[str, bytes | str]) -> dict[str, bytes | str]:
    """``fields`` with their signature added (unchanged when ``signer`` is ``None``)."""
    if signer is not None:
        fields[SIGNATURE_FIELD] = signer.sign(kind, run_id, attempt, fields_bytes(fields))
    return fields


def fields_verified(signer: Signer, kind: str, run_id: str, attempt: int,
                    raw: Mapping[bytes | str, bytes | str]) -> bool:
    """Whether ``raw`` (a stream entry as read back) carries a good signature of ``kind`` for
    ``run_id`` and ``attempt``."""
    signature = raw.get(SIGNATURE_FIELD.encode(), raw.get(SIGNATURE_FIELD))
    if isinstance(signature, bytes):
        signature = signature.decode("ascii", "replace")
    return signer.verify(kind, run_id, attempt, fields_bytes(raw), signature)
