"""Turn predicted retention into a decision: merge, reweight, prune or route (ALGORITHMS.md §5).

Pure functions on numbers: no torch, no model.

Inputs are per *ordered* pair ``(i, j)``: the predicted retention of ``i`` when merged
with ``j`` (mean and, optionally, the lower bound from
:meth:`MergeProbe.predict_lower <mergeprobe.predictor.MergeProbe.predict_lower>`), and
optionally the pair's *conflict share* (the share of the pair's interference carried by
its few most conflicting directions; either orientation may be given).

How a set is assessed (the composition rule is ours; the paper gives only the
thresholds' roles). The retention of member ``i`` in set ``S`` is estimated as the
product of its pairwise retentions, ``r_i(S) = Π_{j ∈ S, j ≠ i} r(i, j)``: interference
from partners that do not interact compounds. For a pair this is the pairwise
prediction itself. The same product of lower bounds gives ``i``'s lower bound.

The rule, with ``m`` the smallest ``r_i(S)``:

1. ``m ≥ τ_merge`` and every lower bound ≥ ``τ_reweight`` → **merge**: Pico-calibrated
   task arithmetic (``method="pico"``, ``base_method="linear"``), all weights 1. A lower
   bound under ``τ_reweight`` turns a merge into a reweight.
2. ``m ≥ τ_reweight`` → **reweight**: Pico-calibrated task arithmetic with per-adapter
   weights ``w_i ∝ 1 / r_i(S)``, normalised to mean 1, so the weakest member gets the
   largest weight.
3. Every failing pair (a pair with a pairwise retention under ``τ_reweight``; the pairs
   of the weakest member if none fails alone) has conflict share ≥ ``conflict_share`` →
   **prune**: the interference sits in few directions, so trim them and merge
   (``method="ties"``).

The spec allows TaDA's gates for reweight and its conflict dropping for prune; on the
project benchmark (``benchmarks/results/mergebench.md``) TaDA kept less than task
arithmetic, Pico and TIES on the same pairs, so the decision names Pico and TIES. Pass
the decision's weights to any method you prefer.
4. Otherwise, set level: remove the weakest member (it is routed), repeatedly while
   that raises the rest's ``m`` and at least two remain. If the rest reaches
   ``τ_reweight`` it is merged or reweighted by rules 1–2 and the removed runs are
   routed. Else → **route**: every adapter stays separate behind a router.

``action`` says what happens to ``merge_set``; ``routed`` lists the runs kept as
separate adapters. A merge with routed runs is deployed as a router over the merged
adapter and the routed ones.

The default thresholds are tuned on the project benchmark (see :class:`DecisionThresholds`).

Example
-------
>>> from mergeprobe.decision import decide
>>> d = decide(["math", "code"], {("math", "code"): 0.95, ("code", "math"): 0.93})
>>> d.action, d.method, d.base_method
('merge', 'pico', 'linear')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mergeprobe.errors import MergeError

__all__ = ["ACTIONS", "Decision", "DecisionThresholds", "decide"]

ACTIONS = ("merge", "reweight", "prune", "route")
Pair = tuple[str, str]


@dataclass(frozen=True)
class DecisionThresholds:
    """Thresholds of :func:`decide`.

    The defaults are tuned on the project benchmark (MergeBench: real merges of LoRA
    adapters of SmolLM2-135M and of a tiny-model sweep, ``benchmarks/results/mergebench.md``):
    over a grid of thresholds, the policy's utility (mean pair-min retention, routing
    priced at 0.25 of retention) varies by less than 0.01 between 0.75 and 0.9, and 0.75 /
    0.75 is the point that routes least within 0.01 of the best. Most of that benchmark's
    pairs lose more than 30 % of a member's skill in any merge, so these thresholds route
    most pairs; ``tau_reweight = tau_merge`` leaves no reweight band. Set your own for
    adapters unlike those.

    Example
    -------
    >>> DecisionThresholds()
    DecisionThresholds(tau_merge=0.75, tau_reweight=0.75, conflict_share=0.5)
    >>> DecisionThresholds(tau_merge=0.9, tau_reweight=0.6).tau_reweight
    0.6

    Attributes
    ----------
    tau_merge
        Smallest predicted retention at which adapters are merged as they are.
    tau_reweight
        Smallest predicted retention at which a reweighted merge is still worth it.
    conflict_share
        Conflict share from which interference counts as concentrated (prunable).
    """

    tau_merge: float = 0.75
    tau_reweight: float = 0.75
    conflict_share: float = 0.5

    def __post_init__(self) -> None:
        for name in ("tau_merge", "tau_reweight", "conflict_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MergeError(f"DecisionThresholds.{name} must be a finite number, got {value!r}.")
        if self.tau_reweight > self.tau_merge:
            raise MergeError(
                f"DecisionThresholds: tau_reweight ({self.tau_reweight}) must not exceed tau_merge ({self.tau_merge})."
            )
        if not 0.0 <= self.conflict_share <= 1.0:
            raise MergeError(f"DecisionThresholds.conflict_share must lie in [0, 1], got {self.conflict_share}.")


@dataclass
class Decision:
    """What to do with a set of adapters, and why.

    Example
    -------
    >>> d = decide(["math", "code"], {("math", "code"): 0.95, ("code", "math"): 0.6})
    >>> d.action, d.routed, d.predicted_min_retention
    ('route', ['math', 'code'], 0.6)

    Attributes
    ----------
    action
        ``"merge"``, ``"reweight"``, ``"prune"`` (what happens to ``merge_set``) or
        ``"route"`` (nothing is merged).
    method
        Merge method for ``merge_set`` (``"pico"`` or ``"ties"``); ``None`` for route.
    base_method
        Base merger under Pico (``"linear"``); ``None`` otherwise.
    weights
        Per-adapter weight for every run of ``merge_set`` (mean 1).
    merge_set
        Runs to merge, in input order.
    routed
        Runs kept as separate adapters behind a router.
    predicted_min_retention
        Smallest predicted retention in ``merge_set`` (over all runs for route).
    predicted_min_lower
        The same for the lower bounds, when they were given.
    member_retention
        Predicted retention of each run in the set it was assessed in.
    reasons
        Human-readable steps of the decision, with the numbers.
    thresholds
        The thresholds used.
    """

    action: str
    method: str | None
    base_method: str | None
    weights: dict[str, float]
    merge_set: list[str]
    routed: list[str]
    predicted_min_retention: float
    predicted_min_lower: float | None
    member_retention: dict[str, float]
    reasons: list[str] = field(default_factory=list)
    thresholds: DecisionThresholds = field(default_factory=DecisionThresholds)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field."""
        return asdict(self)


