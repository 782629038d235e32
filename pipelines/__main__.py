"""``python -m pipelines``: the ``imstream`` command, for child processes started by ``up``."""

from pipelines.cli import main

main()
