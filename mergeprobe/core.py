"""Core-space algebra: the one place where low-rank updates are combined.

Every merger and every pairwise signal in mergeprobe works on LoRA updates
``ΔW_t = B̂_t A_t`` (scaling folded into ``B̂``) without ever building a
``d_out × d_in`` matrix. For T updates of ranks ``r_t`` (``R = Σ r_t``) we stack
``B_all = [B̂_1 … B̂_T]`` and ``A_all = [A_1; …; A_T]`` and take thin QRs,
``B_all = Q_B R_B`` and ``A_allᵀ = Q_A R_A``. Each update then has an
``R × R`` *core* ``M_t = R_B[:, cols_t] R_A[:, cols_t]ᵀ`` with
``ΔW_t = Q_B M_t Q_Aᵀ`` exactly (ALGORITHMS.md §1). Merging acts on the cores and
:meth:`CoreSpace.factorize` turns the merged core back into LoRA factors.

Example
-------
>>> import torch
>>> from mergeprobe.core import CoreSpace
>>> g = torch.Generator().manual_seed(0)
>>> pairs = [(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)) for _ in range(2)]
>>> space = CoreSpace.from_factors(pairs)
>>> merged = space.cores[0] + space.cores[1]
>>> B, A, _ = space.factorize(merged, rank=None)
>>> dense = sum(b @ a for b, a in pairs)
>>> bool(torch.allclose(B @ A, dense, atol=1e-5))
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]
"""A LoRA update as ``(B̂, A)``: ``B̂`` is ``d_out × r`` with the scaling folded in, ``A`` is ``r × d_in``."""


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype to compute in: float64 if any input is float64, else float32.

    Half-precision inputs are always promoted, so merges of bf16/fp16 adapters are
    computed in float32 and cast back only when written.
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def inner(first: Factors, second: Factors) -> Tensor:
    """Frobenius inner product ``⟨B̂_i A_i, B̂_j A_j⟩_F`` computed in low rank.

    Uses ``sum((B̂_iᵀ B̂_j) ⊙ (A_i A_jᵀ))``: cost ``O((d_out + d_in) r_i r_j)``. Leading
    dimensions are batch dimensions (stacked modules of one shape): the result has them.
    """
    (b_i, a_i), (b_j, a_j) = first, second
    dtype = compute_dtype(b_i, a_i, b_j, a_j)
    gram_b = b_i.to(dtype).mT @ b_j.to(dtype)
    gram_a = a_i.to(dtype) @ a_j.to(dtype).mT
    return (gram_b * gram_a).sum((-2, -1))


def frobenius_norm(update: Factors) -> Tensor:
    """``‖B̂ A‖_F`` computed in low rank (clamped at 0 against round-off)."""
    return inner(update, update).clamp_min(0).sqrt()


def cosine(first: Factors, second: Factors, eps: float = 1e-12, norms: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Cosine similarity of two low-rank updates in Frobenius geometry.

    Returns 0 when either update is zero. Batched like :func:`inner`. ``norms`` are the
    two updates' :func:`frobenius_norm`, for callers that already have them.
    """
    norm_first, norm_second = (frobenius_norm(first), frobenius_norm(second)) if norms is None else norms
    norms = norm_first * norm_second
    value = (inner(first, second) / norms).clamp(-1.0, 1.0)
    return torch.where(norms <= eps, torch.zeros((), dtype=value.dtype), value)


def orthonormal_basis(matrix: Tensor) -> Tensor:
    """An orthonormal basis of the column space of ``matrix`` (thin QR, columns kept)."""
    q, _ = torch.linalg.qr(matrix.to(compute_dtype(matrix)), mode="reduced")
    return q


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``matrix = P Σ Qᵀ`` (closest matrix with orthonormal columns).

    A rank-deficient matrix has no unique polar factor: the singular vectors of its zero
    singular values are arbitrary. Components whose singular value is at round-off level
    (``σ ≤ σ_max · max(shape) · eps``) are therefore left out, which gives the unique
    partial isometry on the matrix's range, e.g. ``[U U] → [U U] / √2`` for a duplicated
    orthonormal ``U`` (identical adapters in TSV-M), instead of arbitrary extra directions.
    A full-rank matrix is unaffected.

    >>> u = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))[0]
    >>> bool(torch.allclose(polar_factor(torch.cat([u, u], dim=1)), torch.cat([u, u], dim=1) / 2**0.5))
    True
    """
    p, s, qh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0:
        return p @ qh
    keep = s > float(s.max()) * max(matrix.shape) * torch.finfo(s.dtype).eps
    return p[:, keep] @ qh[keep]


def svd_of_update(update: Factors) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``ΔW = B̂ A`` through its own core, never forming ΔW.

    Returns ``(U, S, V)`` with ``ΔW = U diag(S) Vᵀ``; ``U`` is ``d_out × k``, ``V`` is
    ``d_in × k`` and ``k = min(r, d_out, d_in)``.
    """
    b, a = update
    dtype = compute_dtype(b, a)
    q_b, r_b = torch.linalg.qr(b.to(dtype), mode="reduced")
    q_a, r_a = torch.linalg.qr(a.to(dtype).T, mode="reduced")
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, q_a @ vh.T


