"""MergeProbeCallback on real Trainer runs of the tiny Llama: sequential, concurrent, DDP, resume, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import pytest
import torch

from mergeprobe.errors import MergeProbeError, SchemaVersionError
from mergeprobe.store import ProbeStore
from tests.scripts.tiny_train import train

SCRIPT = Path(__file__).parent / "scripts" / "tiny_train.py"
REPO = Path(__file__).resolve().parents[1]
SCALAR_TAGS = ("mergeprobe/update_alignment/", "mergeprobe/gradient_alignment/", "mergeprobe/cross_disturbance/")


def event_tags(run_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (log_dir,) = [p for p in (run_dir / "runs").iterdir() if p.is_dir()]
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator.Tags()


def assert_all_pairs(store: ProbeStore, runs: list[str]) -> None:
    """Both orientations of every pair stored, with the oriented member features of the right run."""
    for a, b in combinations(runs, 2):
        for first, second in ((a, b), (b, a)):
            features = store.pair_features(first, second)
            assert features, f"no features for the pair {first}, {second}"
            for name in ("update_alignment.mean", "gradient_alignment.mean", "cross_disturbance.mean",
                         "member.cross_disturbance.mean", "partner.cross_disturbance.mean", "member.log_norm_ratio"):
                assert name in features and features[name] == features[name], (first, second, name)
        ab, ba = store.pair_features(a, b), store.pair_features(b, a)
        assert ab["member.cross_disturbance.mean"] == pytest.approx(ba["partner.cross_disturbance.mean"])
        assert ab["member.log_norm_ratio"] == pytest.approx(-ba["member.log_norm_ratio"])


@pytest.fixture(scope="module")
def sequential_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequential")
    callbacks = {}
    for seed, name in enumerate(["alpha", "beta", "gamma"]):
        _, callbacks[name] = train(str(root / "store"), name, str(root / name), seed=seed, report_to=["tensorboard"], predictor=None)
    return root, callbacks


def test_sequential_runs_fill_the_store(sequential_runs):
    root, callbacks = sequential_runs
    store = ProbeStore(root / "store")
    assert sorted(store.runs()) == ["alpha", "beta", "gamma"]
    for name in store.runs():
        record = store.load(name)
        assert record.meta["status"] == "finished"
        assert record.meta["probe_steps"] == [0, 4]
        assert record.adapter_path is not None and (record.adapter_path / "adapter_model.safetensors").exists()
        assert any(k.startswith("gradient.") for k in record.tensors)
        assert store.load_cache(name) is not None  # its own states, kept through the final rewrite
    assert_all_pairs(store, ["alpha", "beta", "gamma"])
    assert set(callbacks["gamma"]._probe.comparisons) == {"alpha", "beta"}


def test_a_pair_stored_in_one_orientation_only_keeps_its_symmetric_features(sequential_runs, tmp_path):
    import shutil

    from mergeprobe.features import MEMBER_PREFIXES, symmetric_part

    root, _ = sequential_runs
    shutil.copytree(root / "store", tmp_path / "store")
    store = ProbeStore(tmp_path / "store")
    reverse = store.pair_features("beta", "alpha")
    store._pair_file("alpha", "beta").unlink()  # a store written before both orientations were stored
    features = store.pairwise_features("alpha", "beta")
    assert symmetric_part(features) == symmetric_part(reverse)
    oriented = {k for k in features if k.startswith(MEMBER_PREFIXES)}
    assert oriented == {"member.self_disturbance.mean", "member.self_relative_change.mean", "member.log_norm_ratio"}
    assert features["member.log_norm_ratio"] == pytest.approx(-reverse["member.log_norm_ratio"])


def test_tensorboard_event_files_hold_the_mergeability_tags(sequential_runs):
    root, _ = sequential_runs
    tags = event_tags(root / "gamma")
    assert "train/loss" in tags["scalars"]  # same directory as the Trainer's own logs
    for prefix in SCALAR_TAGS:
        assert {prefix + "alpha", prefix + "beta"} <= set(tags["scalars"])
    assert "mergeprobe/disturbance" in tags["scalars"]
    assert {"mergeprobe/depth_profile/alpha", "mergeprobe/depth_profile/beta"} <= set(tags["images"])
    # alpha, the first run, learns of beta and gamma at its end only if they existed: they did not.
    assert not any(t.startswith("mergeprobe/update_alignment/") for t in event_tags(root / "alpha")["scalars"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_serves_the_tags(sequential_runs):
    root, _ = sequential_runs
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(root / "gamma" / "runs"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        scalars = images = None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as response:
                    scalars = json.load(response)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/images/tags", timeout=5) as response:
                    images = json.load(response)
                if scalars and any("mergeprobe/update_alignment/alpha" in tags for tags in scalars.values()):
                    break
            except OSError:
                time.sleep(1)
        assert scalars, "tensorboard never answered"
        run_tags = next(iter(scalars.values()))
        assert "mergeprobe/update_alignment/alpha" in run_tags and "mergeprobe/cross_disturbance/beta" in run_tags
        assert "mergeprobe/depth_profile/alpha" in next(iter(images.values()))
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_script(store: Path, name: str, out: Path, seed: int, extra: list[str] | None = None, **callback_kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--store", str(store), "--run-name", name, "--output-dir", str(out), "--seed", str(seed),
         "--max-steps", "16", "--callback-kwargs", json.dumps({"predictor": None, **callback_kwargs}), *(extra or [])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _probe_window(store: ProbeStore, name: str, seed: int, zero_start: bool):
    """A ProbeRun's window on a tiny LoRA model whose factors jump from their start to a random end (no training)."""
    from mergeprobe.probe import ProbeRun
    from tests.conftest import build_lora_model

    model = build_lora_model(seed=seed)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.zeros_like(p) if zero_start else 0.5 * p)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    probe = ProbeRun(store, name, run_id=name, sketch_dim=8, probe_batch={"input_ids": ids, "attention_mask": mask})
    probe.begin_window(model, step=0)
    start = probe._start
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in trained:
                p.copy_(trained[n])
    probe.end_window(model, step=4)
    return model, probe, start


