"""Label real merges: score each member alone and in the merge, retention = merged / alone (ALGORITHMS.md §5).

A :class:`Labeller` holds one part's base model (no PEFT wrapper), tokenizer, probe
store and plan. Adapters are applied as low-rank forward hooks
(:func:`mergeprobe.signals.apply_updates`), so single adapters and merges are scored the
same way on the same model, with no adapter files written. Every result is cached as
one JSON file per merge job and recorded once with :meth:`ProbeStore.record_outcome`.

A member's retention is a label only when its adapter learnt its task: ``alone − base ≥
0.1`` for exact match, ``alone / base ≥ 1.1`` for ``exp(−loss)`` (otherwise the ratio
measures noise). Unlearnt members keep their scores in the cache but get no label.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.mergebench.common import read_json, write_json
from benchmarks.mergebench.plan import METHODS, MergeJob, PartPlan
from mergeprobe.adapters import load_adapter
from mergeprobe.merging import merge_adapters
from mergeprobe.signals import apply_updates
from mergeprobe.tasks import get_task, score

MIN_GAIN_EXACT = 0.1
MIN_RATIO_LM = 1.1


def learnt(task_name: str, alone: float, base: float) -> bool:
    """Whether an adapter learnt its task well enough for its retention to be a label."""
    if get_task(task_name).metric == "exact_match":
        return alone - base >= MIN_GAIN_EXACT
    return base > 0 and alone / base >= MIN_RATIO_LM


class Labeller:
    """Scores and merge labels of one part (see the module docstring)."""

    def __init__(self, plan: PartPlan, model: Any, tokenizer: Any, store: Any, folder: Path, record: bool = True):
        self.plan = plan
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.folder = folder
        self.record = record
        self.tests = {a.task: get_task(a.task).examples("test", plan.test_size, seed=0) for a in plan.adapters}
        self._adapters: dict[str, Any] = {}

    # ------------------------------------------------------------------ scoring
    def score_task(self, task_name: str, updates: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> float:
        """The task's metric on its test set, with ``updates`` added to the base model (None: the base)."""
        task = get_task(task_name)
        if updates is None:
            return score(self.model, self.tokenizer, task, self.tests[task_name], batch_size=64)
        with apply_updates(self.model, updates):
            return score(self.model, self.tokenizer, task, self.tests[task_name], batch_size=64)

    def adapter(self, name: str) -> Any:
        """The final adapter of run ``name``, as stored by the callback (cached in memory)."""
        if name not in self._adapters:
            record = self.store.load(name)
            if record.adapter_path is None or record.status != "finished":
                raise RuntimeError(f"run {name!r} has no finished adapter in {self.store.path}; run the train stage first.")
            self._adapters[name] = load_adapter(record.adapter_path)
        return self._adapters[name]

    def base_scores(self) -> dict[str, float]:
        """The base model's score on every task of the plan (cached)."""
        path = self.folder / "scores" / "base.json"
        cached = read_json(path) or {}
        for task_name in tqdm(sorted(self.tests), desc=f"{self.plan.part}: base scores", unit="task"):
            if task_name not in cached:
                cached[task_name] = self.score_task(task_name, None)
                write_json(path, cached)
        return cached

    def alone_scores(self, file_name: str = "alone.json") -> dict[str, float]:
        """Each adapter alone on its own task (cached in ``scores/<file_name>``)."""
        path = self.folder / "scores" / file_name
        cached = read_json(path) or {}
        for spec in tqdm(self.plan.adapters, desc=f"{self.plan.part}: single-adapter scores", unit="adapter"):
            if spec.name not in cached:
                updates = {k: m.folded() for k, m in self.adapter(spec.name).modules.items()}
                cached[spec.name] = self.score_task(spec.task, updates)
                write_json(path, cached)
        return cached

    # ------------------------------------------------------------------ merging
    def calibration(self, members: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """TaDA's calibration inputs: the members' probe batches from the store, padded together."""
        ids, masks = [], []
        for name in members:
            tensors = self.store.load(name).tensors
            ids.extend(tensors["probe_input_ids"])
            masks.extend(tensors["probe_attention_mask"])
        length = max(int(m.sum()) for m in masks)
        pad = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.long)
        for row, (i, m) in enumerate(zip(ids, masks)):
            keep = i[m.bool()][:length]
            pad[row, : len(keep)] = keep
            mask[row, : len(keep)] = 1
        return {"input_ids": pad, "attention_mask": mask}

    def merge(self, job: MergeJob) -> Any:
        """The merged adapter of ``job`` (core space, exact rank: no truncation beyond the method's own)."""
        method, params = METHODS[job.method]
        extra: dict[str, Any] = {}
        if method == "tada":
            extra = {"base_model": self.model, "calibration": self.calibration(job.members)}
        return merge_adapters(
            [self.adapter(name) for name in job.members],
            method=method,
            rank="exact",
            show_progress=False,
            **extra,
            **params,
        )

    def run_job(self, job: MergeJob, base: dict[str, float], alone: dict[str, float]) -> dict[str, Any]:
        """Merge, score every member, label and record (cached per job)."""
        path = self.folder / "merges" / f"{job.key}.json"
        cached = read_json(path)
        if cached is not None:
            return cached
        task_of = {a.name: a.task for a in self.plan.adapters}
        if not any(learnt(task_of[name], alone[name], base[task_of[name]]) for name in job.members):
            # No member learnt its task: the merge could give no label, so it is not run.
            result = {"key": job.key, "part": self.plan.part, "members": list(job.members), "method": job.method,
                      "skipped": "no member learnt its task", "labelled": [], "retention": {}, "merged": {},
                      "alone": {name: alone[name] for name in job.members}, "base": {name: base[task_of[name]] for name in job.members}}
            write_json(path, result)
            return result
        start = time.perf_counter()
        merged = self.merge(job)
        merge_seconds = time.perf_counter() - start
        scores = {name: self.score_task(task_of[name], merged.modules) for name in job.members}
        retention = {name: scores[name] / alone[name] if alone[name] > 0 else None for name in job.members}
        labelled = {
            name: value
            for name, value in retention.items()
            if value is not None and learnt(task_of[name], alone[name], base[task_of[name]])
        }
        result = {
            "key": job.key,
            "part": self.plan.part,
            "members": list(job.members),
            "method": job.method,
            "merged": scores,
            "alone": {name: alone[name] for name in job.members},
            "base": {name: base[task_of[name]] for name in job.members},
            "retention": retention,
            "labelled": sorted(labelled),
            "merge_seconds": merge_seconds,
            "seconds": time.perf_counter() - start,
        }
        if self.record and labelled:
            result["outcome_id"] = self.store.record_outcome(
                list(job.members),
                job.method,
                labelled,
                scores={name: {"merged": scores[name], "alone": alone[name], "base": result["base"][name]} for name in job.members},
                benchmark="mergebench",
                part=self.plan.part,
                job=job.key,
            )
        write_json(path, result)
        return result

    def run_all(self) -> list[dict[str, Any]]:
        """Base and single scores, then every job of the plan (cached ones are read back)."""
        base = self.base_scores()
        alone = self.alone_scores()
        results = []
        for job in tqdm(self.plan.jobs, desc=f"{self.plan.part}: merges", unit="merge"):
            results.append(self.run_job(job, base, alone))
        return results
