"""Paths, cached JSON files and small helpers shared by the MergeBench stages."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "benchmarks" / "cache"
RESULTS = REPO / "benchmarks" / "results"
PACKAGE_DATA = REPO / "mergeprobe" / "data"


def cache_root(quick: bool) -> Path:
    """``benchmarks/cache/mergebench`` (or ``mergebench-quick``): everything the stages produce."""
    return CACHE / ("mergebench-quick" if quick else "mergebench")


def part_dir(quick: bool, part: str) -> Path:
    """The cache folder of one part (``smollm2`` or ``tiny``)."""
    path = cache_root(quick) / part
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_json(path: Path) -> Any:
    """The JSON value in ``path``, or ``None`` when it does not exist or is unreadable (a killed write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` atomically (temp file + rename), so a killed run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(finite(value), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def finite(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@contextmanager
def timed(log: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to ``log[name]`` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        log[name] = log.get(name, 0.0) + time.perf_counter() - start


def set_threads(threads: int = 1) -> None:
    """Use ``threads`` CPU threads in torch (the benchmark machine has 2 cores shared with other jobs)."""
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