@pytest.mark.parametrize("zero_start", [True, False])
def test_window_end_features_are_the_library_features_computed_without_shortcuts(tmp_path, zero_start):
    # The window end reuses its self-disturbance's adapted states as its own states in every cross-disturbance (B
    # started at 0), switches the model's mode and adapter once, and computes each pair's symmetric features once for
    # both orientations: what it stores must be what the library functions give when called one by one.
    from mergeprobe.adapters import load_adapter
    from mergeprobe.features import (
        MEMBER_PREFIXES,
        cross_disturbance,
        oriented_pairwise_features,
        pairwise_features,
        swap_cross,
    )
    from mergeprobe.signals import self_disturbance, update_between

    store = ProbeStore(tmp_path / "store")
    for seed, name in ((1, "a"), (2, "b")):
        _probe_window(store, name, seed, zero_start)
    model, probe, start = _probe_window(store, "c", 3, zero_start)
    own = probe.signals
    assert (own.update is own.end_factors) == zero_start  # one copy of the factors when the update is the end ΔW
    assert all(m.rank == 0 for m in probe._start.modules.values()) == zero_start  # B = 0 at the start: no start factors held
    assert probe._sketcher is None  # the sketch projections are dropped with the window
    rep, _ = self_disturbance(model, own.end_factors, own.probe_input_ids, own.probe_attention_mask)
    assert torch.equal(own.disturbance, rep["disturbance"]) and torch.equal(own.relative_change, rep["relative_change"])
    assert set(probe.comparisons) == {"a", "b"}
    for name in ("a", "b"):
        other = probe._others[name]
        cross = cross_disturbance(model, own, other)
        assert store.pair_features("c", name) == oriented_pairwise_features(own, other, cross)
        assert probe.comparisons[name].features == oriented_pairwise_features(own, other, cross)
        reverse, stored = oriented_pairwise_features(other, own, swap_cross(cross)), store.pair_features(name, "c")
        assert stored.keys() == reverse.keys()
        for key, value in reverse.items():  # the symmetric part computed in the (c, other) order: float round-off only
            assert stored[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key
    # Tracking measures the update since the original window start, whatever the probe keeps of that start.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(1.5)
    now = replace(own, update=update_between(start, load_adapter(model)))
    for name, tracked in probe.track(model, step=8).items():
        measured_now = {k: v for k, v in tracked.features.items() if not k.startswith(("cross_", *MEMBER_PREFIXES, "update_alignment.global"))}
        assert measured_now == pairwise_features(now, probe._others[name], None)


def test_stored_own_states_spare_one_pass_per_stored_run(tmp_path, monkeypatch):
    # Each run stores its own states (base + its update, on its probe batch) with its record; a later run's window
    # end reads them instead of recomputing them, with bitwise the same features. A record without them is recomputed.
    from mergeprobe import signals
    from mergeprobe.store import CACHE_FILE

    store = ProbeStore(tmp_path / "store")
    for seed, name in ((1, "a"), (2, "b")):
        _probe_window(store, name, seed, zero_start=True)
    passes = []
    original = signals.hidden_states
    monkeypatch.setattr(signals, "hidden_states", lambda *args, **kwargs: passes.append(1) or original(*args, **kwargs))
    model, probe, _ = _probe_window(store, "c", 3, zero_start=True)
    assert len(passes) == 2 + 2 * 2  # self-disturbance (base, adapted), then per stored run the merge on both batches
    for name in ("a", "b"):
        other = probe._others[name]
        cached = signals.own_states_from_cache(store.load_cache(name), other)
        with signals.frozen_base(model):
            fresh = signals.hidden_states_with_updates(model, other.update, other.probe_input_ids, other.probe_attention_mask)
        assert all(torch.equal(x, y) for x, y in zip(cached, fresh, strict=True))
    stored = {name: store.pair_features("c", name) for name in ("a", "b")}
    passes.clear()
    assert store.pairwise_features("c", "a", model=model) == stored["a"]  # offline: both runs' states from their records
    assert len(passes) == 2
    for name in ("a", "b"):
        (tmp_path / "store" / "runs" / name / CACHE_FILE).unlink()
    passes.clear()
    _probe_window(store, "c", 3, zero_start=True)
    assert len(passes) == 2 + 3 * 2
    assert {name: store.pair_features("c", name) for name in ("a", "b")} == stored
    # Runs whose B did not start at 0 store no states (their update is not the window-end ΔW of the adapted pass).
    _probe_window(store, "d", 4, zero_start=False)
    assert store.load_cache("d") is None


def test_tracking_measures_each_step_once(tmp_path, monkeypatch):
    # Window steps 1-4, tracking every 4 steps: steps 8 and 12; training ends at step 12, just measured, so train end
    # adds no second measurement of the same adapter. A run ending between tracking steps is measured at its end.
    from mergeprobe.probe import ProbeRun

    steps = []
    original = ProbeRun.track

    def counting(self, model, step):
        steps.append(step)
        return original(self, model, step)

    monkeypatch.setattr(ProbeRun, "track", counting)
    train(str(tmp_path / "store"), "t", str(tmp_path / "t"), seed=1, max_steps=12, predictor=None, tensorboard=False)
    assert steps == [8, 12]
    steps.clear()
    train(str(tmp_path / "store"), "u", str(tmp_path / "u"), seed=2, max_steps=10, predictor=None, tensorboard=False)
    assert steps == [8, 10]


def test_concurrent_processes_share_one_store(tmp_path):
    processes = [run_script(tmp_path / "store", name, tmp_path / name, seed) for seed, name in enumerate(["p", "q", "r"])]
    for process in processes:
        output, _ = process.communicate(timeout=400)
        assert process.returncode == 0, output[-3000:]
    store = ProbeStore(tmp_path / "store")
    assert sorted(store.runs(status="finished")) == ["p", "q", "r"]
    assert_all_pairs(store, ["p", "q", "r"])


def test_ddp_two_processes_write_one_record(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()), str(SCRIPT),
               "--store", str(tmp_path / "store"), "--run-name", "ddp", "--output-dir", str(tmp_path / "ddp"),
               "--callback-kwargs", json.dumps({"predictor": None})]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = ProbeStore(tmp_path / "store")
    assert store.runs() == ["ddp"]
    record = store.load("ddp")
    assert record.meta["status"] == "finished"
    sketches = [v for k, v in record.tensors.items() if k.startswith("gradient.")]
    assert sketches and all(torch.isfinite(s).all() and s.abs().sum() > 0 for s in sketches)
    assert len(list((tmp_path / "ddp" / "runs").iterdir())) == 1  # only rank 0 writes TensorBoard events


