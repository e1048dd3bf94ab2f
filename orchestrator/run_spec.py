"""The run spec: all a coordinator needs of each task to drive (or resume) a run.

Written once at submit, as the ``spec`` field of ``orch:run:{id}`` (see
:mod:`shared.keys`), and read back by a resuming coordinator and by ``orch
status``. One JSON object, format 2::

    {"format": 2,
     "names":    ["extract", "transform", "load"],   task i is names[i]
     "deps":     [0, 1],                             every task's dependencies, as task numbers,
     "ndeps":    [0, 1, 1],                            task i's being the next ndeps[i] of them
     "profiles": [["etl:extract", "default", null, 0, 0.0, 1.0], ...],
                 reference, queue, timeout, max_retries, retry_delay, retry_backoff
                 [, {"trigger_rule": ..., "retry_on": [...], "retry_jitter": ..., "max_retry_delay": ...}]
                 (the policy object only when one of its fields is not the default, with only those)
     "profile":  [0, 1, 2],                          task i's profile; left out if there is one
     "payloads": ["[[],{}]", ...],                   encoded [args, kwargs]
     "payload":  [0, 0, 0]}                          task i's payload; left out if there is one

The settings and arguments tasks share are stated once: a large DAG is mostly a
few functions with the same settings and no arguments, so the tables stay small
and a task costs its name and its dependencies (about 30 bytes of JSON at
100,000 tasks instead of about 200 in format 1, which spelled out every field
of every task). In memory the spec is the validated :class:`~orchestrator.dag.Graph`
plus two arrays of table indexes, not a dict per task.

Format 1 (a JSON list of one dict per task, written by orch before format 2)
is not read: loading such a run raises :class:`SpecError` saying so, which
:func:`orchestrator.run_store.load_tasks` turns into ``CorruptRunError``.
Anything else that does not fit the layout above (wrong types, numbers out of
range, a dependency cycle) raises too: the spec is input from Redis, not trusted.
"""
from __future__ import annotations

import json
from array import array
from itertools import islice, repeat
from operator import attrgetter, sub
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence

from orchestrator import dag
from orchestrator.mapping import child_name
from orchestrator.task import Task
from orchestrator.trigger_rules import TriggerRule
from shared import codec
from shared.errors import InvalidTaskError, MapError

FORMAT = 2
NO_ARGUMENTS = "[[],{}]"
"""The payload of a task without arguments (what :func:`codec.encode` makes of ``[[], {}]``)."""


def encode_payload(args: Sequence[Any], kwargs: Mapping[str, Any], what: str) -> str:
    """A call's payload, what a job carries: ``[args, kwargs]`` encoded by :mod:`shared.codec`."""
    if not args and not kwargs:
        return NO_ARGUMENTS
    return codec.encode([list(args), dict(kwargs)], what).decode("utf-8")


def encode_arguments(task: Task) -> str:
    """A task's payload (:func:`encode_payload` of its arguments)."""
    return encode_payload(task.args, task.call_kwargs, f"arguments of task {task.name!r}")


