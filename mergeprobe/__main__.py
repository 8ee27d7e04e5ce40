"""``python -m mergeprobe``: the same command line as the ``mergeprobe`` console script."""

from mergeprobe.cli import app

app()