def test_resume_after_the_window_does_not_recapture(tmp_path):
    store_path = str(tmp_path / "store")
    train(store_path, "r", str(tmp_path / "out"), seed=1, max_steps=8, save_steps=6, predictor=None)
    before = ProbeStore(store_path).load("r")
    _, callback = train(store_path, "r", str(tmp_path / "out"), seed=1, max_steps=12, predictor=None,
                        resume=str(tmp_path / "out" / "checkpoint-6"))
    after = ProbeStore(store_path).load("r")
    assert after.meta["probe_steps"] == before.meta["probe_steps"] == [0, 4]
    for key, tensor in before.tensors.items():
        if key.startswith(("gradient.", "update.")):
            assert torch.equal(tensor, after.tensors[key]), key
    assert callback.window_done


def test_resume_inside_the_window_restarts_it(tmp_path):
    from tests.scripts.tiny_train import SimulatedCrash

    store_path = str(tmp_path / "store")
    with pytest.raises(SimulatedCrash):
        train(store_path, "w", str(tmp_path / "out"), seed=2, max_steps=12, save_steps=2, predictor=None, probe_steps=6, crash_at=3)
    assert ProbeStore(store_path).runs() == []  # killed inside the window: no record
    _, callback = train(store_path, "w", str(tmp_path / "out"), seed=2, max_steps=12, predictor=None, probe_steps=6,
                        resume=str(tmp_path / "out" / "checkpoint-2"))
    assert (callback.window_start, callback.window_end) == (2, 8)
    assert ProbeStore(store_path).load("w").meta["probe_steps"] == [2, 8]


