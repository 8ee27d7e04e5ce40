"""Fit and evaluate MergeProbe on the benchmark tables (the ``fit`` stage).

Rows (one per labelled member of a merge, see :mod:`benchmarks.mergebench.rows`) come
from both parts. MergeProbe predicts the retention of task arithmetic
(:data:`~benchmarks.mergebench.plan.TARGET_METHOD`) from pairwise features; the other
methods' labels serve the policy and merger comparisons.

Evaluations
-----------
- **Leave one task out** (strict): for each task ``T`` the model is fitted on the pair
  rows that do not involve ``T`` at all (neither member nor partner, on either scale)
  and predicts every row whose member is on ``T``.
- **Across scale**: fitted on the tiny sweep, tested on the SmolLM2 pairs.
- **Feature sets**: ``symmetric`` (the pair's features, the same for both members) and
  ``oriented`` (plus the member features of :func:`mergeprobe.features.member_features`,
  which tell the two members apart). The callback computes and stores both; the shipped
  default uses ``oriented``.
- **Baselines**: the training mean; the update cosine alone (isotonic regression of
  ``update_alignment.mean``).
- **Decision agreement**: ``decide()`` on the predicted pairwise retention (with the lower
  bounds) against ``decide()`` on the measured retention (the oracle), per pair and per set.
- **Policy value**: realised retention of the MergeProbe-guided policy (merge → Pico over
  task arithmetic, reweight → TaDA, route → adapters kept apart, counted as retention 1
  with an ideal router) against always-TA, -TIES, -DARE-TIES, -TSV-M (and others).
- **Early stopping**: replaying the training order, the adapters the decision at their
  window end would route, and the steps that stopping them would save.
- **Merger quality**: TaDA vs DARE-TIES on task–domain pairs, Pico vs its base mergers,
  TaDA ablations.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.mergebench.common import PACKAGE_DATA, cache_root, read_json, write_json
from benchmarks.mergebench.plan import DOMAIN_TASKS, TARGET_METHOD, plan
from mergeprobe.decision import decide
from mergeprobe.features import MEMBER_PREFIXES
from mergeprobe.predictor import spearman

FEATURE_SETS = ("symmetric", "oriented")
DEFAULT_FEATURE_SET = "oriented"
"""The shipped default reads every feature the callback stores for an ordered pair."""
ROUTE_COST = 0.25
"""The price of routing a pair, in retention: a routed pair keeps both adapters and needs a
router at serving time. Thresholds are tuned to maximise mean pair-min retention less
``ROUTE_COST`` × routed share (routing itself counted as retention 1, an ideal router),
so a merge is preferred whenever it keeps at least about 1 − ``ROUTE_COST`` of each member."""
COSINE = "update_alignment.mean"
HIST_EDGES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, math.inf]
POLICY_METHODS = ("linear", "ties", "dare_ties", "tsvm", "pico_linear", "tada")
"""The always-X policies: the methods run on every pair of both parts."""
ACTION_METHOD = {"merge": "pico_linear", "reweight": "pico_linear", "prune": "ties"}
"""The merge each decided action is realised with: decide() names Pico over task arithmetic
for merge and reweight (the benchmark's Pico merges use equal weights, not the decision's
1/retention weights) and TIES for prune."""


# ------------------------------------------------------------------ tables
def load_table(quick: bool, part: str) -> list[dict[str, Any]]:
    """The rows the merge stage wrote for ``part`` (empty when the part was not run)."""
    path = cache_root(quick) / part / "table.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def features_of(row: dict[str, Any], feature_set: str) -> dict[str, float]:
    """The numeric features of a row for ``feature_set``."""
    out = {}
    for key, value in row.items():
        if key in ("retention", "task", "group", "method", "meta") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if feature_set == "symmetric" and key.startswith(MEMBER_PREFIXES):
            continue
        out[key] = float(value)
    return out


def pair_rows(rows: list[dict[str, Any]], method: str = TARGET_METHOD) -> list[dict[str, Any]]:
    return [r for r in rows if r["method"] == method and r["meta"]["set_size"] == 2]


def involved(row: dict[str, Any]) -> set[str]:
    return {row["task"], *row["meta"]["other_tasks"]}


# ------------------------------------------------------------------ metrics
def scores(y: Sequence[float], pred: Sequence[float]) -> dict[str, Any]:
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if len(y) == 0:
        return {"n": 0, "spearman": None, "mae": None}
    return {"n": len(y), "spearman": spearman(pred, y), "mae": float(np.mean(np.abs(pred - y)))}


def _fit(rows: list[dict[str, Any]], feature_set: str) -> Any:
    from mergeprobe.predictor import MergeProbe

    return MergeProbe(random_state=0).fit([features_of(r, feature_set) for r in rows], [r["retention"] for r in rows])


def _cosine_baseline(train: list[dict[str, Any]]) -> Callable[[list[dict[str, Any]]], np.ndarray]:
    from sklearn.isotonic import IsotonicRegression

    x = np.array([r.get(COSINE, np.nan) for r in train], float)
    y = np.array([r["retention"] for r in train], float)
    ok = np.isfinite(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iso = IsotonicRegression(increasing="auto", out_of_bounds="clip").fit(x[ok], y[ok])
    mean = float(y.mean())

    def predict(rows: list[dict[str, Any]]) -> np.ndarray:
        values = np.array([r.get(COSINE, np.nan) for r in rows], float)
        out = np.full(len(rows), mean)
        good = np.isfinite(values)
        if good.any():
            out[good] = iso.predict(values[good])
        return out

    return predict


class Predictions:
    """Held-out predictions (mean, lower bound, baselines) of every row, keyed by (part, run, others)."""

    def __init__(self) -> None:
        self.mean: dict[tuple, float] = {}
        self.lower: dict[tuple, float] = {}
        self.base_mean: dict[tuple, float] = {}
        self.base_cosine: dict[tuple, float] = {}
        self.grouping = "task"

    @staticmethod
    def key(row: dict[str, Any]) -> tuple:
        return (row["meta"]["part"], row["meta"]["run"], tuple(row["meta"]["others"]))

    def add(self, rows: list[dict[str, Any]], model: Any, feature_set: str, train: list[dict[str, Any]]) -> None:
        if not rows:
            return
        features = [features_of(r, feature_set) for r in rows]
        mean = model.predict_retention(features)
        lower = model.predict_lower_retention(features)
        cosine = _cosine_baseline(train)(rows)
        train_mean = float(np.mean([r["retention"] for r in train]))
        for row, m, lo, c in zip(rows, mean, lower, cosine):
            k = self.key(row)
            self.mean[k], self.lower[k], self.base_cosine[k], self.base_mean[k] = float(m), float(lo), float(c), train_mean

    def evaluate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [r for r in rows if self.key(r) in self.mean]
        y = [r["retention"] for r in rows]
        keys = [self.key(r) for r in rows]
        return {
            "mergeprobe": {**scores(y, [self.mean[k] for k in keys]),
                           "lower_coverage": float(np.mean([yy >= self.lower[k] for yy, k in zip(y, keys)])) if rows else None},
            "baseline_mean": scores(y, [self.base_mean[k] for k in keys]),
            "baseline_update_cosine": scores(y, [self.base_cosine[k] for k in keys]),
        }


def leave_one_task_out(rows: list[dict[str, Any]], feature_set: str) -> Predictions:
    """Strict leave-one-task-out predictions for every row (see the module docstring).

    With labels on a single task only (a ``--quick`` run can end up so) there is nothing to
    hold a task out against: the groups are then the runs (leave one adapter out, as
    strictly), and ``Predictions.grouping`` says so.
    """
    predictions = Predictions()
    by_task = len({r["task"] for r in rows}) >= 2
    predictions.grouping = "task" if by_task else "run"

    def members(row: dict[str, Any]) -> set[str]:
        return involved(row) if by_task else {row["meta"]["run"], *row["meta"]["others"]}

    for group in sorted({r["task"] if by_task else r["meta"]["run"] for r in rows}):
        train = [r for r in rows if group not in members(r)]
        test = [r for r in rows if (r["task"] if by_task else r["meta"]["run"]) == group]
        if len(train) < 3 or not test:
            continue
        predictions.add(test, _fit(train, feature_set), feature_set, train)
    return predictions


def across_scale(train_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]], feature_set: str) -> Predictions:
    predictions = Predictions()
    if len(train_rows) >= 10 and test_rows:
        predictions.add(test_rows, _fit(train_rows, feature_set), feature_set, train_rows)
    return predictions


# ------------------------------------------------------------------ decisions and policies
def _pairs_with_both(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, dict[str, Any]]]:
    """(part, i, j) with i < j → {member: its row}, for pairs where both members are labelled."""
    found: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        if row["meta"]["set_size"] != 2:
            continue
        a, b = sorted((row["meta"]["run"], row["meta"]["others"][0]))
        found[(row["meta"]["part"], a, b)][row["meta"]["run"]] = row
    return {k: v for k, v in found.items() if len(v) == 2}


def _decision(members: list[str], values: dict[tuple[str, str], float], lower: dict[tuple[str, str], float] | None) -> Any:
    return decide(members, values, lower)


def decision_agreement(rows: list[dict[str, Any]], predictions: Predictions) -> dict[str, Any]:
    """Share of pairs whose predicted decision equals the oracle decision (both members labelled)."""
    same, total, confusion = 0, 0, defaultdict(int)
    for (part, a, b), members in _pairs_with_both(rows).items():
        keys = {m: Predictions.key(r) for m, r in members.items()}
        if not all(k in predictions.mean for k in keys.values()):
            continue
        other = {a: b, b: a}
        predicted = _decision([a, b], {(m, other[m]): predictions.mean[keys[m]] for m in members},
                              {(m, other[m]): predictions.lower[keys[m]] for m in members})
        oracle = _decision([a, b], {(m, other[m]): members[m]["retention"] for m in members}, None)
        total += 1
        same += predicted.action == oracle.action
        confusion[f"{oracle.action}→{predicted.action}"] += 1
    return {"pairs": total, "agreement": same / total if total else None, "oracle→predicted": dict(sorted(confusion.items()))}


def _measured(results: dict[str, dict[str, Any]], method: str, members: Sequence[str]) -> dict[str, float] | None:
    """Measured retention of every member of a merge, or None if the job is missing or a member is unlabelled."""
    for key in (f"{method}__{'+'.join(members)}", f"{method}__{'+'.join(reversed(members))}"):
        result = results.get(key)
        if result is not None:
            values = {m: result["retention"].get(m) for m in members}
            if all(m in result["labelled"] for m in members):
                return values
            return None
    for key, result in results.items():  # sets: any member order
        if result["method"] == method and sorted(result["members"]) == sorted(members):
            return {m: result["retention"][m] for m in members} if all(m in result["labelled"] for m in members) else None
    return None


def _summary(values: list[list[float]], routed: int, count: int) -> dict[str, Any]:
    flat = [v for vs in values for v in vs]
    return {
        "sets": count,
        "mean_retention": float(np.mean(flat)) if flat else None,
        "mean_min_retention": float(np.mean([min(vs) for vs in values])) if values else None,
        "worst_retention": float(min(flat)) if flat else None,
        "share_below_0.5": float(np.mean([v < 0.5 for v in flat])) if flat else None,
        "routed_share": routed / count if count else None,
    }


def policy_value(rows: list[dict[str, Any]], results: dict[str, dict[str, Any]], predictions: Predictions) -> dict[str, Any]:
    """Realised retention of each policy over the pairs where every policy's merge was measured."""
    policies: dict[str, list[list[float]]] = defaultdict(list)
    routed: dict[str, int] = defaultdict(int)
    actions: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    count = 0
    for (part, a, b), members in _pairs_with_both(rows).items():
        keys = {m: Predictions.key(r) for m, r in members.items()}
        if not all(k in predictions.mean for k in keys.values()):
            continue
        measured = {m: _measured(results, m, [a, b]) for m in (*POLICY_METHODS, "pico_linear", "tada")}
        if any(v is None for v in measured.values()):
            continue
        count += 1
        other = {a: b, b: a}
        for name, values, lower in (
            ("mergeprobe", {(m, other[m]): predictions.mean[keys[m]] for m in members},
             {(m, other[m]): predictions.lower[keys[m]] for m in members}),
            ("oracle", {(m, other[m]): members[m]["retention"] for m in members}, None),
        ):
            decision = _decision([a, b], values, lower)
            actions[name][decision.action] += 1
            if decision.action == "route":
                policies[name].append([1.0, 1.0])
                routed[name] += 1
            else:
                policies[name].append(list(measured[ACTION_METHOD[decision.action]].values()))
        for method in POLICY_METHODS:
            policies[f"always_{method}"].append(list(measured[method].values()))
        policies["always_route"].append([1.0, 1.0])
        routed["always_route"] += 1
    out = {name: _summary(values, routed[name], count) for name, values in policies.items()}
    for name in ("mergeprobe", "oracle"):
        if name in out:
            out[name]["actions"] = dict(actions[name])
    return out


