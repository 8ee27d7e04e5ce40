"""Element-wise merging shared by TIES, DARE and KnOTS (generalised task arithmetic).

In the spirit of mergekit's ``generalized_task_arithmetic``, one function,
:func:`generalized_task_arithmetic`, covers task arithmetic, TIES, DARE-linear and
DARE-TIES from two switches: how each task tensor is sparsified (``"magnitude"``:
keep the top ``density`` share of entries by magnitude; ``"random"``: drop each entry
with probability ``1 − density`` and rescale the kept ones by ``1/density``; ``None``:
keep everything) and whether signs are elected (``consensus=True``: TIES sign
election and disjoint mean; ``False``: plain sum). The result is multiplied by ``λ``.

:func:`merge_elementwise` applies such a combination to one module, either on the
cores ``M_t`` of :class:`~mergeprobe.core.CoreSpace` (``space="core"``, cheap,
``R × R``) or on the dense ``ΔW_t`` (``space="full"``, one module at a time, then
truncated SVD). Element-wise operations depend on the basis, so the two spaces give
different (both legitimate) merges; see ALGORITHMS.md §2.

The parameter checks used by every method of this family also live here, so each
parameter is validated once, with the same message everywhere.

Example
-------
>>> import torch
>>> from mergeprobe.merging.sparsify import generalized_task_arithmetic
>>> tasks = [torch.tensor([[3.0, -1.0], [0.5, 2.0]]), torch.tensor([[1.0, 2.0], [-4.0, 2.0]])]
>>> merged, diagnostics = generalized_task_arithmetic(tasks, sparsify=None, consensus=True)
>>> merged.tolist()
[[2.0, 2.0], [-4.0, 2.0]]
>>> diagnostics["sign_conflict"]
0.5
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mergeprobe.core import CoreSpace, energy_kept, truncated_factors
from mergeprobe.errors import MergeError
from mergeprobe.merging.base import ModuleInputs, ModuleResult

Sparsification = Literal["magnitude", "random"]
Space = Literal["core", "full"]
SPACES: tuple[str, ...] = ("core", "full")

Combine = Callable[[list[Tensor], str], tuple[Tensor, dict[str, Any]]]
"""``combine(task_tensors, module_key) -> (merged, diagnostics)``, used by :func:`merge_elementwise`."""


def check_density(density: Any) -> float:
    """``density`` as a float, or :class:`MergeError` unless ``0 < density ≤ 1``."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise MergeError(f"density must be a number in (0, 1] (the share of entries kept), got {density!r}.")
    return float(density)


def check_lam(lam: Any) -> float:
    """``lam`` (the factor λ applied to the merged update) as a float, or :class:`MergeError` unless finite."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(float(lam)):
        raise MergeError(f"lam must be a finite number (the factor applied to the merged update), got {lam!r}.")
    return float(lam)


def check_seed(seed: Any) -> int:
    """``seed`` as an int, or :class:`MergeError` unless it is a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MergeError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else :class:`MergeError` naming parameter ``name``."""
    if value not in choices:
        raise MergeError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")
    return str(value)


def magnitude_trim(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``round(density · n)`` entries of largest magnitude (at least one), zero the rest.

    >>> magnitude_trim(torch.tensor([1.0, -4.0, 2.0, 0.5]), 0.5)
    tensor([ 0., -4.,  2.,  0.])
    """
    n = tensor.numel()
    k = min(n, max(1, round(density * n)))
    if k >= n:
        return tensor.clone()
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat.abs(), k, largest=True).indices] = True
    return (flat * mask).reshape(tensor.shape)


