"""Reliability of the store, the merge output and the callback under load and faults.

- a bounded run of ``benchmarks/store_stress.py`` (8 writer processes, 2 readers);
- a reader listing the store during an overwrite sees the record, without a warning;
- ``kill -9`` of a writer at chosen points of a write and at random times: the store
  stays readable (``runs()`` warns and skips, never raises) and the next write goes on;
- ``kill -9`` of a merge writing its output: ``out_dir`` is absent or complete, never half;
- a full disk and a read-only store (simulated inside the training process, and real
  on a tiny tmpfs when this process may mount one): with ``on_store_error="warn"``
  training finishes without the probe;
- a training run killed after its probe window and resumed from a checkpoint stores
  the same record as an uninterrupted run.

The subprocess scripts import the helpers at the top of this module, so keep its
module-level imports light.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from mergeprobe.errors import StoreError
from mergeprobe.store import ProbeStore

REPO = Path(__file__).resolve().parents[1]
STRESS = REPO / "benchmarks" / "store_stress.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
VICTIM = "victim"


# ----------------------------------------------------------------- helpers (also used by the subprocesses)


def versioned_tensors(version: int, side: int = 64) -> dict[str, Any]:
    """Tensors that identify their version; ``side`` sets the size (side² float32 values twice)."""
    import torch

    generator = torch.Generator().manual_seed(version)
    return {
        "version": torch.tensor([float(version)]),
        "sketch.q_proj": torch.randn(side, side, generator=generator),
        "update.q_proj.B": torch.randn(side, side, generator=generator),
    }


def digest(tensors: dict[str, Any]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].contiguous().numpy().tobytes())
    return sha.hexdigest()


def versioned_meta(version: int, tensors: dict[str, Any], run_id: str = "run-victim") -> dict[str, Any]:
    return {"run_id": run_id, "base_model": "tiny", "extra": {"version": version, "digest": digest(tensors)}}


def check_intact(record: Any) -> int:
    """Assert the record's meta and tensors come from the same write; return its version."""
    assert digest(record.tensors) == record.extra["digest"], f"{record.run_name}: meta and tensors of different writes"
    assert record.tensors["version"].item() == record.extra["version"]
    return int(record.extra["version"])


