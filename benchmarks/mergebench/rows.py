"""Table rows: one per labelled member of a merge — its features and its measured retention.

Features of a pair ``(i, j)`` are the ones the probe wrote to the store when the later
of the two runs ended its window (:meth:`ProbeStore.pair_features`; the library's
pairwise features are symmetric, so either orientation is the pair's). Those are what
the callback computes at inference time, so the shipped predictor is fitted on them.

The symmetric pair features cannot tell the two members of a pair apart, yet their
retentions differ (the first try kept 90 % of one adapter and 0 % of the other). Each row
therefore adds the library's oriented features of the labelled member
(:func:`mergeprobe.features.member_features`, prefixes ``member.`` / ``partner.``) — the
callback computes and stores the same ones for both orientations of every pair — from
the per-batch cross-disturbance cached here per pair (stores written before the callback
stored oriented features lack them, so they are recomputed from the stored signals).

For a set ``S``: the library's :func:`~mergeprobe.features.set_features` (pairwise features
aggregated, plus the set's cross-disturbance) and the member features above against the
merge of all of ``S``.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.mergebench.common import read_json, write_json
from benchmarks.mergebench.plan import PartPlan
from mergeprobe.features import (
    cross_disturbance,
    member_features,
    set_cross_disturbance,
    set_features,
)


class RowBuilder:
    """Builds the table rows of one part from its labels, store and base model (features cached as JSON)."""

    def __init__(self, plan: PartPlan, model: Any, store: Any, folder: Path):
        self.plan = plan
        self.model = model.eval()
        self.store = store
        self.folder = folder
        self._signals: dict[str, Any] = {}
        self.spec = {a.name: a for a in plan.adapters}

    def signals(self, name: str) -> Any:
        if name not in self._signals:
            self._signals[name] = self.store.load_signals(name)
        return self._signals[name]

    def library_pair(self, a: str, b: str) -> dict[str, float]:
        """The pair's features as the probe stored them (either orientation), else computed now."""
        stored = self.store.pair_features(a, b) or self.store.pair_features(b, a)
        if stored is None:
            path = self.folder / "features" / f"lib__{'+'.join(sorted((a, b)))}.json"
            stored = read_json(path)
            if stored is None:
                stored = self.store.pairwise_features(a, b, model=self.model)
                write_json(path, stored)
        return {k: float(v) for k, v in stored.items()}

    def pair_cross(self, a: str, b: str) -> dict[str, list[float]]:
        """Per-layer cross-disturbance on each member's batch (cached per unordered pair)."""
        first, second = sorted((a, b))
        path = self.folder / "features" / f"cross__{first}+{second}.json"
        cached = read_json(path)
        if cached is None:
            with torch.no_grad():
                cross = cross_disturbance(self.model, self.signals(first), self.signals(second))
            cached = {
                first: {"disturbance": cross["disturbance.a"].tolist(), "relative_change": cross["relative_change.a"].tolist()},
                second: {"disturbance": cross["disturbance.b"].tolist(), "relative_change": cross["relative_change.b"].tolist()},
            }
            write_json(path, cached)
        return cached

    def member_features(self, member: str, others: list[str], cross: dict[str, dict[str, list[float]]]) -> dict[str, float]:
        """The library's oriented features of ``member`` against ``others`` (:func:`mergeprobe.features.member_features`)."""
        tensors = {f"{kind}.{name}": torch.tensor(values[kind]) for name, values in cross.items() for kind in ("disturbance", "relative_change")}
        return member_features(self.signals(member), [self.signals(o) for o in others], tensors, (member, others))

    def set_library(self, members: tuple[str, ...]) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
        """Library set features and per-member cross-disturbance of the set (cached per set)."""
        names = sorted(members)
        path = self.folder / "features" / f"set__{'+'.join(names)}.json"
        cached = read_json(path)
        if cached is None:
            signals = [self.signals(n) for n in names]
            pairwise = [self.library_pair(a, b) for a, b in combinations(names, 2)]
            with torch.no_grad():
                cross = set_cross_disturbance(self.model, signals)
            cached = {
                "features": set_features(signals, pairwise, cross),
                "cross": {
                    n: {"disturbance": cross[f"disturbance.{k}"].tolist(), "relative_change": cross[f"relative_change.{k}"].tolist()}
                    for k, n in enumerate(names)
                },
            }
            write_json(path, cached)
        return cached["features"], cached["cross"]

    def rows(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per labelled member of every result."""
        rows = []
        for result in tqdm(results, desc=f"{self.plan.part}: feature rows", unit="merge"):
            members = result["members"]
            for member in result["labelled"]:
                others = [m for m in members if m != member]
                if len(members) == 2:
                    features = self.library_pair(member, others[0])
                    cross = self.pair_cross(member, others[0])
                else:
                    features, cross = self.set_library(tuple(members))
                spec = self.spec[member]
                rows.append(
                    {
                        **features,
                        **self.member_features(member, others, cross),
                        "retention": float(result["retention"][member]),
                        "task": spec.task,
                        "method": result["method"],
                        "meta": {
                            "part": self.plan.part,
                            "run": member,
                            "others": others,
                            "other_tasks": [self.spec[o].task for o in others],
                            "set_size": len(members),
                            "job": result["key"],
                            "alone": result["alone"][member],
                            "merged": result["merged"][member],
                            "base": result["base"][member],
                            "rank": spec.rank,
                            "lr": spec.lr,
                            "steps": spec.steps,
                            "seed": spec.seed,
                        },
                    }
                )
        return rows
