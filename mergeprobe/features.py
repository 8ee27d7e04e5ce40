"""Mergeability features of pairs and sets of runs, from their :class:`~mergeprobe.signals.RunSignals`.

Per module shared by two runs ``a`` and ``b`` (ALGORITHMS.md §5), on the window updates
``ΔW = B̂ A``:

``update_alignment``
    ``cos(ΔW_a, ΔW_b)`` in Frobenius geometry, exact in low rank (:func:`mergeprobe.core.cosine`).
``log_norm_ratio``
    ``|log(‖ΔW_a‖_F / ‖ΔW_b‖_F)|`` — absolute, so the feature is symmetric in (a, b).
``b_crowding_top``, ``b_crowding_entropy``
    Pico collision shares ``c_j = σ_j² / Σ σ_k²`` of ``[B̂_a B̂_b]``: the top share, and
    the entropy ``−Σ c_j log c_j`` divided by ``log`` (number of columns), in [0, 1].
``a_overlap``, ``b_overlap``
    ``‖Q_aᵀ Q_b‖_F² / min(r_a, r_b)`` for orthonormal bases of the row spaces of the
    ``A`` (resp. column spaces of the ``B̂``), ranks taken numerically; in [0, 1].
``gradient_alignment``
    Frobenius cosine of the two ``k × k`` gradient sketches.

Each per-module feature ``f`` is summarised as ``f.mean``, ``f.max``, ``f.min`` (over
all shared modules), ``f.shallow``, ``f.middle``, ``f.deep`` (mean over the depth
thirds: layer ``l`` of ``L = max layer + 1`` falls in third ``⌊3l/L⌋``) and
``f.<kind>`` (mean per projection type, e.g. ``f.q_proj``). A group with no module (a
third of a model with fewer than three layers) takes ``f.mean``, so the names depend
only on the modules' kinds. The stored self-disturbance adds
``self_disturbance.mean`` / ``.max`` and ``self_relative_change.mean`` / ``.max``
(over both runs' layers), and :func:`cross_disturbance` adds
``cross_disturbance.mean`` / ``.max`` and ``cross_relative_change.mean`` / ``.max``.

Those features are symmetric, yet the two members of a pair rarely keep the same share
of their skill (one adapter can keep 90 % while the other keeps nothing). The oriented
:func:`member_features` tell them apart, from the same signals, towards the member ``a``
whose retention is predicted (prefix ``member.`` for ``a``, ``partner.`` for the
others):

- ``member.cross_disturbance.mean`` / ``.max``, ``member.cross_relative_change.mean`` /
  ``.max``: the cross-disturbance on ``a``'s own probe batch only (its half of the pooled
  ``cross_*``); ``partner.cross_disturbance.mean``, ``partner.cross_relative_change.mean``:
  the same on the partners' batches (mean over partners);
- ``member.self_disturbance.mean``, ``member.self_relative_change.mean``: ``a``'s own;
- ``member.log_norm_ratio``: ``log ‖ΔW_a‖_F / mean ‖ΔW_partner‖_F`` over all modules (signed).

:func:`oriented_pairwise_features` is the union, and is what the retention predictor
reads for "the retention of ``a`` when merged with ``b``".

Every feature is a finite float: a zero update has alignment 0, overlaps 0 and
crowding 0. What is ours and not the paper's: the symmetric log norm ratio, the
normalised entropy, numerical ranks in the overlaps and the empty-group rule.

Example
-------
>>> import torch
>>> from mergeprobe.features import pairwise_features
>>> from mergeprobe.signals import RunSignals
>>> g = torch.Generator().manual_seed(0)
>>> def run(sign):
...     key = "base_model.model.model.layers.0.self_attn.q_proj"
...     b, a = torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
...     return RunSignals({key: (sign * b, a)}, {key: (b, a)}, {key: torch.eye(4)}, torch.zeros(1),
...                       torch.zeros(1), torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), 4, 0)
>>> round(pairwise_features(run(1.0), run(1.0))["gradient_alignment.mean"], 6)
1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mergeprobe.adapters import module_kind, module_layer
from mergeprobe.core import (
    Factors,
    collision_shares,
    compute_dtype,
    core_triangles,
    cosine,
    energy_shares,
    frobenius_norm,
)
from mergeprobe.signals import (
    PROBE_CHUNK_TOKENS,
    RunSignals,
    frozen_base,
    hidden_states_with_updates,
    representation_disturbance,
)

__all__ = [
    "MEMBER_PREFIXES",
    "MODULE_FEATURES",
    "alignment_profile",
    "b_collision_shares",
    "cross_disturbance",
    "member_features",
    "module_pair_features",
    "oriented_pairwise_features",
    "pairwise_features",
    "per_module_features",
    "set_cross_disturbance",
    "set_features",
    "subspace_overlap",
    "swap_cross",
    "symmetric_part",
    "update_norm",
]

MODULE_FEATURES = (
    "update_alignment",
    "log_norm_ratio",
    "b_crowding_top",
    "b_crowding_entropy",
    "a_overlap",
    "b_overlap",
    "gradient_alignment",
)
"""The per-module pairwise features, in the order they are reported."""

_UPDATE_FEATURES = tuple(name for name in MODULE_FEATURES if name != "gradient_alignment")

DEPTH_THIRDS = ("shallow", "middle", "deep")
_NORM_EPS = 1e-12


def b_collision_shares(b_factors: Sequence[Tensor]) -> Tensor:
    """Pico collision shares ``σ_j² / Σ σ_k²`` of the stacked ``[B̂_1 … B̂_T]`` (ALGORITHMS.md §3).

    Example
    -------
    >>> b = torch.randn(6, 2)
    >>> shares = b_collision_shares([b, b])
    >>> round(float(shares.sum()), 6), round(float(shares[2:].abs().max()), 6)
    (1.0, 0.0)
    """
    return collision_shares(b_factors)[1]


def _numerical_bases(matrices: Tensor, size: int | None = None) -> tuple[Tensor, Tensor]:
    """Orthonormal bases of the column spaces of a stack ``[..., m, n]`` of matrices, numerically rank-revealing.

    Returns ``(Q, ranks)``: ``Q`` is ``[..., m, min(m, n)]`` (left singular vectors) with
    the columns beyond each matrix's own numerical rank set to zero, so that stacked
    matrices of different ranks share one tensor; ``ranks`` counts the singular values
    above ``σ_max · size · eps(float32)``, computed in the compute dtype (0 for a zero
    matrix). ``size`` is ``max(m, n)`` unless given: the larger side of the original
    matrix when ``matrices`` are its coordinates in an orthonormal basis
    (:func:`~mergeprobe.core.core_triangles`).
    """
    matrices = matrices.to(compute_dtype(matrices))
    u, s, _ = torch.linalg.svd(matrices, full_matrices=False)
    size = max(matrices.shape[-2:]) if size is None else size
    keep = s > s[..., :1] * size * torch.finfo(torch.float32).eps
    return u * keep.unsqueeze(-2).to(u.dtype), keep.sum(-1)


def _subspace_overlaps(first: Tensor, second: Tensor, sizes: tuple[int | None, int | None] = (None, None)) -> Tensor:
    """:func:`subspace_overlap` of two stacks of matrices, one value per pair (``sizes``: see :func:`_numerical_bases`)."""
    q_1, rank_1 = _numerical_bases(first, sizes[0])
    q_2, rank_2 = _numerical_bases(second, sizes[1])
    rank = torch.minimum(rank_1, rank_2)
    total = ((q_1.mT @ q_2.to(q_1.dtype)) ** 2).sum((-2, -1))
    return torch.where(rank > 0, total / rank.clamp_min(1), torch.zeros((), dtype=total.dtype))


def subspace_overlap(first: Tensor, second: Tensor) -> float:
    """``‖Q_1ᵀ Q_2‖_F² / min(r_1, r_2)`` for the column spaces of two matrices, in [0, 1].

    1 when one space contains the other, 0 when they are orthogonal or either matrix is
    zero. Ranks are numerical (SVD with a float32-level tolerance).

    Example
    -------
    >>> m = torch.randn(10, 3)
    >>> round(subspace_overlap(m, m @ torch.randn(3, 3)), 6)
    1.0
    """
    return float(_subspace_overlaps(first, second))


def _sketch_cosines(first: Tensor, second: Tensor) -> Tensor:
    """Frobenius cosines, in float64, of two stacks ``[n, k, k]`` of gradient sketches (0 where either is zero)."""
    first, second = first.to(torch.float64).flatten(1), second.to(torch.float64).flatten(1)
    norms = torch.linalg.vector_norm(first, dim=1) * torch.linalg.vector_norm(second, dim=1)
    value = ((first * second).sum(1) / norms).clamp(-1.0, 1.0)
    return torch.where(norms <= _NORM_EPS, torch.zeros((), dtype=value.dtype), value)


def _symmetric_cosines(update_a: Factors, update_b: Factors, norm_a: Tensor, norm_b: Tensor) -> Tensor:
    """:func:`~mergeprobe.core.cosine` of two stacks of updates, the same in either order to the last bit.

    The Frobenius inner product sums its terms in an order that depends on which update
    comes first, so ``cosine(a, b)`` and ``cosine(b, a)`` differ by float round-off,
    which relative to a near-zero cosine can be large; the mean of both orders is
    symmetric exactly. ``norm_a``, ``norm_b``: the stacks'
    :func:`~mergeprobe.core.frobenius_norm`.
    """
    return (cosine(update_a, update_b, norms=(norm_a, norm_b)) + cosine(update_b, update_a, norms=(norm_b, norm_a))) / 2


def _stacked_pair_features(update_a: Factors, update_b: Factors) -> dict[str, list[float]]:
    """The update features of :func:`module_pair_features` for stacks ``[n, d_out, r]`` / ``[n, r, d_in]``.

    One batched computation per stack of same-shape modules (what makes
    :func:`pairwise_features` fast). The norms and the cosine are
    :func:`~mergeprobe.core.frobenius_norm` and :func:`_symmetric_cosines` of the
    stacks. The rest comes from the small triangular factors of the pair's core space
    (:func:`~mergeprobe.core.core_triangles`), ``[B̂_a B̂_b]`` and ``[A_aᵀ A_bᵀ]`` each
    factored once: the collision shares (the singular values of ``R_B`` are those of
    ``[B̂_a B̂_b]``) and the subspace overlaps (of the column blocks of ``R_B`` and
    ``R_A``, with the numerical-rank tolerance of the original ``d × r`` factors), in
    ``O(r³)`` per module instead of SVDs of the ``d × r`` factors.
    ``log_norm_ratio`` is left to the caller, which gets the norms as ``norm_a`` and ``norm_b``.
    """
    (b_a, a_a), (b_b, _) = update_a, update_b
    rank_a, rank_b = b_a.shape[-1], b_b.shape[-1]
    r_b, r_a = core_triangles([update_a, update_b])
    shares = energy_shares(torch.linalg.svdvals(r_b))
    columns = shares.shape[-1]
    if columns:
        top = shares.max(-1).values
    else:
        top = torch.zeros(shares.shape[:-1], dtype=shares.dtype)
    if columns > 1:
        entropy = -torch.xlogy(shares, shares).sum(-1) / math.log(columns)
        entropy = torch.where(shares.sum(-1) > 0, entropy, torch.zeros((), dtype=entropy.dtype))
    else:
        entropy = torch.zeros(shares.shape[:-1], dtype=shares.dtype)
    d_out, d_in = b_a.shape[-2], a_a.shape[-1]
    # The norms and the cosine from the factors themselves, not from their coordinates, whose round-off depends on
    # the order of the pair: log_norm_ratio and update_alignment are symmetric in (a, b) to the last bit.
    norm_a, norm_b = frobenius_norm(update_a), frobenius_norm(update_b)
    values = {
        "norm_a": norm_a,
        "norm_b": norm_b,
        "update_alignment": _symmetric_cosines(update_a, update_b, norm_a, norm_b),
        "b_crowding_top": top,
        "b_crowding_entropy": entropy,
        "a_overlap": _subspace_overlaps(r_a[..., :rank_a], r_a[..., rank_a:], (max(d_in, rank_a), max(d_in, rank_b))),
        "b_overlap": _subspace_overlaps(r_b[..., :rank_a], r_b[..., rank_a:], (max(d_out, rank_a), max(d_out, rank_b))),
    }
    return {name: value.tolist() for name, value in values.items()}


def _log_norm_ratio(norm_a: float, norm_b: float) -> float:
    return abs(math.log((norm_a + _NORM_EPS) / (norm_b + _NORM_EPS)))


def module_pair_features(
    update_a: Factors,
    update_b: Factors,
    gradient_a: Tensor | None = None,
    gradient_b: Tensor | None = None,
) -> dict[str, float]:
    """The per-module features of one module shared by two runs (see the module docstring).

    ``gradient_alignment`` is present only when both sketches are given.
    :func:`per_module_features` computes the same for every shared module at once.

    Example
    -------
    >>> u = (torch.randn(6, 2), torch.randn(2, 5))
    >>> f = module_pair_features(u, (-u[0], u[1]))
    >>> round(f["update_alignment"], 4), round(f["log_norm_ratio"], 4), round(f["b_overlap"], 4)
    (-1.0, 0.0, 1.0)
    """
    single = [(b[None], a[None]) for b, a in (update_a, update_b)]  # a stack of one module
    row = {name: values[0] for name, values in _stacked_pair_features(*single).items()}
    row["log_norm_ratio"] = _log_norm_ratio(row["norm_a"], row["norm_b"])
    features = {name: row[name] for name in _UPDATE_FEATURES}
    if gradient_a is not None and gradient_b is not None:
        features["gradient_alignment"] = float(_sketch_cosines(gradient_a[None], gradient_b[None])[0])
    return features


def _signature(*tensors: Tensor) -> tuple[Any, ...]:
    return tuple((t.shape, t.dtype, t.device) for t in tensors)


def _update_groups(a: RunSignals, b: RunSignals, keys: Sequence[str]) -> list[tuple[list[int], Factors, Factors]]:
    """The shared modules ``keys`` in stacks of one shape and dtype: ``(indices into keys, stacked a, stacked b)``."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(_signature(*a.update[key], *b.update[key]), []).append(i)
    out = []
    for indices in groups.values():
        # B̂ stacked as B̂ᵀ (contiguous along d_out) and viewed back: the Gram products of the norms read it faster
        b_a, b_b = (torch.stack([run.update[keys[i]][0].mT for i in indices]).mT for run in (a, b))
        a_a, a_b = (torch.stack([run.update[keys[i]][1] for i in indices]) for run in (a, b))
        out.append((indices, (b_a, a_a), (b_b, a_b)))
    return out


