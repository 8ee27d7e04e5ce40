"""The MergeProbe signals of one training run (ALGORITHMS.md §5).

Three signals are captured in the probe window at the start of training:

- **Update** — the change of every LoRA module over the window,
  ``ΔW(end) − ΔW(start)``, kept as exact low-rank factors (:func:`update_between`).
- **Gradient** — per module a ``k × k`` sketch ``Ω_outᵀ (∂L/∂W) Ω_in`` of the gradient
  with respect to the frozen base weight, accumulated by hooks during backward
  (:class:`GradientSketcher`). ``Ω_out``, ``Ω_in`` depend only on the module shape,
  ``k`` and a global seed (:func:`gradient_sketch_projections`), so every run uses the
  same sketch and Frobenius cosines between sketches estimate the cosines between the
  true gradients (Johnson–Lindenstrauss).
- **Representation** — hidden states of a probe batch with the adapter disabled and
  enabled, compared per layer by linear CKA (:func:`self_disturbance`,
  :func:`representation_disturbance`).

:class:`RunSignals` bundles them and converts to and from flat, safetensors-ready
tensors. Nothing here knows about the ``transformers.Trainer``; the callback in
:mod:`mergeprobe.callbacks` drives these pieces.

Which parts are ours: the paper (arXiv 2606.19549) is known from its abstract only, so
the choices below — the shape-and-seed keyed sketch, the pairing of forward and
backward hooks under gradient checkpointing, the token masking of hidden states — are
this project's specification, not the authors'.

Example
-------
>>> import torch
>>> from mergeprobe.signals import gradient_sketch_projections
>>> omega_out, omega_in = gradient_sketch_projections(d_out=6, d_in=4, k=3, seed=0)
>>> omega_out.shape, omega_in.shape
(torch.Size([6, 3]), torch.Size([4, 3]))
>>> bool(torch.equal(omega_out, gradient_sketch_projections(6, 4, 3, 0)[0]))
True
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from mergeprobe.adapters import PEFT_PREFIX, LoraAdapter, base_module_path, find_module
from mergeprobe.core import Factors
from mergeprobe.errors import AdapterError

__all__ = [
    "CPU_PASS_COST_TOKENS",
    "PROBE_CHUNK_TOKENS",
    "GradientSketcher",
    "RunSignals",
    "apply_updates",
    "capture_signals",
    "frozen_base",
    "gradient_sketch_projections",
    "hidden_states",
    "hidden_states_with_updates",
    "linear_cka",
    "lora_linear_layers",
    "own_states_cache",
    "own_states_from_cache",
    "representation_disturbance",
    "self_disturbance",
    "sketch_of_gradient",
    "update_between",
]

_SEED_MASK = (1 << 63) - 1


def gradient_sketch_projections(d_out: int, d_in: int, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """The Gaussian projections ``(Ω_out, Ω_in)`` of the gradient sketch of a ``d_out × d_in`` weight.

    Entries are ``N(0, 1/k)`` (standard normal scaled by ``1/√k``), float32, drawn on
    the CPU from a ``torch.Generator`` seeded by a hash of ``(d_out, d_in, k, seed)``.
    Every process and every run therefore gets the same matrices for a module shape,
    which is what makes sketches of different runs comparable.

    Parameters
    ----------
    d_out, d_in:
        The weight's output and input features (``ΔW`` is ``d_out × d_in``).
    k:
        The sketch dimension.
    seed:
        The global sketch seed.

    Returns
    -------
    omega_out, omega_in
        ``d_out × k`` and ``d_in × k``.

    Example
    -------
    >>> omega_out, omega_in = gradient_sketch_projections(8, 8, 4, seed=1)
    >>> bool(torch.equal(omega_out, omega_in))  # two different draws, even for a square weight
    False
    """
    if min(d_out, d_in, k) < 1:
        raise ValueError(f"gradient sketch needs positive sizes, got d_out={d_out}, d_in={d_in}, k={k}")
    digest = hashlib.sha256(f"mergeprobe.gradient_sketch:{d_out}:{d_in}:{k}:{seed}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & _SEED_MASK)
    scale = 1.0 / math.sqrt(k)
    omega_out = torch.randn(d_out, k, generator=generator, dtype=torch.float32) * scale
    omega_in = torch.randn(d_in, k, generator=generator, dtype=torch.float32) * scale
    return omega_out, omega_in


def sketch_of_gradient(gradient: Tensor, k: int, seed: int) -> Tensor:
    """``Ω_outᵀ G Ω_in`` of a dense ``d_out × d_in`` gradient: what the sketcher accumulates.

    For tests and for gradients already at hand; :class:`GradientSketcher` never forms ``G``.

    Example
    -------
    >>> g = torch.ones(6, 4)
    >>> sketch_of_gradient(g, k=3, seed=0).shape
    torch.Size([3, 3])
    """
    omega_out, omega_in = gradient_sketch_projections(int(gradient.shape[0]), int(gradient.shape[1]), k, seed)
    dense = gradient.to(torch.float32)
    return omega_out.to(dense.device).T @ dense @ omega_in.to(dense.device)


def _excluded_lora_types() -> tuple[type, ...]:
    from peft.tuners.lora import layer

    names = ("Embedding", "_ConvNd", "MultiheadAttention", "ParamWrapper")
    return tuple(getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), type))


def lora_linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The linear-type LoRA layers of a ``PeftModel``, by their name in ``named_modules()``.

    The names equal the adapter module keys (``base_model.model.….q_proj``). Linear,
    GPT-2 ``Conv1D`` (``fan_in_fan_out``) and quantised linear LoRA layers are included;
    LoRA on embeddings, convolutions, attention modules and bare parameters is not
    (their gradient is not an ``x → y`` linear map).

    Example
    -------
    >>> sorted(lora_linear_layers(peft_model))[:1]  # doctest: +SKIP
    ['base_model.model.model.layers.0.mlp.down_proj']
    """
    from peft.tuners.lora import LoraLayer

    excluded = _excluded_lora_types()
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, excluded):
            if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
                layers[name] = module
    return layers