# ------------------------------------------------------------------ validation
def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or (not isinstance(value, (int, float)) and not hasattr(value, "__float__")):
        raise MergeError(f"{what} must be a number, got {value!r}.")
    number = float(value)
    if not math.isfinite(number):
        raise MergeError(f"{what} is {number}; predictions must be finite.")
    return number


def _pairwise(runs: Sequence[str], values: Mapping[Pair, Any], what: str) -> dict[Pair, float]:
    missing = [(i, j) for i in runs for j in runs if i != j and (i, j) not in values]
    if missing:
        shown = ", ".join(f"({i!r}, {j!r})" for i, j in missing[:4])
        raise MergeError(
            f"{what} lacks {len(missing)} ordered pair(s), e.g. {shown}; give one per ordered pair of runs."
        )
    return {(i, j): _number(values[(i, j)], f"{what}[{i!r}, {j!r}]") for i in runs for j in runs if i != j}


def _symmetric(runs: Sequence[str], values: Mapping[Pair, Any]) -> dict[frozenset, float]:
    """Conflict share per unordered pair (the larger orientation); NaN or None counts as not given."""
    out: dict[frozenset, float] = {}
    for (i, j), value in values.items():
        if i in runs and j in runs and i != j and value is not None:
            if hasattr(value, "__float__") and math.isnan(float(value)):
                continue
            key = frozenset((i, j))
            share = _number(value, f"conflict_share[{i!r}, {j!r}]")
            out[key] = max(out.get(key, share), share)
    return out


