"""The allow check, the HMAC signer and the signed wire formats on their own (the workers' use of them:
tests/test_security.py, tests/test_signing.py)."""
from __future__ import annotations

import sys

import pytest

from shared.allow import Allowlist, module_of
from shared.errors import TaskRefused
from shared.jobs import JobRefused, MalformedJob, check_job_args, job_message, job_signature, parse_job_message
from shared.messages import Outcome
from shared.signing import Signer, SigningKeyError, fields_bytes, fields_verified


@pytest.mark.parametrize("ref", ["os:system", "builtins:eval", "subprocess:run", "shutil:rmtree",
                                 "importlib:import_module", "pickle:loads", "ctypes:CDLL", "sys:exit",
                                 "os.path:join", "os.system", "worker.rq_job:run_task", "shared.refs:import_reference",
                                 "rq.job:Job", "pip:main", "__main__:f"])
def test_without_an_allowlist_the_standard_library_and_orch_itself_are_refused(ref: str) -> None:
    with pytest.raises(TaskRefused) as info:
        Allowlist().check(ref, "w1")
    assert str(info.value).startswith(f"{ref!r} is not allowed on worker w1 (")
    assert "--allow" in str(info.value)


def test_every_standard_library_module_is_refused_without_an_allowlist() -> None:
    refused = [name for name in sys.stdlib_module_names if Allowlist().allows(f"{name}:anything")]
    assert refused == []


@pytest.mark.parametrize("ref", ["etl:load", "dist_tasks:identity", "my_company.flows:run"])
def test_without_an_allowlist_other_modules_run(ref: str) -> None:
    Allowlist().check(ref, "w1")


def test_an_allowlist_allows_its_prefixes_and_the_modules_under_them_only() -> None:
    allow = Allowlist.from_settings(["etl", "flows.nightly"])
    for ok in ("etl:load", "etl.sub.mod:f", "flows.nightly:run", "flows.nightly.x:y"):
        allow.check(ok, "w1")
    for bad in ("etl2:load", "flows:run", "flows.daily:run", "os:system"):
        assert not allow.allows(bad), bad
    with pytest.raises(TaskRefused) as info:
        allow.check("os:system", "w1")
    assert str(info.value) == "'os:system' is not allowed on worker w1 (allowed: etl, flows.nightly)"


def test_the_allowlist_comes_from_the_command_line_else_the_environment() -> None:
    assert Allowlist.from_settings([], {"ORCH_ALLOW": "etl, flows.nightly,,"}).prefixes == ("etl", "flows.nightly")
    assert Allowlist.from_settings(["a", "b,c"], {"ORCH_ALLOW": "etl"}).prefixes == ("a", "b", "c")
    assert Allowlist.from_settings([], {}).prefixes == ()
    with pytest.raises(ValueError, match="'os;rm' is not a module or package name"):
        Allowlist.from_settings(["os;rm"])
    assert Allowlist().startup_warning() and "--allow" in Allowlist().startup_warning()
    assert Allowlist(("etl",)).startup_warning() is None


def test_module_of_reads_both_reference_forms() -> None:
    assert module_of("a.b:c") == "a.b"
    assert module_of("a.b.c") == "a.b"
    assert module_of("solo") == "solo"


def test_a_signature_binds_kind_run_attempt_and_bytes() -> None:
    signer = Signer([b"k1"])
    sig = signer.sign("job", "run-1", 1, b"payload")
    assert len(sig) == 64 and signer.verify("job", "run-1", 1, b"payload", sig)
    assert not signer.verify("job", "run-2", 1, b"payload", sig), "copied into another run"
    assert not signer.verify("job", "run-1", 2, b"payload", sig), "copied into another attempt"
    assert not signer.verify("outcome", "run-1", 1, b"payload", sig), "a job's signature is no outcome's"
    assert not signer.verify("job", "run-1", 1, b"payload!", sig)
    assert not signer.verify("job", "run-1", 1, b"payload", None)
    assert not signer.verify("job", "run-1", 1, b"payload", sig[:-1] + ("0" if sig[-1] != "0" else "1"))
    assert not Signer([b"other"]).verify("job", "run-1", 1, b"payload", sig)
    # run id and attempt are length-prefixed: no two (run, attempt) pairs share their bytes
    assert signer.sign("job", "run-1", 11, b"") != signer.sign("job", "run-11", 1, b"")


@pytest.mark.parametrize("key", [b"k", b"x" * 64, b"long" * 40])
def test_a_signature_is_the_standard_hmac_sha256(key: bytes) -> None:
    import hashlib
    import hmac

    expected = hmac.new(key, b"3:job5:run-12:" + b"data", hashlib.sha256).hexdigest()
    assert Signer([key]).sign("job", "run-1", 2, b"data") == expected


