"""The callback acting on predictions: early stop of an unmergeable adapter, merge when the last run ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from peft import PeftModel

from mergeprobe.store import ProbeStore
from tests.conftest import build_tiny_llama
from tests.scripts.tiny_train import train
from tests.test_callback import REPO, SCRIPT


def test_early_stop_on_a_constructed_unmergeable_pair(tmp_path, alignment_predictor):
    store = str(tmp_path / "store")
    _, first = train(store, "descent", str(tmp_path / "a"), seed=0, max_steps=16, predictor=alignment_predictor, stop_unmergeable=True)
    assert first.stop_reason is None  # alone in the store: nothing to decide
    trainer, opposed = train(store, "ascent", str(tmp_path / "b"), seed=0, max_steps=16, ascent=True,
                             predictor=alignment_predictor, stop_unmergeable=True)
    assert opposed.decision is not None and opposed.decision.action == "route"
    assert "ascent" in opposed.decision.routed
    assert trainer.state.global_step < 16  # stopped at the window end, not trained to the end
    record = ProbeStore(store).load("ascent")
    assert record.meta["status"] == "stopped"
    assert record.meta["stop_reason"] == opposed.stop_reason and "retention" in record.meta["stop_reason"]


def test_no_early_stop_on_a_mergeable_pair(tmp_path, alignment_predictor):
    store = str(tmp_path / "store")
    train(store, "one", str(tmp_path / "a"), seed=0, max_steps=12, predictor=alignment_predictor, stop_unmergeable=True)
    trainer, twin = train(store, "two", str(tmp_path / "b"), seed=0, max_steps=12, predictor=alignment_predictor,
                          stop_unmergeable=True)
    assert twin.decision is not None and twin.decision.action in ("merge", "reweight")
    assert twin.decision.routed == [] and twin.stop_reason is None
    assert trainer.state.global_step == 12
    assert ProbeStore(store).load("two").meta["status"] == "finished"


def test_merge_on_end_writes_exactly_one_adapter_for_concurrent_runs(tmp_path):
    runs = ["p", "q", "r"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    kwargs = json.dumps({"predictor": None, "merge_on_end": "linear", "expected_runs": runs})
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--store", str(tmp_path / "store"), "--run-name", name, "--output-dir",
             str(tmp_path / name), "--seed", str(seed), "--max-steps", "10", "--callback-kwargs", kwargs],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for seed, name in enumerate(runs)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=400)
        assert process.returncode == 0, output[-3000:]
    store = ProbeStore(tmp_path / "store")
    merges = store.merges()
    assert len(merges) == 1 and merges[0]["merged"]
    assert merges[0]["info"]["runs"] == runs
    adapter = merges[0]["path"] / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    PeftModel.from_pretrained(build_tiny_llama(), str(adapter))  # a standard PEFT adapter


def test_the_shipped_predictor_loads_in_a_child_process_and_predicts_at_the_window_end(tmp_path):
    from mergeprobe.predictor import MergeProbe

    store = str(tmp_path / "store")
    _, first = train(store, "first", str(tmp_path / "first"), seed=0, predictor="default")
    assert first._probe.predictor is None and first._predictor_deferred  # alone in the store: nothing to predict, not loaded
    _, callback = train(store, "second", str(tmp_path / "second"), seed=1, predictor="default")
    assert not callback._predictor_loading and callback._predictor_process is None  # handed over; the child ended with training
    (comparison,) = callback._probe.comparisons.values()
    assert 0.0 <= comparison.predicted_retention and comparison.predicted_lower <= comparison.predicted_retention + 1e-9
    # The child predicted exactly what the shipped model predicts in this process.
    shipped = MergeProbe.default()
    assert comparison.predicted_retention == float(shipped.predict_retention(comparison.features)[0])
    assert comparison.predicted_lower == float(shipped.predict_lower_retention(comparison.features)[0])
    assert callback.decision is not None


def test_an_unreadable_predictor_path_warns_and_the_run_trains_on(tmp_path):
    import pytest

    (tmp_path / "bad.skops").write_text("not a skops file")
    train(str(tmp_path / "store"), "first", str(tmp_path / "first"), predictor=None)
    with pytest.warns(UserWarning, match="no retention predictor"):
        _, callback = train(str(tmp_path / "store"), "only", str(tmp_path / "only"), predictor=str(tmp_path / "bad.skops"))
    assert callback._probe.predictor is None and callback.window_done


def test_a_run_alone_in_the_store_loads_the_predictor_when_another_run_appears(tmp_path, monkeypatch):
    # The first run defers loading; a run that reaches the store while it trains makes its next tracking step load the
    # predictor and predict against it.
    from mergeprobe.callbacks import MergeProbeCallback

    store = str(tmp_path / "store")
    loads = []
    original = MergeProbeCallback._start_loading_predictor

    def start_loading(self):
        if isinstance(self.predictor, str):  # a predictor to load (the late run has none)
            loads.append(self.run_name)
        return original(self)

    monkeypatch.setattr(MergeProbeCallback, "_start_loading_predictor", start_loading)
    original_track = MergeProbeCallback.on_step_end

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.run_name == "early" and state.global_step == 6:  # after its window: another run finishes its own
            train(store, "late", str(tmp_path / "late"), seed=1, max_steps=8, predictor=None)
        return original_track(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(MergeProbeCallback, "on_step_end", on_step_end)
    _, callback = train(store, "early", str(tmp_path / "early"), seed=0, max_steps=12, predictor="default")
    assert loads == ["early"] and callback._probe.predictor is not None
    assert callback._probe.comparisons["late"].predicted_retention is not None

