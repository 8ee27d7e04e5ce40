"""ProbeRun's tracking shortcuts give exactly what the straightforward computation gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeprobe.core import inner
from mergeprobe.errors import PredictorError
from mergeprobe.probe import ProbeRun, _global_cosine, _global_norm
from mergeprobe.store import ProbeStore
from tests.test_callback import _probe_window


def _update(seed: int, shapes: dict[str, tuple[int, int]], rank: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {key: (torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g)) for key, (d_out, d_in) in shapes.items()}


def _cosine_module_by_module(first, second) -> float:
    """The global cosine as it was computed before the norms were passed in (every norm recomputed per pair)."""
    shared = sorted(set(first) & set(second))
    dot = sum(float(inner(first[k], second[k])) for k in shared)
    norm_a = sum(float(inner(first[k], first[k])) for k in first) ** 0.5
    norm_b = sum(float(inner(second[k], second[k])) for k in second) ** 0.5
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / (norm_a * norm_b)))


def test_global_cosine_with_precomputed_norms_is_bitwise_the_module_by_module_cosine():
    shapes = {f"layers.{i}.{kind}": shape for i in range(3) for kind, shape in (("q_proj", (16, 16)), ("up_proj", (40, 16)))}
    first, second = _update(0, shapes), _update(1, {**shapes, "layers.9.down_proj": (16, 40)})  # second has an extra module
    value = _global_cosine(first, second, _global_norm(first), _global_norm(second))
    assert value == _cosine_module_by_module(first, second)
    assert _global_cosine(first, first, _global_norm(first), _global_norm(first)) == pytest.approx(1.0, abs=1e-6)
    zero = {k: (torch.zeros_like(b), a) for k, (b, a) in first.items()}
    assert _global_norm(zero) == 0.0
    assert _global_cosine(zero, second, 0.0, _global_norm(second)) == 0.0 == _cosine_module_by_module(zero, second)


class _RowPredictor:
    """A predictor whose value depends on each row alone; it records how often it is called."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def predict_retention(self, rows):
        self.calls += 1
        if self.fail:
            raise PredictorError("the predictor process died")
        return np.array([0.5 + 0.01 * row["update_alignment.global"] for row in rows])

    def predict_lower_retention(self, rows):
        self.calls += 1
        return np.array([0.4 + 0.01 * row["update_alignment.global"] for row in rows])


def test_tracking_measures_every_stored_run_as_before_with_one_predictor_call_per_bound(tmp_path):
    # Tracking with two stored runs: the global cosine equals the module-by-module one against each run's stored
    # update, and one batched predictor call per bound gives every run the prediction its own row gets.
    from mergeprobe.adapters import load_adapter
    from mergeprobe.signals import update_between

    store = ProbeStore(tmp_path / "store")
    for seed, name in ((1, "a"), (2, "b")):
        _probe_window(store, name, seed, zero_start=True)
    model, probe, start = _probe_window(store, "c", 3, zero_start=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(1.5)
    current = update_between(start, load_adapter(model))
    probe.predictor = predictor = _RowPredictor()
    tracked = probe.track(model, step=8)
    assert set(tracked) == {"a", "b"} and predictor.calls == 2
    for name, comparison in tracked.items():
        cosine = comparison.features["update_alignment.global"]
        assert cosine == _cosine_module_by_module(current, probe._others[name].update)
        assert comparison.predicted_retention == float(predictor.predict_retention([comparison.features])[0])
        assert comparison.predicted_lower == float(predictor.predict_lower_retention([comparison.features])[0])
    assert probe.track(model, step=9) == tracked  # the cached norms of the stored runs change nothing

    probe.predictor = _RowPredictor(fail=True)
    with pytest.warns(UserWarning, match="could not predict retention"):
        failed = probe.track(model, step=10)
    assert probe.predictor is None
    assert all(c.predicted_retention is None and c.predicted_lower is None for c in failed.values())
    assert {n: c.features for n, c in failed.items()} == {n: c.features for n, c in tracked.items()}


def test_predictions_for_several_rows_equal_one_call_per_row():
    # A fitted MergeProbe predicts each row on its own: the batched call of tracking changes no value.
    from mergeprobe.predictor import MergeProbe

    rng = np.random.default_rng(0)
    rows = [{"update_alignment.mean": float(x), "b_crowding_top.mean": float(y)} for x, y in rng.uniform(size=(40, 2))]
    target = [1.0 - 0.5 * r["b_crowding_top.mean"] + 0.1 * r["update_alignment.mean"] for r in rows]
    predictor = MergeProbe(max_iter=20).fit(rows, target)
    probe = ProbeRun(store=None, run_name="x", predictor=predictor)
    batched = probe._predict(rows[:5])
    one_by_one = [probe._predict([row])[0] for row in rows[:5]]
    assert batched == one_by_one
    assert probe._predict([]) == []


def test_decision_from_the_set_read_equals_the_decision_from_one_read_per_pair(tmp_path):
    # decide_for_store reads the set's pair features in one pass; the decision is the one the per-pair reads give,
    # also where a pair file is missing in one orientation or both.
    from mergeprobe.decision import decide
    from mergeprobe.predictor import MergeProbe
    from mergeprobe.probe import decide_for_store

    store = ProbeStore(tmp_path / "store")
    for seed, name in ((1, "a"), (2, "b"), (3, "c")):
        _probe_window(store, name, seed, zero_start=True)
    (store.path / "pairs" / "a+b.json").unlink()  # (a, b) falls back to (b, a)
    (store.path / "pairs" / "a+c.json").unlink()
    (store.path / "pairs" / "c+a.json").unlink()  # {a, c}: computed from the records
    rng = np.random.default_rng(0)
    rows = [{"update_alignment.mean": float(x), "b_crowding_top.mean": float(y)} for x, y in rng.uniform(-1, 1, size=(40, 2))]
    predictor = MergeProbe(max_iter=20).fit(rows, [0.9 - 0.3 * abs(r["b_crowding_top.mean"]) for r in rows])
    runs = ["c", "a", "b"]
    pairs = [(i, j) for i in runs for j in runs if i != j]
    features = [store.pairwise_features(*pair) for pair in pairs]
    expected = decide(
        runs,
        dict(zip(pairs, map(float, predictor.predict_retention(features)))),
        dict(zip(pairs, map(float, predictor.predict_lower_retention(features)))),
        conflict_share={p: float(f.get("b_crowding_top.mean", 0.0)) for p, f in zip(pairs, features)},
    )
    assert decide_for_store(store, runs, predictor) == expected