def threshold_sweep(rows: list[dict[str, Any]], results: dict[str, dict[str, Any]], predictions: Predictions) -> list[dict[str, Any]]:
    """Policy value of the MergeProbe policy over a grid of (τ_merge, τ_reweight), for tuning decide()'s defaults."""
    from mergeprobe.decision import DecisionThresholds

    pairs = []
    for (part, a, b), members in _pairs_with_both(rows).items():
        keys = {m: Predictions.key(r) for m, r in members.items()}
        measured = {m: _measured(results, m, [a, b]) for m in set(ACTION_METHOD.values())}
        if all(k in predictions.mean for k in keys.values()) and all(v is not None for v in measured.values()):
            pairs.append((a, b, members, keys, measured))
    grid = []
    for tau_merge in (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        for tau_reweight in (0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9):
            if tau_reweight > tau_merge:
                continue
            thresholds = DecisionThresholds(tau_merge=tau_merge, tau_reweight=tau_reweight)
            values, routed, agree = [], 0, 0
            for a, b, members, keys, measured in pairs:
                other = {a: b, b: a}
                decision = decide([a, b], {(m, other[m]): predictions.mean[keys[m]] for m in members},
                                  {(m, other[m]): predictions.lower[keys[m]] for m in members}, thresholds=thresholds)
                oracle = decide([a, b], {(m, other[m]): members[m]["retention"] for m in members}, thresholds=thresholds)
                agree += decision.action == oracle.action
                if decision.action == "route":
                    routed += 1
                    values.append([1.0, 1.0])
                else:
                    values.append(list(measured[ACTION_METHOD[decision.action]].values()))
            summary = _summary(values, routed, len(pairs))
            grid.append({"tau_merge": tau_merge, "tau_reweight": tau_reweight, "agreement": agree / len(pairs) if pairs else None,
                         **{k: summary[k] for k in ("mean_retention", "mean_min_retention", "worst_retention", "routed_share")},
                         "utility": (summary["mean_min_retention"] or 0.0) - ROUTE_COST * (summary["routed_share"] or 0.0)})
    return grid


UTILITY_TOLERANCE = 0.01
"""Thresholds within this much utility of the best count as equally good; the one that
routes least among them is chosen (merging is preferred unless routing is clearly better)."""


def best_thresholds(grid: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The grid point that routes least among those within ``UTILITY_TOLERANCE`` of the best utility."""
    if not grid:
        return None
    best = max(g["utility"] for g in grid)
    near = [g for g in grid if g["utility"] >= best - UTILITY_TOLERANCE]
    chosen = min(near, key=lambda g: (g["routed_share"] or 0.0, -g["utility"], g["tau_merge"], g["tau_reweight"]))
    return {**chosen, "best_utility": best}


def set_evaluation(rows: list[dict[str, Any]], results: dict[str, dict[str, Any]], predictions: Predictions,
                   pair_truth: dict[tuple[str, str, str], float]) -> dict[str, Any]:
    """Sets: product-rule prediction vs measured TA retention, decision agreement and policy value."""
    truth, predicted_product, measured_product = [], [], []
    same = total = 0
    policies: dict[str, list[list[float]]] = defaultdict(list)
    routed: dict[str, int] = defaultdict(int)
    count = 0
    sets = [r for r in results.values() if len(r["members"]) > 2 and r["method"] == TARGET_METHOD]
    for result in sets:
        part, members = result["part"], result["members"]
        # Product rule for every labelled member whose pairs with the others were all predicted and measured.
        for m in result["labelled"]:
            keys = [(part, m, (o,)) for o in members if o != m]
            if all(k in predictions.mean for k in keys) and all((part, m, o) in pair_truth for o in members if o != m):
                truth.append(result["retention"][m])
                predicted_product.append(math.prod(predictions.mean[k] for k in keys))
                measured_product.append(math.prod(pair_truth[(part, m, o)] for o in members if o != m))
        # Set decisions need every ordered pair, i.e. every member labelled.
        ordered = [(i, j) for i in members for j in members if i != j]
        keys = {(i, j): (part, i, (j,)) for i, j in ordered}
        if not all(k in predictions.mean for k in keys.values()) or not all((part, i, j) in pair_truth for i, j in ordered):
            continue
        pred = {(i, j): predictions.mean[keys[(i, j)]] for i, j in ordered}
        low = {(i, j): predictions.lower[keys[(i, j)]] for i, j in ordered}
        meas = {(i, j): pair_truth[(part, i, j)] for i, j in ordered}
        predicted, oracle = _decision(members, pred, low), _decision(members, meas, None)
        total += 1
        same += (predicted.action, sorted(predicted.routed)) == (oracle.action, sorted(oracle.routed))
        if len(result["labelled"]) != len(members):
            continue
        realised = {}
        for name, decision in (("mergeprobe", predicted), ("oracle", oracle)):
            values = [1.0] * len(decision.routed)
            if decision.action == "route":
                routed[name] += 1
            else:
                merged = _measured(results, ACTION_METHOD[decision.action], decision.merge_set)
                if merged is None:
                    realised = None
                    break
                values += list(merged.values())
            realised[name] = values
        always = {m: _measured(results, m, members) for m in ("linear", "ties", "dare_ties", "tsvm", "pico_linear", "tada")}
        if realised is None or any(v is None for v in always.values()):
            continue
        count += 1
        for name, values in realised.items():
            policies[name].append(values)
        for m, values in always.items():
            policies[f"always_{m}"].append(list(values.values()))
    return {
        "members": len(truth),
        "product_rule_predicted": scores(truth, predicted_product),
        "product_rule_measured_pairs": scores(truth, measured_product),
        "decision_agreement": same / total if total else None,
        "sets": total,
        "policy": {name: _summary(values, routed[name], count) for name, values in policies.items()},
    }


def early_stopping(part: str, quick: bool, predictions: Predictions, pair_truth: dict[tuple[str, str, str], float]) -> dict[str, Any]:
    """Replay the training order: would the decision at run k's window end route run k (stop it)?

    At run k's window end the store holds runs 1..k; the set decision over them (from the
    predicted pairwise retention) stops run k when it routes k. The oracle makes the same
    decision from the measured retention. Saved steps: ``steps − window``.
    """
    the_plan = plan(part, quick)
    # Runs whose adapter did not learn its task have no label and are left out of the replay.
    learnt = {run for (p, run, _) in pair_truth if p == part}
    stops, agree, total_steps, saved, checked = [], 0, 0, 0, 0
    done: list[str] = []
    window = {spec.name: min(spec.steps, max(8, math.ceil(0.03 * spec.steps))) for spec in the_plan.adapters}
    for spec in the_plan.adapters:
        if spec.name not in learnt:
            continue
        total_steps += spec.steps
        done.append(spec.name)
        if len(done) < 2:
            continue
        ordered = [(i, j) for i in done for j in done if i != j]
        keys = {(i, j): (part, i, (j,)) for i, j in ordered}
        if not all(k in predictions.mean for k in keys.values()):
            continue
        checked += 1
        predicted = decide(list(done), {p: predictions.mean[k] for p, k in keys.items()}, {p: predictions.lower[k] for p, k in keys.items()})
        if all((part, i, j) in pair_truth for i, j in ordered):
            oracle = decide(list(done), {(i, j): pair_truth[(part, i, j)] for i, j in ordered})
            oracle_routes = spec.name in oracle.routed
        else:
            oracle_routes = None
        routes = spec.name in predicted.routed
        if routes:
            stops.append({"run": spec.name, "saved_steps": spec.steps - window[spec.name], "oracle_also_routes": oracle_routes})
            saved += spec.steps - window[spec.name]
        agree += (routes == oracle_routes) if oracle_routes is not None else 0
    return {
        "runs_checked": checked,
        "stopped": stops,
        "steps_total": total_steps,
        "steps_saved": saved,
        "share_saved": saved / total_steps if total_steps else None,
        "stop_decision_agrees_with_oracle": agree / checked if checked else None,
    }


# ------------------------------------------------------------------ descriptive
def histogram(values: Sequence[float]) -> dict[str, Any]:
    counts = [0] * (len(HIST_EDGES) - 1)
    for v in values:
        for k in range(len(HIST_EDGES) - 1):
            if HIST_EDGES[k] <= v < HIST_EDGES[k + 1] or (k == 0 and v < 0):
                counts[k] += 1
                break
    labels = [f"[{HIST_EDGES[k]:.1f}, {HIST_EDGES[k + 1]:.1f})" if math.isfinite(HIST_EDGES[k + 1]) else f"≥ {HIST_EDGES[k]:.1f}"
              for k in range(len(HIST_EDGES) - 1)]
    array = np.asarray(values, float)
    return {
        "n": len(values),
        "bins": labels,
        "counts": counts,
        "quantiles": {q: float(np.quantile(array, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if len(values) else {},
        "mean": float(array.mean()) if len(values) else None,
    }


def merger_quality(results: dict[str, dict[str, Any]], part: str, quick: bool) -> dict[str, Any]:
    """Mean retention (and merged score) of method pairs on the same merges: TaDA vs DARE-TIES, Pico vs base, ablations."""
    the_results = [r for r in results.values() if r["part"] == part]
    by_members: dict[tuple[str, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in the_results:
        by_members[tuple(r["members"])][r["method"]] = r
    task_of = {spec.name: spec.task for spec in plan(part, quick).adapters}

    def compare(a: str, b: str, only: Callable[[tuple[str, ...]], bool]) -> dict[str, Any]:
        ra, rb, sa, sb, wins = [], [], [], [], 0
        merges = 0
        for members, methods in by_members.items():
            if not only(members) or a not in methods or b not in methods:
                continue
            labelled = sorted(set(methods[a]["labelled"]) & set(methods[b]["labelled"]))
            if not labelled:
                continue
            merges += 1
            ma = float(np.mean([methods[a]["retention"][m] for m in labelled]))
            mb = float(np.mean([methods[b]["retention"][m] for m in labelled]))
            wins += ma > mb
            ra.append(ma)
            rb.append(mb)
            sa.append(float(np.mean([methods[a]["merged"][m] for m in labelled])))
            sb.append(float(np.mean([methods[b]["merged"][m] for m in labelled])))
        if not merges:
            return {"merges": 0}
        return {
            "merges": merges,
            f"{a}_retention": float(np.mean(ra)),
            f"{b}_retention": float(np.mean(rb)),
            "delta_retention_points": 100 * (float(np.mean(ra)) - float(np.mean(rb))),
            "delta_score_points": 100 * (float(np.mean(sa)) - float(np.mean(sb))),
            f"{a}_wins_share": wins / merges,
        }

    def task_domain(members: tuple[str, ...]) -> bool:
        return len(members) == 2 and len({task_of.get(m) in DOMAIN_TASKS for m in members}) == 2

    def pairs(members: tuple[str, ...]) -> bool:
        return len(members) == 2

    return {
        "tada_vs_dare_ties (task–domain pairs)": compare("tada", "dare_ties", task_domain),
        "pico_linear_vs_linear (pairs)": compare("pico_linear", "linear", pairs),
        "pico_ties_vs_ties (pairs)": compare("pico_ties", "ties", pairs),
        "pico_tsvm_vs_tsvm (pairs)": compare("pico_tsvm", "tsvm", pairs),
        "tada_vs_tada_uniform (ablation: uniform gates)": compare("tada", "tada_uniform", task_domain),
        "tada_vs_tada_keep_conflicts (ablation: no dropping)": compare("tada", "tada_keep_conflicts", task_domain),
        "tada_vs_tada_raw_probe (ablation: unnormalised probe)": compare("tada", "tada_raw_probe", task_domain),
        "tada_vs_tada_beta_half (ablation: gate temperature β = 1/2)": compare("tada", "tada_beta_half", task_domain),
        "tada_vs_tada_beta_quarter (ablation: gate temperature β = 1/4)": compare("tada", "tada_beta_quarter", task_domain),
        "pico_linear_vs_dare_ties (task–domain pairs)": compare("pico_linear", "dare_ties", task_domain),
    }


def single_scores(quick: bool, part: str) -> dict[str, Any]:
    folder = cache_root(quick) / part
    base = read_json(folder / "scores" / "base.json") or {}
    alone = read_json(folder / "scores" / "alone.json") or {}
    alone32 = read_json(folder / "scores" / "alone_float32.json") or {}
    out = {}
    for spec in plan(part, quick).adapters:
        summary = read_json(folder / "train" / spec.name / "train_summary.json") or {}
        out[spec.name] = {
            "task": spec.task, "rank": spec.rank, "lr": spec.lr, "steps": spec.steps, "seed": spec.seed,
            "base": base.get(spec.task), "alone": alone.get(spec.name), "alone_float32": alone32.get(spec.name),
            "train_seconds": summary.get("seconds"), "final_loss": (summary.get("losses") or [None])[-1],
        }
    return out


def compute_seconds(quick: bool, part: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Seconds each artefact took to make, summed from the artefacts themselves (robust to resumed runs)."""
    folder = cache_root(quick) / part
    singles = single_scores(quick, part)
    pretrain = read_json(folder / "base" / "pretrain_summary.json") or {}
    merges = [r.get("seconds") for r in results.values() if r.get("seconds") is not None]
    return {
        "pretraining": pretrain.get("seconds"),
        "adapters": sum(s["train_seconds"] or 0.0 for s in singles.values()),
        "adapter_steps": sum(s["steps"] for s in singles.values()),
        "merges_run": len(merges),
        "merges_skipped": sum(1 for r in results.values() if r.get("skipped")),
        "merge_and_score": sum(merges),
    }


def all_results(quick: bool, part: str) -> dict[str, dict[str, Any]]:
    """The cached results of the plan's merge jobs (results of jobs no longer planned are left out)."""
    folder = cache_root(quick) / part / "merges"
    out = {}
    for job in plan(part, quick).jobs:
        value = read_json(folder / f"{job.key}.json")
        if value is not None:
            out[value["key"]] = value
    return out


# ------------------------------------------------------------------ the stage
def analyse(quick: bool) -> dict[str, Any]:
    """Fit, evaluate, save the default predictor (full run) and write the analysis JSON."""
    parts = ["tiny"] if quick else ["tiny", "smollm2"]
    tables = {part: load_table(quick, part) for part in parts}
    results = {part: all_results(quick, part) for part in parts}
    everything = [r for part in parts for r in tables[part]]
    target = pair_rows(everything)
    out: dict[str, Any] = {"target_method": TARGET_METHOD, "parts": {}}

    for part in parts:
        rows = tables[part]
        out["parts"][part] = {
            "single": single_scores(quick, part),
            "compute_seconds": compute_seconds(quick, part, results[part]),
            "rows": len(rows),
            "merges": len(results[part]),
            "labelled_pairs_and_sets": len({r["meta"]["job"] for r in rows}),
            "pair_rows_target": len(pair_rows(rows)),
            "retention_target": histogram([r["retention"] for r in pair_rows(rows)]),
            "retention_all_methods": histogram([r["retention"] for r in rows]),
            "retention_sets": histogram([r["retention"] for r in rows if r["meta"]["set_size"] > 2]),
            "retention_by_method": {m: histogram([r["retention"] for r in rows if r["method"] == m])["mean"]
                                    for m in sorted({r["method"] for r in rows})},
            "merger_quality": merger_quality(results[part], part, quick),
        }

    truth = {(r["meta"]["part"], r["meta"]["run"], r["meta"]["others"][0]): r["retention"] for r in target}
    evaluation: dict[str, Any] = {}
    loto_by_set: dict[str, Predictions] = {}
    for feature_set in FEATURE_SETS:
        loto = leave_one_task_out(target, feature_set)
        loto_by_set[feature_set] = loto
        block = {"leave_one_task_out": {part: loto.evaluate(pair_rows(tables[part])) for part in parts}, "grouping": loto.grouping}
        block["leave_one_task_out"]["per_task"] = {
            task: loto.evaluate([r for r in target if r["task"] == task])["mergeprobe"] for task in sorted({r["task"] for r in target})
        }
        block["decision_agreement_loto"] = {part: decision_agreement(pair_rows(tables[part]), loto) for part in parts}
        block["policy_loto"] = {part: policy_value(pair_rows(tables[part]), results[part], loto) for part in parts}
        block["sets_loto"] = {part: set_evaluation(tables[part], results[part], loto, truth) for part in parts}
        block["threshold_sweep_loto"] = threshold_sweep(target, {k: v for part in parts for k, v in results[part].items()}, loto)
        block["best_thresholds"] = best_thresholds(block["threshold_sweep_loto"])
        block["early_stopping_loto"] = {part: early_stopping(part, quick, loto, truth) for part in parts}
        if "smollm2" in parts:
            cross = across_scale(pair_rows(tables["tiny"]), pair_rows(tables["smollm2"]), feature_set)
            block["across_scale"] = cross.evaluate(pair_rows(tables["smollm2"]))
            block["decision_agreement_across_scale"] = decision_agreement(pair_rows(tables["smollm2"]), cross)
            block["policy_across_scale"] = policy_value(pair_rows(tables["smollm2"]), results["smollm2"], cross)
            block["sets_across_scale"] = set_evaluation(tables["smollm2"], results["smollm2"], cross, truth)
            block["early_stopping_across_scale"] = early_stopping("smollm2", quick, cross, truth)
        evaluation[feature_set] = block
    out["evaluation"] = evaluation

    # The shipped default: fitted on every target pair row, with the features the callback computes.
    default_rows = [
        {**features_of(r, DEFAULT_FEATURE_SET), "retention": r["retention"], "task": r["task"], "method": r["method"], "meta": r["meta"]}
        for r in target
    ]
    folder = cache_root(quick)
    destination = PACKAGE_DATA if not quick else folder / "package-data"
    destination.mkdir(parents=True, exist_ok=True)
    table = destination / "mergebench_table.jsonl"
    table.write_text("".join(json.dumps(_rounded(row), sort_keys=True) + "\n" for row in default_rows))
    # Fitted from the table exactly as shipped, so `mergeprobe fit <table>` reproduces the shipped model.
    from mergeprobe.predictor import fit_from_table

    model = fit_from_table(table, random_state=0)
    out["default_model"] = {
        "rows": len(default_rows),
        "features": len(model.feature_names_),
        "feature_set": DEFAULT_FEATURE_SET,
        "fitted_on": f"every task-arithmetic pair row of both parts, features: {DEFAULT_FEATURE_SET}",
    }
    model.save(destination / "mergeprobe_default.skops")
    out["default_model"]["path"] = _relative(destination / "mergeprobe_default.skops")
    out["default_model"]["table"] = _relative(table)
    library = evaluation[DEFAULT_FEATURE_SET]
    write_json(destination / "mergeprobe_default.json", {
        **out["default_model"],
        "produced_by": "python -m benchmarks.mergebench.run --stage fit" + (" --quick" if quick else ""),
        "git_commit": _git_commit(),
        "target": f"retention of the first run of a pair under {TARGET_METHOD} (task arithmetic)",
        "feature_names": list(model.feature_names_),
        "params": model.get_params(),
        "leave_one_task_out": {p: library["leave_one_task_out"][p]["mergeprobe"] for p in parts},
        "across_scale": library.get("across_scale", {}).get("mergeprobe"),
        "tuned_thresholds": library.get("best_thresholds"),
        "route_cost": ROUTE_COST,
    })
    write_json(folder / "analysis.json", out)
    return out


def _relative(path: Path) -> str:
    from benchmarks.mergebench.common import REPO

    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _git_commit() -> str | None:
    import subprocess

    from benchmarks.mergebench.common import REPO

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in row.items()}
