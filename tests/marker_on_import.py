"""A task module that leaves a mark when it is imported: proof that a refused job imported nothing.

Importing it creates the file named by ``ORCH_TEST_IMPORT_MARKER`` (if set).
"""
import os

_marker = os.environ.get("ORCH_TEST_IMPORT_MARKER")
if _marker:
    with open(_marker, "w") as handle:
        handle.write(f"imported by pid {os.getpid()}\n")


def run(value):
    return value