def list_runs(store: ProbeStore) -> tuple[list[str], list[str]]:
    """``store.runs()`` (which must not raise) and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = store.runs()
    return names, [str(w.message) for w in caught]


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def run_python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)


def start_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def wait_for_line(process: subprocess.Popen, expected: str, timeout: float = 240) -> None:
    """Block until the subprocess prints ``expected`` (it prints it once its work is under way)."""
    result: list[str] = []

    def read() -> None:
        for line in process.stdout:
            if line.strip() == expected:
                result.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert result, f"the subprocess never printed {expected!r}: {process.poll()=} {process.stderr.read() if process.poll() is not None else ''}"


def kill9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


# ----------------------------------------------------------------- concurrency


def test_store_stress_bounded(tmp_path: Path) -> None:
    """8 writer processes and 2 polling readers on one store: nothing lost, nothing corrupt seen, no deadlock."""
    out = tmp_path / "stress.json"
    done = subprocess.run(
        [sys.executable, str(STRESS), "--writers", "8", "--readers", "2", "--records", "3", "--outcomes", "2", "--sets", "2",
         "--tensor-kb", "16", "--timeout", "300", "--store", str(tmp_path / "store"), "--out", str(out)],
        env=ENV, capture_output=True, text=True, timeout=400, check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["passed"] and not figures["deadlock"]
    assert figures["records_written"] == 8 * 3 * 2 and figures["records_found"] == 8 * 3
    assert figures["outcomes_recorded"] == figures["outcomes_found"] == 8 * 2
    assert figures["merge_claims"] == 8 * 2 and figures["merges_marked"] == figures["merge_sets_with_one_winner"] == 2
    assert figures["writer_errors"] == figures["reader_problems"] == figures["reader_warnings"] == 0
    assert figures["reader_polls"] > 0
    assert set(figures["exit_codes"].values()) == {0}


@pytest.mark.parametrize("listed", ["before_the_swap", "during_the_swap"])
def test_listing_during_an_overwrite_shows_the_record_without_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listed: str
) -> None:
    """``runs()`` racing the two renames of an overwrite lists the record, with no IncompleteRecordWarning.

    The writer here does what ``write_record`` does (run lock, then both renames under
    the store lock) and pauses between the renames. ``before_the_swap``: the reader
    lists ``runs/`` before the first rename and reads the record after it;
    ``during_the_swap``: the reader lists ``runs/`` between the renames. Before the fix
    the first skipped the record with a warning ("no such record", or "meta.json and
    signals.safetensors come from different writes", as the stress benchmark's readers
    saw) and the second silently left it out of the listing.
    """
    import filelock

    root = tmp_path / "store"
    runs = root / "runs"
    store = ProbeStore(root)
    first, second = versioned_tensors(1), versioned_tensors(2)
    store.write_record(VICTIM, versioned_meta(1, first), first)
    store.write_record("staging", versioned_meta(2, second), second)
    os.replace(runs / "staging", runs / f".{VICTIM}.tmp-0123abcd")  # a finished temp dir, as write_record leaves it
    locked, listing, renamed, reader_failed = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    if listed == "during_the_swap":
        listing.set()

    def overwrite() -> None:
        with filelock.FileLock(str(root / "locks" / f"_run.{VICTIM}.lock")), filelock.FileLock(str(root / "locks" / "_store.lock")):
            locked.set()
            listing.wait(timeout=60)
            os.replace(runs / VICTIM, runs / f".{VICTIM}.old-0123abcd")
            renamed.set()
            reader_failed.wait(timeout=60)
            os.replace(runs / f".{VICTIM}.tmp-0123abcd", runs / VICTIM)
            shutil.rmtree(runs / f".{VICTIM}.old-0123abcd")

    read_record = store._read_record

    def observed_read(folder: Path, *args: Any, **kwargs: Any) -> Any:
        if not listing.is_set():  # the listing is done: let the writer start its swap
            listing.set()
            assert renamed.wait(timeout=60)
        try:
            return read_record(folder, *args, **kwargs)
        except Exception:
            reader_failed.set()
            raise

    monkeypatch.setattr(store, "_read_record", observed_read)
    writer = threading.Thread(target=overwrite)
    writer.start()
    assert locked.wait(timeout=60)  # the writer holds its run lock, as write_record does before creating its temp dir
    if listed == "during_the_swap":
        assert renamed.wait(timeout=60)
    names, messages = list_runs(store)
    writer.join(timeout=60)
    assert reader_failed.is_set()  # the first read did fall into the swap
    assert names == [VICTIM] and messages == []
    assert check_intact(store.load(VICTIM)) == 2


# ----------------------------------------------------------------- kill -9 of a store writer

KILL_AT_POINT = r"""
import os, shutil, signal, sys
from mergeprobe import store as store_module
from mergeprobe.store import ProbeStore, merge_set_id
from tests.test_reliability import VICTIM, versioned_meta, versioned_tensors

root, point = sys.argv[1], sys.argv[2]
store = ProbeStore(root)
old = versioned_tensors(1)
store.write_record(VICTIM, versioned_meta(1, old), old)
store.record_outcome([VICTIM], "ties", {VICTIM: 0.5})

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

real_write, real_replace, real_rmtree = store_module._write_new_file, os.replace, shutil.rmtree
if point == "mid-signals":
    def half_then_die(path, data):
        if path.name == store_module.SIGNALS_FILE:
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            die()
        real_write(path, data)
    store_module._write_new_file = half_then_die
elif point == "before-swap":
    store_module.ProbeStore._swap_into_place = die
elif point == "between-renames":
    def replace(src, dst):
        if ".old-" not in str(dst) and ".tmp-" in str(src) and str(dst).endswith(VICTIM):
            die()
        real_replace(src, dst)
    os.replace = replace
elif point == "before-old-removed":
    def rmtree(path, *args, **kwargs):
        if ".old-" in str(path):
            die()
        real_rmtree(path, *args, **kwargs)
    shutil.rmtree = rmtree
elif point in ("mid-status", "mid-outcome"):
    def replace(src, dst):
        if str(dst).endswith(".json"):
            die()
        real_replace(src, dst)
    os.replace = replace
