"""Find the workflow that ``orch submit TARGET`` (and friends) name.

A TARGET is ``path/to/file.py[:attr]`` or ``package.module[:attr]``; ``attr``
(default ``workflow``, dotted paths allowed) is a :class:`Workflow`, a ``@flow``
(built with the run's parameters, ``orch submit --param``, its defaults filling in the
rest) or a callable that returns a Workflow: called with ``params=`` when it accepts a
``params`` argument, else with none.

A file is imported as a module named after its stem: ``pipelines/etl.py``
becomes module ``etl``, with ``pipelines/`` put first on ``sys.path`` and the
module registered in ``sys.modules`` as ``etl``. Its module-level functions
therefore have ``__module__ == "etl"``, which is the name their import
references (``"etl:extract"``) carry to remote workers: start those with
``orch worker --path pipelines`` so that they import the same file under the
same name. The same rule explains the two limits of file targets: a relative
import inside the file fails (it is not loaded as part of its package), and a
stem that is already the name of another imported module (``random.py``,
``json.py``, ``workflow.py``) is refused, since a worker would import that
other module instead.

A module target is imported with :func:`importlib.import_module`, with the
current directory on ``sys.path`` (as ``python -m`` has it), so that
``orch submit mypkg.flows`` works from the project root.

Every failure raises :class:`~shared.errors.TargetError` with one line that
names the target and says what to fix.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Optional

from orchestrator.flow import Flow
from orchestrator.workflow import Workflow
from shared.errors import TargetError, WorkflowError

DEFAULT_ATTRIBUTE = "workflow"

_ATTR = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_LOADED_MARK = "__orch_target_file__"
"""Set on modules this loader executed from a file, so loading the file again may replace them."""
_STAT_MARK = "__orch_target_stat__"
"""The (mtime, size) of a module's file when this loader last executed it: unchanged, it is reused."""


def _stat(path: Optional[Path]) -> Optional[tuple[int, int]]:
    try:
        info = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if info is None else (info.st_mtime_ns, info.st_size)


def _unchanged(module: ModuleType, path: Optional[Path]) -> bool:
    """Whether ``module``'s file is as it was when loaded (a module without a file: yes)."""
    if path is None:
        return True
    recorded = getattr(module, _STAT_MARK, None)
    return recorded is not None and recorded == _stat(path)


def load_workflow(target: str, params: Optional[Mapping[str, Any]] = None, reload: bool = False) -> Workflow:
    """The :class:`Workflow` that ``target`` names; see the module docstring for the forms.
    A factory that accepts ``params`` receives ``params`` (``{}`` when none are given).
    A file target is executed anew each time its file changed; with ``reload`` a module target
    imported before is reloaded when its file changed (a schedule picks up a changed workflow at its
    next tick). An unchanged file is not executed again.

    Raises :class:`TargetError` (one line, naming ``target``) if the file or
    module cannot be found or imported, the attribute does not exist, is not a
    Workflow, or is a callable that raises or returns something else.
    """
    source, attr = split_target(target)
    if _is_file_target(source):
        module = _load_file(Path(source), target)
    else:
        module = _import_module(source, target, reload)
    return _workflow_from(module, attr, target, dict(params or {}))


def split_target(target: str) -> tuple[str, str]:
    """``"flows.py:etl"`` -> ``("flows.py", "etl")``; the attribute defaults to ``workflow``.

    Only a last ``:`` followed by a (dotted) Python name splits, so a Windows
    drive letter (``C:\\flows\\etl.py``) stays part of the path.
    """
    if not isinstance(target, str) or not target.strip():
        raise TargetError("empty target: give a file (flows.py[:attr]) or a module (package.module[:attr])")
    source, sep, attr = target.rpartition(":")
    if sep and source and _ATTR.match(attr):
        return source, attr
    if target.endswith(":"):
        raise TargetError(f"target {target!r} has nothing after ':'; name the attribute, or leave out the ':'")
    return target, DEFAULT_ATTRIBUTE


def _is_file_target(source: str) -> bool:
    return source.endswith(".py") or "/" in source or os.sep in source