# ------------------------------------------------------------------ assessment
def _member_retention(members: Sequence[str], pairwise: Mapping[Pair, float]) -> dict[str, float]:
    return {i: math.prod(pairwise[(i, j)] for j in members if j != i) for i in members}


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def _describe(retention: Mapping[str, float]) -> str:
    return ", ".join(f"{run} {_fmt(value)}" for run, value in retention.items())


def _merge_or_reweight(
    members: list[str],
    mean: Mapping[str, float],
    lower: Mapping[str, float] | None,
    thresholds: DecisionThresholds,
    reasons: list[str],
) -> tuple[str, str, str | None, dict[str, float]] | None:
    """Rules 1–2 on ``members``; ``None`` when neither applies."""
    weakest = min(members, key=lambda run: mean[run])
    m = mean[weakest]
    if m >= thresholds.tau_merge:
        low_weakest = min(members, key=lambda run: lower[run]) if lower is not None else None
        if lower is not None and lower[low_weakest] < thresholds.tau_reweight:
            reasons.append(
                f"min predicted retention {_fmt(m)} ≥ τ_merge {_fmt(thresholds.tau_merge)}, but the lower bound of "
                f"{low_weakest} is {_fmt(lower[low_weakest])} < τ_reweight {_fmt(thresholds.tau_reweight)}: "
                "too uncertain to merge unweighted."
            )
        else:
            bound = f" (lower bounds ≥ {_fmt(min(lower.values()))})" if lower is not None else ""
            reasons.append(
                f"min predicted retention {_fmt(m)} ({weakest}) ≥ τ_merge {_fmt(thresholds.tau_merge)}{bound}: "
                "merge with Pico-calibrated task arithmetic."
            )
            return "merge", "pico", "linear", {run: 1.0 for run in members}
    if m >= thresholds.tau_reweight:
        raw = {run: 1.0 / max(mean[run], 1e-6) for run in members}
        scale = len(members) / sum(raw.values())
        weights = {run: raw[run] * scale for run in members}
        reasons.append(
            f"min predicted retention {_fmt(m)} ({weakest}) ≥ τ_reweight {_fmt(thresholds.tau_reweight)}"
            + (f" but < τ_merge {_fmt(thresholds.tau_merge)}" if m < thresholds.tau_merge else "")
            + f": reweight (Pico-calibrated task arithmetic) with weights ∝ 1/retention to lift {weakest}: "
            + ", ".join(f"{run} {_fmt(w)}" for run, w in weights.items())
            + "."
        )
        return "reweight", "pico", "linear", weights
    return None