elif point == "mid-claim":
    real_json = store_module._json_text
    store_module._json_text = lambda value, what: die() if what == "claim" else real_json(value, what)

new = versioned_tensors(2)
if point == "mid-status":
    store.update_status(VICTIM, "complete")
elif point == "mid-outcome":
    store.record_outcome([VICTIM], "ties", {VICTIM: 0.9})
elif point == "mid-claim":
    store.claim_merge(merge_set_id([VICTIM, "other"]))
else:
    store.write_record(VICTIM, versioned_meta(2, new), new)
print("not killed")
"""

# point → (the victim's version readers see afterwards, or None: not listed until its next write; a warning expected)
KILL_POINTS = {
    "mid-signals": (1, True),
    "before-swap": (1, True),
    "between-renames": (None, True),
    "before-old-removed": (2, True),
    "mid-status": (1, False),
    "mid-outcome": (1, False),
    "mid-claim": (1, False),
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_writer_killed_at_a_chosen_point_leaves_the_store_readable(tmp_path: Path, point: str) -> None:
    root = tmp_path / "store"
    done = run_python(KILL_AT_POINT, str(root), point)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr[-3000:]
    store = ProbeStore(root)
    version, warns = KILL_POINTS[point]

    names, messages = list_runs(store)
    assert bool(messages) == warns, messages
    if version is None:
        assert names == [] and "interrupted overwrite" in messages[0]
        with pytest.raises(StoreError, match=f"no run record '{VICTIM}'"):
            store.load(VICTIM)
    else:
        assert names == [VICTIM]
        record = store.load(VICTIM)
        assert check_intact(record) == version and record.status == "probing"
    if warns:
        assert "the next write of that run cleans it up" in messages[0]
    outcomes = store.outcomes()
    assert [o["retention"] for o in outcomes] == [{VICTIM: 0.5}]
    merges = store.merges()
    if point == "mid-claim":
        # The claim file exists but is empty: the set counts as claimed (claims never expire).
        assert [(m["claimed"], m["claim"], m["merged"]) for m in merges] == [(True, {}, False)]
        assert store.claim_merge(merges[0]["set_id"]) is False
    else:
        assert merges == []

    # The killed run's next write restores anything a killed overwrite left aside, then replaces it.
    if point == "between-renames":
        with pytest.raises(StoreError, match="another run"):  # the old record was restored: it still owns the name
            store.write_record(VICTIM, {"run_id": "someone-else"}, versioned_tensors(9))
    third = versioned_tensors(3)
    store.write_record(VICTIM, versioned_meta(3, third), third)
    store.update_status(VICTIM, "complete")
    store.record_outcome([VICTIM], "ties", {VICTIM: 0.7})
    names, messages = list_runs(store)
    assert names == [VICTIM] and messages == []
    assert check_intact(store.load(VICTIM)) == 3 and store.load(VICTIM).status == "complete"
    assert hidden_entries(root / "runs") == []
    assert len(store.outcomes()) == 2


KILL_LOOP = r"""
import sys
from mergeprobe.store import ProbeStore
from tests.test_reliability import VICTIM, versioned_meta, versioned_tensors

root, first = sys.argv[1], int(sys.argv[2])
store = ProbeStore(root)
version = first
while True:
    tensors = versioned_tensors(version, side=512)  # 2 MiB per record
    store.write_record(VICTIM, versioned_meta(version, tensors), tensors)
    store.update_status(VICTIM, "complete", version=version)
    store.record_outcome([VICTIM], "ties", {VICTIM: version / 1000})
    if version == first:
        print("writing", flush=True)
    version += 1