def _stacked(updates: Sequence[Factors]) -> tuple[Tensor, Tensor]:
    """``B_all = [B̂_1 … B̂_T]`` and ``A_all = [A_1; …; A_T]`` in the compute dtype (leading dimensions: batch).

    ``B_all`` is laid out column by column (a transposed view), as LAPACK's QR reads it.
    """
    dtype = compute_dtype(*(t for pair in updates for t in pair))
    b_all = torch.cat([b.to(dtype).mT for b, _ in updates], dim=-2).mT
    a_all = torch.cat([a.to(dtype) for _, a in updates], dim=-2)
    return b_all, a_all


def core_triangles(updates: Sequence[Factors]) -> tuple[Tensor, Tensor]:
    """``(R_B, R_A)``: the triangular factors of :class:`CoreSpace`, without its bases.

    ``B_all = Q_B R_B`` and ``A_allᵀ = Q_A R_A`` (thin QRs; the ``Q`` are not formed).
    Column block ``t`` of ``R_B`` (of ``R_A``) is ``B̂_t`` (``A_tᵀ``) in the orthonormal
    coordinates of ``Q_B`` (``Q_A``), so ``ΔW_t = Q_B (R_B[:, cols_t] R_A[:, cols_t]ᵀ) Q_Aᵀ``
    and every Frobenius inner product, norm, singular value and principal angle of the
    factors can be computed from these small ``≤ R × R`` matrices instead of the
    ``d × R`` ones. Leading dimensions are batch dimensions (stacked modules of one
    shape), all updates with the same.

    Example
    -------
    >>> ups = [(torch.randn(6, 2), torch.randn(2, 5)) for _ in range(2)]
    >>> r_b, r_a = core_triangles(ups)
    >>> bool(torch.allclose(inner((r_b[:, :2], r_a[:, :2].T), (r_b[:, 2:], r_a[:, 2:].T)), inner(*ups), atol=1e-4))
    True
    """
    if not updates:
        raise ValueError("core_triangles needs at least one update")
    b_all, a_all = _stacked(updates)
    return torch.linalg.qr(b_all, mode="r")[1], torch.linalg.qr(a_all.mT, mode="r")[1]


