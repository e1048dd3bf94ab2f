"""The result codec (shared.codec) and the worker's outcome message (shared.messages)."""
from __future__ import annotations

import datetime as dt
import decimal
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import codec
from shared.errors import SerializationError, WorkflowError
from shared.messages import FAILED, STARTED, SUCCEEDED, Outcome
from shared.states import FailureKind

# ------------------------------------------------------------------ strategies

timezones = st.one_of(
    st.none(),
    st.just(dt.timezone.utc),
    st.builds(dt.timezone, st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23))),
)
hashable_scalars = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=10),
    st.binary(max_size=10),
    st.dates(),
)
hashables = st.recursive(
    hashable_scalars,
    lambda inner: st.one_of(st.tuples(inner, inner), st.frozensets(inner, max_size=3)),
    max_leaves=6,
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(max_size=50),
    st.datetimes(timezones=timezones),
    st.dates(),
    st.decimals(allow_nan=False),
)


def containers(inner):
    return st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=8), inner, max_size=5),
        st.tuples(inner, inner),
        st.lists(inner, max_size=4).map(tuple),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
        st.dictionaries(hashables, inner, max_size=4),  # non-string keys
        st.fixed_dictionaries({codec.TAG: inner}, optional={"v": inner}),  # looks like a tagged value
    )


values = st.recursive(scalars, containers, max_leaves=15)