def random_drop(tensor: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by ``1/density``.

    The rescale keeps the expectation: ``E[random_drop(x)] = x``.
    """
    if density >= 1.0:
        return tensor.clone()
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def elect_signs(stacked: Tensor) -> Tensor:
    """TIES sign election over dim 0: the sign of the sum of the task values (+1 where the sum is 0)."""
    return torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(stacked: Tensor, signs: Tensor) -> Tensor:
    """TIES disjoint mean: per entry, the mean of the non-zero task values that agree with ``signs``.

    Entries where no task agrees are 0.
    """
    agree = (stacked.sign() == signs).to(stacked.dtype)
    return (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1.0)


def sign_conflict_share(stacked: Tensor) -> float:
    """Share of the entries with a non-zero task value where both signs occur among the tasks."""
    positive = (stacked > 0).any(dim=0)
    negative = (stacked < 0).any(dim=0)
    active = int((positive | negative).sum())
    return float((positive & negative).sum()) / active if active else 0.0


def module_generator(seed: int, key: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, key)``: reproducible, and different for every module.

    The key is hashed with SHA-256 (not Python's salted ``hash``), so the stream is the
    same across processes.
    """
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def generalized_task_arithmetic(
    tensors: Sequence[Tensor],
    *,
    sparsify: Sparsification | None,
    consensus: bool,
    density: float = 1.0,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Sparsify each task tensor, combine them, and scale by ``lam``.

    Parameters
    ----------
    tensors:
        The task tensors (already multiplied by their merge weights), all the same shape.
    sparsify:
        ``"magnitude"`` (TIES trim), ``"random"`` (DARE drop and rescale, needs
        ``generator``) or ``None``.
    consensus:
        ``True``: elect signs and take the disjoint mean (TIES); ``False``: sum.
    density:
        The share of entries kept by the sparsification.
    lam:
        The factor applied to the combination.
    generator:
        The random stream for ``sparsify="random"``; the non-zero tasks draw from it in order.

    Returns
    -------
    merged, diagnostics
        ``diagnostics`` holds ``dropped_share`` (share of the non-zero entries the
        random drop zeroed) for ``"random"`` and ``sign_conflict``
        (:func:`sign_conflict_share`) when ``consensus``.
    """
    diagnostics: dict[str, Any] = {}
    if sparsify == "magnitude":
        sparse = [magnitude_trim(t, density) for t in tensors]
    elif sparsify == "random":
        if generator is None:
            raise MergeError("random sparsification (DARE) needs a seeded generator.")
        # an all-zero task (an adapter without this module) draws no mask, so adding it changes nothing
        sparse = [random_drop(t, density, generator) if bool(t.any()) else t for t in tensors]
        nonzero = sum(int((t != 0).sum()) for t in tensors)
        dropped = sum(int(((t != 0) & (s == 0)).sum()) for t, s in zip(tensors, sparse))
        diagnostics["dropped_share"] = dropped / nonzero if nonzero else 0.0
    elif sparsify is None:
        sparse = list(tensors)
    else:
        raise MergeError(f"sparsify must be 'magnitude', 'random' or None, got {sparsify!r}.")
    stacked = torch.stack(sparse)
    if consensus:
        diagnostics["sign_conflict"] = sign_conflict_share(stacked)
        merged = disjoint_mean(stacked, elect_signs(stacked))
    else:
        merged = stacked.sum(dim=0)
    return lam * merged, diagnostics


def full_space_rank(inputs: ModuleInputs, rank: int | None) -> int:
    """The rank a ``space="full"`` merge is truncated to.

    An element-wise merge of dense ``ΔW_t`` is in general full rank, so "exact"
    (``rank=None``) is capped at ``min(R, d_out, d_in)`` with ``R = Σ r_t``.
    """
    if rank is not None:
        return int(rank)
    total = sum(int(b.shape[1]) for b, _ in inputs.updates)
    return max(1, min(total, *inputs.shape))


def merge_elementwise(inputs: ModuleInputs, rank: int | None, space: Space, combine: Combine) -> ModuleResult:
    """Run an element-wise ``combine`` on one module's weighted updates and return LoRA factors.

    ``space="core"``: ``combine`` sees the cores ``M_t`` (``p × q``, ``p, q ≤ R``) and
    the merged core is factorised by :meth:`CoreSpace.factorize` (``rank=None`` is
    lossless). ``space="full"``: ``combine`` sees the dense ``d_out × d_in`` updates and
    the result is truncated by :func:`~mergeprobe.core.truncated_factors` to
    :func:`full_space_rank`. The diagnostics gain ``energy_kept``, the share of the
    merged update's squared singular values that the factors keep (for modules too
    large for an exact SVD, relative to the leading values the randomised SVD found).
    """
    if space == "core":
        core_space = CoreSpace.from_factors(inputs.weighted)
        merged, diagnostics = combine(list(core_space.cores), inputs.key)
        b, a, s = core_space.factorize(merged, rank)
        kept = energy_kept(s, rank)
    elif space == "full":
        dense = [b @ a for b, a in inputs.weighted]
        merged, diagnostics = combine(dense, inputs.key)
        k = full_space_rank(inputs, rank)
        b, a, s = truncated_factors(merged, k)
        kept = energy_kept(s, k)
    else:
        raise MergeError(f"space must be one of {', '.join(repr(s) for s in SPACES)}, got {space!r}.")
    return ModuleResult(b, a, {"energy_kept": kept, **diagnostics})
