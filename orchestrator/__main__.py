"""``python -m orchestrator``: the ``orch`` command line."""
from orchestrator.cli import main

main()