def children_payloads(task: str, arguments: list[tuple[tuple, dict]], limit: int) -> list[str]:
    """Each child's encoded ``[args, kwargs]`` (what its job carries); :class:`MapError` naming the first
    child whose payload is over ``limit`` bytes (``ORCH_MAX_PAYLOAD_BYTES``), which no worker would read."""
    payloads = []
    for k, (args, kwargs) in enumerate(arguments):
        payload = encode_payload(args, kwargs, f"the arguments of {child_name(task, k)}")
        size = len(payload.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise MapError(f"child {child_name(task, k)!r} of task {task!r}: its arguments encode to {size:,} "
                           f"bytes, over the limit of {limit:,} bytes (ORCH_MAX_PAYLOAD_BYTES)")
        payloads.append(payload)
    return payloads


class SpecError(ValueError):
    """A stored spec that cannot be read (damaged, forged, or of another format)."""


class Policy(NamedTuple):
    """A task's trigger rule and retry policy, when not all default (stored names, not classes)."""

    trigger_rule: str = TriggerRule.ALL_SUCCESS.value
    retry_on: Optional[tuple[str, ...]] = None
    retry_jitter: float = 0.0
    max_retry_delay: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        default = Policy()
        return {k: (list(v) if k == "retry_on" else v) for k, v in self._asdict().items() if v != getattr(default, k)}


class Profile(NamedTuple):
    """The settings a group of tasks shares."""

    ref: str
    queue: str
    timeout: Optional[float]
    max_retries: int
    retry_delay: float
    retry_backoff: float
    policy: Optional[Policy] = None


_DEFAULT_POLICY = (TriggerRule.ALL_SUCCESS, None, 0.0, None)
_POLICY_FIELDS = attrgetter("trigger_rule", "retry_on", "retry_jitter", "max_retry_delay")


def _policy_of(task: Task) -> Optional[Policy]:
    rule, _, jitter, cap = fields = _POLICY_FIELDS(task)
    if fields == _DEFAULT_POLICY:
        return None
    return Policy(TriggerRule(rule).value, task.retry_on_refs, jitter, cap)


class RunSpec(Mapping[str, Mapping[str, Any]]):
    """One run's tasks as the coordinator keeps them: the graph, the shared tables, and
    per task an index into each.

    As a mapping, ``spec[name]`` gives a task's fields (``ref``, ``payload``,
    ``timeout``, ``queue``, the retry policy; not its dependencies), made on each
    lookup, and iterating it gives the names in task order. ``index`` maps a name
    to its task number, the one RQ job ids use.
    """

    def __init__(self, graph: dag.Graph, profiles: Sequence[Profile], profile_of: array,
                 payloads: Sequence[str], payload_of: array) -> None:
        self.graph = graph
        self.profiles = list(profiles)
        self.profile_of = profile_of
        self.payloads = list(payloads)
        self.payload_of = payload_of
        self.maps: dict[str, tuple[int, list[str]]] = {}
        """Mapped tasks expanded so far: task -> (number of its first child, the children's payloads)."""

    @classmethod
    def build(cls, tasks: Sequence[Task], graph: dag.Graph, refs: Sequence[str]) -> "RunSpec":
        """The spec of ``tasks`` (in ``graph``'s order), ``refs[i]`` being task i's reference.
        Raises :class:`~shared.errors.SerializationError` for arguments the codec cannot encode."""
        settings = map(attrgetter("queue", "timeout", "max_retries", "retry_delay", "retry_backoff"), tasks)
        if all(map(_DEFAULT_POLICY.__eq__, map(_POLICY_FIELDS, tasks))):
            policies: Iterator[Optional[Policy]] = repeat(None)  # the usual case: no per-task call
        else:
            policies = map(_policy_of, tasks)
        profile_code: dict[tuple, int] = {}
        profile_of = array("i", [profile_code.setdefault((ref, *rest, policy), len(profile_code))
                                 for ref, rest, policy in zip(refs, settings, policies)])
        if not any(map(attrgetter("args"), tasks)) and not any(map(attrgetter("call_kwargs"), tasks)):
            payloads, payload_of = [NO_ARGUMENTS], array("i", [0]) * len(tasks)  # the usual case, at C speed
        else:
            payload_code: dict[str, int] = {}
            payload_of = array("i", [payload_code.setdefault(payload, len(payload_code))
                                     for payload in map(encode_arguments, tasks)])
            payloads = list(payload_code)
        return cls(graph, [Profile(*key) for key in profile_code], profile_of, payloads, payload_of)

    # ------------------------------------------------------------ the mapping
    @property
    def index(self) -> dict[str, int]:
        return self.graph.index

    def __getitem__(self, name: str) -> dict[str, Any]:
        i = self.graph.index[name]
        p = self.profiles[self.profile_of[i]]
        return {"name": name, "ref": p.ref, "payload": self.payloads[self.payload_of[i]], "timeout": p.timeout,
                "queue": p.queue, "max_retries": p.max_retries, "retry_delay": p.retry_delay,
                "retry_backoff": p.retry_backoff, **(p.policy or Policy())._asdict()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.graph.names)

    def __len__(self) -> int:
        return len(self.graph.names)

    def add_children(self, task: str, first: int, payloads: Sequence[str]) -> list[str]:
        """Take in the children of mapped task ``task`` (numbered from ``first``, the next free number),
        one per payload, with ``task``'s settings; returns their names. ``spec[child]`` and ``index``
        know them from then on; the stored spec (the graph) does not change."""
        if first != len(self.profile_of) or task not in self.graph.index or task in self.maps:
            raise SpecError(f"children of {task!r} from number {first}: not the next expansion of a task of the run")
        n = len(payloads)
        self.profile_of.extend(array("i", [self.profile_of[self.graph.index[task]]]) * n)
        self.payload_of.extend(array("i", range(len(self.payloads), len(self.payloads) + n)))
        self.payloads.extend(payloads)
        names = [child_name(task, k) for k in range(n)]
        self.graph.index.update(zip(names, range(first, first + n)))
        self.maps[task] = (first, list(payloads))
        return names

    def map_record(self, task: str) -> str:
        """How the expansion of ``task`` is kept with the run (``keys.maps``)."""
        first, payloads = self.maps[task]
        return json.dumps({"first": first, "payloads": payloads}, separators=(",", ":"))

    # ------------------------------------------------------------ stored form
    def to_json(self) -> str:
        """The stored form. The number columns are written a slice at a time, never as a list of
        ints: at 100,000 tasks such lists are 10 MB of int objects, freed at once but left as
        scattered holes in the submitting coordinator's heap for the whole run."""
        graph = self.graph
        doc: dict[str, Any] = {
            "format": FORMAT,
            "names": graph.names,
            "profiles": [list(p[:6]) if p.policy is None else [*p[:6], p.policy.to_json()] for p in self.profiles],
            "payloads": self.payloads,
        }
        n = len(graph.names)  # without the children of mapped tasks, which are kept apart (keys.maps)
        columns = {"deps": graph.deps, "ndeps": array("i", map(sub, islice(graph.deps_start, 1, None),
                                                               graph.deps_start))}
        if len(self.profiles) > 1:
            columns["profile"] = self.profile_of[:n]
        if len(self.payloads) > 1:
            columns["payload"] = self.payload_of[:n]
        text = json.dumps(doc, separators=(",", ":"))
        return "".join([text[:-1], *(f',"{key}":[{_numbers_text(column)}]' for key, column in columns.items()), "}"])

    @classmethod
    def from_json(cls, text: str | bytes) -> "RunSpec":
        """Read a stored spec back. Raises :class:`SpecError`, or :class:`~shared.errors.CycleError`
        for a forged cycle."""
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise SpecError(f"not JSON: {exc}") from None
        if isinstance(doc, list):
            raise SpecError("it is in spec format 1 (one dict per task, from an older orch), "
                            "which this version does not read")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise SpecError(f"unknown spec format {doc.get('format') if isinstance(doc, dict) else doc!r:.40}")
        names = _strings(_field(doc, "names"), "names")
        n = len(names)
        index = dict(zip(names, range(n)))
        if len(index) != n:
            raise SpecError("a task name appears twice")
        counts = _numbers(_field(doc, "ndeps"), "ndeps", None)
        deps = _numbers(_field(doc, "deps"), "deps", n)
        if len(counts) != n or sum(counts) != len(deps):
            raise SpecError(f"{len(counts)} dependency counts adding up to {sum(counts)}, "
                            f"for {n} tasks and {len(deps)} dependencies")
        profiles = [_profile(k, row) for k, row in enumerate(_list(_field(doc, "profiles"), "profiles"))]
        payloads = _strings(_field(doc, "payloads"), "payloads")
        profile_of = _column(doc, "profile", n, len(profiles))
        payload_of = _column(doc, "payload", n, len(payloads))
        graph = dag.from_numbers(names, deps, counts, index)
        return cls(graph, profiles, profile_of, payloads, payload_of)

    def tasks(self) -> dict[str, Task]:
        """New :class:`Task` objects, pending, one per task (in task order). Raises
        :class:`SpecError` or ``WorkflowError`` for an argument payload that does not decode."""
        graph, names = self.graph, self.graph.names
        deps, start = graph.deps, graph.deps_start
        tasks: dict[str, Task] = {}
        for i, name in enumerate(names):
            p = self.profiles[self.profile_of[i]]
            args, kwargs = run_arguments(self.payloads[self.payload_of[i]])
            tasks[name] = Task(name, p.ref, [names[j] for j in deps[start[i]:start[i + 1]]], p.max_retries,
                               p.retry_delay, p.timeout, args=args, kwargs=kwargs, retry_backoff=p.retry_backoff,
                               queue=p.queue, **(p.policy or Policy())._asdict())
        return tasks


def _numbers_text(column: array, chunk: int = 4096) -> str:
    """``column``'s numbers, comma-separated (a JSON list's inside), made ``chunk`` numbers at a time."""
    return ",".join([",".join(map(str, column[k:k + chunk])) for k in range(0, len(column), chunk)])


# ------------------------------------------------------------------ checks
def _field(doc: dict, key: str) -> Any:
    if key not in doc:
        raise SpecError(f"no {key!r}")
    return doc[key]


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise SpecError(f"{what} is a {type(value).__name__}, not a list")
    return value


def _strings(value: Any, what: str) -> list[str]:
    if not set(map(type, _list(value, what))) <= {str}:
        raise SpecError(f"{what} holds something other than strings")
    return value


def _numbers(value: Any, what: str, bound: Optional[int]) -> list[int]:
    """``value``, a list of ints in ``0..bound-1`` (``0..`` without a bound)."""
    if not set(map(type, _list(value, what))) <= {int}:
        raise SpecError(f"{what} holds something other than integers")
    if value and (min(value) < 0 or (bound is not None and max(value) >= bound)):
        raise SpecError(f"{what} holds a number out of range 0..{'' if bound is None else bound - 1}")
    return value


def _column(doc: dict, key: str, n: int, size: int) -> array:
    """Each task's index into a table of ``size`` entries; without the column, entry 0 for all."""
    if key not in doc:
        if n and not size:
            raise SpecError(f"no {key}s for {n} tasks")
        return array("i", [0]) * n
    column = _numbers(doc[key], key, size)
    if len(column) != n:
        raise SpecError(f"{len(column)} entries in {key!r} for {n} tasks")
    return array("i", column)


def _profile(k: int, row: Any) -> Profile:
    """A stored profile, checked (and normalised) by the rules a :class:`Task` applies."""
    if not isinstance(row, list) or len(row) not in (6, 7):
        raise SpecError(f"profile {k} is not a list of 6 fields (7 with a policy)")
    ref, queue, timeout, max_retries, retry_delay, retry_backoff = row[:6]
    policy = row[6] if len(row) == 7 else {}
    if not isinstance(ref, str) or not isinstance(policy, dict) or not set(policy) <= set(Policy._fields):
        raise SpecError(f"profile {k}: the reference is not a string, or the policy not one")
    try:
        probe = Task("profile", ref, (), max_retries, retry_delay, timeout, retry_backoff=retry_backoff, queue=queue,
                     **policy)
    except (InvalidTaskError, TypeError) as exc:
        raise SpecError(f"profile {k}: {getattr(exc, 'reason', exc)}") from None
    return Profile(ref, probe.queue, probe.timeout, probe.max_retries, probe.retry_delay, probe.retry_backoff,
                   _policy_of(probe))


def run_arguments(payload: str) -> tuple[tuple, dict]:
    """A stored payload back as ``(args, kwargs)``; :class:`SpecError` if it is not one."""
    if payload == NO_ARGUMENTS:
        return (), {}
    decoded = codec.decode(payload)
    if not (isinstance(decoded, list) and len(decoded) == 2 and isinstance(decoded[0], list)
            and isinstance(decoded[1], dict) and all(isinstance(key, str) for key in decoded[1])):
        raise SpecError(f"payload {payload:.60} is not [args, kwargs]")
    return tuple(decoded[0]), decoded[1]
