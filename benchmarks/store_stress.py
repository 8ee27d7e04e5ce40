"""Stress test of the probe store: many writer processes and polling readers on one store at once.

Each writer process, on the shared store, repeatedly

- writes its own records (``write_record``, tensors of ``--tensor-kb`` KiB) and sets their
  status (``update_status``);
- overwrites one record, ``shared``, that every writer replaces (``overwrite=True``), so
  readers race its directory swap all the time;
- records outcomes (``record_outcome``);
- claims the merge of ``--sets`` merge sets that every writer contends for
  (``claim_merge``), and the winner marks the set merged (``mark_merged``).

Reader processes poll ``runs()``, ``load()``, ``outcomes()`` and ``merges()`` while the
writers run and check every record they see: its metadata carries the SHA-256 of its
tensors, so a reader that ever sees the metadata of one write with the tensors of
another (or a truncated file) reports it. Every warning a reader gets is counted too.

At the end the store is checked against what the writers report: every record, outcome
and merge is there and intact, each set was won by exactly one writer, and no temporary
entry is left behind. A global ``--timeout`` bounds the whole run: a writer or reader
still running then counts as a deadlock; each gets ``SIGUSR1`` (its stack is dumped to
stderr by ``faulthandler``) and is killed, and the run fails.

Figures (records written, outcomes, claims, time, throughput, write latencies, reader
polls, errors, warnings) are printed and written as JSON to ``--out``. The exit status
is 0 only when every check passed.

Usage::

    python benchmarks/store_stress.py                          # 8 writers, 2 readers
    python benchmarks/store_stress.py --writers 16 --records 50
    python benchmarks/store_stress.py --writers 8 --records 3 --outcomes 2 --sets 2 --out /tmp/s.json   # quick

Workers are forked from a ``forkserver`` that has imported torch and mergeprobe once,
so starting them is cheap; each runs single-threaded.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import filelock
import torch

from mergeprobe.store import ProbeStore, merge_set_id

SHARED = "shared"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "store_stress.json"
MAX_LISTED = 20  # problems / warnings kept verbatim in the report


# --------------------------------------------------------------------------- helpers


def make_tensors(seed: int, kib: int) -> dict[str, torch.Tensor]:
    """Deterministic tensors of about ``kib`` KiB in all (float32, plus one float64 and one int64)."""
    generator = torch.Generator().manual_seed(seed)
    side = max(4, int((kib * 1024 / 4 / 2) ** 0.5))
    return {
        "sketch.q_proj": torch.randn(side, side, generator=generator),
        "update.q_proj.B": torch.randn(side, side, generator=generator),
        "disturbance": torch.randn(8, generator=generator, dtype=torch.float64),
        "probe_input_ids": torch.randint(0, 1000, (4, 16), generator=generator),
    }


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def set_ids(count: int) -> list[str]:
    """The merge sets every writer contends for."""
    return [merge_set_id([f"set{k}-a", f"set{k}-b"]) for k in range(count)]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _timed(latencies: dict[str, list[float]], op: str, func: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    try:
        return func(*args, **kwargs)
    finally:
        latencies.setdefault(op, []).append(time.perf_counter() - start)


def _worker_setup() -> None:
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)


# --------------------------------------------------------------------------- writers


def writer_main(index: int, root: str, workdir: str, options: dict[str, Any], barrier: Any) -> None:
    """One writer process: records, status updates, shared overwrites, outcomes and merge claims."""
    _worker_setup()
    report: dict[str, Any] = {"writer": index, "pid": os.getpid(), "records": {}, "outcomes": {}, "won": [], "lost": [], "errors": []}
    latencies: dict[str, list[float]] = {}
    rng = random.Random(index)
    store = ProbeStore(root, lock_timeout=options["lock_timeout"])
    sets = set_ids(options["sets"])
    claim_at = {k * options["records"] // max(1, len(sets)): set_id for k, set_id in enumerate(sets)}
    barrier.wait(timeout=options["timeout"])
    start = time.perf_counter()
    for j in range(options["records"]):
        name = f"w{index}-r{j}"
        try:
            tensors = make_tensors(index * 100_000 + j, options["tensor_kb"])
            digest = tensor_digest(tensors)
            meta = {"run_id": name, "base_model": "stress", "extra": {"digest": digest, "writer": index, "j": j}}
            _timed(latencies, "write_record", store.write_record, name, meta, tensors)
            _timed(latencies, "update_status", store.update_status, name, "complete", step=j)
            report["records"][name] = digest

            shared = make_tensors(10_000_000 + index * 100_000 + j, options["tensor_kb"])
            shared_meta = {"run_id": f"writer-{index}", "extra": {"digest": tensor_digest(shared), "writer": index, "j": j}}
            _timed(latencies, "overwrite_shared", store.write_record, SHARED, shared_meta, shared, overwrite=True)

            for k in range(options["outcomes"] * (j + 1) // options["records"] - options["outcomes"] * j // options["records"]):
                retention = {name: round(rng.random(), 6), SHARED: round(rng.random(), 6)}
                outcome_id = _timed(latencies, "record_outcome", store.record_outcome, [name, SHARED], "ties", retention, writer=index)
                report["outcomes"][outcome_id] = retention

            if j in claim_at:
                set_id = claim_at[j]
                if _timed(latencies, "claim_merge", store.claim_merge, set_id):
                    report["won"].append(set_id)
                    _timed(latencies, "mark_merged", store.mark_merged, set_id, {"writer": index, "pid": os.getpid()})
                else:
                    report["lost"].append(set_id)
        except Exception:  # noqa: BLE001 - every failure of a store operation is counted and reported
            report["errors"].append(traceback.format_exc(limit=4))
    report["seconds"] = time.perf_counter() - start
    report["latencies"] = latencies
    Path(workdir, f"writer-{index}.json").write_text(json.dumps(report))


# --------------------------------------------------------------------------- readers


def _check_record(record: Any) -> str | None:
    """A problem with a loaded record, or None."""
    expected = record.meta.get("extra", {}).get("digest")
    if expected is None:
        return f"record {record.run_name!r} has no digest in its metadata"
    if tensor_digest(record.tensors) != expected:
        return f"record {record.run_name!r}: tensors do not match the metadata of the same record (digest mismatch)"
    return None


def reader_main(index: int, root: str, workdir: str, options: dict[str, Any], barrier: Any, stop: Any) -> None:
    """One reader process: poll the store and verify everything it sees until told to stop."""
    _worker_setup()
    store = ProbeStore(root, create=False, lock_timeout=options["lock_timeout"])
    rng = random.Random(1000 + index)
    polls = loads = outcomes_seen = merges_seen = 0
    problems: list[str] = []
    warning_messages: list[str] = []
    barrier.wait(timeout=options["timeout"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while not stop.is_set():
            try:
                names = store.runs()
                sample = rng.sample(names, min(len(names), options["reader_sample"]))
                if SHARED in names and SHARED not in sample:
                    sample.append(SHARED)
                for name in sample:
                    problem = _check_record(store.load(name))
                    loads += 1
                    if problem:
                        problems.append(problem)
                for outcome in store.outcomes():
                    outcomes_seen += 1
                    if not isinstance(outcome.get("retention"), dict) or outcome.get("method") != "ties":
                        problems.append(f"outcome {outcome.get('id')!r} is malformed: {outcome!r}")
                for merge in store.merges():
                    merges_seen += 1
                    if merge["merged"] and not merge["claimed"]:
                        problems.append(f"merge {merge['set_id']!r} is marked merged but has no claim")
            except Exception as err:  # noqa: BLE001 - every exception a reader meets is a failure of the store
                problems.append(f"{type(err).__name__}: {err}")
            polls += 1
        warning_messages = [str(w.message) for w in caught]
    report = {
        "reader": index,
        "polls": polls,
        "loads_verified": loads,
        "outcomes_seen": outcomes_seen,
        "merges_seen": merges_seen,
        "problems": problems,
        "warnings": warning_messages,
    }
    Path(workdir, f"reader-{index}.json").write_text(json.dumps(report))


# --------------------------------------------------------------------------- final check


def verify_store(root: Path, writers: list[dict[str, Any]]) -> dict[str, Any]:
    """Check the final store against the writers' reports; returns counts and problems."""
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = ProbeStore(root, create=False)
        expected = {name: digest for report in writers for name, digest in report["records"].items()}
        listed = set(store.runs())
        missing = sorted(set(expected) - listed)
        if missing:
            problems.append(f"records lost: {missing[:MAX_LISTED]}")
        unexpected = sorted(listed - set(expected) - {SHARED})
        if unexpected:
            problems.append(f"unexpected records: {unexpected[:MAX_LISTED]}")
        for name, digest in expected.items():
            if name not in listed:
                continue
            record = store.load(name)
            if tensor_digest(record.tensors) != digest or record.meta["extra"]["digest"] != digest:
                problems.append(f"record {name!r} is not what its writer wrote")
            if record.status != "complete":
                problems.append(f"record {name!r} has status {record.status!r}, expected 'complete'")
        if writers and any(report["records"] for report in writers):
            shared = store.load(SHARED)
            problem = _check_record(shared)
            if problem:
                problems.append(problem)

        written_outcomes = {oid: retention for report in writers for oid, retention in report["outcomes"].items()}
        stored_outcomes = {o["id"]: o for o in store.outcomes()}
        lost = sorted(set(written_outcomes) - set(stored_outcomes))
        if lost:
            problems.append(f"outcomes lost: {lost[:MAX_LISTED]}")
        for oid, retention in written_outcomes.items():
            if oid in stored_outcomes and stored_outcomes[oid]["retention"] != retention:
                problems.append(f"outcome {oid} differs from what was written")
        if len(stored_outcomes) != len(written_outcomes):
            problems.append(f"{len(stored_outcomes)} outcomes stored, {len(written_outcomes)} written")

        merges = {m["set_id"]: m for m in store.merges()}
        winners: dict[str, list[dict[str, Any]]] = {}
        for report in writers:
            for set_id in report["won"]:
                winners.setdefault(set_id, []).append(report)
        contended = {set_id for report in writers for set_id in report["won"] + report["lost"]}
        for set_id in sorted(contended):
            won_by = winners.get(set_id, [])
            if len(won_by) != 1:
                problems.append(f"merge set {set_id} was won by {len(won_by)} writers, expected exactly 1")
                continue
            merge = merges.get(set_id)
            if merge is None or not merge["claimed"] or not merge["merged"]:
                problems.append(f"merge set {set_id}: claim or result missing ({merge!r})")
                continue
            if merge["claim"].get("pid") != won_by[0]["pid"] or merge["info"].get("writer") != won_by[0]["writer"]:
                problems.append(f"merge set {set_id}: CLAIM/result do not name the winning writer")

        leftovers = sorted(p.name for sub in ("runs", "outcomes") for p in (root / sub).iterdir() if p.name.startswith("."))
        if leftovers:
            problems.append(f"temporary entries left behind: {leftovers[:MAX_LISTED]}")
    final_warnings = [str(w.message) for w in caught]
    if final_warnings:
        problems.append(f"{len(final_warnings)} warnings while reading the final store: {final_warnings[:3]}")
    return {
        "records_expected": len(expected),
        "records_found": len(listed & set(expected)),
        "outcomes_expected": len(written_outcomes),
        "outcomes_found": len(set(written_outcomes) & set(stored_outcomes)),
        "merge_sets": len(contended),
        "merge_sets_with_one_winner": sum(1 for s in contended if len(winners.get(s, [])) == 1),
        "problems": problems,
    }


