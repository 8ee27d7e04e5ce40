"""decide(): every action is reachable, reasons carry the numbers, set-level removal routes the culprit."""

from __future__ import annotations

import json
import re

import pytest

import mergeprobe
from mergeprobe.decision import Decision, DecisionThresholds
from mergeprobe.decision import decide as library_decide
from mergeprobe.errors import MergeError

RULE = DecisionThresholds(tau_merge=0.9, tau_reweight=0.75, conflict_share=0.5)
"""Thresholds with a reweight band, so that every rule can be exercised (the benchmark-tuned
defaults close that band: see test_defaults_are_the_thresholds_tuned_on_the_benchmark)."""


def decide(*args, **kwargs):
    kwargs.setdefault("thresholds", RULE)
    return library_decide(*args, **kwargs)


def pairs(runs, value=0.95, **overrides):
    """Every ordered pair of ``runs`` at ``value``; overrides as ``i__j=value``."""
    table = {(i, j): value for i in runs for j in runs if i != j}
    for key, v in overrides.items():
        i, j = key.split("__")
        table[(i, j)] = v
    return table


def test_merge_when_everyone_keeps_their_skill():
    d = decide(["math", "code"], pairs(["math", "code"], math__code=0.97, code__math=0.93))
    assert (d.action, d.method, d.base_method) == ("merge", "pico", "linear")
    assert d.merge_set == ["math", "code"] and d.routed == []
    assert d.weights == {"math": 1.0, "code": 1.0}
    assert d.predicted_min_retention == pytest.approx(0.93)
    assert any("0.930" in r and "0.900" in r for r in d.reasons)


def test_reweight_lifts_the_weakest_member():
    d = decide(["a", "b"], pairs(["a", "b"], a__b=0.95, b__a=0.8))
    assert (d.action, d.method, d.base_method) == ("reweight", "pico", "linear")
    assert d.weights["b"] > d.weights["a"]
    assert sum(d.weights.values()) / 2 == pytest.approx(1.0)
    assert d.weights["b"] / d.weights["a"] == pytest.approx(0.95 / 0.8)
    text = " ".join(d.reasons)
    assert "0.800" in text and "0.750" in text and "lift b" in text


def test_uncertain_lower_bound_turns_merge_into_reweight():
    runs = ["a", "b"]
    d = decide(runs, pairs(runs, 0.95), lower=pairs(runs, 0.92, b__a=0.6))
    assert d.action == "reweight"
    assert d.predicted_min_lower == pytest.approx(0.6)
    assert any("lower bound of b is 0.600" in r for r in d.reasons)
    assert decide(runs, pairs(runs, 0.95), lower=pairs(runs, 0.8)).action == "merge"


def test_prune_when_interference_is_concentrated():
    runs = ["task", "domain"]
    r = pairs(runs, task__domain=0.6, domain__task=0.9)
    d = decide(runs, r, conflict_share={("domain", "task"): 0.8})
    assert (d.action, d.method) == ("prune", "ties")
    assert any("0.800" in reason and "0.500" in reason for reason in d.reasons)
    spread = decide(runs, r, conflict_share={("task", "domain"): 0.2})
    assert spread.action == "route"
    assert any("0.200" in reason and "spread out" in reason for reason in spread.reasons)
    unknown = decide(runs, r, conflict_share={("task", "domain"): float("nan")})
    assert unknown.action == "route" and any("no conflict share for domain–task" in x for x in unknown.reasons)
    three = ["a", "b", "c"]
    d3 = decide(three, pairs(three, 0.6), conflict_share={(i, j): 0.9 for i, j in pairs(three)})
    assert (d3.action, d3.method) == ("prune", "ties")


def test_route_when_nothing_merges():
    runs = ["a", "b", "c"]
    d = decide(runs, pairs(runs, 0.5))
    assert d.action == "route" and d.method is None
    assert d.merge_set == [] and d.routed == runs and d.weights == {}
    assert any("route every adapter" in r for r in d.reasons)


