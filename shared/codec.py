"""The codec for task arguments and results: JSON with a few tagged types.

Why JSON and not pickle: run state lives in Redis, where anything that can
write a key could otherwise make every worker and coordinator execute code
while unpickling. JSON decodes safely, is readable with ``redis-cli``, and is
what Airflow XCom and Prefect results default to.

Supported values: ``None``, ``bool``, ``int``, ``float``, ``str``, ``list``,
``dict``, and, through a ``{"__orch__": TAG, "v": ...}`` wrapper, ``tuple``,
``set``, ``frozenset``, ``bytes``, ``datetime``, ``date``, ``Decimal``,
dicts with non-string keys and :class:`~shared.upstream.Upstream` (an upstream task's
result, filled in when the attempt runs). Anything else raises :class:`SerializationError`
naming the type and where it sits in the value (``result[2]['when']``).
"""
from __future__ import annotations

import base64
import datetime as _dt
import decimal
import json
from typing import Any

from shared.errors import SerializationError
from shared.upstream import Mapped, Upstream

TAG = "__orch__"


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        value = int(value)
        if value.bit_length() > 4000:  # past sys.get_int_max_str_digits(), json.dumps raises ValueError
            try:
                str(value)
            except ValueError:
                raise SerializationError(f"{where} is an int with too many digits to serialize") from None
        return value
    if isinstance(value, float):
        return float(value)
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
        pairs = [[_encode(k, f"{where}.key"), _encode(v, f"{where}[{k!r}]")] for k, v in value.items()]
        return {TAG: "dict", "v": pairs}
    if isinstance(value, tuple):
        return {TAG: "tuple", "v": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, (set, frozenset)):
        tag = "frozenset" if isinstance(value, frozenset) else "set"
        return {TAG: tag, "v": [_encode(v, f"{where}.item") for v in value]}
    if isinstance(value, (bytes, bytearray)):
        return {TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, _dt.datetime):
        return {TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, _dt.date):
        return {TAG: "date", "v": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {TAG: "decimal", "v": str(value)}
    if isinstance(value, Upstream):
        return {TAG: "upstream", "v": value.task}
    if isinstance(value, Mapped):
        return {TAG: "mapped", "v": value.task}
    raise SerializationError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which the orch codec cannot "
        "serialize (use JSON types, tuple, set, bytes, datetime, date or Decimal)"
    )


_DECODERS = {
    "dict": lambda v: {_decode(k): _decode(x) for k, x in v},
    "tuple": lambda v: tuple(_decode(x) for x in v),
    "set": lambda v: {_decode(x) for x in v},
    "frozenset": lambda v: frozenset(_decode(x) for x in v),
    "bytes": lambda v: base64.b64decode(v.encode("ascii"), validate=True),
    "datetime": _dt.datetime.fromisoformat,
    "date": _dt.date.fromisoformat,
    "decimal": decimal.Decimal,
    "upstream": lambda v: Upstream(v) if isinstance(v, str) else _malformed("an upstream task name must be a string"),
    "mapped": lambda v: Mapped(v) if isinstance(v, str) else _malformed("a mapped task name must be a string"),
}


def _malformed(reason: str) -> Any:
    raise ValueError(reason)


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        tag = value.get(TAG)
        if tag is None:
            return {k: _decode(v) for k, v in value.items()}
        try:
            return _DECODERS[tag](value["v"])
        except Exception as exc:
            raise SerializationError(f"malformed tagged value {tag!r}: {exc}") from None
    return value


def encode(value: Any, what: str = "value") -> bytes:
    """Encode ``value`` to bytes; ``what`` names it in the error (e.g. ``"result of task 'x'"``)."""
    try:
        return json.dumps(_encode(value, what), separators=(",", ":"), allow_nan=True).encode("utf-8")
    except RecursionError:
        raise SerializationError(f"{what} is nested too deeply (or refers to itself)") from None


def decode(data: bytes | str) -> Any:
    """Decode bytes made by :func:`encode`; anything else raises :class:`SerializationError`."""
    try:
        raw = json.loads(data)
    except (ValueError, TypeError, RecursionError) as exc:
        raise SerializationError(f"cannot decode value: {exc}") from None
    try:
        return _decode(raw)
    except RecursionError:
        raise SerializationError("cannot decode value: nested too deeply") from None