def test_rotation_signs_with_the_first_key_and_verifies_with_either(tmp_path) -> None:
    old, new = Signer([b"old"]), Signer.from_environment({"ORCH_SIGNING_KEY": "new,old"})
    assert new is not None
    assert new.verify("job", "r", 1, b"x", old.sign("job", "r", 1, b"x"))
    assert not old.verify("job", "r", 1, b"x", new.sign("job", "r", 1, b"x")), "signs with the new key"
    path = tmp_path / "keys"
    path.write_text("new\nold\n")
    from_file = Signer.from_environment({"ORCH_SIGNING_KEY_FILE": str(path)})
    assert from_file is not None and from_file.sign("job", "r", 1, b"x") == new.sign("job", "r", 1, b"x")
    assert Signer.from_environment({}) is None
    with pytest.raises(SigningKeyError, match="ORCH_SIGNING_KEY_FILE"):
        Signer.from_environment({"ORCH_SIGNING_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(SigningKeyError, match="at most two"):
        Signer.from_environment({"ORCH_SIGNING_KEY": "a,b,c"})


def test_fields_bytes_is_order_independent_and_leaves_the_signature_out() -> None:
    a = fields_bytes({"run": "r", "task": "t", "sig": "x"})
    assert a == fields_bytes({"task": "t", "run": b"r"})
    assert a != fields_bytes({"run": "r", "task": "t2"})
    assert fields_bytes({"ab": "c"}) != fields_bytes({"a": "bc"})


# ------------------------------------------------------------ signed jobs and outcomes on the wire

ARGS = ("run-1", "load", 1, "etl:load", "[[1],{}]", 2.5, 1024)


def test_a_signed_lean_entry_is_the_unsigned_one_with_its_signature_last() -> None:
    signer = Signer([b"k1"])
    plain, signed = job_message(*ARGS), job_message(*ARGS, signer=signer)
    assert signed.startswith(plain[:-1] + ',"') and signed == job_message(*ARGS, signer=signer), "deterministic"
    assert parse_job_message(signed.encode(), signer).args() == ARGS
    assert parse_job_message(signed.encode()).args() == ARGS, "a worker without a key reads it too"


@pytest.mark.parametrize("forge, reason", [
    (lambda signed, signer: job_message(*ARGS), "job is not signed"),
    (lambda signed, signer: signed.replace('"run-1"', '"run-2"', 1), "does not match"),
    (lambda signed, signer: signed.replace('"load",1,', '"load",2,', 1), "does not match"),
    (lambda signed, signer: signed.replace("etl:load", "os:system"), "does not match"),
    (lambda signed, signer: job_message(*ARGS, signer=Signer([b"other"])), "does not match"),
    (lambda signed, signer: signed.replace(",", ", "), "does not match"),
])
def test_a_lean_entry_altered_or_unsigned_is_refused_naming_its_attempt(forge, reason) -> None:
    signer = Signer([b"k1"])
    entry = forge(job_message(*ARGS, signer=signer), signer)
    with pytest.raises(JobRefused, match=reason) as info:
        parse_job_message(entry.encode(), signer)
    assert info.value.attempt_key is not None and info.value.attempt_key[1] == "load"


def test_an_oversized_entry_is_refused_unread() -> None:
    with pytest.raises(MalformedJob, match="over this worker's limit of 10 bytes") as info:
        parse_job_message(b"\x80not even json" * 10, max_bytes=10)
    assert info.value.attempt_key is None


def test_an_rq_job_signature_covers_its_arguments() -> None:
    signer = Signer([b"k1"])
    signature = job_signature(signer, ARGS)
    check_job_args(signer, ARGS, signature)
    check_job_args(None, ARGS, None)
    for altered in (("run-2", *ARGS[1:]), (*ARGS[:2], 2, *ARGS[3:]), (*ARGS[:3], "os:system", *ARGS[4:])):
        with pytest.raises(JobRefused, match="does not match"):
            check_job_args(signer, altered, signature)
    with pytest.raises(JobRefused, match="not signed"):
        check_job_args(signer, ARGS, None)


def test_an_outcome_signature_survives_the_round_trip_through_redis_bytes() -> None:
    signer = Signer([b"k1"])
    fields = Outcome(run_id="run-1", task="load", attempt=1, status="succeeded", at=1.5, result=b"[1]",
                     worker="w1").to_fields(signer)
    as_read = {k.encode(): (v if isinstance(v, bytes) else v.encode()) for k, v in fields.items()}
    assert fields_verified(signer, "outcome", "run-1", 1, as_read)
    assert not fields_verified(signer, "outcome", "run-1", 2, as_read)
    assert not fields_verified(signer, "outcome", "run-1", 1, {**as_read, b"result": b"[2]"})
    assert not fields_verified(signer, "outcome", "run-1", 1, {k: v for k, v in as_read.items() if k != b"sig"})
    assert "sig" not in Outcome(run_id="r", task="t", attempt=1, status="started", at=1.0).to_fields()
