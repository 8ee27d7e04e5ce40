"""TaDA (task–domain LoRA merging, arXiv 2606.05016): probe-gated, conflict-aware merging.

The paper is known only from its abstract; ALGORITHMS.md §4 is the specification and
this module implements it as written:

1. **Probe.** Run the base model on calibration inputs and measure, per module
   (layer l, projection p) and adapter a, ``c_a = E_x ‖ΔW_a x‖ / E_x ‖W₀ x‖``
   (:func:`mergeprobe.merging.calibration.probe_update_ratios`), then normalise per
   adapter over its modules, ``ĉ_a = c_a / Σ c_a``. Scaling adapter a by κ > 0 leaves
   ``ĉ_a`` unchanged.
2. **Gate.** ``π = ĉ_τ / (ĉ_τ + ĉ_δ)``, ``z = logit π``, centred over the modules and
   divided by its spread (standard deviation; a zero spread gives ``z = 0``),
   ``g = sigmoid(β z)``, weights ``w_τ = 2g`` and ``w_δ = 2(1 − g)``, multiplied by the
   user's weights. Uniform gating (``g = 1/2``) is plain task arithmetic.
3. **Subspace-aware merge.** SVD of each adapter's update through its core; a pair
   of components ``i`` (task) and ``j`` (domain) conflicts when
   ``(u_iᵀu_j)(v_iᵀv_j) < −θ``; the member with the smaller gated singular value
   ``|w|σ`` is dropped; the kept, gated components are summed and truncated to
   ``rank`` through the core SVD.

Ours, beyond the spec:

- **Roles.** With more than two adapters each gets a role, ``"task"`` or ``"domain"``
  (default: the first is the task, the rest domains). A role's signal is the mean
  ``ĉ_a`` of its adapters, the gate is computed between the two role signals, and
  every adapter of a role gets that role's weight. Conflicts are looked for between
  adapters of different roles only. With one adapter per role this is the spec.
- **Normalisation and centring.** ``logit π = log ĉ_τ − log ĉ_δ``, so normalising an
  adapter shifts every module's ``z`` by the same constant, which the centring removes:
  with one adapter per role ``normalize_probe`` changes the reported ``ĉ`` but not the
  gates (and the gates are κ-invariant either way). With several adapters in a role
  the role signal is a mean of adapters, and only the normalised probe keeps the gates
  invariant to one adapter's scale.
- **Modules without a signal.** A module where a role's signal is 0 (no adapter of
  that role has it, or its updates vanish on the calibration inputs) takes no part in
  the centring and gets ``g = 1/2``.
- **Signs.** A conflict uses the signs of the gated weights, ``sign(w_a w_b)
  (u_iᵀu_j)(v_iᵀv_j) < −θ`` (with positive weights, the spec); a tie in ``|w|σ``
  drops the domain member. A component that loses any of its conflicts is dropped.
- **Uniform gating** still runs the probe when :meth:`prepare` is called (so an
  ablation reports the same ``c`` values) but uses ``g = 1/2``; it also works without
  :meth:`prepare`.

Example
-------
>>> import torch
>>> from mergeprobe.merging.base import ModuleInputs
>>> from mergeprobe.merging.methods.tada import TaDA
>>> ups = [(torch.randn(6, 2), torch.randn(2, 5)) for _ in range(2)]
>>> out = TaDA(gating="uniform").merge_module(ModuleInputs("m", ups, [1.0, 1.0], [True, True]), rank=4)
>>> out.diagnostics["gate"]
0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mergeprobe.adapters import module_kind, module_layer
from mergeprobe.core import CoreSpace, energy_kept, svd_of_update
from mergeprobe.errors import MergeError
from mergeprobe.merging.base import MergeContext, MergeMethod, ModuleInputs, ModuleResult
from mergeprobe.merging.calibration import (
    DEFAULT_CALIBRATION_SEQUENCES,
    ProbeResult,
    calibration_tokens,
    probe_update_ratios,
)
from mergeprobe.merging.registry import register

if TYPE_CHECKING:
    from mergeprobe.adapters import LoraAdapter

ROLES = ("task", "domain")
_SPREAD_FLOOR = 1e-9


def default_roles(count: int) -> list[str]:
    """The first adapter is the task, every other one a domain."""
    return ["task"] + ["domain"] * (count - 1)


def normalized_ratios(ratios: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """``ĉ_a(key) = c_a(key) / Σ_keys c_a``, per adapter (all zeros for an adapter with no signal)."""
    keys = list(ratios)
    if not keys:
        return {}
    count = len(ratios[keys[0]])
    totals = [sum(float(ratios[k][a]) for k in keys) for a in range(count)]
    return {k: [float(ratios[k][a]) / totals[a] if totals[a] > 0 else 0.0 for a in range(count)] for k in keys}


def probe_gates(
    ratios: Mapping[str, Sequence[float]],
    roles: Sequence[str],
    beta: float = 1.0,
    normalize: bool = True,
) -> dict[str, float]:
    """TaDA's calibrated gate ``g`` per module from the probe ratios ``c_a`` (ALGORITHMS.md §4.2).

    Parameters
    ----------
    ratios:
        Module key → ``c_a`` per adapter.
    roles:
        ``"task"`` or ``"domain"`` per adapter; at least one of each.
    beta:
        Gate temperature: ``g = sigmoid(β z)``.
    normalize:
        Use ``ĉ_a`` (normalised per adapter over its modules) rather than ``c_a``.

    Returns
    -------
    dict
        Module key → ``g`` in (0, 1); the task role gets ``2g``, the domain role ``2(1 − g)``.

    Example
    -------
    >>> gates = probe_gates({"l0": [2.0, 1.0], "l1": [1.0, 2.0]}, ["task", "domain"])
    >>> gates["l0"] > 0.5 > gates["l1"]
    True
    """
    if set(roles) != set(ROLES):
        raise MergeError(f"tada: roles {list(roles)} need at least one 'task' and one 'domain' adapter, and no other role.")
    signal = normalized_ratios(ratios) if normalize else {k: [float(c) for c in v] for k, v in ratios.items()}
    logits: dict[str, float] = {}
    for key, values in signal.items():
        task = [c for c, role in zip(values, roles) if role == "task"]
        domain = [c for c, role in zip(values, roles) if role == "domain"]
        task_signal, domain_signal = sum(task) / len(task), sum(domain) / len(domain)
        if task_signal > 0 and domain_signal > 0 and math.isfinite(task_signal) and math.isfinite(domain_signal):
            logits[key] = math.log(task_signal) - math.log(domain_signal)
    gates = {key: 0.5 for key in signal}
    if logits:
        values = torch.tensor(list(logits.values()), dtype=torch.float64)
        centred = values - values.mean()
        spread = float(centred.square().mean().sqrt())
        z = centred / spread if spread > _SPREAD_FLOOR else torch.zeros_like(centred)
        for key, gate in zip(logits, torch.sigmoid(beta * z).tolist()):
            gates[key] = gate
    return gates


def _conflict_losers(
    first: tuple[Tensor, Tensor, Tensor],
    second: tuple[Tensor, Tensor, Tensor],
    weight_first: float,
    weight_second: float,
    theta: float,
) -> tuple[Tensor, Tensor, int]:
    """Which components of ``first`` (task) and ``second`` (domain) lose a conflict.

    Returns boolean masks over each one's components and the number of conflicting pairs.
    """
    u_i, s_i, v_i = first
    u_j, s_j, v_j = second
    sign = math.copysign(1.0, weight_first) * math.copysign(1.0, weight_second)
    alignment = sign * (u_i.T @ u_j) * (v_i.T @ v_j)
    conflicts = alignment < -theta
    gated_i = (abs(weight_first) * s_i)[:, None]
    gated_j = (abs(weight_second) * s_j)[None, :]
    drop_second = conflicts & (gated_i >= gated_j)
    drop_first = conflicts & (gated_i < gated_j)
    return drop_first.any(dim=1), drop_second.any(dim=0), int(conflicts.sum())


@register
class TaDA(MergeMethod):
    """TaDA: per-module gates from a magnitude-invariant probe, conflicting directions dropped.

    Parameters
    ----------
    beta:
        Gate temperature ``β`` in ``g = sigmoid(β z)`` (0 gives uniform gates).
    theta:
        Conflict threshold ``θ``: components conflict when ``(u_iᵀu_j)(v_iᵀv_j) < −θ``.
    gating:
        ``"probe"`` (the method) or ``"uniform"`` (ablation: ``g = 1/2`` everywhere).
    normalize_probe:
        Normalise each adapter's probe signal over its modules (``False``: ablation).
    drop_conflicts:
        Drop the weaker member of each conflicting pair (``False``: ablation).
    roles:
        ``"task"`` / ``"domain"`` per adapter, as a list or a comma-separated string
        (default: first task, rest domain).
    tokenizer:
        Needed when the calibration inputs are text (strings or a text file).
    max_calibration_sequences:
        Use at most this many calibration sequences (default 32; ``None``: all).
    max_calibration_tokens:
        Use at most this many calibration tokens in all (default: no limit).
    max_length:
        Truncation length when tokenizing text calibration inputs.
    batch_size:
        Calibration sequences per forward pass of the probe.

    The calibration inputs come through ``merge_adapters(..., calibration=...)``: token
    ids ``[n, seq]``, a list of token id lists, a mapping or iterable of mappings with ``input_ids`` (and
    ``attention_mask``), a list of strings, or a text file path with one sequence per
    line (see :func:`mergeprobe.merging.calibration.calibration_tokens`).

    Diagnostics per module: ``gate``, ``weights`` (effective per adapter), ``c`` and
    ``c_normalized`` (probe, per adapter), ``c_task`` / ``c_domain`` (the role signals the
    gate compares), ``dropped`` (directions dropped per adapter), ``conflicts`` (pairs
    found) and ``energy_kept``. Global: ``depth_profile`` (mean gate per layer),
    ``projection_profile`` (mean gate per projection type), ``roles`` and the amount of
    calibration data.

    Example
    -------
    >>> from mergeprobe import merge_adapters
    >>> merge_adapters(["task/", "domain/"], method="tada", base_model=model,
    ...                calibration="calib.txt", tokenizer=tokenizer, out_dir="merged")  # doctest: +SKIP
    """

    name = "tada"
    needs_base_model = True

    def __init__(
        self,
        beta: float = 1.0,
        theta: float = 0.1,
        gating: Literal["probe", "uniform"] = "probe",
        normalize_probe: bool = True,
        drop_conflicts: bool = True,
        roles: Sequence[str] | None = None,
        tokenizer: Any = None,
        max_calibration_sequences: int | None = DEFAULT_CALIBRATION_SEQUENCES,
        max_calibration_tokens: int | None = None,
        max_length: int = 256,
        batch_size: int = 8,
    ):
        self.beta = beta
        self.theta = theta
        self.gating = gating
        self.normalize_probe = normalize_probe
        self.drop_conflicts = drop_conflicts
        self.roles = roles
        self.tokenizer = tokenizer
        self.max_calibration_sequences = max_calibration_sequences
        self.max_calibration_tokens = max_calibration_tokens
        self.max_length = max_length
        self.batch_size = batch_size

    def params(self) -> dict[str, Any]:
        """The parameters, with the tokenizer named rather than printed."""
        params = super().params()
        if self.tokenizer is not None:
            params["tokenizer"] = getattr(self.tokenizer, "name_or_path", None) or type(self.tokenizer).__name__
        return params

    # -- checks ------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.gating not in ("probe", "uniform"):
            raise MergeError(f"tada: gating must be 'probe' or 'uniform', got {self.gating!r}.")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise MergeError(f"tada: beta must be a finite number ≥ 0, got {self.beta!r}.")
        if not (isinstance(self.theta, (int, float)) and math.isfinite(self.theta) and self.theta >= 0):
            raise MergeError(f"tada: theta must be a finite number ≥ 0 (conflicts are products below −θ), got {self.theta!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise MergeError(f"tada: batch_size must be a positive integer, got {self.batch_size!r}.")

    def _resolve_roles(self, count: int) -> list[str]:
        if self.roles is None:
            roles = default_roles(count)
        elif isinstance(self.roles, str):
            roles = [r.strip() for r in self.roles.split(",")]
        else:
            roles = list(self.roles)
        if len(roles) != count:
            raise MergeError(f"tada: got {len(roles)} roles for {count} adapters; give one role ('task' or 'domain') per adapter.")
        bad = sorted({r for r in roles if r not in ROLES})
        if bad:
            raise MergeError(f"tada: unknown role(s) {bad}; each adapter's role is 'task' or 'domain'.")
        if set(roles) != set(ROLES):
            raise MergeError(f"tada: roles {roles} need at least one 'task' and one 'domain' adapter; TaDA gates one against the other.")
        return roles

    # -- fitted state (set by prepare) --------------------------------------------
    @property
    def gates(self) -> dict[str, float]:
        """Module key → gate ``g`` (after :meth:`prepare`)."""
        return dict(getattr(self, "_gates", {}))

    @property
    def probe(self) -> ProbeResult | None:
        """The probe measurements (after :meth:`prepare`), or ``None``."""
        return getattr(self, "_probe", None)

    def prepare(self, adapters: Sequence[LoraAdapter], weights: Sequence[float], context: MergeContext) -> None:
        """Run the probe on the base model and compute every module's gate."""
        self._check_params()
        self._roles = self._resolve_roles(len(adapters))
        if context.base_model is None:
            raise MergeError(
                "tada probes the base model: pass base_model=... (--base-model), a loaded transformers model "
                "(mergeprobe.models.load_base_model), and calibration inputs (--calibration)."
            )
        tokens = calibration_tokens(
            context.calibration,
            self.tokenizer,
            max_sequences=self.max_calibration_sequences,
            max_tokens=self.max_calibration_tokens,
            max_length=self.max_length,
        )
        self._probe = probe_update_ratios(
            context.base_model, adapters, tokens, batch_size=self.batch_size, show_progress=context.show_progress
        )
        self._normalized = normalized_ratios(self._probe.ratios)
        if self.gating == "probe":
            self._gates = probe_gates(self._probe.ratios, self._roles, self.beta, self.normalize_probe)
        else:
            self._gates = {key: 0.5 for key in self._probe.ratios}

    def _role_signals(self, key: str) -> tuple[float, float] | None:
        probe = self.probe
        if probe is None or key not in probe.ratios:
            return None
        values = self._normalized[key] if self.normalize_probe else probe.ratios[key]
        task = [c for c, r in zip(values, self._roles) if r == "task"]
        domain = [c for c, r in zip(values, self._roles) if r == "domain"]
        return sum(task) / len(task), sum(domain) / len(domain)

    def merge_module(self, inputs: ModuleInputs, rank: int | None) -> ModuleResult:
        self._check_params()
        roles = getattr(self, "_roles", None) or self._resolve_roles(len(inputs.updates))
        if self.gating == "uniform":
            gate = 0.5
        elif inputs.key in getattr(self, "_gates", {}):
            gate = self._gates[inputs.key]
        else:
            raise MergeError(
                f"tada: no probe gate for module {inputs.key!r}; run the merge through merge_adapters(..., base_model=..., "
                "calibration=...) so that prepare() probes the base model first (or use gating='uniform')."
            )
        weights = [w * (2.0 * gate if role == "task" else 2.0 * (1.0 - gate)) for w, role in zip(inputs.weights, roles)]

        svds: list[tuple[Tensor, Tensor, Tensor]] = []
        for b, a in inputs.updates:
            u, s, v = svd_of_update((b, a))
            tolerance = (float(s.max()) if len(s) else 0.0) * max(b.shape[0], a.shape[1]) * torch.finfo(s.dtype).eps
            keep = s > tolerance
            svds.append((u[:, keep], s[keep], v[:, keep]))
        kept = [torch.ones(len(s), dtype=torch.bool) for _, s, _ in svds]
        conflicts = 0
        if self.drop_conflicts:
            for i, role_i in enumerate(roles):
                for j, role_j in enumerate(roles):
                    if role_i != "task" or role_j != "domain" or len(svds[i][1]) == 0 or len(svds[j][1]) == 0:
                        continue
                    lose_i, lose_j, found = _conflict_losers(svds[i], svds[j], weights[i], weights[j], self.theta)
                    kept[i] &= ~lose_i
                    kept[j] &= ~lose_j
                    conflicts += found

        components = [
            ((u[:, keep] * (w * s[keep])), v[:, keep].T) for (u, s, v), keep, w in zip(svds, kept, weights) if bool(keep.any())
        ]
        d_out, d_in = inputs.shape
        if components:
            space = CoreSpace.from_factors(components)
            b_out, a_out, singular = space.factorize(sum(space.cores[1:], space.cores[0]), rank)
        else:
            dtype = inputs.updates[0][0].dtype
            width = 1 if rank is None else int(rank)
            b_out, a_out, singular = torch.zeros(d_out, width, dtype=dtype), torch.zeros(width, d_in, dtype=dtype), torch.zeros(0)

        diagnostics: dict[str, Any] = {
            "gate": gate,
            "weights": weights,
            "dropped": [int((~keep).sum()) for keep in kept],
            "conflicts": conflicts,
            "energy_kept": energy_kept(singular, rank),
        }
        probe = self.probe
        if probe is not None and inputs.key in probe.ratios:
            diagnostics["c"] = list(probe.ratios[inputs.key])
            diagnostics["c_normalized"] = list(self._normalized[inputs.key])
            diagnostics["c_task"], diagnostics["c_domain"] = self._role_signals(inputs.key)
        return ModuleResult(b_out, a_out, diagnostics)

    def global_diagnostics(self) -> dict[str, Any]:
        """The depth profile (mean gate per layer), the profile per projection type, roles and data used."""
        gates = self.gates
        if not gates:
            return {}
        by_layer: dict[int, list[float]] = {}
        by_kind: dict[str, list[float]] = {}
        for key, gate in gates.items():
            layer = module_layer(key)
            if layer is not None:
                by_layer.setdefault(layer, []).append(gate)
            by_kind.setdefault(module_kind(key), []).append(gate)
        probe = self.probe
        return {
            "depth_profile": {layer: sum(v) / len(v) for layer, v in sorted(by_layer.items())},
            "projection_profile": {kind: sum(v) / len(v) for kind, v in sorted(by_kind.items())},
            "roles": list(self._roles),
            "gating": self.gating,
            "calibration_sequences": probe.num_sequences if probe else 0,
            "calibration_tokens": probe.num_tokens if probe else 0,
        }
