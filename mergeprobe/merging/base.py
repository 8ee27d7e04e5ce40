"""What every merge method is: the per-module inputs, the result, and the method contract.

A method receives, one module at a time, the T adapters' updates as factors
``(B̂_t, A_t)`` with the LoRA scaling folded into ``B̂_t`` (an adapter that lacks the
module contributes a zero-width update, i.e. ``ΔW_t = 0``), the merge weights, and
the rank to return. It builds its result through :mod:`mergeprobe.core` and never
forms a dense ``d_out × d_in`` matrix unless its definition needs element-wise
access to ``ΔW`` (``space="full"``).

Example
-------
>>> from mergeprobe.merging.registry import get_method
>>> method = get_method("linear")
>>> method.name
'linear'
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from mergeprobe.core import Factors

if TYPE_CHECKING:
    from mergeprobe.adapters import LoraAdapter


@dataclass
class ModuleInputs:
    """The updates of one module across the T adapters being merged.

    Attributes
    ----------
    key:
        The module key (PEFT state-dict prefix).
    updates:
        ``(B̂_t, A_t)`` per adapter, scaling folded in, weights *not* applied;
        zero-width (rank 0) for an adapter that does not touch this module.
    weights:
        The per-adapter merge weights ``w_t``.
    present:
        Whether adapter t has this module.
    """

    key: str
    updates: list[Factors]
    weights: list[float]
    present: list[bool]

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``."""
        b, a = self.updates[0]
        return int(b.shape[0]), int(a.shape[1])

    @property
    def weighted(self) -> list[Factors]:
        """``(w_t B̂_t, A_t)`` per adapter."""
        return [(b * w, a) for (b, a), w in zip(self.updates, self.weights)]


@dataclass
class ModuleResult:
    """A merged module: ``ΔW = B @ A`` (scaling 1) and what the method wants to report."""

    B: Tensor
    A: Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeContext:
    """What a method may need beyond the adapters: a base model and calibration inputs (TaDA)."""

    base_model: Any = None
    calibration: Any = None
    show_progress: bool = True


class MergeMethod(ABC):
    """A merge method: parameters set at construction, work done per module.

    Subclasses set ``name``, declare their parameters as keyword arguments of
    ``__init__`` (stored as attributes) and implement :meth:`merge_module`.
    Methods that look at the whole model first (TaDA's probe) override :meth:`prepare`.
    """

    name: ClassVar[str]
    needs_base_model: ClassVar[bool] = False

    def prepare(self, adapters: Sequence[LoraAdapter], weights: Sequence[float], context: MergeContext) -> None:
        """Called once before any module is merged. The default does nothing."""

    @abstractmethod
    def merge_module(self, inputs: ModuleInputs, rank: int | None) -> ModuleResult:
        """Merge one module; ``rank=None`` means keep every component (lossless where possible)."""

    def params(self) -> dict[str, Any]:
        """The method's parameters, for reports."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def global_diagnostics(self) -> dict[str, Any]:
        """Diagnostics that belong to the whole merge rather than one module (e.g. TaDA's probe)."""
        return {}