def _first_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    value = kwargs.get("x", kwargs.get("input"))
    return value if isinstance(value, Tensor) else None


def _module_device(module: torch.nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


class GradientSketcher:
    """Accumulates ``k × k`` sketches of ``∂L/∂W`` for every LoRA layer of a ``PeftModel``.

    For a layer with input ``x`` (``n × d_in`` once tokens are flattened) and gradient
    ``g_out`` of the loss with respect to its output (``n × d_out``), the gradient of the
    frozen base weight is ``G = g_outᵀ x``. The sketcher keeps
    ``Ĝ += (g_out Ω_out)ᵀ (x Ω_in) = Ω_outᵀ G Ω_in`` — a sum, so it works through
    gradient accumulation — and never holds anything larger than ``n × k`` per layer.
    The base weight needs no ``requires_grad``; LoRA's own parameters make the layer's
    output require grad.

    How forward and backward are paired (gradient checkpointing): the forward hook
    computes ``x Ω_in`` and, only if the layer output requires grad, registers a
    tensor hook *on that very output* that closes over this ``x Ω_in``. The backward
    contribution is therefore always paired with the input of the forward pass whose
    graph the gradient flows through:

    - reentrant checkpointing runs the first forward under ``no_grad`` (output needs no
      grad: nothing registered) and the recomputation with grad (its hook fires);
    - non-reentrant checkpointing backpropagates through the first forward's graph (its
      hook fires); the recomputation only refills saved tensors, its output receives no
      gradient, so its hook never fires;
    - forward passes under ``no_grad`` (evaluation, probes) contribute nothing.

    ``fan_in_fan_out`` layers (GPT-2 ``Conv1D``) need nothing special: the input is
    still ``d_in``-dimensional and the output ``d_out``-dimensional; the shapes are
    taken from the LoRA layer's ``in_features`` / ``out_features``, not from the stored
    (transposed) weight. The sketch is in ``d_out × d_in`` orientation for every layer.

    Only forward passes taken while :attr:`active` is True contribute; when inactive
    the hooks return at once.

    Parameters
    ----------
    k:
        Sketch dimension (ALGORITHMS.md §5 default 32).
    seed:
        Global sketch seed; runs must share it for their sketches to be comparable.

    Example
    -------
    >>> sketcher = GradientSketcher(k=32, seed=0)
    >>> sketcher.attach(peft_model)  # doctest: +SKIP
    >>> sketcher.active = True  # doctest: +SKIP
    >>> peft_model(**batch).loss.backward()  # doctest: +SKIP
    >>> sketcher.all_reduce(); sketches = sketcher.sketches()  # doctest: +SKIP
    """

    def __init__(self, k: int = 32, seed: int = 0) -> None:
        self.k = k
        self.seed = seed
        self._active = False
        self._handles: list[Any] = []
        self._sketches: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._omegas: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def active(self) -> bool:
        """Whether forward passes are currently sketched (the callback toggles this)."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = bool(value)

    @property
    def attached(self) -> bool:
        """Whether hooks are registered on a model."""
        return bool(self._handles)

    @property
    def step_count(self) -> int:
        """Backward passes (micro-batches) accumulated since the last :meth:`reset`.

        Counted as the largest number of contributions any one layer received, which
        is one per backward pass for a transformer that calls each layer once.
        """
        return max(self._counts.values(), default=0)

    @property
    def module_keys(self) -> list[str]:
        """The keys of the sketched layers, sorted."""
        return sorted(self._sketches)

    def attach(self, model: torch.nn.Module) -> GradientSketcher:
        """Register the hooks on every linear LoRA layer of ``model`` (see :func:`lora_linear_layers`).

        Returns ``self``. Raises :class:`~mergeprobe.errors.AdapterError` when the model
        has no LoRA layer, and ``RuntimeError`` when already attached.
        """
        if self._handles:
            raise RuntimeError("GradientSketcher is already attached; call detach() first.")
        layers = lora_linear_layers(model)
        if not layers:
            raise AdapterError("the model has no linear LoRA layers to sketch; pass the PeftModel being trained.")
        shared: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}  # one draw per shape: the layers of a model share it
        for key, module in layers.items():
            device = _module_device(module)
            shape = (module.out_features, module.in_features, device)
            if shape not in shared:
                omega_out, omega_in = gradient_sketch_projections(module.out_features, module.in_features, self.k, self.seed)
                shared[shape] = (omega_out.to(device), omega_in.to(device))
            self._omegas[key] = shared[shape]
            self._sketches[key] = torch.zeros(self.k, self.k, dtype=torch.float32, device=device)
            self._counts[key] = 0
            self._handles.append(module.register_forward_hook(self._forward_hook(key), with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove every hook; the accumulated sketches are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Zero every sketch and the step count."""
        for key, sketch in self._sketches.items():
            sketch.zero_()
            self._counts[key] = 0

    def sketches(self) -> dict[str, Tensor]:
        """The accumulated ``k × k`` float32 sketches, as CPU copies, by module key."""
        return {key: self._sketches[key].detach().to("cpu", copy=True) for key in sorted(self._sketches)}

    def all_reduce(self) -> None:
        """Average the sketches over ``torch.distributed`` ranks (no-op when not initialised).

        Every rank must call it (it is a collective) with the same layers attached.
        One flat tensor is reduced, on the current CUDA device under NCCL.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or not self._sketches:
            return
        keys = sorted(self._sketches)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        flat = torch.cat([self._sketches[key].reshape(-1).to(device) for key in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        for key, chunk in zip(keys, flat.split(self.k * self.k)):
            self._sketches[key].copy_(chunk.view(self.k, self.k))

    def _on_device(self, key: str, device: torch.device) -> tuple[Tensor, Tensor]:
        """The projections of ``key`` on ``device``, moving them and the sketch there if the model moved."""
        omega_out, omega_in = self._omegas[key]
        if omega_in.device != device:
            omega_out, omega_in = omega_out.to(device), omega_in.to(device)
            self._omegas[key] = (omega_out, omega_in)
            self._sketches[key] = self._sketches[key].to(device)
        return omega_out, omega_in

    def _forward_hook(self, key: str):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self._active or not isinstance(output, Tensor) or not output.requires_grad:
                return
            x = _first_input(args, kwargs)
            if x is None:
                return
            omega_out, omega_in = self._on_device(key, x.device)
            x_sketch = x.detach().reshape(-1, x.shape[-1]).to(torch.float32) @ omega_in

            def backward_hook(grad: Tensor) -> None:
                g_sketch = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float32) @ omega_out
                self._sketches[key].add_(g_sketch.T @ x_sketch)
                self._counts[key] += 1

            output.register_hook(backward_hook)

        return hook


def update_between(start: LoraAdapter, end: LoraAdapter) -> dict[str, Factors]:
    """The window update ``ΔW(end) − ΔW(start)`` of every module, as exact low-rank factors.

    For each module ``(B̂, A) = ([B̂_end, −B̂_start], [A_end; A_start])`` (rank ``2r``),
    scalings folded in; when ``start``'s B is all zero (the usual LoRA initialisation)
    its half is dropped and the update is ``(B̂_end, A_end)`` (rank ``r``). Right for
    non-zero B initialisations such as PiSSA.

    Raises
    ------
    AdapterError
        When the two adapters do not have the same modules.

    Example
    -------
    >>> from mergeprobe.adapters import LoraAdapter, LoraModule
    >>> start = LoraAdapter({"m.0.q_proj": LoraModule(torch.ones(2, 4), torch.ones(3, 2), 1.0)})
    >>> end = LoraAdapter({"m.0.q_proj": LoraModule(torch.ones(2, 4), 2 * torch.ones(3, 2), 1.0)})
    >>> b, a = update_between(start, end)["m.0.q_proj"]
    >>> bool(torch.allclose(b @ a, end.delta("m.0.q_proj") - start.delta("m.0.q_proj")))
    True
    """
    if set(start.modules) != set(end.modules):
        missing = sorted(set(start.modules) ^ set(end.modules))[:3]
        raise AdapterError(
            f"update_between: {start.name!r} and {end.name!r} have different modules (e.g. {missing}); "
            "pass two snapshots of the same adapter."
        )
    updates: dict[str, Factors] = {}
    for key in sorted(end.modules):
        b_end, a_end = end.modules[key].folded()
        b_start, a_start = start.modules[key].folded()
        if not bool(b_start.any()):
            updates[key] = (b_end, a_end)
        else:
            dtype = torch.promote_types(b_end.dtype, b_start.dtype)
            updates[key] = (
                torch.cat([b_end.to(dtype), -b_start.to(dtype)], dim=1),
                torch.cat([a_end.to(dtype), a_start.to(dtype)], dim=0),
            )
    return updates


@contextlib.contextmanager
def _adapter_state(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    # PEFT's disable_adapter walks the whole model twice (~0.1 s for a 135M model): skip it when already inside one.
    already_disabled = bool(getattr(model, "_adapters_disabled", False))
    if not enabled and not already_disabled and hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with model.disable_adapter():
            yield
    else:
        yield


_FROZEN: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()
"""Models inside :func:`frozen_base`, with its nesting depth: their passes need not look for training modules."""


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # Looking for a module in training mode walks the whole model (~4 ms for a 135M model, per pass): not inside frozen_base.
    if _FROZEN.get(model) or not any(module.training for module in model.modules()):  # nothing to toggle back
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def frozen_base(model: torch.nn.Module) -> Iterator[None]:
    """The state every representation pass runs in: eval mode, no gradients, the PEFT adapter disabled.

    :func:`hidden_states` and :func:`hidden_states_with_updates` enter it themselves;
    entering it once around many passes (as the cross-disturbance and the probe's
    window end do) saves switching the model's mode and adapter for each pass, which
    PEFT does by walking the whole model. Inside it, ``hidden_states(...,
    adapter_enabled=True)`` sees the base model too.

    Example
    -------
    >>> with frozen_base(peft_model):  # doctest: +SKIP
    ...     base = hidden_states(peft_model, ids, adapter_enabled=False)
    ...     adapted = hidden_states_with_updates(peft_model, updates, ids)
    """
    with torch.no_grad(), _eval_mode(model), _adapter_state(model, enabled=False):
        _FROZEN[model] = _FROZEN.get(model, 0) + 1
        try:
            yield
        finally:
            _FROZEN[model] -= 1
            if not _FROZEN[model]:
                del _FROZEN[model]


PROBE_CHUNK_TOKENS = 4096
"""Default token budget of one forward pass of :func:`hidden_states` (its sequences padded to the widest of them)."""

CPU_PASS_COST_TOKENS = 32
"""On the CPU a forward pass costs about as much as this many more tokens (SmolLM2-135M, one
thread: 0.1 s fixed, 2.4 ms per token); elsewhere a pass is taken to cost a whole token budget."""


def _chunks(attention_mask: Tensor, batch_size: int | None, max_tokens: int, pass_cost: int) -> list[tuple[list[int], int]]:
    """How :func:`hidden_states` splits a batch: ``(rows, width)`` per forward pass.

    A row needs the columns up to its last real token (its trailing padding changes no
    real token's state: attention never reaches it). Rows are sorted by that width and
    split into runs of consecutive rows that minimise the tokens computed plus
    ``pass_cost`` per pass; a pass holds at most ``max_tokens`` tokens (one longer row
    goes alone) and at most ``batch_size`` rows. Rows with no real token are left out.
    """
    if max_tokens < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"hidden_states needs positive chunk sizes, got batch_size={batch_size}, max_tokens={max_tokens}")
    columns = torch.arange(1, attention_mask.shape[1] + 1)
    widths = (attention_mask.ne(0).cpu() * columns).amax(dim=1).tolist()
    rows = sorted((r for r, w in enumerate(widths) if w > 0), key=lambda r: widths[r])
    # best[i]: cheapest split of the i narrowest rows; a pass of rows[j:i] is rows[i - 1]'s width wide.
    best, cut = [0] + [math.inf] * len(rows), [0] * (len(rows) + 1)
    for i in range(1, len(rows) + 1):
        width = widths[rows[i - 1]]
        for j in range(i - 1, -1, -1):
            if j < i - 1 and ((i - j) * width > max_tokens or (batch_size is not None and i - j > batch_size)):
                break
            cost = best[j] + (i - j) * width + pass_cost
            if cost < best[i]:
                best[i], cut[i] = cost, j
    chunks, i = [], len(rows)
    while i > 0:
        chunks.append((rows[cut[i] : i], widths[rows[i - 1]]))
        i = cut[i]
    return chunks[::-1]


def hidden_states(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    adapter_enabled: bool = True,
    batch_size: int | None = None,
    max_tokens: int = PROBE_CHUNK_TOKENS,
) -> list[Tensor]:
    """Per-layer hidden states of the real (unmasked) tokens of a batch.

    Runs the model with ``output_hidden_states=True`` in eval mode without gradients.
    Each sequence is cut after its last real token (trailing padding changes no real
    token's state) and the sequences, sorted by that length, are split into forward
    passes that compute the fewest tokens, counting a pass's own cost on the CPU
    (:data:`CPU_PASS_COST_TOKENS`): a probe batch padded to a fixed length no longer
    pays for its padding. A pass holds at most ``max_tokens`` tokens (a longer sequence
    is a pass of its own), which bounds its activation memory, and at most
    ``batch_size`` sequences when that is given. The states come back in the batch's
    order; how it is split changes them by float round-off at most.

    It keeps the outputs of the transformer blocks (``hidden_states[1:]``: the
    embedding output, which no LoRA changes, is left out; the last entry is after the
    final norm, as ``transformers`` returns it). The
    output projection is not needed: a ``transformers`` model's body
    (``PreTrainedModel.base_model``, the model without its LM head) is run where it has
    one, else the whole model, asked for the last position's logits only
    (``logits_to_keep=1``) where its ``forward`` accepts it. Tokens
    whose ``attention_mask`` is 0 are removed. For a ``PeftModel``,
    ``adapter_enabled=False`` runs under ``model.disable_adapter()`` (the base model).
    The model's training mode is restored afterwards.

    Returns
    -------
    list[Tensor]
        One float32 CPU tensor ``[n_tokens, hidden]`` per layer. Memory is
        ``n_tokens · hidden · layers · 4`` bytes: keep probe batches small.

    Example
    -------
    >>> base = hidden_states(peft_model, ids, mask, adapter_enabled=False)  # doctest: +SKIP
    >>> len(base) == peft_model.config.num_hidden_layers  # doctest: +SKIP
    True
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = _module_device(model)
    pass_cost = CPU_PASS_COST_TOKENS if device.type == "cpu" else max_tokens
    forward, extra = _states_forward(model)
    rows: dict[int, list[Tensor]] = {}  # the states of each row's real tokens, layer by layer
    with torch.no_grad(), _eval_mode(model), _adapter_state(model, adapter_enabled):
        for chunk, width in _chunks(attention_mask, batch_size, max_tokens, pass_cost):
            ids = input_ids[chunk, :width].to(device)
            mask = attention_mask[chunk, :width].to(device)
            out = forward(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False, **extra)
            states = [state.to("cpu", torch.float32) for state in out.hidden_states[1:]]
            keep = mask.bool().cpu()
            for index, row in enumerate(chunk):
                rows[row] = [state[index, keep[index]] for state in states]
    if not rows:
        raise ValueError("hidden_states: the batch has no real token (its attention_mask is all 0)")
    return [torch.cat(layer) for layer in zip(*(rows[r] for r in sorted(rows)))]


def _states_forward(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
    """What :func:`hidden_states` calls, and its extra arguments: the body of a model with an LM head, else the model.

    The body of a ``transformers`` model (its ``base_model``, e.g. ``LlamaModel`` inside
    ``LlamaForCausalLM``) returns the very hidden states the whole model returns, without
    the LM head's matmul (~10 % of a pass for SmolLM2-135M even at one position). A
    ``PeftModel``'s LoRA layers and hooks sit inside that body, so they act as before.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(target, "base_model", None)
    if isinstance(body, torch.nn.Module) and body is not target and not hasattr(body, "peft_config"):
        return body, {}
    return model, ({"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {})


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (base) model's ``forward`` takes ``logits_to_keep`` (transformers causal LMs do)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return False


def _modules_by_key(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, torch.nn.Module]:
    """:func:`~mergeprobe.adapters.find_module` for many keys with one walk of the module tree."""
    named = dict(model.named_modules())
    found = {}
    for key in keys:
        candidates = [c for c in (key, base_module_path(key), PEFT_PREFIX + key) if c in named]
        found[key] = named[candidates[0]] if candidates else find_module(model, key)  # find_module raises the error
    return found


@contextlib.contextmanager
def apply_updates(model: torch.nn.Module, updates: Mapping[str, Factors]) -> Iterator[None]:
    """Temporarily add low-rank updates ``B̂ A`` to the model's target modules.

    A forward hook on each module adds ``x Aᵀ B̂ᵀ`` to its output, so the module computes
    ``(W + B̂ A) x``; the hooks are removed on exit. Keys follow the adapter convention
    and are resolved with :func:`~mergeprobe.adapters.find_module` (PeftModel or bare
    base model). The adapter's own LoRA is left as it is: disable it yourself when the
    updates should act on the base model alone (as :func:`hidden_states` does with
    ``adapter_enabled=False``).

    Example
    -------
    >>> merged = {k: (torch.cat([ba, bb], 1), torch.cat([aa, ab], 0)) for k, ((ba, aa), (bb, ab)) in pairs.items()}  # doctest: +SKIP
    >>> with apply_updates(peft_model, merged):  # doctest: +SKIP
    ...     states = hidden_states(peft_model, ids, adapter_enabled=False)
    """
    handles = []
    try:
        modules = _modules_by_key(model, updates)
        for key, (b, a) in updates.items():
            module = modules[key]
            device = _module_device(module)
            hook = _update_hook(b.to(device), a.to(device), _computes_fresh_output(module))
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _computes_fresh_output(module: torch.nn.Module) -> bool:
    """Whether ``module`` returns a new tensor of its own on every call (a linear layer, a PEFT LoRA layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, (torch.nn.Linear, BaseTunerLayer))


def _update_hook(b: Tensor, a: Tensor, fresh_output: bool):
    """The forward hook of :func:`apply_updates`: the module's output plus ``x Aᵀ B̂ᵀ``.

    The update is added in place, without a second output-sized tensor, when nothing
    else can hold that output yet: a module that computes a fresh output
    (``fresh_output``), no gradient recorded, this hook the first to see it, the
    output contiguous, of the update's dtype and device, and no view of the input.
    Otherwise a new tensor ``output + x Aᵀ B̂ᵀ`` is returned. The two agree up to
    float round-off (bitwise on the CPU in practice).
    """

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = _first_input(args, kwargs)
        if x is None or not isinstance(output, Tensor):
            return output
        low = x.to(a.dtype) @ a.T
        if (
            fresh_output
            and not torch.is_grad_enabled()
            and output.dtype == low.dtype == b.dtype  # not so under autocast
            and output.device == b.device
            and output.is_contiguous()
            and output.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
            and not _global_forward_hooks()
            and next(iter(module._forward_hooks.values()), None) is hook
        ):
            output.view(-1, output.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]), b.T)
            return output
        return output + (low @ b.T).to(output.dtype)

    return hook


def _global_forward_hooks() -> bool:
    """Whether forward hooks registered for every module (``register_module_forward_hook``) exist: they see outputs first."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks)


def hidden_states_with_updates(
    model: torch.nn.Module,
    updates: Mapping[str, Factors],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    batch_size: int | None = None,
    max_tokens: int = PROBE_CHUNK_TOKENS,
) -> list[Tensor]:
    """:func:`hidden_states` of the base model plus the low-rank ``updates`` (the model's own adapter disabled).

    The one way mergeprobe computes the states of "base model + ``ΔW``": the adapted
    side of the self-disturbance (:func:`self_disturbance`) and both sides of the
    cross-disturbance (:func:`mergeprobe.features.cross_disturbance`). The same updates
    on the same batch therefore give bitwise the same states wherever they are
    computed, so states computed once can be reused. ``batch_size`` and ``max_tokens``
    chunk the passes as in :func:`hidden_states`.

    Example
    -------
    >>> own = hidden_states_with_updates(peft_model, run.update, run.probe_input_ids)  # doctest: +SKIP
    """
    with frozen_base(model), apply_updates(model, updates):
        return hidden_states(model, input_ids, attention_mask, adapter_enabled=False, batch_size=batch_size, max_tokens=max_tokens)


OWN_STATES = "own_states"
"""Name prefix of a run's own hidden states in a store record's cache (``own_states.<layer>``)."""


def own_states_cache(states: Sequence[Tensor]) -> dict[str, Tensor]:
    """A run's own states (base + its update, on its probe batch) as flat cache tensors.

    The states are what :func:`hidden_states_with_updates` returns for the run's window
    update on its probe batch (for LoRA started at ``B = 0``, the adapted states of
    :func:`self_disturbance`). Stored with the run's record
    (:meth:`~mergeprobe.store.ProbeStore.write_record` ``cache=``), they spare every later
    cross-disturbance with this run one forward pass of its probe batch.

    Example
    -------
    >>> cache = own_states_cache([torch.zeros(5, 4), torch.ones(5, 4)])
    >>> sorted(cache)
    ['own_states.0', 'own_states.1']
    """
    return {f"{OWN_STATES}.{layer}": state for layer, state in enumerate(states)}


def own_states_from_cache(cache: Mapping[str, Tensor] | None, signals: RunSignals) -> list[Tensor] | None:
    """The own states in a record's cache (:func:`own_states_cache`), or ``None`` if they cannot be the run's.

    They are checked against the run's probe batch: one float32 ``[n_tokens, hidden]``
    tensor per layer, ``n_tokens`` the batch's real tokens, layers numbered from 0 without
    gaps, one hidden size. Anything else (no cache, another layout) gives ``None``: the
    caller then computes the states.

    Example
    -------
    >>> signals = RunSignals({}, {}, {}, torch.zeros(2), torch.zeros(2), torch.ones(1, 5, dtype=torch.long),
    ...                      torch.ones(1, 5, dtype=torch.long), sketch_dim=32, sketch_seed=0)
    >>> len(own_states_from_cache(own_states_cache([torch.zeros(5, 4)] * 2), signals))
    2
    >>> own_states_from_cache(own_states_cache([torch.zeros(3, 4)]), signals) is None
    True
    """
    if not cache:
        return None
    layers = sum(1 for name in cache if name.startswith(f"{OWN_STATES}."))
    states = [cache.get(f"{OWN_STATES}.{layer}") for layer in range(layers)]
    tokens = int(signals.probe_attention_mask.bool().sum())
    if not states or any(s is None or s.dtype != torch.float32 or s.ndim != 2 or s.shape != states[0].shape for s in states):
        return None
    return states if states[0].shape[0] == tokens else None


def self_disturbance(
    model: torch.nn.Module,
    factors: Mapping[str, Factors],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    batch_size: int | None = None,
    max_tokens: int = PROBE_CHUNK_TOKENS,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """The representation signal of a run: its probe batch's hidden states without and with its ``ΔW``.

    ``factors`` are the adapter's folded window-end factors (``ΔW = B̂ A`` per module).
    The adapted states are :func:`hidden_states_with_updates` of them: the same as
    running the ``PeftModel`` with its adapter enabled (bitwise so when the LoRA scaling
    is a power of two, e.g. ``lora_alpha = 2r``; up to float round-off otherwise).
    ``batch_size`` and ``max_tokens`` chunk the passes as in :func:`hidden_states`.

    Returns
    -------
    disturbance, adapted
        :func:`representation_disturbance` of the base and the adapted states, and the
        adapted states themselves: when the run's window update equals ``factors``
        (LoRA started at ``B = 0``) they are its own states in
        :func:`~mergeprobe.features.cross_disturbance`, which then need no second pass.

    Example
    -------
    >>> factors = {k: m.folded() for k, m in load_adapter(peft_model).modules.items()}  # doctest: +SKIP
    >>> disturbance, adapted = self_disturbance(peft_model, factors, ids, mask)  # doctest: +SKIP
    """
    with frozen_base(model):
        chunking = {"batch_size": batch_size, "max_tokens": max_tokens}
        base = hidden_states(model, input_ids, attention_mask, adapter_enabled=False, **chunking)
        adapted = hidden_states_with_updates(model, factors, input_ids, attention_mask, **chunking)
    return representation_disturbance(base, adapted), adapted


_Value = TypeVar("_Value")

_PREPARED: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Per representation tensor: ``(its version, {name: value})`` of what :func:`linear_cka` and
:func:`representation_disturbance` derive from it alone. An entry lives as long as its tensor."""


def _prepared(x: Tensor, name: str, compute: Callable[[], _Value]) -> _Value:
    """``compute()``, computed once per representation ``x`` and reused while ``x`` is alive and unchanged.

    In one window end the same states are one side of several comparisons (a run's own
    states against its base states and against each merge), so their float64 Gram
    matrix and norms are worth keeping. Tensors that take part in autograd or have no
    version counter (inference tensors, which could change unseen) are not cached.
    """
    if x.requires_grad or x.is_inference():
        return compute()
    version, values = _PREPARED.get(x, (None, None))
    if version != x._version or values is None:
        version, values = x._version, {}
        _PREPARED[x] = (version, values)
    if name not in values:
        values[name] = compute()
    return values[name]


def _centred(x: Tensor) -> Tensor:
    """``x`` as float64 ``n × features`` with column means removed."""
    x = x.to(torch.float64).reshape(x.shape[0], -1)
    return x - x.mean(dim=0, keepdim=True)


def _example_gram(x: Tensor) -> tuple[Tensor, Tensor]:
    """The centred ``n × n`` Gram matrix ``X̃ X̃ᵀ`` of ``x`` and its Frobenius norm, kept for reuse."""

    def compute() -> tuple[Tensor, Tensor]:
        centred = _centred(x)
        gram = centred @ centred.T
        return gram, torch.linalg.norm(gram)

    return _prepared(x, "example_gram", compute)


def _feature_gram_norm(x: Tensor, centred: Tensor) -> Tensor:
    """``‖X̃ᵀ X̃‖_F`` of ``x`` (``centred`` is :func:`_centred` of it), kept for reuse."""
    return _prepared(x, "feature_gram_norm", lambda: torch.linalg.norm(centred.T @ centred))


def _norm(x: Tensor) -> Tensor:
    """``‖x‖_F`` in float64, kept for reuse."""
    return _prepared(x, "norm", lambda: torch.linalg.norm(x.to(torch.float64)))


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of two representations of the same ``n`` examples (rows).

    ``CKA = ‖Ỹᵀ X̃‖_F² / (‖X̃ᵀ X̃‖_F ‖Ỹᵀ Ỹ‖_F)`` with column-centred ``X̃``, ``Ỹ``
    (Kornblith et al. 2019), computed in float64 through the smaller of the feature
    and example Gram matrices. Invariant to orthogonal transforms and isotropic
    scaling of either side. Two constant representations give 1, one constant 0.

    What depends on one side alone (its centred Gram matrix and that matrix's norm)
    is computed once per tensor and reused while the tensor lives unchanged, so
    comparing one representation with several others costs one Gram matrix per
    comparison, not two. The values are those of computing everything afresh. The kept
    ``n × n`` float64 Gram matrix (only when ``n`` is at most the number of features)
    takes at most twice the memory of the float32 states, and is freed with them.

    Example
    -------
    >>> x = torch.randn(50, 8)
    >>> round(float(linear_cka(x, 3 * x)), 6)
    1.0
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same examples on both sides, got {x.shape[0]} and {y.shape[0]} rows")
    if x.shape[0] <= max(math.prod(x.shape[1:]), math.prod(y.shape[1:])):
        (gram_x, norm_x), (gram_y, norm_y) = _example_gram(x), _example_gram(y)
        cross = (gram_x * gram_y).sum()
    else:
        centred_x, centred_y = _centred(x), _centred(y)
        norm_x, norm_y = _feature_gram_norm(x, centred_x), _feature_gram_norm(y, centred_y)
        cross = ((centred_y.T @ centred_x) ** 2).sum()
    if norm_x == 0 and norm_y == 0:
        return torch.ones((), dtype=torch.float64)
    if norm_x == 0 or norm_y == 0:
        return torch.zeros((), dtype=torch.float64)
    return (cross / (norm_x * norm_y)).clamp(0.0, 1.0)


def representation_disturbance(h_base: list[Tensor], h_adapted: list[Tensor]) -> dict[str, Tensor]:
    """Per-layer disturbance ``1 − CKA_linear(H_base, H_adapted)`` and relative change.

    ``relative_change(l) = ‖H_adapted − H_base‖_F / ‖H_base‖_F`` (the plain
    ``‖H_adapted − H_base‖_F`` when the base states are all zero, so it stays finite),
    in float64. The base states' norm, like their Gram matrix in :func:`linear_cka`, is
    computed once per tensor: a run's own states compared with several others cost it once.

    Returns
    -------
    dict
        ``disturbance`` and ``relative_change``: float32 tensors of one value per layer.

    Example
    -------
    >>> h = [torch.randn(20, 4) for _ in range(3)]
    >>> out = representation_disturbance(h, h)
    >>> out["disturbance"].abs().max().item() < 1e-6, out["relative_change"].tolist()
    (True, [0.0, 0.0, 0.0])
    """
    if len(h_base) != len(h_adapted):
        raise ValueError(f"representation_disturbance: {len(h_base)} base layers but {len(h_adapted)} adapted layers")
    disturbance, relative = [], []
    for base, adapted in zip(h_base, h_adapted):
        disturbance.append(float(1.0 - linear_cka(base, adapted)))
        norm = float(_norm(base))
        diff = float(torch.linalg.norm(adapted.to(torch.float64) - base.to(torch.float64)))
        relative.append(diff / norm if norm > 0 else diff)
    return {
        "disturbance": torch.tensor(disturbance, dtype=torch.float32).clamp_min(0.0),
        "relative_change": torch.tensor(relative, dtype=torch.float32),
    }


@dataclass
class RunSignals:
    """Everything MergeProbe keeps of one run's probe window (ALGORITHMS.md §5).

    Attributes
    ----------
    update:
        Module key → ``(B̂, A)``: the window update ``ΔW(end) − ΔW(start)`` (:func:`update_between`).
    end_factors:
        Module key → ``(B̂, A)``: the folded LoRA factors at the window end.
    gradient:
        Module key → ``k × k`` gradient sketch (:class:`GradientSketcher`).
    disturbance, relative_change:
        Per layer, base vs adapted hidden states on the probe batch (:func:`representation_disturbance`).
    probe_input_ids, probe_attention_mask:
        The probe batch (token ids and mask), ``[n_sequences, seq_len]``.
    sketch_dim, sketch_seed:
        The gradient sketch's ``k`` and global seed; sketches compare only when both match.

    Example
    -------
    >>> signals = RunSignals({}, {}, {}, torch.zeros(2), torch.zeros(2), torch.ones(1, 3, dtype=torch.long),
    ...                      torch.ones(1, 3, dtype=torch.long), sketch_dim=32, sketch_seed=0)
    >>> again = RunSignals.from_tensors(signals.to_tensors(), signals.meta())
    >>> again.sketch_dim, bool(torch.equal(again.probe_input_ids, signals.probe_input_ids))
    (32, True)
    """

    update: dict[str, Factors]
    end_factors: dict[str, Factors]
    gradient: dict[str, Tensor]
    disturbance: Tensor
    relative_change: Tensor
    probe_input_ids: Tensor
    probe_attention_mask: Tensor
    sketch_dim: int
    sketch_seed: int

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat, contiguous CPU tensors with no shared storage (ready for ``safetensors.torch.save_file``).

        Names: ``update.<key>.B``, ``update.<key>.A``, ``end_factors.<key>.B``,
        ``end_factors.<key>.A``, ``gradient.<key>``, ``disturbance``,
        ``relative_change``, ``probe_input_ids``, ``probe_attention_mask``.
        """

        def own(t: Tensor) -> Tensor:
            return t.detach().to("cpu").contiguous().clone()

        tensors: dict[str, Tensor] = {}
        for prefix, factors in (("update", self.update), ("end_factors", self.end_factors)):
            for key, (b, a) in factors.items():
                tensors[f"{prefix}.{key}.B"] = own(b)
                tensors[f"{prefix}.{key}.A"] = own(a)
        for key, sketch in self.gradient.items():
            tensors[f"gradient.{key}"] = own(sketch)
        tensors["disturbance"] = own(self.disturbance)
        tensors["relative_change"] = own(self.relative_change)
        tensors["probe_input_ids"] = own(self.probe_input_ids)
        tensors["probe_attention_mask"] = own(self.probe_attention_mask)
        return tensors

    def meta(self) -> dict[str, int]:
        """The JSON-safe scalars that :meth:`from_tensors` needs besides the tensors."""
        return {"sketch_dim": int(self.sketch_dim), "sketch_seed": int(self.sketch_seed)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> RunSignals:
        """Rebuild from :meth:`to_tensors` and :meth:`meta` output (exact round trip)."""
        factors: dict[str, dict[str, dict[str, Tensor]]] = {"update": {}, "end_factors": {}}
        gradient: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            prefix, _, rest = name.partition(".")
            if prefix in factors and rest[-2:] in (".A", ".B"):
                factors[prefix].setdefault(rest[:-2], {})[rest[-1]] = tensor
            elif prefix == "gradient" and rest:
                gradient[rest] = tensor
        for prefix, table in factors.items():
            for key, pair in table.items():
                if set(pair) != {"A", "B"}:
                    raise ValueError(f"RunSignals.from_tensors: {prefix}.{key} lacks its {({'A', 'B'} - set(pair)).pop()} factor")
        missing = [n for n in ("disturbance", "relative_change", "probe_input_ids", "probe_attention_mask") if n not in tensors]
        missing += [n for n in ("sketch_dim", "sketch_seed") if n not in meta]
        if missing:
            raise ValueError(f"RunSignals.from_tensors: missing {missing}")
        return cls(
            update={k: (p["B"], p["A"]) for k, p in sorted(factors["update"].items())},
            end_factors={k: (p["B"], p["A"]) for k, p in sorted(factors["end_factors"].items())},
            gradient=dict(sorted(gradient.items())),
            disturbance=tensors["disturbance"],
            relative_change=tensors["relative_change"],
            probe_input_ids=tensors["probe_input_ids"],
            probe_attention_mask=tensors["probe_attention_mask"],
            sketch_dim=int(meta["sketch_dim"]),
            sketch_seed=int(meta["sketch_seed"]),
        )

    @property
    def num_layers(self) -> int:
        """Number of layers of the representation signals."""
        return int(self.disturbance.shape[0])


def capture_signals(
    model: torch.nn.Module,
    start: LoraAdapter,
    end: LoraAdapter,
    sketcher: GradientSketcher,
    probe_input_ids: Tensor,
    probe_attention_mask: Tensor | None = None,
    batch_size: int | None = None,
    max_tokens: int = PROBE_CHUNK_TOKENS,
) -> RunSignals:
    """Assemble a run's :class:`RunSignals` at the end of its probe window.

    ``model`` is the ``PeftModel`` in its window-end state; ``start`` / ``end`` are its
    adapter snapshots (:func:`~mergeprobe.adapters.load_adapter`); ``sketcher`` has
    accumulated the window's gradients (call :meth:`GradientSketcher.all_reduce` first
    under DDP). The representation signal compares the probe batch's hidden states with
    the adapter disabled and enabled (:func:`self_disturbance`), its passes chunked by
    ``batch_size`` and ``max_tokens`` as in :func:`hidden_states`.

    Example
    -------
    >>> signals = capture_signals(model, start, load_adapter(model), sketcher, ids, mask)  # doctest: +SKIP
    """
    if probe_attention_mask is None:
        probe_attention_mask = torch.ones_like(probe_input_ids)
    end_factors = {key: module.folded() for key, module in sorted(end.modules.items())}
    rep, _ = self_disturbance(model, end_factors, probe_input_ids, probe_attention_mask, batch_size, max_tokens)
    return RunSignals(
        update=update_between(start, end),
        end_factors=end_factors,
        gradient=sketcher.sketches(),
        disturbance=rep["disturbance"],
        relative_change=rep["relative_change"],
        probe_input_ids=probe_input_ids.detach().to("cpu"),
        probe_attention_mask=probe_attention_mask.detach().to("cpu"),
        sketch_dim=sketcher.k,
        sketch_seed=sketcher.seed,
    )
