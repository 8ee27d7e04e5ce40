"""Resident-set-size readings shared by the benchmark scripts (imported as a sibling module)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def rss_now_mb() -> float | None:
    """Current resident set size (Linux ``/proc``), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024
