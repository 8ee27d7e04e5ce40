"""Task arithmetic (``linear``): ``ΔW = Σ_t w_t ΔW_t``, exact in core space.

Example
-------
>>> import torch
>>> from mergeprobe.merging.base import ModuleInputs
>>> from mergeprobe.merging.methods.linear import Linear
>>> ups = [(torch.randn(4, 2), torch.randn(2, 3)) for _ in range(2)]
>>> out = Linear().merge_module(ModuleInputs("m", ups, [1.0, 1.0], [True, True]), rank=None)
>>> bool(torch.allclose(out.B @ out.A, sum(b @ a for b, a in ups), atol=1e-5))
True
"""

from __future__ import annotations

from mergeprobe.core import CoreSpace, energy_kept
from mergeprobe.merging.base import MergeMethod, ModuleInputs, ModuleResult
from mergeprobe.merging.registry import register



@register
class Linear(MergeMethod):
    """Task arithmetic: the weighted sum of the updates, truncated to ``rank`` by the core SVD."""

    name = "linear"

    def merge_module(self, inputs: ModuleInputs, rank: int | None) -> ModuleResult:
        space = CoreSpace.from_factors(inputs.weighted)
        merged = sum(space.cores[1:], space.cores[0])
        b, a, s = space.factorize(merged, rank)
        return ModuleResult(b, a, {"energy_kept": energy_kept(s, rank)})