# --------------------------------------------------------------------------- driver


def run_stress(options: dict[str, Any], root: Path, workdir: Path) -> dict[str, Any]:
    """Run the writers and readers on ``root`` and return the figures (``passed`` says whether every check held)."""
    ProbeStore(root)  # created once, before anyone races to create it
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "torch", "mergeprobe.store", "safetensors.torch"])
    n_writers, n_readers = options["writers"], options["readers"]
    barrier = ctx.Barrier(n_writers + n_readers + 1)
    stop = ctx.Event()
    writers = [ctx.Process(target=writer_main, args=(i, str(root), str(workdir), options, barrier), name=f"writer-{i}") for i in range(n_writers)]
    readers = [ctx.Process(target=reader_main, args=(i, str(root), str(workdir), options, barrier, stop), name=f"reader-{i}") for i in range(n_readers)]
    started = time.perf_counter()
    for process in writers + readers:
        process.start()
    deadline = started + options["timeout"]
    try:
        barrier.wait(timeout=options["timeout"])
    except threading.BrokenBarrierError:  # some worker never started: counted below as stuck or failed
        pass
    t0 = time.perf_counter()
    for process in writers:
        process.join(timeout=max(0.0, deadline - time.perf_counter()))
    writers_seconds = time.perf_counter() - t0
    stop.set()
    for process in readers:
        process.join(timeout=max(5.0, deadline - time.perf_counter()))
    stuck = [p for p in writers + readers if p.is_alive()]
    for process in stuck:
        os.kill(process.pid, signal.SIGUSR1)  # faulthandler dumps its stacks to stderr
    if stuck:
        time.sleep(1.0)
    for process in stuck:
        process.kill()
        process.join(timeout=10)

    writer_reports = [json.loads(p.read_text()) for p in sorted(workdir.glob("writer-*.json"))]
    reader_reports = [json.loads(p.read_text()) for p in sorted(workdir.glob("reader-*.json"))]
    final = verify_store(root, writer_reports)

    latencies: dict[str, list[float]] = {}
    for report in writer_reports:
        for op, values in report["latencies"].items():
            latencies.setdefault(op, []).extend(values)
    writer_errors = [err for report in writer_reports for err in report["errors"]]
    reader_problems = [p for report in reader_reports for p in report["problems"]]
    reader_warnings = [w for report in reader_reports for w in report["warnings"]]
    exit_codes = {p.name: p.exitcode for p in writers + readers}
    records_written = sum(len(lat) for op, lat in latencies.items() if op in ("write_record", "overwrite_shared"))
    figures = {
        "writers": n_writers,
        "readers": n_readers,
        "records_written": records_written,
        "own_records": final["records_expected"],
        "shared_overwrites": len(latencies.get("overwrite_shared", [])),
        "status_updates": len(latencies.get("update_status", [])),
        "outcomes_recorded": len(latencies.get("record_outcome", [])),
        "merge_claims": len(latencies.get("claim_merge", [])),
        "merge_sets": final["merge_sets"],
        "merges_marked": len(latencies.get("mark_merged", [])),
        "tensor_kib_per_record": options["tensor_kb"],
        "seconds": round(writers_seconds, 3),
        "records_per_second": round(records_written / writers_seconds, 2) if writers_seconds > 0 else None,
        "latency_seconds": {
            op: {
                "count": len(values),
                "median": round(statistics.median(values), 4),
                "p95": round(_percentile(values, 0.95), 4),
                "max": round(max(values), 4),
            }
            for op, values in sorted(latencies.items())
        },
        "reader_polls": sum(r["polls"] for r in reader_reports),
        "reader_loads_verified": sum(r["loads_verified"] for r in reader_reports),
        "reader_outcomes_seen": sum(r["outcomes_seen"] for r in reader_reports),
        "reader_problems": len(reader_problems),
        "reader_warnings": len(reader_warnings),
        "writer_errors": len(writer_errors),
        "deadlock": bool(stuck),
        "stuck_processes": [p.name for p in stuck],
        "exit_codes": exit_codes,
        "records_found": final["records_found"],
        "outcomes_found": final["outcomes_found"],
        "merge_sets_with_one_winner": final["merge_sets_with_one_winner"],
        "final_check_problems": final["problems"],
        "examples": {
            "writer_errors": writer_errors[:MAX_LISTED],
            "reader_problems": reader_problems[:MAX_LISTED],
            "reader_warnings": reader_warnings[:MAX_LISTED],
        },
        "options": options,
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "host": socket.gethostname(),
            "torch": torch.__version__,
            "filelock": filelock.__version__,
            "store_filesystem": _filesystem(root),
        },
    }
    figures["passed"] = (
        not stuck
        and all(code == 0 for code in exit_codes.values())
        and not writer_errors
        and not reader_problems
        and not reader_warnings
        and not final["problems"]
        and len(writer_reports) == n_writers
        and len(reader_reports) == n_readers
    )
    return figures


