"""One adapter's probe: the Trainer-independent logic behind :class:`MergeProbeCallback`.

A :class:`ProbeRun` follows one LoRA training run through its probe window:

1. :meth:`ProbeRun.begin_window` snapshots the LoRA factors, attaches the gradient
   sketcher and starts collecting the run's own probe batch from its training inputs
   (a forward pre-hook, so no extra data loading and no change to the data order).
2. :meth:`ProbeRun.end_window` computes the window update, the representation
   disturbance on the probe batch, writes the run's record to the :class:`ProbeStore`,
   and compares the run with every compatible run already there (update and gradient
   alignment, cross-disturbance computed with the model in memory, predicted retention).
3. :meth:`ProbeRun.track` keeps measuring the cheap update alignment (and the predicted
   retention it implies) against the stored runs for the rest of training.

Example
-------
>>> from mergeprobe.probe import ProbeRun
>>> from mergeprobe.store import ProbeStore
>>> probe = ProbeRun(ProbeStore("probe-store"), run_name="math")  # doctest: +SKIP
>>> probe.begin_window(peft_model, step=0)  # doctest: +SKIP
>>> ...  # train the window  # doctest: +SKIP
>>> comparisons = probe.end_window(peft_model, step=8)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import socket
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeprobe.adapters import LoraAdapter, load_adapter
from mergeprobe.core import inner
from mergeprobe.errors import MergeProbeError, PredictorError, StoreError

COMPARABLE_STATUSES = ("complete", "finished", "stopped")

MAX_CACHED_STATES_BYTES = 256 * 2**20
"""A run's own hidden states are stored with its record up to this size (16 sequences × 32 tokens of
SmolLM2-135M: 35 MB); larger ones are recomputed by each later run that compares with it."""


def base_model_identity(model: Any) -> dict[str, str]:
    """Name and weight fingerprint of a model's base, to tell which runs can be merged.

    The fingerprint hashes the first 4096 values of the input embedding, so two runs
    whose base models share a name but not weights are told apart.
    """
    inner_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner_model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or getattr(inner_model, "name_or_path", "") or type(inner_model).__name__)
    embedding = inner_model.get_input_embeddings().weight.detach().reshape(-1)[:4096]
    digest = hashlib.sha256(embedding.to(torch.float32).cpu().numpy().tobytes()).hexdigest()[:16]
    return {"name": name, "fingerprint": digest}


def require_lora_model(model: Any) -> None:
    """Raise a clear error unless ``model`` is a PEFT model with LoRA layers."""
    if not hasattr(model, "peft_config"):
        raise MergeProbeError(
            f"MergeProbeCallback needs a PEFT LoRA model, got {type(model).__name__}. "
            "Wrap it first: model = peft.get_peft_model(model, LoraConfig(...))."
        )
    from peft.tuners.lora import LoraLayer

    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        raise MergeProbeError(
            "the PEFT model has no LoRA layers (is it another PEFT method?); MergeProbeCallback probes LoRA adapters only."
        )


def _same_factors(first: dict[str, tuple[Tensor, Tensor]], second: dict[str, tuple[Tensor, Tensor]]) -> bool:
    """Whether two sets of low-rank factors are bitwise equal, module by module."""
    return first.keys() == second.keys() and all(
        torch.equal(first[k][0], second[k][0]) and torch.equal(first[k][1], second[k][1]) for k in first
    )


def _rank_zero(adapter: LoraAdapter) -> LoraAdapter:
    """The zero update on ``adapter``'s modules, as rank-0 factors (nothing held; :func:`update_between` drops it)."""
    from mergeprobe.adapters import LoraModule

    modules = {
        key: LoraModule(A=m.A.new_zeros((0, m.A.shape[1])), B=m.B.new_zeros((m.B.shape[0], 0)), scaling=m.scaling)
        for key, m in adapter.modules.items()
    }
    return LoraAdapter(modules, adapter.config, adapter.name)


def _global_norm(update: dict[str, tuple[Tensor, Tensor]]) -> float:
    """``‖ΔW‖_F`` of a whole adapter's update (all its modules as one vector), for :func:`_global_cosine`."""
    return sum(float(inner(factors, factors)) for factors in update.values()) ** 0.5


