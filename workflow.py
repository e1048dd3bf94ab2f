"""The classic import: ``from workflow import Task, Workflow`` (re-exports of :mod:`orchestrator`)."""
from orchestrator import *  # noqa: F401,F403
from orchestrator import __all__  # noqa: F401