def _filesystem(path: Path) -> str | None:
    """The file system type of ``path`` (from /proc/mounts), if it can be told."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    resolved = str(path.resolve())
    best = max((m for m in mounts if resolved == m[1] or resolved.startswith(m[1].rstrip("/") + "/")), key=lambda m: len(m[1]), default=None)
    return best[2] if best else None


def print_figures(figures: dict[str, Any]) -> None:
    print(f"store stress: {figures['writers']} writers, {figures['readers']} readers, {figures['tensor_kib_per_record']} KiB of tensors per record")
    print(f"  records written     {figures['records_written']} ({figures['own_records']} own records + {figures['shared_overwrites']} overwrites of '{SHARED}')")
    print(f"  status updates      {figures['status_updates']}")
    print(f"  outcomes recorded   {figures['outcomes_recorded']} (found afterwards: {figures['outcomes_found']})")
    print(f"  merge claims        {figures['merge_claims']} on {figures['merge_sets']} sets; sets with exactly one winner: {figures['merge_sets_with_one_winner']}")
    print(f"  time                {figures['seconds']} s for the writers ({figures['records_per_second']} records/s)")
    for op, stats in figures["latency_seconds"].items():
        print(f"    {op:<17} n={stats['count']:<5} median {stats['median']:.4f} s  p95 {stats['p95']:.4f} s  max {stats['max']:.4f} s")
    print(f"  reader polls        {figures['reader_polls']} ({figures['reader_loads_verified']} record loads verified)")
    print(f"  records found       {figures['records_found']} of {figures['own_records']}")
    print(f"  writer errors       {figures['writer_errors']}")
    print(f"  reader problems     {figures['reader_problems']}   reader warnings {figures['reader_warnings']}")
    print(f"  deadlock            {figures['deadlock']} {figures['stuck_processes'] or ''}")
    for problem in figures["final_check_problems"]:
        print(f"  final check: {problem}")
    for kind, examples in figures["examples"].items():
        for example in examples[:3]:
            print(f"  {kind}: {example.strip()[:300]}")
    print("PASSED" if figures["passed"] else "FAILED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--records", type=int, default=20, help="own records per writer (each also overwrites 'shared' once)")
    parser.add_argument("--outcomes", type=int, default=10, help="outcomes per writer")
    parser.add_argument("--sets", type=int, default=6, help="merge sets every writer contends for")
    parser.add_argument("--tensor-kb", type=int, default=64, help="KiB of tensors per record")
    parser.add_argument("--reader-sample", type=int, default=8, help="records a reader loads per poll (plus 'shared')")
    parser.add_argument("--timeout", type=float, default=600.0, help="global limit in seconds; still running then = deadlock")
    parser.add_argument("--lock-timeout", type=float, default=120.0, help="the store's lock timeout")
    parser.add_argument("--store", type=Path, default=None, help="store directory (default: a fresh temporary one, removed afterwards)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.writers < 1 or args.records < 1:
        parser.error("--writers and --records must be at least 1")
    options = {
        "writers": args.writers,
        "readers": args.readers,
        "records": args.records,
        "outcomes": args.outcomes,
        "sets": min(args.sets, args.records),
        "tensor_kb": args.tensor_kb,
        "reader_sample": args.reader_sample,
        "timeout": args.timeout,
        "lock_timeout": args.lock_timeout,
    }
    scratch = Path(tempfile.mkdtemp(prefix="store-stress-"))
    root = args.store if args.store is not None else scratch / "store"
    workdir = scratch / "reports"
    workdir.mkdir()
    try:
        figures = run_stress(options, root, workdir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_figures(figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {args.out}")
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
