"""Pico (Crowded in B-Space, arXiv 2604.16826): calibrate over-shared B directions, then merge.

Per module (ALGORITHMS.md §3), with the LoRA scaling folded into ``B̂_t``:

1. thin SVD ``B_all = [B̂_1 … B̂_T] = U Σ Vᵀ``;
2. collision shares ``c_j = σ_j² / Σ_k σ_k²`` and ``α_j = 1 / (1 + (T−1) c_j)``;
3. calibrated ``B̃_t = B̂_t + U diag(α − 1) Uᵀ B̂_t``;
4. merge the ``(B̃_t, A_t)`` with a base merger (``linear``, ``ties``, ``tsvm`` or any
   other registered method that needs no base model) at full rank, with the user's
   weights;
5. rescale by ``γ = (1/T) Σ_t ‖w_t ΔW_t‖_F / ‖ΔW_merged‖_F`` (the original, weighted
   updates; norms in low rank), then truncate to ``rank`` through the core SVD.

Everything is low rank: the SVD of ``B_all`` goes through its QR (``U`` lies in the
span of ``Q_B``), the calibration touches ``d_out × r_t`` matrices only, and no
``d_out × d_in`` matrix is formed (unless the base merger itself works on dense
updates, e.g. ``ties`` with ``space="full"``).

Ours, not the paper's: ``T`` counts only the adapters that have the module (an adapter
without it contributes ``ΔW_t = 0`` and takes no part in the collision shares nor the
average norm); when every update of a module is zero the shares are 0 and ``γ = 1``.
An adapter that has the module but whose update is exactly zero (``B = 0``, as PEFT
initialises it) does count in ``T``: ``γ`` scales the merge to the mean norm including
that zero, so merging ``y`` with a zero adapter gives ``y / 2``.
The collision shares use the unweighted ``B̂_t`` (as the paper's definition); the
user's weights enter at the merge and in ``γ``.

Example
-------
>>> import torch
>>> from mergeprobe.merging.base import ModuleInputs
>>> from mergeprobe.merging.methods.pico import Pico
>>> g = torch.Generator().manual_seed(0)
>>> ups = [(torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g)) for _ in range(2)]
>>> out = Pico(base="linear").merge_module(ModuleInputs("m", ups, [1.0, 1.0], [True, True]), rank=2)
>>> out.A.shape, round(out.diagnostics["gamma"], 3) > 0
(torch.Size([2, 6]), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any


from mergeprobe.core import CoreSpace, Factors, collision_shares, energy_kept, frobenius_norm, share_entropy
from mergeprobe.errors import MergeError
from mergeprobe.merging.base import MergeContext, MergeMethod, ModuleInputs, ModuleResult
from mergeprobe.merging.registry import get_method, register

if TYPE_CHECKING:
    from mergeprobe.adapters import LoraAdapter


@register
class Pico(MergeMethod):
    """Pico: downscale over-shared directions of the stacked B's, merge with a base method, rescale.

    Parameters
    ----------
    base:
        The base merger's registered name (the paper uses ``"linear"``, ``"ties"`` and
        ``"tsvm"``). It is looked up when the merge starts, and runs at full rank.
    rescale:
        Multiply the merge by ``γ`` (the paper's rescale; ``False`` is the ablation).
    base_params:
        Parameters of the base merger, e.g. ``{"density": 0.5}`` for ``ties``.

    Diagnostics per module: ``top_collision_share`` (largest ``c_j``),
    ``collision_entropy`` (nats) and ``collision_entropy_normalized`` (divided by
    ``log`` of the number of directions), ``gamma`` (the rescale factor, reported even
    when ``rescale=False``), ``energy_kept`` by the truncation, and ``base`` (the base
    merger's own diagnostics).
    """

    name = "pico"

    def __init__(self, base: str = "linear", rescale: bool = True, base_params: dict[str, Any] | None = None):
        self.base = base
        self.rescale = rescale
        self.base_params = base_params

    def _base_method(self) -> MergeMethod:
        """The base merger, built on first use from ``base`` and ``base_params``."""
        cached = getattr(self, "_base", None)
        if cached is not None:
            return cached
        if not isinstance(self.base, str):
            raise MergeError(f"pico: base must be a merge method name such as 'linear', 'ties' or 'tsvm', got {self.base!r}.")
        if self.base == self.name:
            raise MergeError("pico: base cannot be 'pico' itself; choose 'linear', 'ties' or 'tsvm'.")
        if self.base_params is not None and not isinstance(self.base_params, dict):
            raise MergeError(f"pico: base_params must be a dict of the base merger's parameters, got {type(self.base_params).__name__}.")
        method = get_method(self.base, **(self.base_params or {}))
        if method.needs_base_model:
            raise MergeError(f"pico: base merger {self.base!r} probes a base model and cannot run inside pico; choose 'linear', 'ties' or 'tsvm'.")
        self._base = method
        return method

    def prepare(self, adapters: Sequence[LoraAdapter], weights: Sequence[float], context: MergeContext) -> None:
        """Build the base merger (so a bad ``base`` fails before any module) and let it prepare."""
        self._base = None
        self._base_method().prepare(adapters, weights, context)

    def merge_module(self, inputs: ModuleInputs, rank: int | None) -> ModuleResult:
        base = self._base_method()
        present = [i for i, u in enumerate(inputs.updates) if u[0].shape[1] > 0]
        count = len(present)
        if count == 0:
            raise MergeError(f"pico: module {inputs.key!r} has no update in any adapter.")

        u, shares = collision_shares([inputs.updates[i][0] for i in present])
        alpha = 1.0 / (1.0 + (count - 1) * shares)
        calibrated: list[Factors] = []
        for b, a in inputs.updates:
            b = b.to(u.dtype)
            calibrated.append((b + u @ ((alpha - 1.0)[:, None] * (u.T @ b)), a))

        merged = base.merge_module(ModuleInputs(inputs.key, calibrated, list(inputs.weights), list(inputs.present)), rank=None)
        merged_b, merged_a = merged.B.to(u.dtype), merged.A.to(u.dtype)
        merged_norm = float(frobenius_norm((merged_b, merged_a)))
        mean_norm = sum(float(frobenius_norm(w_update)) for i, w_update in enumerate(inputs.weighted) if i in present) / count
        gamma = mean_norm / merged_norm if merged_norm > 0.0 else 1.0
        if self.rescale:
            merged_b = merged_b * gamma

        space = CoreSpace.from_factors([(merged_b, merged_a)])
        b_out, a_out, s = space.factorize(space.cores[0], rank)
        directions = int(shares.numel())
        entropy = share_entropy(shares)
        return ModuleResult(
            b_out,
            a_out,
            {
                "top_collision_share": float(shares.max()) if directions else 0.0,
                "collision_entropy": entropy,
                "collision_entropy_normalized": entropy / math.log(directions) if directions > 1 else 0.0,
                "gamma": gamma,
                "energy_kept": energy_kept(s, rank),
                "base": merged.diagnostics,
            },
        )