def _global_cosine(
    first: dict[str, tuple[Tensor, Tensor]], second: dict[str, tuple[Tensor, Tensor]], norm_first: float, norm_second: float
) -> float:
    """Cosine of two whole adapters' updates (all shared modules as one vector).

    ``norm_first`` and ``norm_second`` are the updates' :func:`_global_norm`: tracking
    measures one current update against every stored run, whose norms never change.
    One :func:`~mergeprobe.core.inner` per module, summed in sorted key order (stacking
    the modules for one batched call copies more than it saves at LoRA shapes).
    """
    if norm_first == 0.0 or norm_second == 0.0:
        return 0.0
    dot = sum(float(inner(first[k], second[k])) for k in sorted(set(first) & set(second)))
    return max(-1.0, min(1.0, dot / (norm_first * norm_second)))


@dataclass
class Comparison:
    """This run against one other run of the store."""

    other: str
    features: dict[str, float]
    profile: tuple[list[int], list[str], Tensor] | None = None
    predicted_retention: float | None = None
    predicted_lower: float | None = None


@dataclass
class ProbeRun:
    """The probe of one training run (see the module docstring).

    Parameters
    ----------
    store:
        The shared :class:`~mergeprobe.store.ProbeStore`.
    run_name:
        This run's name in the store.
    run_id:
        Identifies this run across restarts (a resumed run may rewrite its own record,
        another run of the same name may not unless ``overwrite``).
    sketch_dim, sketch_seed:
        Size and seed of the gradient sketch (the same in every run of a store).
    probe_batch_size:
        How many of the run's own training sequences form its probe batch.
    probe_batch:
        Explicit probe inputs (``input_ids`` tensor, or a dict with ``input_ids`` and
        ``attention_mask``) instead of collecting training inputs.
    predictor:
        A fitted :class:`~mergeprobe.predictor.MergeProbe`, or ``None``.
    is_main:
        Only the world-main process writes to the store and compares runs.
    """

    store: Any
    run_name: str
    run_id: str = ""
    sketch_dim: int = 32
    sketch_seed: int = 0
    probe_batch_size: int = 16
    probe_batch: Any = None
    adapter_name: str = "default"
    predictor: Any = None
    overwrite: bool = False
    is_main: bool = True
    window_start: int = 0
    signals: Any = None
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    _start: LoraAdapter | None = None
    _sketcher: Any = None
    _batch_hook: Any = None
    _batches: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    _others: dict[str, Any] = field(default_factory=dict)
    _other_norms: dict[str, float] = field(default_factory=dict)
    _record_meta: dict[str, Any] = field(default_factory=dict)
    base: dict[str, str] = field(default_factory=dict)

    # ----------------------------------------------------------------- window
    def begin_window(self, model: Any, step: int) -> None:
        """Snapshot the factors, start gradient sketching and probe-batch collection."""
        from mergeprobe.signals import GradientSketcher

        require_lora_model(model)
        self._start = load_adapter(model, self.adapter_name)
        self._sketcher = GradientSketcher(k=self.sketch_dim, seed=self.sketch_seed)
        self._sketcher.attach(model)
        self._sketcher.active = True
        self._batches = []
        if self.probe_batch is None:
            self._batch_hook = model.register_forward_pre_hook(self._collect_batch, with_kwargs=True)
        self.window_start = step

    def _collect_batch(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not module.training or sum(len(ids) for ids, _ in self._batches) >= self.probe_batch_size:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, Tensor):
            return
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if not isinstance(mask, Tensor) else mask
        self._batches.append((ids.detach().cpu(), mask.detach().cpu()))

    def _probe_inputs(self) -> tuple[Tensor, Tensor]:
        if self.probe_batch is not None:
            batch = self.probe_batch
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            ids = torch.as_tensor(ids)
            return ids[: self.probe_batch_size], (torch.ones_like(ids) if mask is None else torch.as_tensor(mask))[: self.probe_batch_size]
        if not self._batches:
            raise MergeProbeError("no training inputs were seen during the probe window; pass probe_batch=... to the callback.")
        length = max(ids.shape[1] for ids, _ in self._batches)
        padded_ids, padded_mask = [], []
        for ids, mask in self._batches:
            pad = length - ids.shape[1]
            padded_ids.append(torch.nn.functional.pad(ids, (0, pad), value=0))
            padded_mask.append(torch.nn.functional.pad(mask, (0, pad), value=0))
        return torch.cat(padded_ids)[: self.probe_batch_size], torch.cat(padded_mask)[: self.probe_batch_size]

    def _stop_collecting(self) -> None:
        if self._batch_hook is not None:
            self._batch_hook.remove()
            self._batch_hook = None
        if self._sketcher is not None:
            self._sketcher.active = False
            self._sketcher.detach()
            self._sketcher = None  # its Gaussian projections (one pair per layer shape) are not needed after the window

    def end_window(self, model: Any, step: int, meta: dict[str, Any] | None = None) -> dict[str, Comparison]:
        """Finish the window: build this run's signals, store them, compare with the other runs.

        Every process must call this (the gradient sketches are all-reduced); only the
        main process writes and compares.
        """
        from mergeprobe.signals import RunSignals, own_states_cache, self_disturbance, update_between

        if self._start is None or self._sketcher is None:
            raise MergeProbeError("end_window called before begin_window")
        self._sketcher.all_reduce()
        sketches = self._sketcher.sketches()
        self._stop_collecting()
        if not self.is_main:
            return {}
        end = load_adapter(model, self.adapter_name)
        ids, mask = self._probe_inputs()
        end_factors = {k: m.folded() for k, m in end.modules.items()}
        update = update_between(self._start, end)
        # LoRA that started at B = 0: the window update is the window-end ΔW. Hold one copy of the factors for the rest
        # of training, and this run's own states in every cross-disturbance (base + its update, on its probe batch) are
        # the adapted states of its self-disturbance: no second pass.
        from_zero = _same_factors(update, end_factors)
        if from_zero:
            update = end_factors
            self._start = _rank_zero(self._start)  # ΔW(start) = 0: tracking needs none of its factors
        disturbance, adapted = self_disturbance(model, end_factors, ids, mask)
        self.signals = RunSignals(
            update=update,
            end_factors=end_factors,
            gradient=sketches,
            disturbance=disturbance["disturbance"],
            relative_change=disturbance["relative_change"],
            probe_input_ids=ids,
            probe_attention_mask=mask,
            sketch_dim=self.sketch_dim,
            sketch_seed=self.sketch_seed,
        )
        self.base = base_model_identity(model)
        record_meta = {
            "run_id": self.run_id,
            "base_model": self.base["name"],
            "base_fingerprint": self.base["fingerprint"],
            "target_modules": sorted(end.modules),
            "ranks": {k: m.rank for k, m in end.modules.items()},
            "probe_steps": [int(self.window_start), int(step)],
            "status": "complete",
            "host": socket.gethostname(),
            "signals": self.signals.meta(),
            **(meta or {}),
        }
        self._record_meta = record_meta
        # This run's own states go into its record too: every later run's cross-disturbance with it reads them
        # instead of recomputing them (one forward pass of this probe batch per later run).
        cacheable = from_zero and sum(t.numel() * t.element_size() for t in adapted) <= MAX_CACHED_STATES_BYTES
        self._write(model, record_meta, cache=own_states_cache(adapted) if cacheable else None, keep_cache=False)
        own_states = {id(self.signals): adapted} if from_zero else {}
        del adapted  # held by own_states only, and only as long as it is needed
        self._compare_all(model, own_states)
        return self.comparisons

    def _write(self, model: Any, meta: dict[str, Any], cache: dict[str, Tensor] | None = None, keep_cache: bool = True) -> None:
        """Write this run's record with the model's current adapter saved beside the signals.

        ``cache`` (this run's own states) is written with the window-end record; later
        rewrites keep the stored one, since the signals it derives from do not change.
        """
        with tempfile.TemporaryDirectory(prefix="mergeprobe-adapter-") as tmp:
            model.save_pretrained(tmp, selected_adapters=[self.adapter_name])
            source = Path(tmp) / self.adapter_name if self.adapter_name != "default" else Path(tmp)
            self.store.write_record(
                self.run_name, meta, self.signals.to_tensors(), overwrite=self.overwrite, adapter=source, cache=cache, keep_cache=keep_cache
            )

    def save_final_adapter(self, model: Any, status: str = "finished", **extra: Any) -> None:
        """Rewrite this run's record with the final adapter and a final status (main process)."""
        if not self.is_main or self.signals is None:
            return
        meta = {**self._record_meta, "status": status, "adapter_stage": "final", **extra}
        self._write(model, meta)

    def restore(self, model: Any, record: Any) -> None:
        """Resume after the window: reuse the stored signals instead of recapturing them.

        The window-start factors are recovered exactly as ``ΔW(end) − update``, so
        tracking continues to measure the update since the original window start.
        """
        from mergeprobe.adapters import LoraModule
        from mergeprobe.signals import RunSignals

        self.signals = RunSignals.from_tensors(record.tensors, record.meta.get("signals", {}))
        self._record_meta = {k: v for k, v in record.meta.items() if k not in ("created", "updated", "write_id")}
        self.base = base_model_identity(model)
        modules = {}
        for key, (b_end, a_end) in self.signals.end_factors.items():
            b_up, a_up = self.signals.update.get(key, (b_end[:, :0], a_end[:0]))
            modules[key] = LoraModule(A=torch.cat([a_end, a_up]), B=torch.cat([b_end, -b_up], dim=1), scaling=1.0)
        self._start = LoraAdapter(modules, name=f"{self.run_name}@window-start")
        self.window_start = int(record.meta.get("probe_steps", [0])[0])

    # ------------------------------------------------------------- comparing
    def _compatible_others(self) -> dict[str, Any]:
        """Load (once) every other complete run of the store with the same base model."""
        from mergeprobe.signals import RunSignals

        for name in self.store.runs():
            if name == self.run_name or name in self._others:
                continue
            try:
                record = self.store.load(name)
            except StoreError as err:
                warnings.warn(f"skipping run {name!r} of the probe store: {err}", stacklevel=2)
                continue
            if record.meta.get("status") not in COMPARABLE_STATUSES:
                continue
            if record.meta.get("base_fingerprint") != self.base["fingerprint"]:
                warnings.warn(
                    f"skipping run {name!r}: it was trained on another base model "
                    f"({record.meta.get('base_model')!r}) and cannot be merged with {self.run_name!r}.",
                    stacklevel=2,
                )
                self._others[name] = None
                continue
            signals = RunSignals.from_tensors(record.tensors, record.meta.get("signals", {}))
            # Comparisons never read another run's window-end factors: do not hold them for the rest of training.
            self._others[name] = replace(signals, end_factors={})
        return {k: v for k, v in self._others.items() if v is not None}

    def _predict(self, rows: list[dict[str, float]]) -> list[tuple[float | None, float | None]]:
        """``(mean, lower)`` predicted retention for each feature dict, one predictor call per bound for all rows."""
        if self.predictor is None or not rows:
            return [(None, None)] * len(rows)
        try:
            mean = self.predictor.predict_retention(rows)
            lower = self.predictor.predict_lower_retention(rows)
        except (PredictorError, ValueError) as err:
            warnings.warn(f"MergeProbe could not predict retention ({err}); continuing without predictions.", stacklevel=2)
            self.predictor = None
            return [(None, None)] * len(rows)
        return [(float(m), float(lo)) for m, lo in zip(mean, lower)]

    def _compare(self, model: Any, name: str, other: Any, own_states: dict[int, list[Tensor]] | None = None) -> Comparison:
        """Full comparison with one run: all pairwise features, cross-disturbance included.

        ``own_states`` caches the runs' own hidden states between comparisons (see
        :func:`~mergeprobe.features.cross_disturbance`).
        """
        from mergeprobe.features import (
            alignment_profile,
            cross_disturbance,
            member_features,
            pairwise_features,
            swap_cross,
        )
        from mergeprobe.signals import frozen_base, own_states_from_cache

        own_states = {} if own_states is None else own_states
        if id(other) not in own_states:  # the other run's own states, as its probe stored them
            stored = own_states_from_cache(self.store.load_cache(name), other)
            if stored is not None:
                own_states[id(other)] = stored
        with frozen_base(model):
            cross = cross_disturbance(model, self.signals, other, own_states=own_states)
        # oriented_pairwise_features of both orientations, with the symmetric part computed once for both.
        symmetric = pairwise_features(self.signals, other, cross)
        features = {**symmetric, **member_features(self.signals, [other], cross)}
        [(mean, lower)] = self._predict([features])
        # Both orientations: the other run's retention in this pair needs this run's model pass too.
        self.store.write_pair_features(self.run_name, name, features)
        self.store.write_pair_features(name, self.run_name, {**symmetric, **member_features(other, [self.signals], swap_cross(cross))})
        return Comparison(name, features, alignment_profile(self.signals, other), mean, lower)

    def _compare_all(self, model: Any, own_states: dict[int, list[Tensor]] | None = None) -> None:
        """Full comparisons with every compatible stored run; ``own_states`` as in :meth:`_compare`."""
        from mergeprobe.signals import frozen_base

        own_states = {} if own_states is None else own_states  # this run's own states are computed (at most) once
        with frozen_base(model):  # one switch of mode and adapter for every comparison
            for name, other in self._compatible_others().items():
                self.comparisons[name] = self._compare(model, name, other, own_states)
                own_states.pop(id(other), None)  # keep only this run's states in memory

    def track(self, model: Any, step: int) -> dict[str, Comparison]:
        """Compare with runs that appeared since, and re-measure update alignment with all, now.

        A run that reached the store after this run's window gets the full comparison
        (with cross-disturbance) once; then every call measures the current update's
        alignment with each stored window update (cheap, no forward pass) and the
        retention that implies, keeping the window's cross-disturbance.
        """
        from mergeprobe.features import MEMBER_PREFIXES, pairwise_features
        from mergeprobe.signals import update_between

        if self.signals is None or self._start is None:
            return {}
        current = update_between(self._start, load_adapter(model, self.adapter_name))
        now = type(self.signals)(**{**vars(self.signals), "update": current})
        others = self._compatible_others()
        current_norm = _global_norm(current) if others else 0.0
        measured = {}
        for name, other in others.items():
            if name not in self.comparisons:
                self.comparisons[name] = self._compare(model, name, other)
            if name not in self._other_norms:  # a stored window update never changes
                self._other_norms[name] = _global_norm(other.update)
            # Forward-pass features (cross-disturbance, member/partner) stay as measured at the window end.
            kept = {k: v for k, v in self.comparisons[name].features.items() if k.startswith(("cross_", *MEMBER_PREFIXES))}
            features = {**pairwise_features(now, other, None), **kept}
            features["update_alignment.global"] = _global_cosine(current, other.update, current_norm, self._other_norms[name])
            measured[name] = features
        predictions = self._predict(list(measured.values()))
        return {name: Comparison(name, features, None, *p) for (name, features), p in zip(measured.items(), predictions)}

    def close(self) -> None:
        """Remove every hook this probe installed."""
        self._stop_collecting()