"""


def test_writer_killed_at_random_times_leaves_the_store_readable(tmp_path: Path) -> None:
    """A process rewriting a 2 MiB record in a loop, killed -9 after a random delay, three times over."""
    root = tmp_path / "store"
    rng = random.Random(6)
    seen_versions = []
    for round_index in range(3):
        delay = rng.uniform(0.0, 0.8)
        process = start_python(KILL_LOOP, str(root), str(1000 * (round_index + 1)))
        wait_for_line(process, "writing")
        time.sleep(delay)
        kill9(process)

        store = ProbeStore(root)
        names, messages = list_runs(store)
        context = f"round {round_index}, killed {delay:.3f} s after the first write; warnings: {messages}"
        assert set(names) <= {VICTIM}, context
        if names:
            seen_versions.append(check_intact(store.load(VICTIM)))
        else:  # killed between the two renames of an overwrite
            assert any("interrupted overwrite" in m for m in messages), context
        assert all(isinstance(o["retention"][VICTIM], float) for o in store.outcomes()), context
        # the next write of the run goes on and cleans up
        tensors = versioned_tensors(round_index)
        store.write_record(VICTIM, versioned_meta(round_index, tensors), tensors)
        names, messages = list_runs(store)
        assert names == [VICTIM] and messages == [], context
        assert check_intact(store.load(VICTIM)) == round_index
        assert hidden_entries(root / "runs") == [], context
    assert seen_versions, "the record was never readable after a kill"


# ----------------------------------------------------------------- kill -9 of a merge writing its output

KILL_MERGE = r"""
import sys, torch
from mergeprobe import merge_adapters
from mergeprobe.adapters import LoraAdapter, LoraModule

out, point = sys.argv[1], sys.argv[2]
generator = torch.Generator().manual_seed(0)
def adapter(name):
    modules = {f"base_model.model.model.layers.{i}.self_attn.q_proj": LoraModule(
        torch.randn(16, 1024, generator=generator), torch.randn(1024, 16, generator=generator), 2.0) for i in range(64)}
    return LoraAdapter(modules, {"r": 16, "lora_alpha": 32, "base_model_name_or_path": "tiny"}, name)
