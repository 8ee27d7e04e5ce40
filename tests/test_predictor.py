"""MergeProbe: the scikit-learn contract, learning a known monotone signal, safe persistence."""

from __future__ import annotations

import json
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from scipy.stats import spearmanr
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

import mergeprobe
from mergeprobe import predictor as predictor_module
from mergeprobe.errors import PredictorError
from mergeprobe.predictor import (
    MergeProbe,
    fit_from_store,
    fit_from_table,
    leave_one_group_out,
    predict_pairwise,
    read_table,
    rows_from_store,
)

# --------------------------------------------------------------------- contract


@parametrize_with_checks([MergeProbe(max_iter=20)])
def test_sklearn_contract(estimator, check):
    check(estimator)


# ------------------------------------------------------------- synthetic table
def synthetic_rows(n: int = 240, seed: int = 0) -> list[dict]:
    """Retention is a known decreasing function of B-crowding plus an irrelevant feature and noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        crowding = float(rng.uniform(0, 1))
        rows.append(
            {
                "b_crowding_top.max": crowding,
                "update_alignment.mean": float(rng.normal()),
                "retention": float(1.0 - 0.6 * crowding**2 + rng.normal(0, 0.01)),
                "task": f"task{k % 4}",
            }
        )
    return rows


def features_of(rows):
    return [{k: v for k, v in r.items() if k not in ("retention", "task")} for r in rows]


@pytest.fixture(scope="module")
def fitted() -> MergeProbe:
    return fit_from_table(synthetic_rows(), max_iter=100, random_state=0)


def test_learns_a_monotone_function(fitted):
    test = synthetic_rows(200, seed=1)
    pred = fitted.predict_retention(features_of(test))
    truth = [r["retention"] for r in test]
    assert spearmanr(pred, truth).statistic > 0.9
    assert fitted.feature_names_ == ["b_crowding_top.max", "update_alignment.mean"]


def test_lower_bound_is_below_the_mean(fitted):
    test = features_of(synthetic_rows(200, seed=2))
    mean, lower = fitted.predict_retention(test), fitted.predict_lower_retention(test)
    assert lower.mean() < mean.mean()
    assert np.all(lower <= mean)


def test_missing_features_are_nan_and_unknown_ones_ignored(fitted):
    full = fitted.predict_retention({"b_crowding_top.max": 0.9, "update_alignment.mean": 0.0})
    partial = fitted.predict_retention({"b_crowding_top.max": 0.9, "a_new_signal.mean": 5.0})
    assert np.isfinite(partial).all() and full.shape == partial.shape == (1,)
    with pytest.raises(PredictorError, match="none of the 2 features"):
        fitted.predict_retention({"typo.mean": 0.1})
    with pytest.raises(PredictorError, match="not a number"):
        fitted.predict_retention({"b_crowding_top.max": "high"})


def test_dict_and_matrix_predictions_agree(fitted):
    rows = features_of(synthetic_rows(10, seed=3))
    matrix = np.array([[r["b_crowding_top.max"], r["update_alignment.mean"]] for r in rows])
    with pytest.warns(UserWarning, match="feature names"):
        from_matrix = fitted.predict(matrix)
    np.testing.assert_array_equal(fitted.predict(rows), from_matrix)


def test_monotonic_constraint_by_name():
    rows = synthetic_rows(120)
    probe = fit_from_table(rows, max_iter=30, monotonic_cst={"b_crowding_top.max": -1})
    grid = [{"b_crowding_top.max": c, "update_alignment.mean": 0.0} for c in np.linspace(0, 1, 25)]
    assert np.all(np.diff(probe.predict_retention(grid)) <= 1e-12)
    with pytest.raises(ValueError, match="unknown features"):
        fit_from_table(rows, max_iter=5, monotonic_cst={"nope": 1})


def test_feature_missing_from_every_training_row_is_tolerated():
    rows = features_of(synthetic_rows(60))
    for row in rows:
        row["gradient_alignment.deep"] = None
    probe = MergeProbe(max_iter=10).fit(rows, np.linspace(0, 1, 60))
    assert np.isfinite(probe.predict_retention(rows[:3])).all()


# ------------------------------------------------------------------ persistence
def test_save_load_round_trip(fitted, tmp_path):
    path = fitted.save(tmp_path / "probe.skops")
    assert [p.name for p in tmp_path.iterdir()] == ["probe.skops"]  # no temporary file left
    loaded = MergeProbe.load(path)
    test = features_of(synthetic_rows(50, seed=4))
    np.testing.assert_array_equal(loaded.predict_retention(test), fitted.predict_retention(test))
    np.testing.assert_array_equal(loaded.predict_lower_retention(test), fitted.predict_lower_retention(test))
    assert loaded.get_params() == fitted.get_params()


def test_unfitted_model_cannot_be_saved(tmp_path):
    with pytest.raises(PredictorError, match="unfitted"):
        MergeProbe().save(tmp_path / "x.skops")


EXECUTED: list[str] = []


class Payload:
    """Records any attempt to rebuild it: loading must not get that far."""

    def __init__(self) -> None:
        self.value = 1

    def __setstate__(self, state):
        EXECUTED.append("setstate")
        self.__dict__.update(state)


def test_untrusted_custom_class_is_refused_before_construction(fitted, tmp_path):
    probe = clone(fitted).fit(features_of(synthetic_rows(40)), np.linspace(0, 1, 40))
    probe.payload_ = Payload()
    path = tmp_path / "evil.skops"
    sio.dump(probe, path)
    EXECUTED.clear()
    with pytest.raises(PredictorError) as err:
        MergeProbe.load(path)
    assert "Payload" in str(err.value) and "evil.skops" in str(err.value)
    assert EXECUTED == []


def test_untrusted_module_is_never_imported(fitted, tmp_path):
    evil_class = type("Evil", (), {"__module__": "never_imported_evil_module", "x": 1})
    probe = clone(fitted).fit(features_of(synthetic_rows(40)), np.linspace(0, 1, 40))
    probe.payload_ = evil_class()
    path = tmp_path / "evil.skops"
    sio.dump(probe, path)
    with pytest.raises(PredictorError, match=r"never_imported_evil_module\.Evil"):
        MergeProbe.load(path)
    assert "never_imported_evil_module" not in sys.modules


def test_type_skops_trusts_by_default_is_still_refused(fitted, tmp_path):
    probe = clone(fitted).fit(features_of(synthetic_rows(40)), np.linspace(0, 1, 40))
    probe.extra_ = OrderedDict(a=1)
    path = tmp_path / "ordered.skops"
    sio.dump(probe, path)
    with pytest.raises(PredictorError, match=r"collections\.OrderedDict"):
        MergeProbe.load(path)


def test_non_mergeprobe_object_is_refused(tmp_path):
    path = tmp_path / "dict.skops"
    sio.dump({"a": [1, 2]}, path)
    with pytest.raises(PredictorError, match="not a MergeProbe"):
        MergeProbe.load(path)


def test_pickle_renamed_to_skops_is_refused(fitted, tmp_path):
    path = tmp_path / "model.skops"
    path.write_bytes(pickle.dumps(fitted))
    with pytest.raises(PredictorError, match="pickle"):
        MergeProbe.load(path)
    (tmp_path / "text.skops").write_text("hello")
    with pytest.raises(PredictorError, match="not a skops file"):
        MergeProbe.load(tmp_path / "text.skops")
    with pytest.raises(PredictorError, match="does not exist"):
        MergeProbe.load(tmp_path / "absent.skops")


def test_a_build_without_the_default_model_says_how_to_fit_one(monkeypatch, tmp_path):
    monkeypatch.setattr(predictor_module, "_default_model_path", lambda: tmp_path / "mergeprobe_default.skops")
    with pytest.raises(PredictorError, match="not shipped") as err:
        MergeProbe.default()
    assert "mergeprobe fit" in str(err.value)


DATA = Path(predictor_module.__file__).parent / "data"


def test_shipped_default_loads_through_skops_trusted_types_without_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the shipped predictor must not be unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    probe = MergeProbe.default()
    assert isinstance(probe, MergeProbe)
    untrusted = sio.get_untrusted_types(file=DATA / "mergeprobe_default.skops")
    assert set(untrusted) <= set(predictor_module.TRUSTED_TYPES)


def test_shipped_default_is_the_model_of_the_shipped_table():
    """The table, provenance and model agree: refitting on the table reproduces the shipped predictions."""
    probe = MergeProbe.default()
    provenance = json.loads((DATA / "mergeprobe_default.json").read_text())
    assert provenance["feature_names"] == list(probe.feature_names_)
    rows = read_table(DATA / "mergebench_table.jsonl")
    assert len(rows) == provenance["rows"] >= 300
    assert {r["meta"]["part"] for r in rows} == {"tiny", "smollm2"}
    refit = fit_from_table(rows, **provenance["params"])
    sample = [{k: v for k, v in r.items() if k not in ("retention", "task", "method", "meta")} for r in rows[::25]]
    np.testing.assert_allclose(refit.predict_retention(sample), probe.predict_retention(sample), atol=1e-6)
    predicted = probe.predict_retention(sample)
    assert np.isfinite(predicted).all() and (predicted >= 0).all()


def test_shipped_default_reads_exactly_the_features_the_callback_computes():
    from mergeprobe.features import cross_disturbance, oriented_pairwise_features
    from tests.test_features import _signals
    from tests.conftest import build_tiny_llama

    a, b = _signals(1), _signals(2, batch_seed=5)
    computed = oriented_pairwise_features(a, b, cross_disturbance(build_tiny_llama(), a, b))
    assert set(computed) == set(MergeProbe.default().feature_names_)


# ------------------------------------------------------------------ tables
def test_read_table_jsonl_and_csv(tmp_path):
    rows = synthetic_rows(30)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    csv_path = tmp_path / "t.csv"
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
    lines[1] = lines[1].replace(str(rows[0]["update_alignment.mean"]), "")  # one missing cell
    csv_path.write_text("\n".join(lines) + "\n")
    from_csv = read_table(csv_path)
    assert from_csv[0]["update_alignment.mean"] is None and from_csv[0]["task"] == "task0"
    a = fit_from_table(jsonl, max_iter=10, random_state=0)
    b = fit_from_table(rows, max_iter=10, random_state=0)
    c = fit_from_table(csv_path, max_iter=10, random_state=0)
    test = features_of(synthetic_rows(5, seed=9))
    np.testing.assert_array_equal(a.predict_retention(test), b.predict_retention(test))
    assert c.feature_names_ == a.feature_names_


def test_table_errors(tmp_path):
    with pytest.raises(PredictorError, match="no finite 'retention'"):
        fit_from_table([{"x.mean": 1.0}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x.mean": 1, "retention": 1}\n{oops\n')
    with pytest.raises(PredictorError, match=r"bad\.jsonl:2"):
        read_table(bad)


# ------------------------------------------------------------------ probe store
class FakeStore:
    """The two methods of ProbeStore the predictor uses."""

    def __init__(self, crowding: dict[frozenset, float]) -> None:
        self.crowding = crowding
        self.calls: list[tuple[str, str]] = []

    def outcomes(self):
        out = []
        for pair, c in self.crowding.items():
            a, b = sorted(pair)
            out.append({"runs": [a, b], "method": "linear", "retention": {a: 1.0 - 0.5 * c, b: 0.95 - 0.5 * c}})
        out.append({"runs": ["r0", "r1", "r2"], "method": "linear", "retention": {"r0": 0.1}})  # set-level: skipped
        out.append({"runs": ["r0", "r1"], "method": "ties", "retention": {"r0": 0.0}})
        return out

    def pairwise_features(self, a, b):
        self.calls.append((a, b))
        c = self.crowding[frozenset((a, b))]
        return {"b_crowding_top.max": c, "norm_ratio.mean": 1.0 if a < b else -1.0}


@pytest.fixture
def store():
    rng = np.random.default_rng(0)
    runs = [f"r{k}" for k in range(10)]
    return FakeStore({frozenset((a, b)): float(rng.uniform()) for i, a in enumerate(runs) for b in runs[i + 1 :]})


def test_rows_from_store_orients_each_member(store):
    rows = rows_from_store(store, method="linear")
    assert len(rows) == 2 * 45
    first = [r for r in rows if r["group"] == "r0" and r["norm_ratio.mean"] == 1.0]
    assert len(first) == 9
    assert ("r1", "r0") in store.calls and ("r0", "r1") in store.calls
    assert len(rows_from_store(store)) == 2 * 45 + 1  # the ties outcome of r0 is kept without the filter


def test_fit_from_store_and_predict_pairwise(store):
    probe = fit_from_store(store, method="linear", max_iter=60, random_state=0)
    mean, lower = predict_pairwise(probe, store, ["r0", "r1", "r2"])
    assert set(mean) == {(i, j) for i in ("r0", "r1", "r2") for j in ("r0", "r1", "r2") if i != j}
    assert all(lower[p] <= mean[p] for p in mean)
    truth = {(i, j): (1.0 if i < j else 0.95) - 0.5 * store.crowding[frozenset((i, j))] for i, j in mean}
    assert spearmanr([mean[p] for p in mean], [truth[p] for p in mean]).statistic > 0.8


def test_fit_from_empty_store_says_what_to_do():
    class Empty:
        def outcomes(self):
            return []

    with pytest.raises(PredictorError, match="no evaluated pairwise merges"):
        fit_from_store(Empty())


# ------------------------------------------------------------------ evaluation
def test_leave_one_group_out_beats_the_mean_baseline():
    rows = synthetic_rows(160)
    report = leave_one_group_out(rows, probe=MergeProbe(max_iter=60, random_state=0))
    assert report["n"] == 160 and report["n_groups"] == 4
    assert report["spearman"] > 0.9
    assert report["mae"] < report["baselines"]["mean"]["mae"]
    assert report["baselines"]["mean"]["spearman"] is None or abs(report["baselines"]["mean"]["spearman"]) < 0.5
    # update_alignment.mean is noise here, so the single-signal baseline is poor.
    assert report["baselines"]["update_cosine"]["mae"] > report["mae"]
    assert 0.5 <= report["lower_coverage"] <= 1.0
    assert set(report["per_group"]) == {"task0", "task1", "task2", "task3"}
    json.dumps(report)


def test_leave_one_group_out_needs_two_groups():
    with pytest.raises(PredictorError, match="at least two groups"):
        leave_one_group_out(synthetic_rows(20), groups=["g"] * 20)


def test_reexported():
    assert mergeprobe.MergeProbe is MergeProbe
