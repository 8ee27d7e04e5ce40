"""KnOTS merging (``knots``): align the tasks in one SVD basis, then merge (Stoica et al. 2025).

Model Merging with SVD to Tie the KnOTS, ICLR 2025 (arXiv:2410.19735). Per module
(ALGORITHMS.md §2): SVD of the concatenation ``[w_1 ΔW_1 … w_T ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ]``;
each task becomes ``Σ V_tᵀ`` in the shared left basis ``U``; those aligned task
matrices are merged element-wise with ``merge`` (``"ties"``, ``"dare_ties"``,
``"dare_linear"`` or ``"linear"``, through :mod:`mergeprobe.merging.sparsify`), and
``ΔW = U · merged``.

In core space the SVD is that of ``[M_1 … M_T]`` (``p × T q``, ``p, q ≤ R``), and
``U · merged`` is a core, factorised by :meth:`~mergeprobe.core.CoreSpace.factorize`;
no ``d_out × d_in`` matrix is built. With ``merge="linear"`` KnOTS is exactly task
arithmetic (the basis change is linear). The merge weights multiply each update
before the SVD.

Diagnostics per module: ``energy_kept`` and those of the element-wise merge
(``sign_conflict``, ``dropped_share``).

Example
-------
>>> import torch
>>> from mergeprobe.merging.base import ModuleInputs
>>> from mergeprobe.merging.methods.knots import Knots
>>> g = torch.Generator().manual_seed(0)
>>> ups = [(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)) for _ in range(2)]
>>> out = Knots(merge="linear").merge_module(ModuleInputs("m", ups, [1.0, 1.0], [True, True]), rank=None)
>>> bool(torch.allclose(out.B @ out.A, sum(b @ a for b, a in ups), atol=1e-5))
True
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from mergeprobe.core import CoreSpace, energy_kept
from mergeprobe.merging.base import MergeMethod, ModuleInputs, ModuleResult
from mergeprobe.merging.registry import register
from mergeprobe.merging.sparsify import (
    Sparsification,
    check_choice,
    check_density,
    check_lam,
    check_seed,
    generalized_task_arithmetic,
    module_generator,
)

KnotsMerge = Literal["ties", "dare_ties", "dare_linear", "linear"]
MERGES: dict[str, tuple[Sparsification | None, bool]] = {
    "ties": ("magnitude", True),
    "dare_ties": ("random", True),
    "dare_linear": ("random", False),
    "linear": (None, False),
}
"""``merge`` → (sparsification, sign consensus) of the element-wise merge."""


@register
class Knots(MergeMethod):
    """KnOTS: SVD-align the task updates, merge the aligned ``Σ V_tᵀ``, map back with ``U``.

    Parameters
    ----------
    merge:
        The element-wise merge of the aligned tasks: ``"ties"``, ``"dare_ties"``,
        ``"dare_linear"`` or ``"linear"``.
    density:
        Share of entries kept by TIES / DARE, in (0, 1] (unused by ``"linear"``).
    lam:
        Factor λ applied to the merged update.
    seed:
        Seed of the DARE drop masks (combined with each module's key).
    """

    name = "knots"

    def __init__(self, merge: KnotsMerge = "ties", density: float = 0.5, lam: float = 1.0, seed: int = 0) -> None:
        self.merge = check_choice(merge, "merge", tuple(MERGES))
        self.density = check_density(density)
        self.lam = check_lam(lam)
        self.seed = check_seed(seed)

    def merge_module(self, inputs: ModuleInputs, rank: int | None) -> ModuleResult:
        space = CoreSpace.from_factors(inputs.weighted)
        u, s, vh = torch.linalg.svd(torch.cat(space.cores, dim=1), full_matrices=False)
        blocks = (s[:, None] * vh).split(space.cores[0].shape[1], dim=1)
        # an adapter without this module has M_t = 0: make its aligned block exactly 0, not round-off
        aligned = [block if r > 0 else torch.zeros_like(block) for block, r in zip(blocks, space.ranks)]
        sparsify, consensus = MERGES[self.merge]
        generator = module_generator(self.seed, inputs.key, u.device) if sparsify == "random" else None
        merged, diagnostics = generalized_task_arithmetic(
            aligned, sparsify=sparsify, consensus=consensus, density=self.density, lam=self.lam, generator=generator
        )
        b, a, singular_values = space.factorize(u @ merged, rank)
        out: dict[str, Any] = {"energy_kept": energy_kept(singular_values, rank), **diagnostics}
        return ModuleResult(b, a, out)
