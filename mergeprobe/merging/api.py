"""``merge_adapters``: the one entry point to every merge method.

Rule for modules present in only some adapters: the merge covers the union of the
adapters' modules, and an adapter that does not target a module contributes
``ΔW_t = 0`` there (it never changed that weight).

Example
-------
>>> from mergeprobe import merge_adapters
>>> result = merge_adapters(["runs/math/adapter", "runs/code/adapter"], method="ties",
...                         density=0.5, out_dir="merged")  # doctest: +SKIP
>>> result.out_dir  # doctest: +SKIP
PosixPath('merged')
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mergeprobe.adapters import LoraAdapter, adapter_config_for, load_adapter, save_adapter
from mergeprobe.errors import AdapterError, MergeError, OutputExistsError
from mergeprobe.merging.base import MergeContext, ModuleInputs
from mergeprobe.merging.registry import get_method

REPORT_NAME = "mergeprobe_merge.json"


@dataclass
class MergeResult:
    """A merged adapter: factors per module (scaling 1) plus what the method reported.

    Example
    -------
    >>> result = merge_adapters(["runs/math", "runs/code"], method="pico", base="ties")  # doctest: +SKIP
    >>> result.save("merged")  # a PEFT adapter directory  # doctest: +SKIP
    >>> result.global_diagnostics["energy_kept"]  # doctest: +SKIP
    0.97

    Attributes
    ----------
    modules:
        Module key → ``(B, A)`` with ``ΔW = B @ A``.
    diagnostics:
        Module key → the method's per-module diagnostics (e.g. Pico collision shares,
        TaDA gates and dropped directions, energy kept by the truncation).
    method, params, weights, sources:
        What was merged and how.
    global_diagnostics:
        Diagnostics of the whole merge (e.g. TaDA's probe signal per module).
    config:
        The PEFT ``adapter_config.json`` the result is written with.
    out_dir:
        Where it was written, if anywhere.
    """

    modules: dict[str, tuple[Tensor, Tensor]]
    diagnostics: dict[str, dict[str, Any]]
    method: str
    params: dict[str, Any]
    weights: list[float]
    sources: list[str]
    global_diagnostics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    out_dir: Path | None = None

    def delta(self, key: str) -> Tensor:
        """The dense merged update of one module (for tests and small layers)."""
        b, a = self.modules[key]
        return b.float() @ a.float()

    def report(self) -> dict[str, Any]:
        """A JSON-safe summary: method, parameters, inputs and diagnostics."""
        return {
            "method": self.method,
            "params": _json_safe(self.params),
            "weights": self.weights,
            "sources": self.sources,
            "ranks": {k: int(a.shape[0]) for k, (_, a) in self.modules.items()},
            "global": _json_safe(self.global_diagnostics),
            "modules": _json_safe(self.diagnostics),
        }

    def save(self, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the merged adapter as a PEFT directory (atomic; see :func:`save_adapter`)."""
        self.out_dir = save_adapter(
            self.modules,
            out_dir,
            template_config=self.config,
            dtype=self.dtype,
            overwrite=overwrite,
            extra_files={REPORT_NAME: json.dumps(self.report(), indent=1) + "\n"},
        )
        return self.out_dir


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def check_compatible(adapters: Sequence[LoraAdapter], allow_base_mismatch: bool = False) -> None:
    """Raise :class:`AdapterError` unless the adapters can be merged.

    They must name the same base model (unless ``allow_base_mismatch``) and agree on
    the shape of every module they share.
    """
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1 and not allow_base_mismatch:
        listing = ", ".join(f"{a.name!r} → {a.base_model!r}" for a in adapters)
        raise AdapterError(
            f"adapters were trained on different base models ({listing}). Merging them is almost always a mistake; "
            "if the bases are the same weights under different names, pass allow_base_mismatch=True (--allow-base-mismatch)."
        )
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter in adapters:
        for key, module in adapter.modules.items():
            if key in shapes and shapes[key][0] != module.shape:
                shape, owner = shapes[key]
                raise AdapterError(
                    f"module {key!r} is {shape[0]}×{shape[1]} in adapter {owner!r} but "
                    f"{module.shape[0]}×{module.shape[1]} in adapter {adapter.name!r}; these adapters belong to different architectures — "
                    "merge only adapters trained on the same base model."
                )
            shapes.setdefault(key, (module.shape, adapter.name))


def _module_inputs(key: str, adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> ModuleInputs:
    owner = next(a for a in adapters if key in a.modules)
    d_out, d_in = owner.modules[key].shape
    dtype = owner.modules[key].folded()[0].dtype
    updates = []
    for adapter in adapters:
        module = adapter.modules.get(key)
        if module is None:
            updates.append((torch.zeros(d_out, 0, dtype=dtype), torch.zeros(0, d_in, dtype=dtype)))
        else:
            updates.append(module.folded())
    return ModuleInputs(key=key, updates=updates, weights=list(weights), present=[key in a.modules for a in adapters])


def merge_adapters(
    adapters: Sequence[Any],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    rank: int | Literal["exact"] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    base_model: Any = None,
    calibration: Any = None,
    allow_base_mismatch: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    **params: Any,
) -> MergeResult:
    """Merge LoRA adapters into one, in core space, optionally writing a PEFT adapter.

    Parameters
    ----------
    adapters:
        Two or more adapter directories, ``PeftModel`` s or :class:`LoraAdapter` s.
    method:
        A registered method: ``linear``, ``ties``, ``dare_linear``, ``dare_ties``,
        ``tsvm``, ``knots``, ``pico``, ``tada`` (see
        :func:`mergeprobe.merging.available_methods`).
    weights:
        Per-adapter weights ``w_t`` (default 1 each).
    rank:
        Output rank per module: ``None`` (default) the largest input rank of the
        module, an int, or ``"exact"`` to keep the full core rank (lossless for
        linear merges).
    out_dir:
        If given, the merged adapter is written there (atomically).
    base_model, calibration:
        A base model (``transformers`` model) and calibration inputs, for methods
        that probe the model (``tada``).
    allow_base_mismatch:
        Merge adapters whose configs name different base models.
    overwrite:
        Replace an existing ``out_dir``.
    show_progress:
        Show a progress bar over modules.
    **params:
        The method's parameters (e.g. ``density=0.5`` for ``ties``).

    Returns
    -------
    MergeResult

    Raises
    ------
    MergeError
        Inconsistent arguments, or a method that fails numerically on a module.
    AdapterError
        An adapter that cannot be read or combined, or merged factors that overflow the
        output dtype when written.
    OutputExistsError
        ``out_dir`` exists and ``overwrite`` is false.

    Notes
    -----
    Numerics:

    - **Precision.** Every method computes in float32 (float64 if any input is
      float64): bf16 and fp16 factors are promoted when read. The merged factors are
      written in the first adapter's dtype (:attr:`MergeResult.dtype`), i.e. a bf16 or
      fp16 merge is the float32 merge of the same values, cast. If a factor overflows
      that dtype when cast (fp16 tops out at 65504) the write raises
      :class:`~mergeprobe.errors.AdapterError` and nothing is written; merge without
      ``out_dir``, set ``result.dtype = torch.float32`` and ``result.save(out_dir)``.
    - **Zero updates** (``B = 0``, as PEFT initialises an adapter) contribute nothing;
      a module whose updates are all zero merges to a zero update. A zero adapter still
      counts as having the module: Pico's rescale ``γ`` averages the norms over it, so
      merging ``y`` with a zero adapter gives ``y / 2`` under ``pico`` but ``y`` under
      ``linear``, ``tsvm`` and ``tada``.
    - **Rank-deficient and identical adapters.** Singular directions at round-off level
      are dropped (TSV-M, TaDA, and the polar factors of TSV-M), so no arbitrary
      direction enters the result: ``tsvm`` of two identical adapters is that adapter,
      ``linear`` is twice it, ``pico`` has its norm. Element-wise methods (``ties``,
      ``dare_*``, ``knots``) act on the entries of the cores and may raise the rank.
    - **Scale.** No absolute threshold is used anywhere (tolerances are relative to the
      largest singular value involved), so an update of norm 1e-6 alone in a module is
      kept as it is; next to a 1e6 update in the same module it is below float32
      resolution and is lost, as in any float32 sum. NaN or Inf in an input is refused
      when it is read; a method that still produces a non-finite value raises
      :class:`~mergeprobe.errors.MergeError`.

    Example
    -------
    >>> result = merge_adapters(["a/", "b/"], method="pico", base="ties", out_dir="merged")  # doctest: +SKIP
    """
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise OutputExistsError(f"output directory {str(out_dir)!r} already exists; choose another path or pass overwrite=True (--overwrite).")
    if len(adapters) < 2:
        raise MergeError(f"merging needs at least two adapters, got {len(adapters)}; pass two or more adapter directories.")
    merge_method = get_method(method, **params)
    loaded = [load_adapter(a) for a in adapters]
    check_compatible(loaded, allow_base_mismatch)
    if weights is None:
        weights = [1.0] * len(loaded)
    weights = [float(w) for w in weights]
    if len(weights) != len(loaded):
        raise MergeError(f"got {len(weights)} weights for {len(loaded)} adapters; give one weight per adapter.")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights must be finite numbers, got {weights}.")
    if rank is not None and rank != "exact" and (not isinstance(rank, int) or rank < 1):
        raise MergeError(f"rank must be a positive integer, 'exact' or None, got {rank!r}.")
    if merge_method.needs_base_model and base_model is None:
        raise MergeError(f"method {method!r} probes the base model: pass base_model=... (--base-model) and calibration inputs (--calibration).")

    context = MergeContext(base_model=base_model, calibration=calibration, show_progress=show_progress)
    try:
        merge_method.prepare(loaded, weights, context)
    except torch.linalg.LinAlgError as err:
        raise MergeError(f"method {method!r} failed while preparing the merge ({err}); check the inputs' norms and the method's parameters.") from err
    keys = sorted({k for a in loaded for k in a.modules})
    modules: dict[str, tuple[Tensor, Tensor]] = {}
    diagnostics: dict[str, dict[str, Any]] = {}
    for key in tqdm(keys, desc=f"merging ({method})", unit="module", disable=not show_progress):
        inputs = _module_inputs(key, loaded, weights)
        if rank == "exact":
            module_rank = None
        elif rank is None:
            module_rank = max(a.modules[key].rank for a in loaded if key in a.modules)
        else:
            module_rank = int(rank)
        try:
            result = merge_method.merge_module(inputs, module_rank)
        except torch.linalg.LinAlgError as err:
            raise MergeError(f"method {method!r} failed on module {key!r} ({err}); check the inputs' norms and the method's parameters.") from err
        if not (torch.isfinite(result.B).all() and torch.isfinite(result.A).all()):
            raise MergeError(f"method {method!r} produced NaN/Inf in module {key!r}; check the inputs' norms and the method's parameters.")
        modules[key] = (result.B, result.A)
        diagnostics[key] = result.diagnostics
    template = loaded[0].config
    merged = MergeResult(
        modules=modules,
        diagnostics=diagnostics,
        method=method,
        params=merge_method.params(),
        weights=weights,
        sources=[a.name for a in loaded],
        global_diagnostics=merge_method.global_diagnostics(),
        config=adapter_config_for(modules, template),
        dtype=loaded[0].dtype,
    )
    if out_dir is not None:
        merged.save(out_dir, overwrite=overwrite)
    return merged
