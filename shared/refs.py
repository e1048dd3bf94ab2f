"""Task functions by import reference: ``"package.module:function"``.

Workers on other machines cannot receive a Python function, only its name; a
reference is that name. ``reference_of`` turns a callable into one (or says why
no worker could import it); ``import_reference`` turns one back on the worker.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Callable

from shared.errors import TaskImportError

_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_reference(text: str) -> bool:
    return bool(_REF.match(text))


def reference_of(func: Callable[..., Any]) -> str:
    """The import reference of ``func``; raises ``ValueError`` saying why a worker could not import it."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module or not qualname:
        raise ValueError(f"{func!r} has no module-level name; pass a module function or 'package.module:function'")
    if qualname == "<lambda>" or "<lambda>" in qualname:
        raise ValueError("its function is a lambda; workers can only import module-level functions")
    if "<locals>" in qualname:
        raise ValueError(f"its function {qualname} is defined inside another function (a closure); "
                         "move it to module level")
    if module == "__main__":
        raise ValueError(f"its function {qualname} is defined in __main__, which no worker can import; "
                         "move it into a module, or submit the file with 'orch submit FILE.py'")
    ref = f"{module}:{qualname}"
    try:
        found = import_reference(ref)
    except TaskImportError as exc:
        raise ValueError(exc.reason) from None
    if found is not func and getattr(found, "__wrapped__", None) is not func:
        raise ValueError(f"{ref} does not name this function (it was redefined or shadowed)")
    return ref


def import_reference(ref: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``; any failure is a :class:`TaskImportError` naming ``ref``."""
    if not is_reference(ref):
        raise TaskImportError(ref, "expected the form 'package.module:function'")
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # a module can fail to import with any exception
        raise TaskImportError(ref, f"{type(exc).__name__}: {exc}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskImportError(ref, f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise TaskImportError(ref, f"{attr_path} is a {type(obj).__name__}, not a callable")
    return obj