adapters = [adapter("a"), adapter("b")]
if point not in ("loop", "none"):
    import os, signal
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if point == "mid-weights":  # half the weights file written, then killed
        import pathlib
        real_write = pathlib.Path.write_bytes
        def half(self, data):
            if self.name == "adapter_model.safetensors":
                real_write(self, data[: len(data) // 2])
                die()
            return real_write(self, data)
        pathlib.Path.write_bytes = half
    elif point == "before-rename":
        real_replace = os.replace
        os.replace = lambda src, dst: die() if ".tmp-" in str(src) else real_replace(src, dst)
if point == "loop":  # merge again and again into the same out_dir, as a rerun with --overwrite does
    while True:
        merge_adapters(adapters, method="linear", out_dir=out, overwrite=True, show_progress=False)
        print("merging", flush=True)
print("merging", flush=True)
merge_adapters(adapters, method="linear", out_dir=out, overwrite=True, show_progress=False)
print("done", flush=True)
"""

MERGED_FILES = ["adapter_config.json", "adapter_model.safetensors", "mergeprobe_merge.json"]


def assert_absent_or_complete(out: Path) -> bool:
    """``out`` is absent or a complete adapter (all files, every module loads); returns whether it exists."""
    from mergeprobe import load_adapter

    visible = sorted(p.name for p in out.parent.iterdir() if not p.name.startswith("."))
    assert visible in ([], [out.name]), visible
    if not out.exists():
        return False
    assert sorted(p.name for p in out.iterdir()) == MERGED_FILES
    assert len(load_adapter(out).modules) == 64
    json.loads((out / "mergeprobe_merge.json").read_text())
    return True


@pytest.mark.parametrize("point", ["mid-weights", "before-rename"])
def test_merge_killed_while_writing_leaves_no_half_adapter(tmp_path: Path, point: str) -> None:
    out = tmp_path / "merged" / "adapter"
    done = run_python(KILL_MERGE, str(out), point)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr[-3000:]
    assert not assert_absent_or_complete(out)
    # What the killed writer leaves is a hidden temporary directory beside out_dir, which no reader takes for an adapter.
    assert [p.name.startswith(".adapter.tmp-") for p in out.parent.iterdir()] == [True]
    done = run_python(KILL_MERGE, str(out), "none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert assert_absent_or_complete(out)


def test_merge_killed_at_random_times_leaves_no_half_adapter(tmp_path: Path) -> None:
    """A process merging into the same out_dir in a loop (8 MiB adapters), killed -9 after a random delay, four times."""
    out = tmp_path / "merged" / "adapter"
    rng = random.Random(7)
    states = []
    for delay in [rng.uniform(0.0, 1.0) for _ in range(4)]:
        process = start_python(KILL_MERGE, str(out), "loop")
        wait_for_line(process, "merging")
        time.sleep(delay)
        kill9(process)
        states.append(assert_absent_or_complete(out))
    done = run_python(KILL_MERGE, str(out), "none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert assert_absent_or_complete(out), states


# ----------------------------------------------------------------- full disk, read-only store

HINTS = {errno.ENOSPC: "disk is full", errno.EROFS: "read-only"}


def assert_trained_without_probe(trainer: Any, callback: Any, caught: list[Any], hint: str, max_steps: int) -> None:
    assert trainer.state.global_step == max_steps  # training went on to the end
    assert callback.disabled
    messages = [str(w.message) for w in caught if "training continues without the probe" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert hint in messages[0]


@pytest.mark.parametrize("code", sorted(HINTS), ids=lambda code: errno.errorcode[code])
@pytest.mark.parametrize("fails_at", ["window_end", "final"])
def test_store_failure_with_warn_lets_training_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, fails_at: str) -> None:
    """ENOSPC/EROFS raised by the store's file writes inside the training process, at the window end or at the final write."""
    from mergeprobe import store as store_module
    from tests.scripts.tiny_train import train

    writes = {"count": 0}
    real_write = store_module._write_new_file

    def failing_write(path: Path, data: bytes) -> None:
        writes["count"] += 1
        if fails_at == "window_end" or writes["count"] > 3:  # window end writes signals, cache (own states), meta; the final write fails
            raise OSError(code, os.strerror(code), str(path))
        real_write(path, data)

    monkeypatch.setattr(store_module, "_write_new_file", failing_write)
    store_path = tmp_path / "store"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, callback = train(str(store_path), "full", str(tmp_path / "out"), max_steps=8, predictor=None, on_store_error="warn")
    assert_trained_without_probe(trainer, callback, caught, HINTS[code], 8)
    monkeypatch.undo()
    store = ProbeStore(store_path)
    names, messages = list_runs(store)
    assert messages == [] and hidden_entries(store_path / "runs") == []
    if fails_at == "window_end":
        assert names == []
    else:  # the window's record stays as it was written
        assert names == ["full"] and store.load("full").status == "complete"


def test_store_failure_with_raise_stops_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergeprobe import store as store_module
    from tests.scripts.tiny_train import train

    def failing_write(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(store_module, "_write_new_file", failing_write)
    with pytest.raises(StoreError, match="disk is full"):
        train(str(tmp_path / "store"), "full", str(tmp_path / "out"), max_steps=6, predictor=None)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 2 MiB tmpfs mounted at tmp_path/mnt (skipped where this process may not mount)."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the monkeypatched variant covers this")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


@pytest.mark.parametrize("temp_dir", ["elsewhere", "on_the_full_disk"])
def test_real_full_disk_with_warn(tiny_tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, temp_dir: str) -> None:
    """A store on a full tmpfs; ``on_the_full_disk``: the system temp dir (where the adapter is staged) is full too.

    Before the fix, the second case stopped training with a SafetensorError from staging
    the adapter, despite ``on_store_error="warn"``.
    """
    import tempfile

    from tests.scripts.tiny_train import train

    store_path = tiny_tmpfs / "store"
    ProbeStore(store_path)
    if temp_dir == "on_the_full_disk":
        (tiny_tmpfs / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tiny_tmpfs / "tmp"))
    free = os.statvfs(tiny_tmpfs)
    filler = tiny_tmpfs / "filler"
    with open(filler, "wb") as handle:  # leave 8 KiB: less than a record
        handle.write(b"\0" * (free.f_bavail * free.f_frsize - 8192))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, callback = train(str(store_path), "full", str(tmp_path / "out"), max_steps=6, predictor=None, on_store_error="warn")
    hint = "disk is full" if temp_dir == "elsewhere" else "No space left on device"
    assert_trained_without_probe(trainer, callback, caught, hint, 6)
    store = ProbeStore(store_path)
    assert list_runs(store) == ([], []) and hidden_entries(store_path / "runs") == []
    filler.unlink()  # space again: the store takes writes as before
    tensors = versioned_tensors(1)
    store.write_record("after", versioned_meta(1, tensors, "after"), tensors)
    assert check_intact(store.load("after")) == 1


def test_real_read_only_store_with_warn(tiny_tmpfs: Path, tmp_path: Path) -> None:
    from tests.scripts.tiny_train import train

    store_path = tiny_tmpfs / "store"
    tensors = versioned_tensors(1)
    ProbeStore(store_path).write_record("earlier", versioned_meta(1, tensors, "earlier"), tensors)
    done = subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, callback = train(str(store_path), "ro", str(tmp_path / "out"), max_steps=6, predictor=None, on_store_error="warn")
    assert_trained_without_probe(trainer, callback, caught, "read-only", 6)
    # Readers still read a read-only store.
    store = ProbeStore(store_path)
    assert list_runs(store) == (["earlier"], [])
    assert check_intact(store.load("earlier")) == 1


# ----------------------------------------------------------------- resume after kill -9

TRAIN_AND_MAYBE_DIE = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from tests.scripts import tiny_train

store, out, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
def kill_at(step):
    from transformers import TrainerCallback
    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **unused):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
    return KillAt()