@dataclass(frozen=True)
class CoreSpace:
    """The shared bases and per-update cores of several low-rank updates of one module.

    Example
    -------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> ups = [(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)) for _ in range(2)]
    >>> space = CoreSpace.from_factors(ups)
    >>> space.ranks, tuple(space.cores[0].shape)
    ((2, 2), (4, 4))

    Attributes
    ----------
    q_b:
        ``d_out × p`` orthonormal basis of the span of all ``B̂_t``.
    q_a:
        ``d_in × q`` orthonormal basis of the span of all ``A_tᵀ``.
    cores:
        One ``p × q`` core per update, ``ΔW_t = q_b @ cores[t] @ q_a.T``.
    ranks:
        The rank ``r_t`` of each input update.
    """

    q_b: Tensor
    q_a: Tensor
    cores: tuple[Tensor, ...]
    ranks: tuple[int, ...]

    @classmethod
    def from_factors(cls, updates: Sequence[Factors]) -> CoreSpace:
        """Build the core space of ``updates`` (a sequence of ``(B̂_t, A_t)``)."""
        if not updates:
            raise ValueError("CoreSpace.from_factors needs at least one update")
        b_all, a_all = _stacked(updates)
        q_b, r_b = torch.linalg.qr(b_all, mode="reduced")
        q_a, r_a = torch.linalg.qr(a_all.T, mode="reduced")
        ranks = tuple(int(b.shape[1]) for b, _ in updates)
        cores = []
        start = 0
        for rank in ranks:
            cols = slice(start, start + rank)
            cores.append(r_b[:, cols] @ r_a[:, cols].T)
            start += rank
        return cls(q_b=q_b, q_a=q_a, cores=tuple(cores), ranks=ranks)

    @property
    def dim(self) -> int:
        """The largest rank any merge expressed in this space can have."""
        return min(self.q_b.shape[1], self.q_a.shape[1])

    def dense(self, core: Tensor) -> Tensor:
        """``Q_B core Q_Aᵀ``: the dense ``d_out × d_in`` update (for methods and tests that need it)."""
        return self.q_b @ core @ self.q_a.T

    def project(self, dense_update: Tensor) -> Tensor:
        """The core of a dense update restricted to this space: ``Q_Bᵀ ΔW Q_A``."""
        return self.q_b.T @ dense_update.to(self.q_b.dtype) @ self.q_a

    def factorize(self, core: Tensor, rank: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """Turn a merged core into LoRA factors of at most ``rank`` components.

        The singular values are split evenly, ``B = Q_B U_k √S_k`` and
        ``A = √S_k V_kᵀ Q_Aᵀ``, so the factors are balanced and ``B A`` is the best
        rank-k approximation of ``Q_B core Q_Aᵀ``. ``rank=None`` keeps every component
        (lossless).

        Returns
        -------
        B, A, singular_values
            ``B`` is ``d_out × k``, ``A`` is ``k × d_in``; ``singular_values`` holds all
            of them, so callers can report the energy a truncation dropped.
        """
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        k = len(s) if rank is None else min(int(rank), len(s))
        root = s[:k].sqrt()
        b = self.q_b @ (u[:, :k] * root)
        a = (root[:, None] * vh[:k]) @ self.q_a.T
        return b, a, s


def collision_shares(b_factors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(U, c)``: left singular vectors of ``[B̂_1 … B̂_T]`` and their collision shares (Pico, §3).

    ``c_j = σ_j² / Σ_k σ_k²`` (all zeros when every ``B̂_t`` is zero). The SVD runs
    through the QR of the stack (``O(d_out R²)``), via :func:`mergeprobe.core.svd_of_update`
    applied to ``(B_all, I_R)``.
    """
    dtype = compute_dtype(*b_factors)
    b_all = torch.cat([b.to(dtype) for b in b_factors], dim=1)
    identity = torch.eye(b_all.shape[1], dtype=b_all.dtype)
    u, s, _ = svd_of_update((b_all, identity))
    return u, energy_shares(s)


def energy_shares(singular_values: Tensor) -> Tensor:
    """``σ_j² / Σ_k σ_k²`` over the last dimension; all zeros where every ``σ`` is zero."""
    energy = singular_values.square()
    total = energy.sum(-1, keepdim=True)
    return torch.where(total > 0, energy / total, torch.zeros((), dtype=energy.dtype))


def share_entropy(shares: torch.Tensor) -> float:
    """Shannon entropy (nats) of the collision shares; 0 when one direction holds everything."""
    positive = shares[shares > 0]
    return float(-(positive * positive.log()).sum()) if len(positive) else 0.0


def energy_kept(singular_values: Tensor, rank: int | None) -> float:
    """Share of the squared singular values that a truncation to ``rank`` components keeps."""
    total = float((singular_values**2).sum())
    if rank is None or total == 0.0:
        return 1.0
    return float((singular_values[:rank] ** 2).sum()) / total


def truncated_factors(dense_update: Tensor, rank: int, exact_limit: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-``rank`` LoRA factors of a dense update (for methods that must go dense).

    An exact SVD is used when the smaller side is at most ``exact_limit``; beyond that,
    ``torch.svd_lowrank`` with a few power iterations (randomised, accurate for the
    leading components that LoRA keeps).
    """
    dense_update = dense_update.to(compute_dtype(dense_update))
    if min(dense_update.shape) <= exact_limit:
        u, s, vh = torch.linalg.svd(dense_update, full_matrices=False)
        v = vh.T
    else:
        u, s, v = torch.svd_lowrank(dense_update, q=min(rank + 10, min(dense_update.shape)), niter=4)
    k = min(rank, len(s))
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * v[:, :k].T, s