def test_set_level_removal_routes_the_conflicting_member():
    runs = ["math", "code", "safety", "science"]
    # safety clashes with everyone; the other three get along.
    r = pairs(runs, 0.97)
    for other in ("math", "code", "science"):
        r[(other, "safety")] = 0.7
        r[("safety", other)] = 0.75
    d = decide(runs, r)
    assert d.routed == ["safety"]
    assert d.merge_set == ["math", "code", "science"]
    assert d.action == "merge"
    assert d.predicted_min_retention == pytest.approx(0.97**2)
    text = " ".join(d.reasons)
    assert "without safety" in text and "route safety separately" in text
    assert re.search(r"0\.941", text)  # 0.97² for the rest


def test_removal_stops_when_it_does_not_help():
    runs = ["a", "b", "c"]
    # Everyone clashes equally: removing one does not lift the others above τ_reweight.
    d = decide(runs, pairs(runs, 0.6))
    assert d.action == "route" and d.routed == runs


def test_removal_can_route_more_than_one():
    runs = ["a", "b", "c", "d"]
    r = pairs(runs, 0.97)
    for bad, severity in (("c", 0.5), ("d", 0.3)):
        for other in runs:
            if other != bad:
                r[(other, bad)] = severity
                r[(bad, other)] = severity
    d = decide(runs, r)
    assert sorted(d.routed) == ["c", "d"] and d.merge_set == ["a", "b"] and d.action == "merge"


def test_thresholds_are_configurable_and_validated():
    runs = ["a", "b"]
    r = pairs(runs, 0.85)
    assert decide(runs, r).action == "reweight"
    assert decide(runs, r, thresholds=DecisionThresholds(tau_merge=0.8)).action == "merge"
    with pytest.raises(MergeError, match="must not exceed"):
        DecisionThresholds(tau_merge=0.5, tau_reweight=0.7)
    with pytest.raises(MergeError, match="conflict_share"):
        DecisionThresholds(conflict_share=1.5)


def test_invalid_inputs_are_named():
    with pytest.raises(MergeError, match="at least two runs"):
        decide(["a"], {})
    with pytest.raises(MergeError, match=r"\('b', 'a'\)"):
        decide(["a", "b"], {("a", "b"): 0.9})
    with pytest.raises(MergeError, match="finite"):
        decide(["a", "b"], {("a", "b"): 0.9, ("b", "a"): float("nan")})
    with pytest.raises(MergeError, match="duplicate"):
        decide(["a", "a"], {})


def test_defaults_are_the_thresholds_tuned_on_the_benchmark():
    from pathlib import Path

    provenance = json.loads((Path(mergeprobe.__file__).parent / "data" / "mergeprobe_default.json").read_text())
    tuned = provenance["tuned_thresholds"]
    defaults = DecisionThresholds()
    assert (defaults.tau_merge, defaults.tau_reweight) == (tuned["tau_merge"], tuned["tau_reweight"])
    runs = ["a", "b"]
    below, above = tuned["tau_merge"] - 0.01, tuned["tau_merge"] + 0.01
    assert library_decide(runs, pairs(runs, below)).action == "route"
    assert library_decide(runs, pairs(runs, above)).action == "merge"


def test_to_dict_is_json_safe():
    d = decide(["a", "b"], pairs(["a", "b"], 0.8), lower=pairs(["a", "b"], 0.7))
    payload = json.loads(json.dumps(d.to_dict()))
    assert payload["action"] == "reweight"
    assert payload["thresholds"] == {"tau_merge": 0.9, "tau_reweight": 0.75, "conflict_share": 0.5}
    assert set(payload) >= {"action", "method", "weights", "merge_set", "routed", "predicted_min_retention", "reasons"}


def test_reexported():
    assert mergeprobe.decide is library_decide and mergeprobe.Decision is Decision
    assert mergeprobe.DecisionThresholds is DecisionThresholds
