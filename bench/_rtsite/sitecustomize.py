"""Profiling only (``python -m bench.profile``, part ``trips``): count Redis round trips per process.

Put on ``PYTHONPATH`` with ``BENCH_RT_FILE`` set, this wraps redis-py's
``send_packed_command`` (one call per round trip: a pipeline is one) and, at
exit, appends ``{"pid", "ppid", "count"}`` to that file. Forked children that
end with ``os._exit`` (RQ work horses, multiprocessing) are counted too:
``os._exit`` is wrapped to write first. Never active in the benchmark itself.
"""
import json
import os

_FILE = os.environ.get("BENCH_RT_FILE")

if _FILE:
    import atexit

    _state = {"count": 0, "pid": os.getpid(), "written": False}

    def _write():
        if _state["written"] or _state["pid"] != os.getpid() and _state["count"] == 0:
            return
        _state["written"] = True
        try:
            with open(_FILE, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "count": _state["count"]}) + "\n")
        except OSError:
            pass

    def _after_fork():
        _state.update(count=0, pid=os.getpid(), written=False)

    os.register_at_fork(after_in_child=_after_fork)
    atexit.register(_write)
    _real_exit = os._exit

    def _exit(code):
        _write()
        _real_exit(code)

    os._exit = _exit

    try:
        from redis.connection import AbstractConnection

        _send = AbstractConnection.send_packed_command

        def _counted(self, command, check_health=True):
            _state["count"] += 1
            return _send(self, command, check_health)

        AbstractConnection.send_packed_command = _counted
    except Exception:  # redis not importable here: nothing to count
        pass