tiny_train.CrashAt = kill_at  # crash_at=N now means kill -9 at the end of step N
tiny_train.train(store, "resumed", out, seed=3, max_steps=12, predictor=None, **kwargs)
"""

# Fields of the record that may differ between an uninterrupted and a resumed run, and why.
EXPECTED_TO_DIFFER = {
    "run_id",  # derived from the output directory, which differs between the two runs
    "created",  # when the record was first written
    "updated",  # when it was last written
    "write_id",  # a fresh id per write
    "cache_id",  # a fresh id per cache written (the window end's)
    "pid",  # the process that wrote it last
}


def test_run_resumed_after_kill_stores_the_same_record(tmp_path: Path) -> None:
    """Killed -9 at step 9 (window [0, 4] stored, checkpoint at 6), resumed: same record as a run never killed."""
    from mergeprobe import load_adapter

    plain, crashed = tmp_path / "plain", tmp_path / "crashed"
    done = run_python(TRAIN_AND_MAYBE_DIE, str(plain / "store"), str(plain / "out"), json.dumps({"save_steps": 6}), timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_python(TRAIN_AND_MAYBE_DIE, str(crashed / "store"), str(crashed / "out"), json.dumps({"save_steps": 6, "crash_at": 9}), timeout=400)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert ProbeStore(crashed / "store").load("resumed").status == "complete"  # the window's record, written before the kill
    checkpoint = str(crashed / "out" / "checkpoint-6")
    done = run_python(TRAIN_AND_MAYBE_DIE, str(crashed / "store"), str(crashed / "out"), json.dumps({"resume": checkpoint}), timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]

    expected, got = ProbeStore(plain / "store").load("resumed"), ProbeStore(crashed / "store").load("resumed")
    assert got.status == expected.status == "finished" and got.probe_steps == expected.probe_steps == [0, 4]
    differing = {key for key in expected.meta.keys() | got.meta.keys() if expected.meta.get(key) != got.meta.get(key)}
    assert differing <= EXPECTED_TO_DIFFER, differing - EXPECTED_TO_DIFFER
    assert sorted(got.tensors) == sorted(expected.tensors)
    import torch

    for key, tensor in expected.tensors.items():
        torch.testing.assert_close(got.tensors[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    # The cached own states were written at the window end, before the kill, and carried through the resumed run's rewrite.
    cache_expected, cache_got = ProbeStore(plain / "store").load_cache("resumed"), ProbeStore(crashed / "store").load_cache("resumed")
    assert cache_got is not None and sorted(cache_got) == sorted(cache_expected)
    for key, tensor in cache_expected.items():
        torch.testing.assert_close(cache_got[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    final_expected, final_got = load_adapter(expected.adapter_path), load_adapter(got.adapter_path)
    assert final_got.modules.keys() == final_expected.modules.keys()
    for key in final_expected.modules:
        torch.testing.assert_close(final_got.delta(key), final_expected.delta(key), rtol=1e-4, atol=1e-6, msg=key)
