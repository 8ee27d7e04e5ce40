"""DARE merging (``dare_linear``, ``dare_ties``): drop and rescale (Yu et al. 2024).

Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch, ICML 2024 (arXiv:2311.03099). Each entry of each task vector is dropped with
probability ``1 − density`` and the kept entries are rescaled by ``1/density``, so
every task vector keeps its expectation (the rescale that PEFT silently skipped for two
years is applied here, and tested). Then ``dare_linear`` sums the task vectors and
``dare_ties`` elects signs and takes the TIES disjoint mean; both multiply by ``λ``.
The merge weights multiply each task vector before the drop.

The drop is seeded: the generator of a module is seeded from ``(seed, module key)``
(:func:`~mergeprobe.merging.sparsify.module_generator`), so a merge is reproducible
and different modules get different masks. ``space`` is as for ``ties``: ``"core"``
drops entries of the cores ``M_t`` (default, cheap, ``rank=None`` lossless);
``"full"`` drops entries of the dense ``ΔW_t`` and truncates the result to ``rank``
(``rank=None``: ``min(R, d_out, d_in)``, since the result is not low-rank).

Diagnostics per module: ``energy_kept``, ``dropped_share`` (share of the non-zero
entries that were dropped, ≈ ``1 − density``) and, for ``dare_ties``, ``sign_conflict``.

Example
-------
>>> import torch
>>> from mergeprobe.merging.base import ModuleInputs
>>> from mergeprobe.merging.methods.dare import DareLinear
>>> g = torch.Generator().manual_seed(0)
>>> ups = [(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)) for _ in range(2)]
>>> inputs = ModuleInputs("m", ups, [1.0, 1.0], [True, True])
>>> first = DareLinear(density=0.5, seed=3).merge_module(inputs, rank=None)
>>> again = DareLinear(density=0.5, seed=3).merge_module(inputs, rank=None)
>>> bool(torch.equal(first.B @ first.A, again.B @ again.A))
True
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from mergeprobe.merging.base import MergeMethod, ModuleInputs, ModuleResult
from mergeprobe.merging.registry import register
from mergeprobe.merging.sparsify import (
    SPACES,
    Space,
    check_choice,
    check_density,
    check_lam,
    check_seed,
    generalized_task_arithmetic,
    merge_elementwise,
    module_generator,
)


class _Dare(MergeMethod):
    """Random drop with ``1/density`` rescale, then a sum or a TIES disjoint mean.

    Parameters
    ----------
    density:
        Probability that an entry is kept, in (0, 1].
    lam:
        Factor λ applied to the merged update.
    space:
        ``"core"`` (on the cores ``M_t``) or ``"full"`` (on the dense ``ΔW_t``).
    seed:
        Seed of the drop masks (combined with each module's key).
    """

    consensus: ClassVar[bool]

    def __init__(self, density: float = 0.5, lam: float = 1.0, space: Space = "core", seed: int = 0) -> None:
        self.density = check_density(density)
        self.lam = check_lam(lam)
        self.space = check_choice(space, "space", SPACES)
        self.seed = check_seed(seed)

    def _combine(self, tensors: list[Tensor], key: str) -> tuple[Tensor, dict[str, Any]]:
        generator = module_generator(self.seed, key, tensors[0].device)
        return generalized_task_arithmetic(
            tensors, sparsify="random", consensus=self.consensus, density=self.density, lam=self.lam, generator=generator
        )

    def merge_module(self, inputs: ModuleInputs, rank: int | None) -> ModuleResult:
        return merge_elementwise(inputs, rank, self.space, self._combine)


@register
class DareLinear(_Dare):
    """DARE then task arithmetic: ``λ Σ_t drop(w_t ΔW_t) / density``."""

    name = "dare_linear"
    consensus = False


@register
class DareTies(_Dare):
    """DARE then TIES sign election and disjoint mean."""

    name = "dare_ties"
    consensus = True