def same(a, b) -> bool:
    """Equal and of the same types all the way down (1 == 1.0 == True and (1,) != [1] are not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a) and all(
            same(k1, k2) for k1, k2 in zip(a, b)
        )
    if isinstance(a, (set, frozenset)):
        members_of_b = {y: y for y in b}
        return a == b and all(same(x, members_of_b[x]) for x in a)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dt.datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    return a == b


# ------------------------------------------------------------------ round trips


@settings(max_examples=200, deadline=None)
@given(values)
def test_round_trip(value):
    data = codec.encode(value)
    assert isinstance(data, bytes)
    json.loads(data)  # plain JSON on the wire
    back = codec.decode(data)
    assert same(back, value), (value, back)
    assert same(codec.decode(data.decode("utf-8")), value)  # str input too


@pytest.mark.parametrize(
    "value",
    [
        None, True, False, 0, -1, 2**100, 1.5, -0.0, math.inf, -math.inf, "", "ünïcødé ☃", "\x00",
        [], {}, (), set(), frozenset(), b"", b"\x00\xff" * 10,
        (1, [2, (3,)]), {"a": {"b": [1, {"c": (2,)}]}},
        {1: "int key", (1, 2): "tuple key", None: "none key", "s": "str key"},
        {codec.TAG: "tuple", "v": [1, 2]},  # a user dict that looks like a tagged value
        {codec.TAG: "x"},
        dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
        dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        dt.date(1, 1, 1),
        decimal.Decimal("3.14159265358979323846264338327950288"),
        decimal.Decimal("-1E+999"),
        {frozenset({1, 2}), (1, "a")},
    ],
    ids=repr,
)
def test_round_trip_examples(value):
    assert same(codec.decode(codec.encode(value)), value)


def test_nan_round_trips():
    assert math.isnan(codec.decode(codec.encode(math.nan)))
    assert codec.decode(codec.encode(decimal.Decimal("NaN"))).is_nan()


def test_bytearray_decodes_as_bytes():
    assert codec.decode(codec.encode(bytearray(b"abc"))) == b"abc"
    assert type(codec.decode(codec.encode(bytearray(b"abc")))) is bytes


# ------------------------------------------------------------- unsupported values


class Custom:
    pass


@pytest.mark.parametrize(
    "value, path, type_name",
    [
        (object(), "result", "builtins.object"),
        ({"a": [1, object()]}, "result['a'][1]", "builtins.object"),
        ([0, (1, 2, Custom())], "result[1][2]", "Custom"),
        ({"when": {1: lambda: 0}}, "result['when'][1]", "function"),
        ({Custom()}, "result.item", "Custom"),
        ({Custom(): 1}, "result.key", "Custom"),
        ({"k": [1, 2, 3j]}, "result['k'][2]", "complex"),
        ((x for x in ()), "result", "generator"),
    ],
    ids=["object", "nested-dict-list", "tuple", "function", "set-item", "dict-key", "complex", "generator"],
)
def test_unsupported_value_names_its_path_and_type(value, path, type_name):
    with pytest.raises(SerializationError) as info:
        codec.encode(value, "result")
    message = str(info.value)
    assert message.startswith(path + " is a "), message
    assert type_name in message
    assert "cannot serialize" in message
    assert isinstance(info.value, WorkflowError) and isinstance(info.value, TypeError)


def test_default_name_of_the_value():
    with pytest.raises(SerializationError, match=r"^value\[0\] is a builtins.object"):
        codec.encode([object()])


def test_self_reference_is_a_serialization_error():
    loop: list = [1]
    loop.append(loop)
    with pytest.raises(SerializationError, match="nested too deeply"):
        codec.encode(loop, "result of task 't'")
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(SerializationError):
        codec.encode(deep)


def test_int_too_long_for_json_is_a_serialization_error():
    # Python refuses int -> str past sys.get_int_max_str_digits() (4300 by default) with a ValueError
    with pytest.raises(SerializationError) as info:
        codec.encode({"n": [10**5000]}, "result")
    assert "result['n'][0]" in str(info.value)
    assert codec.decode(codec.encode(10**4000)) == 10**4000


# ------------------------------------------------------------------------ garbage


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"{",
        "[1, 2",
        b'{"__orch__": "tuple"}',  # no "v"
        b'{"__orch__": "nope", "v": 1}',  # unknown tag
        b'{"__orch__": ["list"], "v": 1}',  # unhashable tag
        b'{"__orch__": "bytes", "v": "not base64!"}',
        b'{"__orch__": "bytes", "v": 5}',
        b'{"__orch__": "datetime", "v": "yesterday"}',
        b'{"__orch__": "date", "v": null}',
        b'{"__orch__": "decimal", "v": "one"}',
        b'{"__orch__": "decimal", "v": [1]}',
        b'{"__orch__": "set", "v": [[1]]}',  # unhashable member
        b'{"__orch__": "dict", "v": [[[1], 2]]}',  # unhashable key
        b'{"__orch__": "dict", "v": [1, 2]}',
        b'{"__orch__": "tuple", "v": 3}',
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the recursion limit
        b'{"__orch__": "tuple", "v": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b"1" * 5000,  # an int longer than int->str conversion allows
    ],
    ids=lambda d: repr(d[:40]),
)
def test_garbage_raises_serialization_error(data):
    with pytest.raises(SerializationError):
        codec.decode(data)


@settings(max_examples=250, deadline=None)
@given(st.binary(max_size=200))
def test_decode_of_random_bytes_raises_only_serialization_error(data):
    try:
        codec.decode(data)
    except SerializationError:
        pass


json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
    st.sampled_from(["tuple", "set", "frozenset", "bytes", "datetime", "date", "decimal", "dict", "AAAA",
                     "2020-01-01"]),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=5), inner, max_size=3),
        st.fixed_dictionaries({codec.TAG: inner, "v": inner}),  # tagged, with anything in it
        st.fixed_dictionaries({codec.TAG: inner}),
    ),
    max_leaves=20,
)


@settings(max_examples=250, deadline=None)
@given(json_values)
def test_decode_of_random_json_raises_only_serialization_error(raw):
    data = json.dumps(raw).encode()
    try:
        codec.decode(data)
    except SerializationError:
        pass


@settings(max_examples=100, deadline=None)
@given(values, st.data())
def test_decode_of_mangled_encodings_raises_only_serialization_error(value, data):
    blob = bytearray(codec.encode(value))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "dup"]))
        if op == "flip":
            blob[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del blob[i:]
            if not blob:
                break
        else:
            blob[i:i] = blob[i:i + 5]
    try:
        codec.decode(bytes(blob))
    except SerializationError:
        pass


# ------------------------------------------------------------------------ Outcome

kinds = st.sampled_from(list(FailureKind))
optional_text = st.none() | st.text(max_size=30)
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def outcomes(draw):
    status = draw(st.sampled_from([STARTED, SUCCEEDED, FAILED]))
    return Outcome(
        run_id=draw(st.text(min_size=1, max_size=20)),
        task=draw(st.text(min_size=1, max_size=20)),
        attempt=draw(st.integers(1, 10**6)),
        status=status,
        at=draw(finite),
        result=draw(st.none() | st.binary(max_size=40)) if status == SUCCEEDED else None,
        error=draw(optional_text),
        kind=draw(kinds) if status == FAILED else FailureKind.ERROR,
        traceback=draw(optional_text),
        worker=draw(optional_text),
        started_at=draw(st.none() | finite),
        types=draw(optional_text),
    )


def as_redis(fields: dict) -> dict[bytes, bytes]:
    """What redis-py returns for a stream entry: bytes keys and values."""
    return {k.encode(): (v if isinstance(v, bytes) else v.encode("utf-8")) for k, v in fields.items()}


@settings(max_examples=150, deadline=None)
@given(outcomes())
def test_outcome_round_trip(outcome):
    fields = outcome.to_fields()
    assert all(isinstance(k, str) for k in fields)
    assert all(isinstance(v, (str, bytes)) for v in fields.values())
    assert Outcome.from_fields(fields) == outcome
    assert Outcome.from_fields(as_redis(fields)) == outcome


def test_outcome_fields_example():
    o = Outcome("run-1", "t", 2, FAILED, 12.5, error="ValueError: bad row 7", kind=FailureKind.TIMEOUT,
                traceback="Traceback ...", started_at=10.25)
    fields = o.to_fields()
    assert fields == {
        "run": "run-1", "task": "t", "attempt": "2", "status": "failed", "at": "12.5",
        "error": "ValueError: bad row 7", "kind": "timeout", "traceback": "Traceback ...", "started_at": "10.25",
    }
    back = Outcome.from_fields(as_redis(fields))
    assert back == o and back.kind is FailureKind.TIMEOUT
    ok = Outcome("run-1", "t", 1, SUCCEEDED, 1.0, result=codec.encode({"x": (1, 2)}))
    assert "kind" not in ok.to_fields()
    assert codec.decode(Outcome.from_fields(as_redis(ok.to_fields())).result) == {"x": (1, 2)}


GOOD = {"run": "r", "task": "t", "attempt": "1", "status": "succeeded", "at": "1.0"}


@pytest.mark.parametrize(
    "change",
    [
        {"status": None},
        {"status": "exploded"},
        {"attempt": None},
        {"attempt": "0"},
        {"attempt": "-3"},
        {"attempt": "one"},
        {"attempt": "1.5"},
        {"at": None},
        {"at": "noon"},
        {"task": None},
        {"task": ""},
        {"run": None},
        {"kind": "meltdown", "status": "failed"},
        {"started_at": "later"},
        {b"\xff\xfe": "x"},
    ],
    ids=repr,
)
def test_from_fields_rejects_malformed(change):
    raw: dict = dict(GOOD)
    for k, v in change.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    with pytest.raises(SerializationError, match="malformed outcome message"):
        Outcome.from_fields(raw)


def test_from_fields_rejects_non_mappings():
    for raw in (None, [("run", "r")], "run=r", 5):
        with pytest.raises(SerializationError):
            Outcome.from_fields(raw)  # type: ignore[arg-type]


field_names = st.sampled_from(["run", "task", "attempt", "status", "at", "result", "error", "kind",
                               "traceback", "worker", "started_at", "log"])
field_values = st.one_of(
    st.text(max_size=12),
    st.binary(max_size=12),
    st.sampled_from(["1", "0", "-1", "succeeded", "failed", "started", "timeout", "nan", "inf", "1e400", "1" * 5000]),
)
keys = st.one_of(field_names, field_names.map(str.encode), st.text(max_size=5), st.binary(max_size=5))


@settings(max_examples=250, deadline=None)
@given(st.dictionaries(keys, field_values, max_size=14))
def test_from_fields_fuzz_raises_only_serialization_error(raw):
    try:
        outcome = Outcome.from_fields(raw)
    except SerializationError:
        return
    assert outcome.status in (STARTED, SUCCEEDED, FAILED)
    assert outcome.attempt >= 1 and outcome.task and outcome.run_id
    assert isinstance(outcome.kind, FailureKind)
    assert outcome.result is None or isinstance(outcome.result, bytes)


@settings(max_examples=150, deadline=None)
@given(outcomes(), st.data())
def test_from_fields_fuzz_mutated_real_messages(outcome, data):
    raw = as_redis(outcome.to_fields())
    key = data.draw(st.sampled_from(sorted(raw)))
    action = data.draw(st.sampled_from(["drop", "replace"]))
    if action == "drop":
        del raw[key]
    else:
        raw[key] = data.draw(st.binary(max_size=10))
    try:
        Outcome.from_fields(raw)
    except SerializationError:
        pass
