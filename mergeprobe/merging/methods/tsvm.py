"""Task Singular Vectors merging (``tsvm``), in core space (Gargiulo et al. 2025).

Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025
(arXiv:2412.00081). Per module (ALGORITHMS.md §2): SVD of each weighted update
``w_t ΔW_t = U_t Σ_t V_tᵀ``; keep its top ``⌊min(d_out, d_in) / T⌋`` components (all
of them for LoRA-sized ranks); concatenate ``U_cat = [U_1 … U_T]``,
``V_cat = [V_1 … V_T]`` and the singular values; replace each concatenation by its
orthogonal polar factor (:func:`~mergeprobe.core.polar_factor`, the closest matrix
with orthonormal columns), and ``ΔW = λ U⊥ Σ_cat V⊥ᵀ``.

Everything is ``R``-dimensional: the SVDs are those of the cores ``M_t`` and the
singular vectors are expressed in the core bases, so no ``d_out × d_in`` matrix is
built; the merged core is factorised by :meth:`~mergeprobe.core.CoreSpace.factorize`.
Ours, beyond the paper: ``T`` counts the adapters that have the module, and components
with a numerically zero singular value (a rank-deficient adapter) are left out, since
their singular vectors are arbitrary and would still bend the polar factors; for the
same reason the polar factors keep only the range of ``U_cat`` and ``V_cat``
(:func:`~mergeprobe.core.polar_factor`), so two identical adapters merge to that adapter
rather than to it plus arbitrary directions.

Diagnostics per module: ``energy_kept``, ``components_per_task`` and
``orthogonality_gap``, ``max(‖U_catᵀU_cat − I‖_F, ‖V_catᵀV_cat − I‖_F)``: 0 when the
tasks' singular spaces are already orthogonal (TSV-M is then task arithmetic), larger
the more they interfere.

Example
-------
>>> import torch
>>> from mergeprobe.merging.base import ModuleInputs
>>> from mergeprobe.merging.methods.tsvm import Tsvm
>>> g = torch.Generator().manual_seed(0)
>>> ups = [(torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g)) for _ in range(2)]
>>> out = Tsvm().merge_module(ModuleInputs("m", ups, [1.0, 1.0], [True, True]), rank=3)
>>> out.A.shape[0], out.diagnostics["components_per_task"]
(3, [2, 2])
"""

from __future__ import annotations

import torch

from mergeprobe.core import CoreSpace, energy_kept, polar_factor
from mergeprobe.merging.base import MergeMethod, ModuleInputs, ModuleResult
from mergeprobe.merging.registry import register
from mergeprobe.merging.sparsify import check_lam


@register
class Tsvm(MergeMethod):
    """TSV-M: orthogonalise the concatenated task singular vectors, keep the singular values.

    Parameters
    ----------
    lam:
        Factor λ applied to the merged update (the paper's α).
    """

    name = "tsvm"

    def __init__(self, lam: float = 1.0) -> None:
        self.lam = check_lam(lam)

    def merge_module(self, inputs: ModuleInputs, rank: int | None) -> ModuleResult:
        space = CoreSpace.from_factors(inputs.weighted)
        tasks = sum(1 for r in space.ranks if r > 0)
        budget = min(inputs.shape) // max(tasks, 1)
        svds = [torch.linalg.svd(core, full_matrices=False) for core in space.cores]
        largest = max(float(s.max()) if s.numel() else 0.0 for _, s, _ in svds)
        tol = largest * max(space.cores[0].shape) * torch.finfo(space.cores[0].dtype).eps
        us, sigmas, vs, kept = [], [], [], []
        for (u, s, vh), r in zip(svds, space.ranks):
            k = min(r, budget, int((s > tol).sum()))
            us.append(u[:, :k])
            sigmas.append(s[:k])
            vs.append(vh[:k].T)
            kept.append(k)
        u_cat, s_cat, v_cat = torch.cat(us, dim=1), torch.cat(sigmas), torch.cat(vs, dim=1)
        if s_cat.numel() == 0:
            merged = torch.zeros_like(space.cores[0])
            gap = 0.0
        else:
            eye = torch.eye(s_cat.numel(), dtype=u_cat.dtype, device=u_cat.device)
            gap = max(float(torch.linalg.norm(u_cat.T @ u_cat - eye)), float(torch.linalg.norm(v_cat.T @ v_cat - eye)))
            merged = self.lam * (polar_factor(u_cat) * s_cat) @ polar_factor(v_cat).T
        b, a, s = space.factorize(merged, rank)
        return ModuleResult(b, a, {"energy_kept": energy_kept(s, rank), "components_per_task": kept, "orthogonality_gap": gap})
