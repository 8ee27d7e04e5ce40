"""TIES merging (``ties``): trim, elect sign, disjoint mean (Yadav et al. 2023).

TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023
(arXiv:2306.01708). Per task vector keep the top ``density`` share of entries by
magnitude; elect each entry's sign as the sign of the sum of the trimmed values;
average only the values that agree with the elected sign; multiply by ``λ``
(ALGORITHMS.md §2). The merge weights multiply each task vector before trimming, as in
PEFT and mergekit. The paper trims to 20 %; the default here, 0.5, is milder because
a core holds only ``R × R`` entries.

TIES is element-wise, so it depends on the basis. ``space="core"`` (default) runs it
on the cores ``M_t`` of :class:`~mergeprobe.core.CoreSpace`, as Core Space merging
does: ``O((d_out + d_in) R²)``, and ``rank=None`` is lossless. ``space="full"`` runs
it on the dense ``ΔW_t`` of one module at a time and truncates the result by SVD; a
full-space TIES result is not low-rank, so there ``rank=None`` keeps
``min(R, d_out, d_in)`` components (see ``energy_kept`` for what that drops).

Diagnostics per module: ``energy_kept`` and ``sign_conflict``, the share of the
non-zero entries whose trimmed task values disagree in sign.

Example
-------
>>> import torch
>>> from mergeprobe.merging.base import ModuleInputs
>>> from mergeprobe.merging.methods.ties import Ties
>>> g = torch.Generator().manual_seed(0)
>>> ups = [(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)) for _ in range(2)]
>>> out = Ties(density=0.5).merge_module(ModuleInputs("m", ups, [1.0, 1.0], [True, True]), rank=None)
>>> (out.B @ out.A).shape, sorted(out.diagnostics)
(torch.Size([6, 5]), ['energy_kept', 'sign_conflict'])
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mergeprobe.merging.base import MergeMethod, ModuleInputs, ModuleResult
from mergeprobe.merging.registry import register
from mergeprobe.merging.sparsify import (
    SPACES,
    Space,
    check_choice,
    check_density,
    check_lam,
    generalized_task_arithmetic,
    merge_elementwise,
)


@register
class Ties(MergeMethod):
    """TIES merging in core space (default) or on the dense updates.

    Parameters
    ----------
    density:
        Share of each task vector's entries kept by the magnitude trim, in (0, 1].
    lam:
        Factor λ applied to the merged update.
    space:
        ``"core"`` (on the cores ``M_t``) or ``"full"`` (on the dense ``ΔW_t``).
    """

    name = "ties"

    def __init__(self, density: float = 0.5, lam: float = 1.0, space: Space = "core") -> None:
        self.density = check_density(density)
        self.lam = check_lam(lam)
        self.space = check_choice(space, "space", SPACES)

    def _combine(self, tensors: list[Tensor], key: str) -> tuple[Tensor, dict[str, Any]]:
        return generalized_task_arithmetic(tensors, sparsify="magnitude", consensus=True, density=self.density, lam=self.lam)

    def merge_module(self, inputs: ModuleInputs, rank: int | None) -> ModuleResult:
        return merge_elementwise(inputs, rank, self.space, self._combine)
