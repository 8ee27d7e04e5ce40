"""Tests of the probe store: atomic records, concurrent writers and readers, merge claims, failures.

Spawned worker processes import this module, so torch is imported only where tensors
are made: the claim race then starts without paying for a torch import per process.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import sys
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Any

import pytest

import mergeprobe
from mergeprobe.errors import SchemaVersionError, StoreError
from mergeprobe.store import (
    CACHE_FILE,
    SCHEMA_VERSION,
    IncompleteRecordWarning,
    ProbeStore,
    atomic_write_text,
    check_name,
    merge_set_id,
)

N_PROCESSES = 6


def _tensors(value: float) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(int(value))
    return {
        "value": torch.tensor([float(value)]),
        "sketch.q_proj": torch.randn(32, 32, generator=generator),
        "update.q_proj.A": torch.randn(4, 64, generator=generator, dtype=torch.float64),
    }


def _meta(run_id: str, value: float, **more: Any) -> dict[str, Any]:
    return {"run_id": run_id, "base_model": "tiny-llama", "target_modules": ["q_proj"], "ranks": 4, "extra": {"value": value}, **more}


def _write_worker(root: str, index: int, n_records: int, n_outcomes: int) -> None:
    store = ProbeStore(root)
    for j in range(n_records):
        name = f"w{index}-r{j}"
        value = index * 100 + j
        store.write_record(name, _meta(name, value), _tensors(value))
        store.update_status(name, "complete", step=j)
        store.write_record("shared", _meta(f"writer-{index}", value), _tensors(value), overwrite=True)
    for j in range(n_outcomes):
        store.record_outcome([f"w{index}-r0", f"w{index}-r1"], "ties", {f"w{index}-r0": 0.9, f"w{index}-r1": 0.8 + j / 100})


def _claim_worker(root: str, set_id: str, barrier: Any, results: Any) -> None:
    store = ProbeStore(root)
    barrier.wait(timeout=120)
    results.put((os.getpid(), store.claim_merge(set_id)))


def _check_consistent(record: Any) -> None:
    """Meta and tensors of a record come from the same write."""
    assert record.tensors["value"].item() == record.meta["extra"]["value"], record.run_name


def test_round_trip_and_listing(tmp_path: Path) -> None:
    import torch

    store = ProbeStore(tmp_path / "store")
    written = _tensors(3)
    store.write_record("math", _meta("run-math", 3, probe_steps=[0, 8]), written)
    store.write_record("code", _meta("run-code", 4, base_model={"name_or_path": "other", "revision": "main"}), _tensors(4))
    store.write_record("chat", _meta("run-chat", 5, status="complete"), _tensors(5))

    record = store.load("math")
    assert sorted(record.tensors) == sorted(written)
    for key, tensor in written.items():
        assert record.tensors[key].dtype == tensor.dtype
        assert torch.equal(record.tensors[key], tensor)
    assert record.run_id == "run-math" and record.status == "probing" and record.base_model == "tiny-llama"
    assert record.probe_steps == [0, 8] and record.ranks == 4 and record.target_modules == ["q_proj"]
    assert record.meta["schema_version"] == SCHEMA_VERSION and record.pid == os.getpid()
    assert record.extra == {"value": 3} and record.created == record.updated

    assert store.runs() == ["chat", "code", "math"]
    assert store.runs(status="complete") == ["chat"]
    assert store.runs(base_model="tiny-llama") == ["chat", "math"]
    assert store.runs(base_model="other") == ["code"]
    assert store.runs(base_model={"name_or_path": "other", "revision": "main"}) == ["code"]
    assert store.runs(status="probing", base_model="tiny-llama") == ["math"]
    assert [r.run_name for r in store.records(status="probing")] == ["code", "math"]

    meta = store.update_status("math", "complete", final_loss=0.5)
    reloaded = store.load("math")
    assert reloaded.status == "complete" and reloaded.extra == {"value": 3, "final_loss": 0.5}
    assert meta == reloaded.meta
    assert torch.equal(reloaded.tensors["sketch.q_proj"], written["sketch.q_proj"])
    assert store.runs(status="complete") == ["chat", "math"]
    with pytest.raises(StoreError, match="not one of"):
        store.update_status("math", "done")
    with pytest.raises(StoreError, match="no run record 'missing'"):
        store.load("missing")

    reopened = ProbeStore(tmp_path / "store", create=False)
    assert reopened.info["schema_version"] == SCHEMA_VERSION
    assert reopened.runs() == ["chat", "code", "math"]


def test_adapter_is_stored_with_the_record(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter-src"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    store = ProbeStore(tmp_path / "store")
    store.write_record("math", _meta("a", 1), _tensors(1), adapter=adapter)
    stored = store.load("math").adapter_path
    assert stored is not None and (stored / "adapter_config.json").read_text() == "{}"
    assert store.write_record("code", _meta("b", 2), _tensors(2)).adapter_path is None


def test_a_stored_adapter_is_readable_as_the_umask_allows_not_private_like_its_temporary_source(tmp_path: Path) -> None:
    # The probe stages the adapter in a temporary directory (mode 0700); other users of a shared store must read it.
    import os
    import tempfile

    umask = os.umask(0o022)
    try:
        with tempfile.TemporaryDirectory() as staged:
            (Path(staged) / "nested").mkdir(mode=0o700)
            for name in ("adapter_config.json", "nested/adapter_model.safetensors"):
                (Path(staged) / name).write_text("{}")
                os.chmod(Path(staged) / name, 0o600)
            stored = ProbeStore(tmp_path / "store").write_record("math", _meta("a", 1), _tensors(1), adapter=staged).adapter_path
    finally:
        os.umask(umask)
    assert stored is not None
    assert [oct(p.stat().st_mode & 0o777) for p in (stored, stored / "nested")] == ["0o755", "0o755"]
    assert [oct(p.stat().st_mode & 0o777) for p in (stored / "adapter_config.json", stored / "nested/adapter_model.safetensors")] == ["0o644", "0o644"]
    assert (stored / "nested/adapter_model.safetensors").read_text() == "{}"


def test_same_name_other_run_is_refused(tmp_path: Path) -> None:
    import torch

    store = ProbeStore(tmp_path / "store")
    first = store.write_record("math", _meta("run-1", 1), _tensors(1))
    resumed = store.write_record("math", _meta("run-1", 2), _tensors(2))
    assert resumed.meta["created"] == first.meta["created"]
    assert store.load("math").tensors["value"].item() == 2.0

    with pytest.raises(StoreError, match="another run.*overwrite=True") as info:
        store.write_record("math", _meta("run-2", 3), _tensors(3))
    assert "run-1" in str(info.value) and "choose another run_name" in str(info.value).lower()
    assert store.load("math").run_id == "run-1"

    store.write_record("math", _meta("run-2", 3), {"value": torch.tensor([3.0])}, overwrite=True)
    record = store.load("math")
    assert record.run_id == "run-2" and sorted(record.tensors) == ["value"]
    with pytest.raises(StoreError, match="another run"):
        store.write_record("math", {"extra": {"value": 4}}, _tensors(4))  # no run_id: a new, unknown run
    assert [p.name for p in (tmp_path / "store" / "runs").iterdir()] == ["math"]


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", ".hidden", "a\\b", "a b", "x" * 201, "a..b"])
def test_bad_run_names_are_rejected(tmp_path: Path, name: str) -> None:
    store = ProbeStore(tmp_path / "store")
    with pytest.raises(StoreError, match="not a safe store name"):
        store.write_record(name, _meta("r", 1), _tensors(1))
    with pytest.raises(StoreError, match="not a safe store name"):
        store.load(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert list((tmp_path / "store" / "runs").iterdir()) == []


def test_schema_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ProbeStore(root)
    info = json.loads((root / "store.json").read_text())
    atomic_write_text(root / "store.json", json.dumps({**info, "schema_version": 999}))
    with pytest.raises(SchemaVersionError) as err:
        ProbeStore(root)
    message = str(err.value)
    assert str(root) in message and "999" in message and f"version {SCHEMA_VERSION}" in message
    assert "new store directory" in message

    (root / "store.json").write_text('{"format": "mergeprobe-probe-st')
    with pytest.raises(StoreError, match="not valid JSON"):
        ProbeStore(root)
    with pytest.raises(StoreError, match="not a probe store"):
        ProbeStore(tmp_path / "empty", create=False)


def test_incomplete_records_are_skipped_with_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "store"
    runs = root / "runs"
    store = ProbeStore(root)
    for name in ("good", "ghost", "halfmeta", "halfsignals", "badfield", "oldschema", "mixed"):
        store.write_record(name, _meta(name, 1), _tensors(1))
    # meta.json of one write beside signals.safetensors of another.
    (runs / "mixed" / "meta.json").write_bytes((runs / "good" / "meta.json").read_bytes())
    # A writer killed before its rename: a temp dir holding half a safetensors file.
    ghost = runs / ".ghost.tmp-0123abcd"
    os.replace(runs / "ghost", ghost)
    signals = (ghost / "signals.safetensors").read_bytes()
    (ghost / "signals.safetensors").write_bytes(signals[: len(signals) // 2])
    meta_text = (runs / "halfmeta" / "meta.json").read_text()
    (runs / "halfmeta" / "meta.json").write_text(meta_text[: len(meta_text) // 2])
    signals = (runs / "halfsignals" / "signals.safetensors").read_bytes()
    (runs / "halfsignals" / "signals.safetensors").write_bytes(signals[:-100])
    for name, version in (("badfield", "one"), ("oldschema", 0)):
        meta = json.loads((runs / name / "meta.json").read_text())
        (runs / name / "meta.json").write_text(json.dumps({**meta, "schema_version": version}))

    with pytest.warns(IncompleteRecordWarning) as caught:
        assert store.runs() == ["good"]
    messages = "\n".join(str(w.message) for w in caught)
    for name in ("ghost", "halfmeta", "halfsignals", "badfield", "oldschema", "mixed"):
        assert f"record {name!r}" in messages
    assert "killed write" in messages and "not valid JSON" in messages and "truncated" in messages
    assert "different writes" in messages

    with pytest.raises(StoreError, match="'halfmeta' is incomplete.*not valid JSON"):
        store.load("halfmeta")
    with pytest.raises(StoreError, match="'halfsignals' is incomplete.*truncated"):
        store.load("halfsignals")
    with pytest.raises(SchemaVersionError, match="'oldschema' has schema version 0"):
        store.load("oldschema")
    with pytest.warns(IncompleteRecordWarning):
        assert [r.run_name for r in store.records()] == ["good"]

    # The store keeps accepting writes; a rewrite replaces the broken record and cleans the temp dir.
    store.write_record("ghost", _meta("ghost", 2), _tensors(2))
    assert not ghost.exists()
    with pytest.warns(IncompleteRecordWarning, match="replacing incomplete record 'halfmeta'"):
        store.write_record("halfmeta", _meta("someone-else", 3), _tensors(3))
    store.write_record("fresh", _meta("fresh", 4), _tensors(4))
    _check_consistent(store.load("halfmeta"))
    with pytest.warns(IncompleteRecordWarning):
        assert store.runs() == ["fresh", "ghost", "good", "halfmeta"]


def test_load_during_an_overwrite_sees_the_new_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import filelock

    root = tmp_path / "store"
    runs = root / "runs"
    store = ProbeStore(root)
    store.write_record("shared", _meta("w", 1), _tensors(1))
    store.write_record("staging", _meta("w", 2), _tensors(2))
    renamed, reader_failed = threading.Event(), threading.Event()

    def overwrite() -> None:
        # What write_record does: both renames under the store lock; the reader looks in between.
        with filelock.FileLock(str(root / "locks" / "_store.lock")):
            os.replace(runs / "shared", runs / ".shared.old-0123abcd")
            renamed.set()
            reader_failed.wait(timeout=60)
            os.replace(runs / "staging", runs / "shared")

    read_record = store._read_record

    def observed_read(*args: Any, **kwargs: Any) -> Any:
        try:
            return read_record(*args, **kwargs)
        except Exception:
            reader_failed.set()
            raise

    monkeypatch.setattr(store, "_read_record", observed_read)
    writer = threading.Thread(target=overwrite)
    writer.start()
    assert renamed.wait(timeout=60)
    record = store.load("shared")
    writer.join(timeout=60)
    assert reader_failed.is_set()
    assert record.meta["extra"]["value"] == 2
    _check_consistent(record)


def test_corrupt_outcome_is_skipped(tmp_path: Path) -> None:
    store = ProbeStore(tmp_path / "store")
    first = store.record_outcome(["math", "code"], "pico", {"math": 0.97, "code": 0.9}, scores={"math": 0.5}, seed=3)
    (tmp_path / "store" / "outcomes" / "broken.json").write_text('{"id": "x", "runs": [')
    with pytest.warns(IncompleteRecordWarning, match="outcome broken.json"):
        outcomes = store.outcomes()
    assert [o["id"] for o in outcomes] == [first]
    assert outcomes[0]["retention"] == {"math": 0.97, "code": 0.9} and outcomes[0]["extra"] == {"seed": 3}
    with pytest.raises(StoreError, match="finite numbers"):
        store.record_outcome(["math"], "pico", {"math": float("nan")})


def test_concurrent_writers_and_reader(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ProbeStore(root)
    n_records, n_outcomes = 4, 3
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_write_worker, args=(str(root), i, n_records, n_outcomes)) for i in range(N_PROCESSES)]
    for worker in workers:
        worker.start()
    problems: list[str] = []
    seen: set[str] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while any(worker.is_alive() for worker in workers):
            try:
                for name in store.runs():
                    _check_consistent(store.load(name))
                    seen.add(name)
                    if name != "shared" and "shared" in seen:
                        _check_consistent(store.load("shared"))  # overwritten all the time: races its swap
                store.outcomes()
            except Exception as err:  # collect everything the reader hits; none is allowed
                problems.append(repr(err))
            time.sleep(0.01)  # leave the two shared cores to the writers
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * N_PROCESSES
    assert problems == []
    assert [str(w.message) for w in caught] == []
    assert seen, "the reader never saw a record while the writers ran"

    expected = sorted(f"w{i}-r{j}" for i in range(N_PROCESSES) for j in range(n_records))
    assert store.runs() == sorted([*expected, "shared"])
    assert store.runs(status="complete") == expected
    for name in expected:
        record = store.load(name)
        _check_consistent(record)
        assert record.run_id == name and record.extra["step"] == int(name[-1])
    shared = store.load("shared")
    _check_consistent(shared)
    assert shared.meta["extra"]["value"] % 100 == n_records - 1
    assert len(store.outcomes()) == N_PROCESSES * n_outcomes
    assert [p.name for p in (root / "runs").iterdir() if p.name.startswith(".")] == []


def test_claim_merge_has_exactly_one_winner(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ProbeStore(root)
    set_id = merge_set_id(["math", "code", "chat"])
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(N_PROCESSES), ctx.Queue()
    workers = [ctx.Process(target=_claim_worker, args=(str(root), set_id, barrier, results)) for _ in range(N_PROCESSES)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    winners = [pid for pid, won in outcomes if won]
    assert len(winners) == 1
    assert len(outcomes) == N_PROCESSES
    assert store.claim_merge(set_id) is False

    (merge,) = store.merges()
    assert merge["set_id"] == set_id and merge["claimed"] and merge["claim"]["pid"] == winners[0]
    assert merge["merged"] is False
    store.mark_merged(set_id, {"method": "pico", "out": "adapter"})
    (merge,) = store.merges()
    assert merge["merged"] and merge["info"] == {"method": "pico", "out": "adapter"}
    assert store.merge_dir(set_id) == root / "merges" / set_id


def test_merge_set_id_and_names() -> None:
    assert merge_set_id(["b", "a"]) == merge_set_id(["a", "b", "a"]) != merge_set_id(["a", "c"])
    assert check_name(merge_set_id(["a"]), "merge set id")
    with pytest.raises(StoreError):
        merge_set_id(["a/b"])


@pytest.mark.parametrize("code, hint", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full")])
def test_os_errors_become_store_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, hint: str) -> None:
    root = tmp_path / "store"
    store = ProbeStore(root)
    store.write_record("math", _meta("a", 1), _tensors(1))

    def failing_replace(src: Any, dst: Any) -> None:
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StoreError, match=hint) as err:
        store.write_record("code", _meta("b", 2), _tensors(2))
    assert str(root) in str(err.value) and errno.errorcode[code] in str(err.value)
    with pytest.raises(StoreError, match=hint):
        store.record_outcome(["math"], "pico", {"math": 1.0})
    with pytest.raises(StoreError, match=hint):
        store.update_status("math", "complete")
    with pytest.raises(StoreError, match=hint):
        store.mark_merged("set-a", {})
    monkeypatch.undo()
    # Nothing half-written is left behind, and the existing record is intact.
    leftovers = [p for sub in ("runs", "outcomes") for p in (root / sub).iterdir() if p.name.startswith(".")]
    assert leftovers == [] and list((root / "runs" / "math").iterdir()) != []
    assert store.runs() == ["math"] and store.load("math").status == "probing" and store.outcomes() == []


def test_read_only_directory(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ProbeStore(root)
    store.write_record("math", _meta("a", 1), _tensors(1))
    folders = [root, *[p for p in root.rglob("*") if p.is_dir()]]
    for folder in folders:
        folder.chmod(0o555)
    try:
        if os.access(root / "runs", os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions (root); covered by the monkeypatch test")
        with pytest.raises(StoreError, match="permission denied") as err:
            store.write_record("code", _meta("b", 2), _tensors(2))
        assert str(root) in str(err.value)
        with pytest.raises(StoreError, match="permission denied"):
            store.record_outcome(["math"], "pico", {"math": 1.0})
        assert ProbeStore(root).runs() == ["math"]
    finally:
        for folder in folders:
            folder.chmod(0o755)


def test_lock_timeout_names_the_lock_file(tmp_path: Path) -> None:
    store = ProbeStore(tmp_path / "store")
    with store.lock("refit") as held:
        assert held == tmp_path / "store" / "locks" / "refit.lock"
        with pytest.raises(StoreError, match=r"timed out .*refit\.lock"):
            with store.lock("refit", timeout=0.05):
                pass
    with store.lock("refit", timeout=0.05):
        pass
    with pytest.raises(StoreError, match="not a safe store name"):
        with store.lock("../etc"):
            pass


def test_signals_and_pairwise_features_wiring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    class FakeSignals:
        def __init__(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
            self.tensors, self._meta = tensors, meta

        def to_tensors(self) -> dict[str, Any]:
            return self.tensors

        def meta(self) -> dict[str, Any]:
            return self._meta

        @classmethod
        def from_tensors(cls, tensors: dict[str, Any], meta: dict[str, Any]) -> FakeSignals:
            return cls(tensors, meta)

    calls: list[tuple[str, Any]] = []

    def cross_disturbance(model: Any, a: FakeSignals, b: FakeSignals, own_states: Any = None) -> dict[str, float]:
        calls.append(("cross", model))
        assert own_states == {}  # these records cache no states
        return {"cross": 1.0}

    def oriented_pairwise_features(a: FakeSignals, b: FakeSignals, cross: dict[str, float] | None) -> dict[str, float]:
        calls.append(("pairwise", cross))
        return {"alignment": float(a.tensors["g"].item() * b.tensors["g"].item()), "steps": float(a.meta()["k"])}

    features = types.SimpleNamespace(cross_disturbance=cross_disturbance, oriented_pairwise_features=oriented_pairwise_features)
    monkeypatch.setitem(
        sys.modules, "mergeprobe.signals", types.SimpleNamespace(RunSignals=FakeSignals, own_states_from_cache=lambda cache, signals: None)
    )
    monkeypatch.setattr("mergeprobe.probe.base_model_identity", lambda model: {"name": model, "fingerprint": "f"})
    monkeypatch.setitem(sys.modules, "mergeprobe.features", features)
    monkeypatch.setattr(mergeprobe, "features", features, raising=False)

    store = ProbeStore(tmp_path / "store")
    store.write_signals("a", FakeSignals({"g": torch.tensor(2.0)}, {"k": 32}), {"run_id": "a", "status": "complete"})
    store.write_signals("b", FakeSignals({"g": torch.tensor(3.0)}, {"k": 32}), {"run_id": "b"})
    loaded = store.load_signals("a")
    assert loaded.meta() == {"k": 32} and loaded.tensors["g"].item() == 2.0
    assert store.pairwise_features("a", "b") == {"alignment": 6.0, "steps": 32.0}
    assert calls == [("pairwise", None)]
    store.pairwise_features("a", "b", model="model")
    assert calls[1:] == [("cross", "model"), ("pairwise", {"cross": 1.0})]
    store.write_record("plain", {"run_id": "p"}, {})
    with pytest.raises(StoreError, match="no RunSignals metadata"):
        store.load_signals("plain")


def test_cache_is_written_carried_over_and_never_an_error(tmp_path: Path) -> None:
    import torch

    store = ProbeStore(tmp_path / "store")
    states = {"own_states.0": torch.randn(5, 4), "own_states.1": torch.randn(5, 4)}
    store.write_record("a", _meta("a", 1.0), _tensors(1.0))
    assert store.load_cache("a") is None  # no cache written
    first = store.write_record("a", _meta("a", 1.0), _tensors(1.0), cache=states)
    cache = store.load_cache("a")
    assert cache is not None and all(torch.equal(cache[k], v) for k, v in states.items())
    # The same run rewriting its record (final adapter, new status) keeps the cache, linked not rewritten.
    inode = (tmp_path / "store" / "runs" / "a" / CACHE_FILE).stat().st_ino
    again = store.write_record("a", _meta("a", 2.0, status="finished"), _tensors(2.0), keep_cache=True)
    assert (tmp_path / "store" / "runs" / "a" / CACHE_FILE).stat().st_ino == inode
    assert again.meta["cache_id"] == first.meta["cache_id"] and torch.equal(store.load_cache("a")["own_states.1"], states["own_states.1"])
    store.update_status("a", "finished", note="x")
    assert store.load_cache("a") is not None
    # A rewrite without keep_cache drops it; another run taking the name over never inherits it.
    store.write_record("a", _meta("a", 3.0), _tensors(3.0), cache=states)
    store.write_record("a", _meta("a", 3.0), _tensors(3.0))
    assert store.load_cache("a") is None
    store.write_record("a", _meta("a", 3.0), _tensors(3.0), cache=states)
    store.write_record("a", _meta("other", 3.0), _tensors(3.0), overwrite=True, keep_cache=True)
    assert store.load_cache("a") is None
    # A truncated, foreign or missing cache file reads as no cache: recomputed by the caller, never an error.
    store.write_record("b", _meta("b", 1.0), _tensors(1.0), cache=states)
    path = tmp_path / "store" / "runs" / "b" / CACHE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert store.load_cache("b") is None
    store.write_record("c", _meta("c", 1.0), _tensors(1.0), cache=states)
    path.write_bytes((tmp_path / "store" / "runs" / "c" / CACHE_FILE).read_bytes())  # c's cache in b's record
    assert store.load_cache("b") is None
    path.unlink()
    assert store.load_cache("b") is None and store.load("b").status == "probing"
    assert store.load_cache("missing") is None


def test_pairwise_features_among_equals_one_call_per_pair_and_loads_each_record_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pair files as a set of runs can leave them: (a, b) and (b, a) stored, only (c, a) of the pair {a, c}, nothing
    # for {b, c}. The set read gives every ordered pair what pairwise_features gives it, with a file read once per
    # pair and a record loaded once, where one call per pair loads a record again for each pair it falls back to.
    from mergeprobe.features import oriented_pairwise_features
    from tests.test_features import _signals

    store = ProbeStore(tmp_path / "store")
    signals = {name: _signals(seed) for seed, name in enumerate("abc", start=1)}
    for name, run in signals.items():
        store.write_signals(name, run, {"run_id": name, "status": "complete"})
    for a, b in ("ab", "ba", "ca"):  # as a probe stores them, with a forward-pass feature the records cannot give
        store.write_pair_features(a, b, {**oriented_pairwise_features(signals[a], signals[b], None), "cross_disturbance.mean": 0.25})

    one_by_one = {(a, b): store.pairwise_features(a, b) for a in "abc" for b in "abc" if a != b}
    loaded: list[str] = []
    read: list[tuple[str, str]] = []
    real_load, real_read = store.load_signals, store.pair_features
    monkeypatch.setattr(store, "load_signals", lambda name: loaded.append(name) or real_load(name))
    monkeypatch.setattr(store, "pair_features", lambda a, b: read.append((a, b)) or real_read(a, b))
    assert store.pairwise_features_among(["a", "b", "c", "a"]) == one_by_one
    assert sorted(loaded) == ["a", "b", "c"]
    assert sorted(read) == sorted(one_by_one)
    # The three paths: stored, the reverse's symmetric part (its cross-disturbance kept), computed (none measured).
    assert one_by_one["a", "c"]["cross_disturbance.mean"] == 0.25 == one_by_one["a", "b"]["cross_disturbance.mean"]
    assert "cross_disturbance.mean" not in one_by_one["b", "c"]
