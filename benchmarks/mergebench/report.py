"""Write ``mergebench.json`` and ``mergebench.md`` from the analysis (the ``report`` stage).

Every number comes from ``analysis.json`` (written by the ``fit`` stage); nothing is
typed in by hand. The full run writes to ``benchmarks/results/``; ``--quick`` writes
next to its cache.
"""

from __future__ import annotations

import platform
import time
from typing import Any

from benchmarks.mergebench.analysis import ROUTE_COST, UTILITY_TOLERANCE
from benchmarks.mergebench.common import RESULTS, cache_root, read_json, write_json
from benchmarks.mergebench.plan import METHODS, TARGET_METHOD


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _histogram(hist: dict[str, Any], width: int = 40) -> str:
    if not hist or not hist.get("n"):
        return "(no labels)"
    top = max(hist["counts"]) or 1
    rows = [[label, count, "█" * round(width * count / top)] for label, count in zip(hist["bins"], hist["counts"])]
    quantiles = ", ".join(f"q{int(100 * float(q))} {v:.2f}" for q, v in hist["quantiles"].items())
    return _table(["retention", "members", ""], rows) + f"\n\nn = {hist['n']}, mean {hist['mean']:.3f}; {quantiles}."


def _predictor_rows(block: dict[str, Any], parts: list[str]) -> list[list[Any]]:
    rows = []
    for part in parts:
        ev = block["leave_one_task_out"].get(part, {})
        for name, label in (("mergeprobe", "MergeProbe"), ("baseline_mean", "always the mean"), ("baseline_update_cosine", "update cosine alone")):
            s = ev.get(name, {})
            rows.append([f"leave one task out, {part}", label, s.get("n"), s.get("spearman"), s.get("mae")])
    if "across_scale" in block:
        for name, label in (("mergeprobe", "MergeProbe"), ("baseline_mean", "always the mean"), ("baseline_update_cosine", "update cosine alone")):
            s = block["across_scale"].get(name, {})
            rows.append(["tiny → SmolLM2", label, s.get("n"), s.get("spearman"), s.get("mae")])
    return rows


def _policy_rows(policy: dict[str, Any]) -> list[list[Any]]:
    order = ["mergeprobe", "oracle", *sorted(k for k in policy if k.startswith("always_"))]
    rows = []
    for name in order:
        if name not in policy:
            continue
        p = policy[name]
        rows.append([name, p.get("sets"), p.get("mean_retention"), p.get("mean_min_retention"), p.get("worst_retention"),
                     p.get("share_below_0.5"), p.get("routed_share"), ", ".join(f"{k} {v}" for k, v in (p.get("actions") or {}).items())])
    return rows