def decide(
    runs: Sequence[str],
    retention: Mapping[Pair, float],
    lower: Mapping[Pair, float] | None = None,
    conflict_share: Mapping[Pair, float] | None = None,
    thresholds: DecisionThresholds | None = None,
) -> Decision:
    """Decide how to combine ``runs`` from their predicted pairwise retention.

    Parameters
    ----------
    runs
        Names of the runs (adapters), at least two, distinct.
    retention
        ``{(i, j): predicted mean retention of i when merged with j}`` for every ordered pair.
    lower
        The same for the lower bound; optional.
    conflict_share
        ``{(i, j): share}`` per pair (either orientation; the larger is used); optional.
        A pair without a finite share (absent, ``None``, NaN) cannot justify pruning.
    thresholds
        Default :class:`DecisionThresholds`.

    Returns
    -------
    Decision

    Raises
    ------
    MergeError
        Fewer than two runs, duplicate runs, a missing ordered pair or a non-finite value.

    Examples
    --------
    >>> r = {("a", "b"): 0.6, ("b", "a"): 0.95}
    >>> decide(["a", "b"], r).action
    'route'
    >>> decide(["a", "b"], r, thresholds=DecisionThresholds(tau_merge=0.9, tau_reweight=0.5)).action
    'reweight'
    """
    runs = list(runs)
    thresholds = thresholds or DecisionThresholds()
    if len(runs) < 2:
        raise MergeError(f"decide needs at least two runs to combine, got {runs}.")
    if len(set(runs)) != len(runs):
        raise MergeError(f"decide got duplicate run names: {runs}.")
    mean_pairs = _pairwise(runs, retention, "retention")
    lower_pairs = _pairwise(runs, lower, "lower") if lower is not None else None
    conflicts = _symmetric(runs, conflict_share) if conflict_share is not None else None

    def assess(members: list[str]) -> tuple[dict[str, float], dict[str, float] | None]:
        mean = _member_retention(members, mean_pairs)
        low = _member_retention(members, lower_pairs) if lower_pairs is not None else None
        return mean, low

    def build(action, method, base, weights, members, routed, mean, low, reasons) -> Decision:
        return Decision(
            action=action,
            method=method,
            base_method=base,
            weights=weights,
            merge_set=list(members),
            routed=list(routed),
            predicted_min_retention=min(mean.values()),
            predicted_min_lower=min(low.values()) if low is not None else None,
            member_retention=dict(mean),
            reasons=reasons,
            thresholds=thresholds,
        )

    mean, low = assess(runs)
    reasons = [f"predicted retention in the full set of {len(runs)}: {_describe(mean)}."]
    chosen = _merge_or_reweight(runs, mean, low, thresholds, reasons)
    if chosen is not None:
        return build(*chosen, runs, [], mean, low, reasons)

    weakest = min(runs, key=lambda run: mean[run])
    reasons.append(
        f"min predicted retention {_fmt(mean[weakest])} ({weakest}) < τ_reweight {_fmt(thresholds.tau_reweight)}."
    )

    # Rule 3: prune when every failing pair's interference is concentrated.
    if conflicts is not None:
        failing = [
            frozenset((i, j))
            for k, i in enumerate(runs)
            for j in runs[k + 1 :]
            if min(mean_pairs[(i, j)], mean_pairs[(j, i)]) < thresholds.tau_reweight
        ] or [frozenset((weakest, j)) for j in runs if j != weakest]
        shares = {pair: conflicts.get(pair) for pair in failing}
        names = {pair: "–".join(sorted(pair)) for pair in failing}
        if all(share is not None for share in shares.values()):
            low_pair = min(failing, key=lambda pair: shares[pair])
            if shares[low_pair] >= thresholds.conflict_share:
                reasons.append(
                    "interference is concentrated: conflict share "
                    + ", ".join(f"{names[p]} {_fmt(shares[p])}" for p in failing)
                    + f" ≥ {_fmt(thresholds.conflict_share)}: prune the conflicting directions (TIES trimming), then merge."
                )
                return build("prune", "ties", None, {run: 1.0 for run in runs}, runs, [], mean, low, reasons)
            reasons.append(
                f"conflict share of {names[low_pair]} is {_fmt(shares[low_pair])} < {_fmt(thresholds.conflict_share)}: "
                "interference is spread out, pruning would not remove it."
            )
        else:
            absent = [names[p] for p, share in shares.items() if share is None]
            reasons.append(f"no conflict share for {', '.join(absent)}: pruning not assessed.")

    # Rule 4: route the weakest members while that lifts the rest.
    members, routed, current = list(runs), [], mean
    while len(members) > 2:
        worst = min(members, key=lambda run: current[run])
        rest = [run for run in members if run != worst]
        rest_mean, rest_low = assess(rest)
        if min(rest_mean.values()) <= min(current.values()):
            reasons.append(
                f"removing {worst} would not raise the rest's min predicted retention "
                f"({_fmt(min(rest_mean.values()))} ≤ {_fmt(min(current.values()))})."
            )
            break
        members, current = rest, rest_mean
        routed.append(worst)
        reasons.append(
            f"without {worst} the rest's predicted retention is {_describe(rest_mean)} "
            f"(min {_fmt(min(rest_mean.values()))})."
        )
        step_reasons: list[str] = []
        chosen = _merge_or_reweight(rest, rest_mean, rest_low, thresholds, step_reasons)
        if chosen is not None:
            reasons.append(f"route {', '.join(routed)} separately; the other {len(rest)} are combined.")
            reasons.extend(step_reasons)
            return build(*chosen, rest, routed, rest_mean, rest_low, reasons)

    reasons.append(
        f"no subset of at least two reaches τ_reweight {_fmt(thresholds.tau_reweight)}: route every adapter separately."
    )
    return build("route", None, None, {}, [], runs, mean, low, reasons)