def test_model_without_lora_is_rejected_at_train_begin(tmp_path):
    from transformers import Trainer, TrainingArguments

    from mergeprobe.callbacks import MergeProbeCallback
    from tests.conftest import build_tiny_llama
    from tests.scripts.tiny_train import TokenDataset

    args = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=2, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=build_tiny_llama(), args=args, train_dataset=TokenDataset(0), callbacks=[MergeProbeCallback(tmp_path / "s")])
    with pytest.raises(MergeProbeError, match="get_peft_model"):
        trainer.train()


def test_unknown_max_steps_requires_probe_steps(tmp_path):
    from transformers.trainer_callback import TrainerState

    from mergeprobe.callbacks import MergeProbeCallback

    state = TrainerState()
    state.max_steps = 0
    with pytest.raises(MergeProbeError, match="probe_steps"):
        MergeProbeCallback(tmp_path / "s")._window_length(None, state)


def test_window_longer_than_training_is_clamped(tmp_path):
    with pytest.warns(UserWarning, match="clamping"):
        _, callback = train(str(tmp_path / "store"), "short", str(tmp_path / "out"), max_steps=3, predictor=None, probe_steps=10)
    assert callback.window_end == 3
    assert ProbeStore(tmp_path / "store").load("short").meta["probe_steps"] == [0, 3]


def test_store_of_another_schema_is_a_clear_error(tmp_path):
    store = ProbeStore(tmp_path / "store")
    info = json.loads((store.path / "store.json").read_text())
    (store.path / "store.json").write_text(json.dumps({**info, "schema_version": 999}))
    with pytest.raises(SchemaVersionError, match="999"):
        train(str(tmp_path / "store"), "x", str(tmp_path / "out"), max_steps=2, predictor=None)


def test_truncated_record_is_skipped_and_the_run_continues(tmp_path):
    store_path = tmp_path / "store"
    train(str(store_path), "first", str(tmp_path / "a"), seed=0, max_steps=6, predictor=None)
    signals = store_path / "runs" / "first" / "signals.safetensors"
    signals.write_bytes(signals.read_bytes()[: signals.stat().st_size // 2])
    with pytest.warns(UserWarning, match="first"):
        _, callback = train(str(store_path), "second", str(tmp_path / "b"), seed=1, max_steps=6, predictor=None)
    assert ProbeStore(store_path).load("second").meta["status"] == "finished"
    assert "first" not in callback._probe.comparisons


def test_same_run_name_from_another_run_is_refused(tmp_path):
    from mergeprobe.errors import StoreError

    train(str(tmp_path / "store"), "dup", str(tmp_path / "one"), max_steps=5, predictor=None)
    with pytest.raises(StoreError, match="overwrite"):
        train(str(tmp_path / "store"), "dup", str(tmp_path / "two"), max_steps=5, predictor=None)
    train(str(tmp_path / "store"), "dup", str(tmp_path / "two"), max_steps=5, predictor=None, overwrite=True)


def test_report_cli_shows_the_pairs_and_the_decision(sequential_runs, alignment_predictor):
    from typer.testing import CliRunner

    from mergeprobe.cli import app

    root, _ = sequential_runs
    result = CliRunner().invoke(app, ["report", str(root / "store"), "--predictor", alignment_predictor, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {r["run"] for r in data["runs"]} == {"alpha", "beta", "gamma"}
    assert len(data["pairs"]) == 6 and all(0.0 <= p["predicted_retention"] <= 1.0 for p in data["pairs"])
    assert data["decision"]["action"] in ("merge", "reweight", "prune", "route") and data["decision"]["reasons"]
    table = CliRunner().invoke(app, ["report", str(root / "store"), "--predictor", "none"])
    assert table.exit_code == 0 and "alpha" in table.output and "no decision" in table.output


def test_fit_cli_refits_on_recorded_outcomes(sequential_runs, tmp_path):
    from typer.testing import CliRunner

    from mergeprobe.cli import app
    from mergeprobe.predictor import MergeProbe

    root, _ = sequential_runs
    store = ProbeStore(root / "store")
    for (a, b), kept in {("alpha", "beta"): (0.9, 0.8), ("alpha", "gamma"): (0.4, 0.5), ("beta", "gamma"): (0.7, 0.6)}.items():
        store.record_outcome([a, b], "linear", {a: kept[0], b: kept[1]})
    out = tmp_path / "refit.skops"
    result = CliRunner().invoke(app, ["fit", str(root / "store"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    probe = MergeProbe.load(out)
    prediction = probe.predict_retention(store.pairwise_features("alpha", "beta"))
    assert prediction.shape == (1,) and 0.3 <= float(prediction[0]) <= 1.0
    missing = CliRunner().invoke(app, ["fit", str(tmp_path / "no-store"), "--out", str(tmp_path / "x.skops")])
    assert missing.exit_code == 2 and "error:" in missing.output
