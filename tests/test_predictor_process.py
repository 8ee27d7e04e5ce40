"""The retention predictor served from a child process (mergeprobe.predictor_process)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
import weakref

import numpy as np
import pytest

from mergeprobe.errors import PredictorError
from mergeprobe.predictor import MergeProbe
from mergeprobe import predictor_process
from mergeprobe.predictor_process import PredictorProcess


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = [{"update_alignment.mean": float(a), "cross_disturbance.mean": float(d)} for a, d in rng.uniform(-1, 1, (200, 2))]
    y = [0.7 + 0.2 * r["update_alignment.mean"] - 0.1 * r["cross_disturbance.mean"] for r in rows]
    model = MergeProbe(max_iter=30).fit(rows, y)
    path = tmp_path_factory.mktemp("predictor") / "probe.skops"
    model.save(path)
    return model, path


def test_the_child_predicts_what_the_model_predicts_in_process(fitted):
    model, path = fitted
    rows = [
        {"update_alignment.mean": 0.5, "cross_disturbance.mean": -0.2},
        {"update_alignment.mean": -0.9},  # a missing feature is NaN on both sides
        {"update_alignment.mean": math.nan, "cross_disturbance.mean": 0.3, "unknown.feature": 1.0},
    ]
    with PredictorProcess(path) as child:
        assert child.wait_ready() is child and child.alive
        np.testing.assert_array_equal(child.predict_retention(rows), model.predict_retention(rows))
        np.testing.assert_array_equal(child.predict_lower_retention(rows), model.predict_lower_retention(rows))
        np.testing.assert_array_equal(child.predict_retention(rows[0]), model.predict_retention(rows[0]))  # one dict
    assert not child.alive


def test_the_shipped_model_is_served_as_default():
    with PredictorProcess("default") as child:
        (value,) = child.predict_retention({"update_alignment.mean": 0.2})
    assert value == float(MergeProbe.default().predict_retention({"update_alignment.mean": 0.2})[0])


def test_a_file_that_is_not_a_predictor_fails_with_the_childs_reason(tmp_path):
    bad = tmp_path / "bad.skops"
    bad.write_text("not a skops file")
    child = PredictorProcess(bad)
    with pytest.raises(PredictorError, match="not a skops file"):
        child.wait_ready()
    with pytest.raises(PredictorError, match="not a skops file"):  # every later call says the same
        child.predict_retention({"update_alignment.mean": 0.2})
    assert not child.alive


def test_a_bad_request_leaves_the_child_serving(fitted):
    model, path = fitted
    with PredictorProcess(path) as child:
        with pytest.raises(PredictorError, match="feature dict"):
            child.predict_retention([])
        with pytest.raises((ValueError, PredictorError)):
            child.predict_retention({"update_alignment.mean": "high"})
        row = {"update_alignment.mean": 0.1}
        np.testing.assert_array_equal(child.predict_retention(row), model.predict_retention(row))


def test_a_child_that_dies_is_reported_not_waited_for(fitted):
    _, path = fitted
    child = PredictorProcess(path).wait_ready()
    child._process.kill()
    child._process.wait()
    with pytest.raises(PredictorError, match="stopped|exited"):
        child.predict_retention({"update_alignment.mean": 0.1})
    assert not child.alive
    child.close()  # idempotent


@pytest.mark.skipif(os.name != "posix", reason="the wait is bounded on POSIX only")
def test_a_child_that_never_answers_is_given_up_on(tmp_path):
    child = PredictorProcess(tmp_path / "absent.skops", timeout=0.5)
    child.close()
    # Stand in a child that hangs: it reads its requests and never answers.
    child._process = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(60)"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child._finalizer = weakref.finalize(child, predictor_process._shut_down, child._process, tempfile.TemporaryFile())
    started = time.monotonic()
    with pytest.raises(PredictorError, match="no answer within 0.5 s"):
        child.wait_ready()
    assert time.monotonic() - started < 30 and child._process.poll() is not None  # ended, not left behind