def decide_for_store(store: Any, runs: list[str], predictor: Any, thresholds: Any = None) -> Any:
    """The set decision for ``runs`` from their stored pair features and ``predictor``.

    Every ordered pair's retention is predicted from the features in the store (see
    :meth:`ProbeStore.pairwise_features_among`); a pair's conflict share is its top
    B-space collision share (``b_crowding_top.mean``): interference concentrated in
    one direction is what pruning can remove.

    Example
    -------
    >>> decision = decide_for_store(store, ["math", "code"], MergeProbe.default())  # doctest: +SKIP
    >>> decision.action  # doctest: +SKIP
    'merge'
    """
    from mergeprobe.decision import decide

    pairs = [(i, j) for i in runs for j in runs if i != j]
    features = store.pairwise_features_among(runs)
    mean = predictor.predict_retention([features[p] for p in pairs])
    lower = predictor.predict_lower_retention([features[p] for p in pairs])
    conflict = {p: float(features[p].get("b_crowding_top.mean", 0.0)) for p in pairs}
    return decide(
        runs,
        {p: float(v) for p, v in zip(pairs, mean)},
        {p: float(v) for p, v in zip(pairs, lower)},
        conflict_share=conflict,
        thresholds=thresholds,
    )


def merge_finished_runs(
    store: Any,
    method: str,
    model: Any,
    base_fingerprint: str,
    expected_runs: list[str] | None = None,
    decision: Any = None,
    calibration_size: int = 32,
) -> Any:
    """Merge the finished runs of a store once, whichever process gets there first.

    The set is the runs that finished on the same base model (``expected_runs``: wait
    until all of them finished), less the runs a ``decision`` routed or that stopped
    early. The process that wins :meth:`ProbeStore.claim_merge` for the set merges
    with ``method`` into ``<store>/merges/<set>/adapter`` and records it; every other
    process returns ``None``. TaDA's probe uses ``model`` (adapters disabled) and the
    runs' probe batches as calibration inputs.
    """
    from mergeprobe.merging import merge_adapters
    from mergeprobe.store import merge_set_id

    records = {r.run_name: r for r in store.records() if r.meta.get("base_fingerprint") == base_fingerprint}
    finished = {name for name, r in records.items() if r.meta.get("status") == "finished" and r.adapter_path is not None}
    if expected_runs is not None:
        if not set(expected_runs) <= {n for n, r in records.items() if r.meta.get("status") in ("finished", "stopped")}:
            return None
        finished &= set(expected_runs)
    routed = set(getattr(decision, "routed", ()) or ())
    members = sorted(finished - routed)
    if len(members) < 2:
        return None
    set_id = merge_set_id(members)
    if not store.claim_merge(set_id):
        return None
    calibration = None
    if method == "tada":
        ids = torch.cat([records[m].tensors["probe_input_ids"] for m in members if "probe_input_ids" in records[m].tensors])
        calibration = ids[:calibration_size]
    out = store.merge_dir(set_id) / "adapter"
    result = merge_adapters(
        [records[m].adapter_path for m in members],
        method=method,
        out_dir=out,
        base_model=model if method == "tada" else None,
        calibration=calibration,
        overwrite=True,
        show_progress=False,
    )
    store.mark_merged(set_id, {"method": method, "runs": members, "adapter": str(out), "routed": sorted(routed)})
    return result
