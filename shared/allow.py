"""Which task functions a worker may import: checked before anything is imported.

Whoever can write to Redis can put a job on a queue. The job names a function
by reference (``"package.module:function"``); importing and calling it is what
a worker does. So a worker decides, from its own settings only (never from
Redis), which references it will import at all:

- with an allowlist (``orch worker --allow etl --allow flows.nightly``, or
  ``ORCH_ALLOW=etl,flows.nightly``), a reference whose module is one of the
  prefixes or lies under one (``etl``, ``etl.load``; not ``etl2``) is allowed,
  and nothing else;
- without one, every standard-library and builtin module is refused (``os``,
  ``subprocess``, ``builtins``, ``pickle``, ... from ``sys.stdlib_module_names``)
  and so are the tools that run code on request (orch's own packages, RQ, pip,
  setuptools); any other module is imported, and the worker says so once at
  start.

The refusal is :class:`~shared.errors.TaskRefused`, reported as the attempt's
failure; the worker keeps serving.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from shared.errors import TaskRefused

ALWAYS_REFUSED_WITHOUT_ALLOWLIST = frozenset({
    "orchestrator", "worker", "shared", "workflow", "rq", "redis", "pip", "setuptools", "pkg_resources",
    "_pytest", "pytest", "IPython",
})
"""Third-party and orch packages refused along with the standard library when no allowlist is set."""
_PREFIX = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_REFUSED_TOP = frozenset(sys.stdlib_module_names) | {"builtins", "__main__", "__builtin__"} \
    | ALWAYS_REFUSED_WITHOUT_ALLOWLIST


def module_of(ref: str) -> str:
    """The module part of ``"pkg.mod:func"``; for RQ's dotted ``"pkg.mod.func"``, everything before the last dot."""
    if ":" in ref:
        return ref.partition(":")[0]
    return ref.rpartition(".")[0] or ref


@dataclass(frozen=True)
class Allowlist:
    """Module prefixes a worker may import task functions from (empty: the default rule)."""

    prefixes: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, given: Iterable[str] = (), environ: Optional[Mapping[str, str]] = None) -> "Allowlist":
        """From ``--allow`` values, else ``ORCH_ALLOW`` (comma-separated). A malformed prefix
        raises ``ValueError`` naming it."""
        environ = os.environ if environ is None else environ
        values = [v for item in given for v in item.split(",")]
        if not values:
            values = environ.get("ORCH_ALLOW", "").split(",")
        prefixes = tuple(dict.fromkeys(v.strip() for v in values if v.strip()))
        for prefix in prefixes:
            if not _PREFIX.match(prefix):
                raise ValueError(f"--allow {prefix!r} is not a module or package name (e.g. etl or flows.nightly)")
        return cls(prefixes)

    def allows(self, ref: str) -> bool:
        module = module_of(ref)
        if not self.prefixes:
            return bool(module) and module.split(".")[0] not in _REFUSED_TOP
        return any(module == p or module.startswith(p + ".") for p in self.prefixes)

    def check(self, ref: str, worker: str) -> None:
        """Raise :class:`TaskRefused` unless ``ref`` may be imported on ``worker``. Imports nothing."""
        if self.allows(ref):
            return
        if self.prefixes:
            raise TaskRefused(ref, worker, f"allowed: {', '.join(self.prefixes)}")
        raise TaskRefused(ref, worker, "standard-library, builtin and orch's own modules are refused; "
                                       "start the worker with --allow to choose what runs")

    def startup_warning(self) -> Optional[str]:
        """What the worker says once at start when it has no allowlist."""
        if self.prefixes:
            return None
        return ("no --allow given: this worker imports any task module it is sent except the standard "
                "library's and orch's own; give --allow PREFIX (or ORCH_ALLOW) to allow only your own code")

    def describe(self) -> str:
        return ", ".join(self.prefixes) if self.prefixes else "any module outside the standard library"


@functools.cache
def worker_allowlist() -> Allowlist:
    """This process's allowlist, from ``ORCH_ALLOW`` (``orch worker --allow`` sets it before any
    work process or work horse starts, so they all read the same one). Read once."""
    return Allowlist.from_settings()


def refused(refs: Iterable[tuple[str, str]], allowlist: Allowlist) -> list[tuple[str, str]]:
    """The ``(task, reference)`` pairs ``allowlist`` refuses (the submit-side check)."""
    return [(task, ref) for task, ref in refs if not allowlist.allows(ref)]