def _load_file(path: Path, target: str) -> ModuleType:
    if not path.is_file():
        what = "is a directory, not a .py file" if path.is_dir() else "not found"
        raise TargetError(f"cannot load {target!r}: file {str(path)!r} {what}")
    path = path.resolve()
    name = path.stem
    previous = sys.modules.get(name)
    if previous is not None and getattr(previous, _LOADED_MARK, None) == str(path) and _unchanged(previous, path):
        return previous  # loaded from this file, which has not changed since
    if previous is not None and not getattr(previous, _LOADED_MARK, None):
        if _file_of(previous) == path:
            return previous  # already imported normally from this very file
        raise TargetError(
            f"cannot load {target!r}: its module name {name!r} is already taken by "
            f"{_file_of(previous) or 'a built-in module'}; rename the file"
        )
    directory = str(path.parent)
    if not sys.path or sys.path[0] != directory:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {target!r}: {str(path)!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    setattr(module, _LOADED_MARK, str(path))
    setattr(module, _STAT_MARK, _stat(path))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        raise TargetError(f"cannot load {target!r}: error while importing {path.name}: "
                          f"{_describe(exc, path)}") from None
    return module


def _import_module(name: str, target: str, reload: bool = False) -> ModuleType:
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        previous = sys.modules.get(name)
        if reload and previous is not None and not _unchanged(previous, _file_of(previous)):
            module = importlib.reload(previous)
        else:
            module = importlib.import_module(name)
        if getattr(module, _STAT_MARK, None) is None and _file_of(module) is not None:
            setattr(module, _STAT_MARK, _stat(_file_of(module)))
        return module
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise TargetError(
                f"cannot load {target!r}: no module named {exc.name!r} "
                f"(for a file, give its path ending in .py; for a module, run from its project root)"
            ) from None
        raise TargetError(f"cannot load {target!r}: error while importing {name}: {_describe(exc)}") from None
    except (Exception, SystemExit) as exc:
        raise TargetError(f"cannot load {target!r}: error while importing {name}: {_describe(exc)}") from None


def _workflow_from(module: ModuleType, attr: str, target: str, params: dict[str, Any]) -> Workflow:
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"cannot load {target!r}: {module.__name__} has no attribute {attr!r}"
                              f"{_found_hint(module)}") from None
    if isinstance(obj, Workflow):
        return obj
    if isinstance(obj, Flow):
        try:
            return obj.build(**params)
        except WorkflowError as exc:
            raise TargetError(f"cannot load {target!r}: {exc}") from None
        except (Exception, SystemExit) as exc:
            raise TargetError(f"cannot load {target!r}: building flow {obj.name!r} raised {_describe(exc)}") from None
    if not callable(obj):
        raise TargetError(f"cannot load {target!r}: {attr} is a {type(obj).__name__}, "
                          "not a Workflow or a function returning one")
    try:
        made = obj(params=params) if _takes_params(obj) else obj()
    except (Exception, SystemExit) as exc:
        raise TargetError(f"cannot load {target!r}: calling {attr}() raised {_describe(exc)}") from None
    if not isinstance(made, Workflow):
        raise TargetError(f"cannot load {target!r}: {attr}() returned a {type(made).__name__}, not a Workflow")
    return made


def _takes_params(factory: Any) -> bool:
    """Whether ``factory`` accepts a ``params`` keyword argument (by name, or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == "params" and p.kind is not p.POSITIONAL_ONLY
                                           and p.kind is not p.VAR_POSITIONAL) for p in parameters)


def _found_hint(module: ModuleType) -> str:
    names = [name for name, value in vars(module).items() if isinstance(value, Workflow)]
    if not names:
        return " (and it defines no Workflow at module level)"
    return f"; Workflow objects it defines: {', '.join(sorted(names))} (use TARGET:NAME)"


def _file_of(module: ModuleType) -> Optional[Path]:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


def _describe(exc: BaseException, path: Optional[Path] = None) -> str:
    """``"ValueError: bad config (line 12)"``: type, first line of the message, and where in ``path``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if path is not None and not isinstance(exc, SyntaxError):  # a SyntaxError's message has its line
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
        if frames:
            text += f" (line {frames[-1].lineno})"
    return text