def _gradient_alignments(a: RunSignals, b: RunSignals, keys: Sequence[str]) -> list[float | None]:
    """The sketch cosine of each of ``keys`` (``None`` where either run has no sketch), batched by shape."""
    out: list[float | None] = [None] * len(keys)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, key in enumerate(keys):
        if key in a.gradient and key in b.gradient:
            groups.setdefault(_signature(a.gradient[key], b.gradient[key]), []).append(i)
    for indices in groups.values():
        values = _sketch_cosines(*(torch.stack([run.gradient[keys[i]] for i in indices]) for run in (a, b)))
        for i, value in zip(indices, values.tolist()):
            out[i] = value
    return out


def _module_columns(a: RunSignals, b: RunSignals) -> tuple[list[str], dict[str, list[float | None]]]:
    """The shared module keys (sorted) and, per feature of ``MODULE_FEATURES``, its value for each key.

    Modules of one shape are computed together (:func:`_stacked_pair_features`); a
    ``gradient_alignment`` is ``None`` where either run has no sketch of the module.
    """
    _check_sketches(a, b)
    keys = sorted(set(a.update) & set(b.update))
    columns: dict[str, list[Any]] = {name: [None] * len(keys) for name in MODULE_FEATURES}
    for indices, stack_a, stack_b in _update_groups(a, b, keys):
        values = _stacked_pair_features(stack_a, stack_b)
        values["log_norm_ratio"] = [_log_norm_ratio(x, y) for x, y in zip(values["norm_a"], values["norm_b"])]
        for name in _UPDATE_FEATURES:
            for i, value in zip(indices, values[name]):
                columns[name][i] = value
    columns["gradient_alignment"] = _gradient_alignments(a, b, keys)
    return keys, columns


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _depth_third(layer: int, num_layers: int) -> str:
    return DEPTH_THIRDS[min(2, (3 * layer) // max(num_layers, 1))]


def _summarise(columns: Mapping[str, Sequence[float | None]], all_keys: Sequence[str]) -> dict[str, float]:
    """Mean/max/min, depth-third and per-kind summaries of each per-module feature.

    ``columns`` holds, per feature, one value for each of ``all_keys`` (every shared
    module), ``None`` where the feature is missing. The group names come from
    ``all_keys``, so every pair of runs on the same modules gets the same feature names
    even when a feature is missing for some modules.
    """
    layers = [module_layer(k) for k in all_keys]
    kinds = [module_kind(k) for k in all_keys]
    num_layers = max((l for l in layers if l is not None), default=-1) + 1
    thirds = [None if l is None else _depth_third(l, num_layers) for l in layers]
    group_names = (*DEPTH_THIRDS, *sorted(set(kinds)))
    out: dict[str, float] = {}
    for name, column in columns.items():
        groups: dict[str, list[float]] = {g: [] for g in group_names}
        all_values = []
        for value, third, kind in zip(column, thirds, kinds):
            if value is None:
                continue
            all_values.append(value)
            if third is not None:
                groups[third].append(value)
            groups[kind].append(value)
        overall = _mean(all_values) if all_values else 0.0
        out[f"{name}.mean"] = overall
        out[f"{name}.max"] = max(all_values, default=0.0)
        out[f"{name}.min"] = min(all_values, default=0.0)
        for group, members in groups.items():
            out[f"{name}.{group}"] = _mean(members) if members else overall
    return out


def _check_sketches(a: RunSignals, b: RunSignals) -> None:
    if (a.sketch_dim, a.sketch_seed) != (b.sketch_dim, b.sketch_seed):
        raise ValueError(
            f"gradient sketches are not comparable: k={a.sketch_dim}, seed={a.sketch_seed} vs "
            f"k={b.sketch_dim}, seed={b.sketch_seed}; capture every run with the same sketch_dim and sketch_seed."
        )


def per_module_features(a: RunSignals, b: RunSignals) -> dict[str, dict[str, float]]:
    """Module key → :func:`module_pair_features` for every module both runs updated.

    Computed in batches of same-shape modules, equal to :func:`module_pair_features`
    module by module up to float round-off.

    Example
    -------
    >>> table = per_module_features(run_a, run_b)  # doctest: +SKIP
    >>> table["base_model.model.model.layers.0.self_attn.q_proj"]["update_alignment"]  # doctest: +SKIP
    0.12
    """
    keys, columns = _module_columns(a, b)
    return {
        key: {name: columns[name][i] for name in MODULE_FEATURES if columns[name][i] is not None}
        for i, key in enumerate(keys)
    }


def _layer_summary(name: str, first: Tensor, second: Tensor) -> dict[str, float]:
    values = torch.cat([first.reshape(-1), second.reshape(-1)]).to(torch.float64)
    if values.numel() == 0:
        return {f"{name}.mean": 0.0, f"{name}.max": 0.0}
    return {f"{name}.mean": float(values.mean()), f"{name}.max": float(values.max())}


def pairwise_features(a: RunSignals, b: RunSignals, cross: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The pairwise mergeability features of two runs (names in the module docstring).

    Parameters
    ----------
    a, b:
        The two runs' signals; only modules both updated count.
    cross:
        The output of :func:`cross_disturbance` for this pair; its ``cross_*`` summaries
        are added.

    Returns
    -------
    dict[str, float]
        Finite values, names sorted; symmetric in ``a`` and ``b``.

    Example
    -------
    >>> features = pairwise_features(run_a, run_b, cross_disturbance(model, run_a, run_b))  # doctest: +SKIP
    >>> features["update_alignment.deep"], features["cross_disturbance.mean"]  # doctest: +SKIP
    (0.03, 0.002)
    """
    keys, columns = _module_columns(a, b)
    features = _summarise(columns, keys)
    features.update(_layer_summary("self_disturbance", a.disturbance, b.disturbance))
    features.update(_layer_summary("self_relative_change", a.relative_change, b.relative_change))
    for name, value in (cross or {}).items():
        if name.startswith("cross_") and isinstance(value, (int, float)):
            features[name] = float(value)
    return {name: _finite(value) for name, value in sorted(features.items())}


MEMBER_PREFIXES = ("member.", "partner.")
"""Prefixes of the oriented features (:func:`member_features`)."""


def update_norm(signals: RunSignals) -> float:
    """``‖ΔW‖_F`` of a run's window update over all its modules."""
    return math.sqrt(sum(float(frobenius_norm(f)) ** 2 for f in signals.update.values()))


def _values(tensors: Sequence[Tensor]) -> Tensor:
    flat = [t.reshape(-1).to(torch.float64) for t in tensors]
    return torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)


def _stat(values: Tensor, how: str) -> float:
    if values.numel() == 0:
        return 0.0
    return _finite(float(values.mean() if how == "mean" else values.max()))


def member_features(
    member: RunSignals,
    partners: Sequence[RunSignals],
    cross: Mapping[str, Any] | None,
    labels: tuple[str, Sequence[str]] = ("a", ("b",)),
) -> dict[str, float]:
    """Features oriented towards ``member`` in a merge with ``partners`` (names in the module docstring).

    Parameters
    ----------
    member, partners:
        The run whose retention is predicted and the runs it is merged with.
    cross:
        :func:`cross_disturbance` (labels ``"a"``, ``"b"``) or
        :func:`set_cross_disturbance` (labels ``"0"``, ``"1"``, …) of the merge; without
        it only the self and norm features are returned.
    labels:
        The labels of ``member`` and of each partner in ``cross``'s per-layer entries
        ``disturbance.<label>`` / ``relative_change.<label>``.

    Example
    -------
    >>> cross = cross_disturbance(base_model, run_a, run_b)  # doctest: +SKIP
    >>> member_features(run_a, [run_b], cross)["member.cross_disturbance.mean"]  # doctest: +SKIP
    0.003
    """
    if not partners:
        raise ValueError("member_features needs at least one partner run")
    own_label, partner_labels = labels
    if len(partner_labels) != len(partners):
        raise ValueError(f"labels name {len(partner_labels)} partner(s) for {len(partners)} partner run(s)")
    partner_norm = sum(update_norm(p) for p in partners) / len(partners)
    out = {
        "member.self_disturbance.mean": _stat(_values([member.disturbance]), "mean"),
        "member.self_relative_change.mean": _stat(_values([member.relative_change]), "mean"),
        "member.log_norm_ratio": math.log((update_norm(member) + _NORM_EPS) / (partner_norm + _NORM_EPS)),
    }
    if cross is not None:
        for name in ("disturbance", "relative_change"):
            own = _values([cross[f"{name}.{own_label}"]])
            out[f"member.cross_{name}.mean"] = _stat(own, "mean")
            out[f"member.cross_{name}.max"] = _stat(own, "max")
            per_partner = [_stat(_values([cross[f"{name}.{label}"]]), "mean") for label in partner_labels]
            out[f"partner.cross_{name}.mean"] = _mean(per_partner)
    return {name: _finite(value) for name, value in sorted(out.items())}


def oriented_pairwise_features(a: RunSignals, b: RunSignals, cross: Mapping[str, Any] | None = None) -> dict[str, float]:
    """:func:`pairwise_features` of (a, b) plus :func:`member_features` oriented towards ``a``.

    What the retention predictor reads for the retention of ``a`` merged with ``b``;
    swap the runs (the same ``cross``, whose labels follow the runs) for ``b``'s.

    Example
    -------
    >>> cross = cross_disturbance(base_model, run_a, run_b)  # doctest: +SKIP
    >>> for_a = oriented_pairwise_features(run_a, run_b, cross)  # doctest: +SKIP
    >>> for_b = oriented_pairwise_features(run_b, run_a, swap_cross(cross))  # doctest: +SKIP
    """
    return {**pairwise_features(a, b, cross), **member_features(a, [b], cross)}


def swap_cross(cross: Mapping[str, Any]) -> dict[str, Any]:
    """A pair's :func:`cross_disturbance` with the roles of ``a`` and ``b`` exchanged."""
    swapped = dict(cross)
    for name in ("disturbance", "relative_change"):
        if f"{name}.a" in cross and f"{name}.b" in cross:
            swapped[f"{name}.a"], swapped[f"{name}.b"] = cross[f"{name}.b"], cross[f"{name}.a"]
    return swapped


def symmetric_part(features: Mapping[str, float]) -> dict[str, float]:
    """The features of a pair without the oriented ``member.`` / ``partner.`` ones."""
    return {k: v for k, v in features.items() if not k.startswith(MEMBER_PREFIXES)}


def alignment_profile(a: RunSignals, b: RunSignals, signal: str = "update") -> tuple[list[int], list[str], Tensor]:
    """Per-layer × projection matrix of update (or gradient) alignment, for heatmaps.

    Parameters
    ----------
    signal:
        ``"update"`` for ``cos(ΔW_a, ΔW_b)``, ``"gradient"`` for the sketch cosine.

    Returns
    -------
    layers, kinds, matrix
        Sorted layer indices, sorted projection types and a float32
        ``len(layers) × len(kinds)`` matrix; cells without a shared module are NaN
        (matplotlib leaves them blank). Modules without a layer index are left out.

    Example
    -------
    >>> layers, kinds, matrix = alignment_profile(run_a, run_b)  # doctest: +SKIP
    >>> plt.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu")  # doctest: +SKIP
    """
    if signal not in ("update", "gradient"):
        raise ValueError(f"alignment_profile: signal must be 'update' or 'gradient', got {signal!r}")
    _check_sketches(a, b)
    cells: dict[tuple[int, str], list[float]] = {}
    # Only the one feature drawn, computed as per_module_features computes it, in the same batches (not the
    # subspace SVDs of the others).
    keys = sorted(set(a.update) & set(b.update))
    if signal == "update":
        values: list[float | None] = [None] * len(keys)
        for indices, stack_a, stack_b in _update_groups(a, b, keys):
            norms = frobenius_norm(stack_a), frobenius_norm(stack_b)
            for i, value in zip(indices, _symmetric_cosines(stack_a, stack_b, *norms).tolist()):
                values[i] = value
    else:
        values = _gradient_alignments(a, b, keys)
    for key, value in zip(keys, values):
        layer = module_layer(key)
        if layer is None or value is None:
            continue
        cells.setdefault((layer, module_kind(key)), []).append(value)
    layers = sorted({layer for layer, _ in cells})
    kinds = sorted({kind for _, kind in cells})
    matrix = torch.full((len(layers), len(kinds)), float("nan"), dtype=torch.float32)
    for (layer, kind), values in cells.items():
        matrix[layers.index(layer), kinds.index(kind)] = _mean(values)
    return layers, kinds, matrix


def _summed_updates(updates: Sequence[Mapping[str, Factors]]) -> dict[str, Factors]:
    """Task arithmetic in low rank: per module, the stacked factors of the sum of the updates."""
    merged: dict[str, Factors] = {}
    for key in sorted(set().union(*updates)):
        pairs = [u[key] for u in updates if key in u]
        dtype = compute_dtype(*(t for pair in pairs for t in pair))
        merged[key] = (torch.cat([b.to(dtype) for b, _ in pairs], dim=1), torch.cat([a.to(dtype) for _, a in pairs], dim=0))
    return merged


def _merge_disturbance(
    model: torch.nn.Module,
    members: Sequence[RunSignals],
    labels: Sequence[str],
    chunking: Mapping[str, int | None],
    own_states: MutableMapping[int, list[Tensor]] | None = None,
) -> dict[str, Any]:
    merged = _summed_updates([m.update for m in members])
    out: dict[str, Any] = {}
    disturbances, relatives = [], []
    with frozen_base(model):  # one switch of mode and adapter for all the passes
        for label, member in zip(labels, members):
            ids, mask = member.probe_input_ids, member.probe_attention_mask
            own = own_states.get(id(member)) if own_states is not None else None
            if own is None:
                own = hidden_states_with_updates(model, member.update, ids, mask, **chunking)
                if own_states is not None:
                    own_states[id(member)] = own
            together = hidden_states_with_updates(model, merged, ids, mask, **chunking)
            rep = representation_disturbance(own, together)
            out[f"disturbance.{label}"] = rep["disturbance"]
            out[f"relative_change.{label}"] = rep["relative_change"]
            disturbances.append(rep["disturbance"])
            relatives.append(rep["relative_change"])
    for name, parts in (("cross_disturbance", disturbances), ("cross_relative_change", relatives)):
        values = torch.cat(parts).to(torch.float64)
        out[f"{name}.mean"] = _finite(float(values.mean())) if values.numel() else 0.0
        out[f"{name}.max"] = _finite(float(values.max())) if values.numel() else 0.0
    return out


def cross_disturbance(
    model: torch.nn.Module,
    a: RunSignals,
    b: RunSignals,
    batch_size: int | None = None,
    own_states: MutableMapping[int, list[Tensor]] | None = None,
    max_tokens: int = PROBE_CHUNK_TOKENS,
) -> dict[str, Any]:
    """How much merging disturbs each run's representations (ALGORITHMS.md §5).

    On ``a``'s probe batch, the hidden states of the base model plus the task-arithmetic
    merge ``ΔW_a + ΔW_b`` of the two window updates are compared with those of the base
    model plus ``ΔW_a`` alone (``1 − CKA`` and relative change, per layer); the same on
    ``b``'s batch with ``ΔW_b``. The states are
    :func:`~mergeprobe.signals.hidden_states_with_updates` (the model's own adapter
    disabled, the updates added by hooks), so ``model`` may be the ``PeftModel`` of
    either run or the bare base model. For LoRA initialised with ``B = 0`` the window
    update equals the window-end ``ΔW``. ``batch_size`` and ``max_tokens`` chunk the
    passes as in :func:`~mergeprobe.signals.hidden_states`.

    ``own_states`` is a cache of each run's own hidden states (base model plus its
    update, on its probe batch), keyed by ``id()`` of its :class:`RunSignals`: pass one
    dict to every call that compares one run with several others, within the lifetime
    of those objects, and each run's own states are computed once. A run's adapted
    states from :func:`~mergeprobe.signals.self_disturbance` are those own states when
    its update equals the window-end factors: seed the cache with them (the probe does)
    and they are not computed again.

    Returns
    -------
    dict
        ``disturbance.a``, ``relative_change.a``, ``disturbance.b``, ``relative_change.b``
        (per-layer float32 tensors) and the floats ``cross_disturbance.mean`` / ``.max``
        and ``cross_relative_change.mean`` / ``.max`` over both batches and all layers.

    Example
    -------
    >>> cross = cross_disturbance(base_model, run_a, run_b)  # doctest: +SKIP
    >>> cross["cross_disturbance.max"]  # doctest: +SKIP
    0.004
    """
    return _merge_disturbance(model, [a, b], ["a", "b"], {"batch_size": batch_size, "max_tokens": max_tokens}, own_states)


def set_cross_disturbance(
    model: torch.nn.Module,
    signals: Sequence[RunSignals],
    batch_size: int | None = None,
    max_tokens: int = PROBE_CHUNK_TOKENS,
) -> dict[str, Any]:
    """:func:`cross_disturbance` for a whole set: the merge of every update versus each member's own.

    Per-layer tensors are named ``disturbance.<i>`` / ``relative_change.<i>`` by member
    index; the ``cross_*`` summaries are over all members and layers. ``batch_size`` and
    ``max_tokens`` chunk the passes as in :func:`~mergeprobe.signals.hidden_states`.

    Example
    -------
    >>> cross_all = set_cross_disturbance(base_model, [run_a, run_b, run_c])  # doctest: +SKIP
    """
    if not signals:
        raise ValueError("set_cross_disturbance needs at least one run")
    labels = [str(i) for i in range(len(signals))]
    return _merge_disturbance(model, list(signals), labels, {"batch_size": batch_size, "max_tokens": max_tokens})


def set_features(
    signals: Sequence[RunSignals],
    pairwise: Sequence[Mapping[str, float]],
    cross_all: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Set-level features: every pairwise feature aggregated over the set's pairs, plus the set's cross-disturbance.

    Each pairwise feature ``f`` becomes ``f.pair_mean``, ``f.pair_max`` and
    ``f.pair_min`` (over the pairs that have it); ``set_size`` is the number of runs;
    the ``cross_*`` summaries of ``cross_all`` (:func:`set_cross_disturbance`) are added
    as ``set_cross_disturbance.mean`` etc.

    Example
    -------
    >>> pairs = [pairwise_features(x, y) for x, y in itertools.combinations(runs, 2)]  # doctest: +SKIP
    >>> features = set_features(runs, pairs, set_cross_disturbance(base_model, runs))  # doctest: +SKIP
    >>> features["update_alignment.mean.pair_min"]  # doctest: +SKIP
    -0.02
    """
    features: dict[str, float] = {"set_size": float(len(signals))}
    names = sorted(set().union(*pairwise)) if pairwise else []
    for name in names:
        values = [float(p[name]) for p in pairwise if name in p]
        features[f"{name}.pair_mean"] = _mean(values)
        features[f"{name}.pair_max"] = max(values)
        features[f"{name}.pair_min"] = min(values)
    for name, value in (cross_all or {}).items():
        if name.startswith("cross_") and isinstance(value, (int, float)):
            features[f"set_{name}"] = float(value)
    return {name: _finite(value) for name, value in sorted(features.items())}