def render(analysis: dict[str, Any], timings: dict[str, float], command: str) -> str:
    parts = list(analysis["parts"])
    out = [
        "# MergeBench: real LoRA merges, labelled, and the MergeProbe retention predictor",
        "",
        f"Regenerate everything (cached stages are skipped): `{command}`",
        "",
        (f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()} "
        f"({platform.python_version()}, torch threads as run). Label: `retention_i(S) = score_i(merged S) / score_i(i alone)` "
        f"(ALGORITHMS.md §5); the predictor's target is the retention under **{TARGET_METHOD}** (task arithmetic). "
        "Members whose adapter did not learn its task (exact match gain < 0.1 over the base, or exp(−loss) ratio < 1.1) get no label."),
        "",
        "## Compute time",
        "",
        ("Summed from the cached artefacts (each records how long it took), so resumed runs count once; "
        "measured on 2 CPU cores shared with other jobs, one torch thread per process."),
        "",
        _table(["part", "pretraining s", "adapters s", "adapter steps", "merges scored", "merges skipped (no member learnt)",
                "merge + score s"],
               [[p, *(analysis["parts"][p]["compute_seconds"].get(k) for k in
                      ("pretraining", "adapters", "adapter_steps", "merges_run", "merges_skipped", "merge_and_score"))]
                for p in analysis["parts"]]),
        "",
        "Wall time of the last invocation of each stage (a stage that found its work cached is quick):",
        "",
        _table(["stage", "seconds"], [[k, round(v)] for k, v in sorted(timings.items())]),
        "",
    ]
    for part in parts:
        info = analysis["parts"][part]
        out += [f"## Part `{part}`", "", "### Base model vs single-task adapters (held-out test sets)", ""]
        precision = any(s.get("alone_float32") is not None for s in info["single"].values())
        rows = [[name, s["task"], s["rank"], s["lr"], s["steps"], s["base"], s["alone"], *([s.get("alone_float32")] if precision else []),
                 s["final_loss"], round(s["train_seconds"]) if s.get("train_seconds") else None] for name, s in info["single"].items()]
        out += [_table(["adapter", "task", "r", "lr", "steps", "base score", "adapter alone", *(["alone, float32"] if precision else []),
                        "final train loss", "train s"], rows), ""]
        if precision:
            out += [("Scores are exact match (share of test answers greedy decoding produces) or exp(−mean answer-token loss) for the "
                    "domain tasks, on 64 held-out examples, computed in bfloat16; the float32 column is the precision check."), ""]
        out += [f"Merges run: {info['merges']}; labelled member rows: {info['rows']} from {info['labelled_pairs_and_sets']} labelled pairs and sets.", ""]
        out += [f"### Retention distribution: pairs, {TARGET_METHOD}", "", _histogram(info["retention_target"]), ""]
        out += ["### Retention distribution: every method, pairs and sets", "", _histogram(info["retention_all_methods"]), ""]
        out += ["### Mean retention by method", "",
                _table(["method", "mean retention"], [[m, v] for m, v in info["retention_by_method"].items()]), ""]
        out += ["### Merger quality (same merges, mean member retention)", ""]
        rows = []
        for name, q in info["merger_quality"].items():
            a, b = name.split(" ")[0].split("_vs_")
            rows.append([name, q.get("merges"), q.get(f"{a}_retention"), q.get(f"{b}_retention"), q.get("delta_retention_points"),
                         q.get("delta_score_points"), q.get(f"{a}_wins_share")])
        out += [_table(["comparison", "merges", "first", "second", "Δ retention (points)", "Δ score (points)", "first wins"], rows), ""]

    for feature_set, block in analysis["evaluation"].items():
        out += [f"## Predictor: features `{feature_set}`", ""]
        if block.get("grouping") == "run":
            out += ["Labels cover a single task, so 'leave one task out' below holds out one adapter (and every row involving it) at a time.", ""]
        out += [_table(["evaluation", "predictor", "rows", "Spearman ρ", "MAE"], _predictor_rows(block, parts)), ""]
        rows = [[k, v.get("n"), v.get("spearman"), v.get("mae")] for k, v in block["leave_one_task_out"]["per_task"].items()]
        out += ["Per held-out task (leave one task out, both parts):", "", _table(["task", "rows", "ρ", "MAE"], rows), ""]
        rows = [[f"leave one task out, {p}", d.get("pairs"), d.get("agreement"), d.get("oracle→predicted")] for p, d in block["decision_agreement_loto"].items()]
        if "decision_agreement_across_scale" in block:
            d = block["decision_agreement_across_scale"]
            rows.append(["tiny → SmolLM2", d.get("pairs"), d.get("agreement"), d.get("oracle→predicted")])
        out += ["Decision agreement with the oracle (decide() on measured retention), pairs:", "",
                _table(["evaluation", "pairs", "agreement", "oracle→predicted"], rows), ""]
        header = ["policy", "pairs", "mean retention", "mean of pair min", "worst", "share < 0.5", "routed share", "actions"]
        for p, policy in block["policy_loto"].items():
            out += [f"Policy value, pairs, `{p}` (predictions: leave one task out):", "", _table(header, _policy_rows(policy)), ""]
        if "policy_across_scale" in block:
            out += ["Policy value, pairs, `smollm2` (predictions: tiny → SmolLM2):", "", _table(header, _policy_rows(block["policy_across_scale"])), ""]
        for p, sets in block["sets_loto"].items():
            out += [f"Sets of 3–4, `{p}` (leave one task out; member retention in a set predicted as the product of its pairwise retentions):", "",
                    _table(["members", "ρ (product of predicted pairs)", "ρ (product of measured pairs)", "set decision agreement", "sets"],
                           [[sets["members"], sets["product_rule_predicted"].get("spearman"), sets["product_rule_measured_pairs"].get("spearman"),
                             sets["decision_agreement"], sets["sets"]]]), ""]
            if sets.get("policy"):
                out += [_table(header, _policy_rows(sets["policy"])), ""]
        sweep = block.get("threshold_sweep_loto") or []
        if sweep:
            best = block["best_thresholds"]
            out += [("Decision thresholds on the benchmark (all pairs, leave-one-task-out predictions; route counted as retention 1 "
                    f"with an ideal router, priced at {ROUTE_COST} of retention: utility = mean pair-min retention − {ROUTE_COST} × routed share):"),
                    "",
                    _table(["τ_merge", "τ_reweight", "agreement", "mean retention", "mean pair min", "worst", "routed share", "utility"],
                           [[g["tau_merge"], g["tau_reweight"], g["agreement"], g["mean_retention"], g["mean_min_retention"],
                             g["worst_retention"], g["routed_share"], g["utility"]] for g in sweep]), "",
                    (f"Chosen: τ_merge {best['tau_merge']}, τ_reweight {best['tau_reweight']} — the least routing among the thresholds "
                     f"within {UTILITY_TOLERANCE} of the best utility ({best['best_utility']:.3f}); utility {best['utility']:.3f}, routed share "
                     f"{best['routed_share']:.3f}, agreement with the oracle at these thresholds {best['agreement']:.3f}. The thresholds are "
                     "tuned on the same held-out predictions they are reported on, so these rows are slightly optimistic."), ""]
        stops = dict(block["early_stopping_loto"])
        if "early_stopping_across_scale" in block:
            stops["smollm2 (tiny → SmolLM2)"] = block["early_stopping_across_scale"]
        rows = [[p, s.get("runs_checked"), len(s.get("stopped", [])), s.get("steps_saved"), s.get("steps_total"), s.get("share_saved"),
                 s.get("stop_decision_agrees_with_oracle")] for p, s in stops.items() if s]
        out += ["Early stopping (training order replayed; a run is stopped when the decision at its window end routes it):", "",
                _table(["part", "runs checked", "stopped", "steps saved", "steps total", "share saved", "agrees with oracle"], rows), ""]

    default = analysis["default_model"]
    out += ["## Shipped default predictor", "",
            (f"`{default['path']}` — fitted on {default['rows']} rows ({default['fitted_on']}), {default['features']} features; "
            f"the table it was fitted on is `{default['table']}`."), ""]
    out += ["## Methods", "", _table(["label", "method", "parameters"], [[k, m, p] for k, (m, p) in METHODS.items()]), ""]
    return "\n".join(out) + "\n"


def write_report(quick: bool, timings: dict[str, float], command: str) -> None:
    analysis = read_json(cache_root(quick) / "analysis.json")
    if analysis is None:
        raise SystemExit("no analysis.json: run the fit stage first (--stage fit).")
    folder = RESULTS if not quick else cache_root(quick) / "results"
    folder.mkdir(parents=True, exist_ok=True)
    markdown = render(analysis, timings, command)
    (folder / "mergebench.md").write_text(markdown)
    write_json(folder / "mergebench.json", {"command": command, "timings": timings, **analysis})
