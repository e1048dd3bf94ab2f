"""Run parameters: checked and encoded at submit, read by tasks as ``current_task().params``.

A run's parameters are a mapping of names to values the codec encodes
(:mod:`shared.codec`). They are stored once, in the run's hash (field
``params`` of ``orch:run:{id}``), never in the jobs: a fan-out of 100,000 tasks
does not carry them 100,000 times. A work process reads them the first time a
task of that run asks for them and keeps them (:class:`ParamsCache`), so a task
that never reads them costs nothing and the next ones cost no round trip.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Optional

from shared import codec, keys
from shared.errors import InvalidParamsError, SerializationError

PARAMS_FIELD = "params"
"""The field of the run's hash (``orch:run:{id}``) that holds its encoded parameters."""


def encode_params(params: Optional[Mapping[str, Any]]) -> Optional[bytes]:
    """The stored form of ``params`` (``None`` for none). Raises :class:`InvalidParamsError` for
    something that is not a mapping of string names, :class:`SerializationError` naming the
    parameter the codec cannot encode: called before anything of the run is written."""
    if params is None:
        return None
    if not isinstance(params, Mapping):
        raise InvalidParamsError(f"expected a mapping of names to values, not a {type(params).__name__}")
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise InvalidParamsError(f"a parameter name must be a non-empty string, not {name!r}")
        codec.encode(value, f"parameter {name!r}")
    return codec.encode(dict(params), "the run parameters")


def decode_params(blob: bytes | str) -> dict[str, Any]:
    """The parameters of a stored run; raises :class:`SerializationError` if they are damaged."""
    params = codec.decode(blob)
    if not isinstance(params, dict):
        raise SerializationError(f"run parameters are a {type(params).__name__}, not a mapping")
    return params


def round_trip(params: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``params`` as a task on a worker would see them (checked, then encoded and decoded), so the
    embedded backend gives tasks the same values and refuses the same parameters."""
    blob = encode_params(params)
    return {} if blob is None else decode_params(blob)


class ParamsCache:
    """The encoded parameters of the last ``size`` runs this process ran tasks of, each read from
    Redis once; every read decodes a fresh copy, so a task that changes its dict changes no other's."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._blobs: OrderedDict[str, Optional[bytes]] = OrderedDict()

    def get(self, connection: Any, run_id: str) -> dict[str, Any]:
        if run_id in self._blobs:
            self._blobs.move_to_end(run_id)
        else:
            self._blobs[run_id] = connection.hget(keys.run(run_id), PARAMS_FIELD)
            while len(self._blobs) > self.size:
                self._blobs.popitem(last=False)
        blob = self._blobs[run_id]
        return {} if not blob else decode_params(blob)
