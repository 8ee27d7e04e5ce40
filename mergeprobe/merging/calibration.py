"""Calibration inputs for methods that probe the base model, and TaDA's probe pass.

Two steps, each usable on its own:

1. :func:`calibration_tokens` turns what a user passes as ``calibration`` into a
   padded token batch (:class:`CalibrationTokens`). Accepted forms:

   - a tensor (or NumPy array) of token ids, ``[n, seq]`` (or one sequence ``[seq]``);
     every token counts;
   - a list of token id sequences (lists or 1-D tensors, lengths may differ);
   - a mapping with ``input_ids`` and optionally ``attention_mask`` (e.g. the
     ``BatchEncoding`` a tokenizer returns), as tensors or lists of lists;
   - an iterable of mappings, one sequence each, with ``input_ids`` and optionally
     ``attention_mask`` (e.g. the rows of a tokenized ``datasets.Dataset``);
   - a list of strings, tokenized with ``tokenizer``;
   - a path (``str`` or ``os.PathLike``) to a UTF-8 text file, one sequence per
     line (blank lines skipped), tokenized with ``tokenizer``.

   At most ``max_sequences`` sequences are used (default 32, the first ones), each
   at most ``max_length`` tokens when tokenized here, and at most ``max_tokens``
   non-padding tokens in all. Sequences are right-padded with id 0 and masked.

2. :func:`probe_update_ratios` runs the base model on those tokens with a forward
   hook on every target module and measures, for each adapter ``a``,
   ``c_a = E_x ‖ΔW_a x‖ / E_x ‖W₀ x‖`` over the non-padding tokens, in low rank
   (``ΔW_a x = B̂_a (A_a x)``, and ``W₀ x`` is the module's output minus its bias),
   as ALGORITHMS.md §4 step 1 defines it.

Example
-------
>>> import torch
>>> from mergeprobe.merging.calibration import calibration_tokens
>>> tokens = calibration_tokens(torch.randint(0, 100, (40, 8)))
>>> tokens.input_ids.shape, tokens.num_tokens
(torch.Size([32, 8]), 256)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mergeprobe.adapters import LoraAdapter, find_module
from mergeprobe.errors import MergeError

DEFAULT_CALIBRATION_SEQUENCES = 32
"""How many calibration sequences a probe uses by default (ALGORITHMS.md §4)."""

CALIBRATION_FORMS = (
    "a tensor of token ids [n, seq]; a list of token id lists; a mapping with input_ids (and attention_mask); "
    "an iterable of such mappings, one sequence each; a list of strings with a tokenizer; "
    "or the path of a text file with one sequence per line, with a tokenizer"
)


@dataclass(frozen=True)
class CalibrationTokens:
    """Right-padded calibration sequences.

    Attributes
    ----------
    input_ids:
        ``[n, seq]`` token ids (``torch.long``); padding positions hold 0.
    attention_mask:
        ``[n, seq]``, 1 for real tokens, 0 for padding.
    """

    input_ids: Tensor
    attention_mask: Tensor

    @property
    def num_sequences(self) -> int:
        """The number of sequences ``n``."""
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """The number of non-padding tokens."""
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``(input_ids, attention_mask)`` slices of at most ``batch_size`` sequences."""
        for start in range(0, self.num_sequences, batch_size):
            yield self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size]


def _pad(sequences: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    length = max(int(s.numel()) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, (seq, seq_mask) in enumerate(zip(sequences, masks)):
        ids[row, : seq.numel()] = seq
        mask[row, : seq.numel()] = seq_mask
    return ids, mask


def _as_id_tensor(value: Any, what: str) -> Tensor:
    try:
        tensor = value if isinstance(value, Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise MergeError(f"calibration {what} cannot be read as token ids ({err}); expected integers.") from err
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise MergeError(f"calibration {what} must hold integer token ids, got dtype {tensor.dtype}.")
    return tensor.detach().to("cpu", torch.long)


def _rows(ids: Tensor, mask: Tensor | None, what: str) -> tuple[list[Tensor], list[Tensor]]:
    """Split ``[n, seq]`` (or ``[seq]``) ids and an optional mask into per-sequence rows."""
    if ids.ndim == 1:
        ids = ids[None]
        mask = None if mask is None else mask.reshape(1, -1)
    if ids.ndim != 2:
        raise MergeError(f"calibration {what} must be [n, seq] token ids, got shape {tuple(ids.shape)}.")
    if mask is None:
        mask = torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise MergeError(f"calibration {what}: attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}.")
    return list(ids), list((mask != 0).long())


def _ragged_rows(value: Any, what: str) -> list[Tensor]:
    """Rows of ``[n, seq]`` ids given as a tensor or as (possibly ragged) lists."""
    if isinstance(value, Tensor) or (isinstance(value, Sequence) and value and not isinstance(value[0], (Sequence, Tensor))):
        tensor = _as_id_tensor(value, what)
        return list(tensor[None] if tensor.ndim == 1 else tensor)
    return [_as_id_tensor(row, what).reshape(-1) for row in value]


def _from_mapping(batch: Mapping[str, Any], what: str) -> tuple[list[Tensor], list[Tensor]]:
    if "input_ids" not in batch:
        raise MergeError(f"calibration {what} has no 'input_ids' (keys: {sorted(map(str, batch))}); pass tokenized inputs.")
    ids = _ragged_rows(batch["input_ids"], f"{what} input_ids")
    if batch.get("attention_mask") is None:
        masks = [torch.ones_like(row) for row in ids]
    else:
        masks = _ragged_rows(batch["attention_mask"], f"{what} attention_mask")
        if len(masks) != len(ids) or any(m.shape != r.shape for m, r in zip(masks, ids)):
            raise MergeError(f"calibration {what}: attention_mask does not match input_ids sequence by sequence.")
        masks = [(m != 0).long() for m in masks]
    return ids, masks


def _tokenize(texts: Sequence[str], tokenizer: Any, max_length: int, source: str) -> tuple[list[Tensor], list[Tensor]]:
    if tokenizer is None:
        raise MergeError(
            f"calibration {source} is text, which needs a tokenizer: pass tokenizer=... "
            "(e.g. the one mergeprobe.models.load_base_model returns), or pass token ids instead."
        )
    if not callable(tokenizer):
        raise MergeError(f"tokenizer must be a callable tokenizer (transformers PreTrainedTokenizer), got {type(tokenizer).__name__}.")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids = [_as_id_tensor(row, f"{source} (tokenized)").reshape(-1) for row in encoded["input_ids"]]
    masks = [torch.ones_like(row) for row in ids]
    return ids, masks


def _read_lines(path: Path, limit: int | None) -> list[str]:
    if not path.is_file():
        raise MergeError(
            f"calibration file {str(path)!r} does not exist; pass an existing text file (one sequence per line), "
            f"or one of: {CALIBRATION_FORMS}."
        )
    lines: list[str] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    lines.append(line.rstrip("\n"))
                    if limit is not None and len(lines) >= limit:
                        break
    except UnicodeDecodeError as err:
        raise MergeError(f"calibration file {str(path)!r} is not UTF-8 text ({err}).") from err
    return lines


def calibration_tokens(
    calibration: Any,
    tokenizer: Any = None,
    *,
    max_sequences: int | None = DEFAULT_CALIBRATION_SEQUENCES,
    max_tokens: int | None = None,
    max_length: int = 256,
) -> CalibrationTokens:
    """Turn calibration inputs into right-padded token ids with an attention mask.

    Parameters
    ----------
    calibration:
        Token ids ``[n, seq]`` (tensor or array); a list of token id sequences; a mapping with ``input_ids`` (and ``attention_mask``);
        an iterable of such mappings, one sequence each; a list of strings; or the
        path of a text file with one sequence per line.
    tokenizer:
        Needed for strings and text files: a ``transformers`` tokenizer (called as
        ``tokenizer(texts, truncation=True, max_length=max_length)``).
    max_sequences:
        Use at most this many sequences, the first ones (default 32; ``None``: all).
    max_tokens:
        Use at most this many non-padding tokens in all: later tokens are masked and
        sequences left without tokens are dropped (``None``: no limit).
    max_length:
        Truncation length when tokenizing text.

    Raises
    ------
    MergeError
        For missing inputs, text without a tokenizer, a missing file, non-integer
        ids, mismatched masks, or inputs that leave no token.

    Example
    -------
    >>> batch = calibration_tokens([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    >>> batch.input_ids.tolist(), batch.attention_mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    if max_sequences is not None and max_sequences < 1:
        raise MergeError(f"max_sequences must be a positive integer or None, got {max_sequences!r}.")
    if max_tokens is not None and max_tokens < 1:
        raise MergeError(f"max_tokens must be a positive integer or None, got {max_tokens!r}.")
    if calibration is None:
        raise MergeError(f"no calibration inputs: pass calibration=... ({CALIBRATION_FORMS}).")

    if isinstance(calibration, Tensor) or (hasattr(calibration, "__array__") and not isinstance(calibration, (str, Mapping))):
        ids, masks = _rows(_as_id_tensor(calibration, "tensor"), None, "tensor")
    elif isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        texts = _read_lines(path, max_sequences)
        ids, masks = _tokenize(texts, tokenizer, max_length, f"file {str(path)!r}")
    elif isinstance(calibration, Mapping):
        ids, masks = _from_mapping(calibration, "mapping")
    elif isinstance(calibration, Iterable):
        items = []
        for item in calibration:
            items.append(item)
            if max_sequences is not None and len(items) >= max_sequences:
                break
        if items and all(isinstance(item, str) for item in items):
            ids, masks = _tokenize(items, tokenizer, max_length, "texts")
        elif items and all(isinstance(item, (Tensor, Sequence)) or hasattr(item, "__array__") for item in items):
            ids = [_as_id_tensor(item, f"sequence {index}").reshape(-1) for index, item in enumerate(items)]
            masks = [torch.ones_like(row) for row in ids]
        elif items and all(isinstance(item, Mapping) for item in items):
            ids, masks = [], []
            for index, item in enumerate(items):
                row_ids, row_masks = _from_mapping(item, f"item {index}")
                ids.extend(row_ids)
                masks.extend(row_masks)
        elif items:
            kinds = sorted({type(item).__name__ for item in items})
            raise MergeError(
                f"calibration items must all be strings, all token id sequences or all mappings with input_ids, got {', '.join(kinds)}."
            )
        else:
            ids, masks = [], []
    else:
        raise MergeError(f"calibration of type {type(calibration).__name__} is not understood; pass {CALIBRATION_FORMS}.")

    if max_sequences is not None:
        ids, masks = ids[:max_sequences], masks[:max_sequences]
    if max_tokens is not None:
        budget = max_tokens
        for row, mask in enumerate(masks):
            kept = torch.cumsum(mask, 0) <= budget
            masks[row] = mask * kept
            budget -= int(masks[row].sum())
    pairs = [(i, m) for i, m in zip(ids, masks) if int(m.sum()) > 0]
    if not pairs:
        raise MergeError(f"calibration inputs hold no tokens; pass non-empty sequences ({CALIBRATION_FORMS}).")
    input_ids, attention_mask = _pad([i for i, _ in pairs], [m for _, m in pairs])
    return CalibrationTokens(input_ids=input_ids * attention_mask, attention_mask=attention_mask)


@dataclass(frozen=True)
class ProbeResult:
    """What the probe pass measured.

    Attributes
    ----------
    ratios:
        Module key → ``c_a`` per adapter: ``E_x ‖ΔW_a x‖ / E_x ‖W₀ x‖`` over the
        calibration tokens (0 for an adapter without the module, and for every adapter
        when ``W₀ x`` vanishes on all tokens).
    base_norms:
        Module key → ``E_x ‖W₀ x‖``.
    num_tokens, num_sequences:
        How much calibration data the averages are over.
    """

    ratios: dict[str, list[float]]
    base_norms: dict[str, float]
    num_tokens: int
    num_sequences: int


class _ModuleProbe:
    """Forward hook state for one module: running sums of ``‖ΔW_a x‖`` and ``‖W₀ x‖``."""

    def __init__(self, factors: list[tuple[Tensor, Tensor] | None], mask_ref: list[Tensor]):
        self.factors = factors
        self.mask_ref = mask_ref
        self.update_sums = [0.0] * len(factors)
        self.base_sum = 0.0
        self.count = 0
        self._device_factors: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, Tensor] | None]] = {}

    def _factors_on(self, device: torch.device, dtype: torch.dtype) -> list[tuple[Tensor, Tensor] | None]:
        key = (device, dtype)
        if key not in self._device_factors:
            self._device_factors[key] = [
                None if f is None else (f[0].to(device, dtype), f[1].to(device, dtype)) for f in self.factors
            ]
        return self._device_factors[key]

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        y = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            return
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.reshape(-1, x.shape[-1]).to(dtype)
        y = y.reshape(-1, y.shape[-1]).to(dtype)
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor):
            y = y - bias.to(y.device, dtype)
        mask = self.mask_ref[0]
        if mask.numel() == x.shape[0]:
            keep = mask.reshape(-1).to(x.device) != 0
            x, y = x[keep], y[keep]
        # Otherwise the module saw tokens in another layout (e.g. routed experts): count them all.
        self.base_sum += float(torch.linalg.vector_norm(y, dim=1).sum())
        self.count += int(x.shape[0])
        for index, pair in enumerate(self._factors_on(x.device, dtype)):
            if pair is not None:
                b, a = pair
                self.update_sums[index] += float(torch.linalg.vector_norm((x @ a.T) @ b.T, dim=1).sum())


def _bare_module(model: Any, key: str) -> torch.nn.Module:
    """The base layer a key refers to (inside a PEFT LoRA wrapper, its ``base_layer``)."""
    module = find_module(model, key)
    while hasattr(module, "base_layer") and isinstance(module.base_layer, torch.nn.Module):
        module = module.base_layer
    return module


def _check_token_range(model: Any, tokens: CalibrationTokens) -> None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and int(tokens.input_ids.max()) >= vocab:
        raise MergeError(
            f"calibration token id {int(tokens.input_ids.max())} is outside the base model's vocabulary ({vocab}); "
            "were the inputs tokenized for another model?"
        )


def probe_update_ratios(
    model: Any,
    adapters: Sequence[LoraAdapter],
    tokens: CalibrationTokens,
    *,
    keys: Sequence[str] | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> ProbeResult:
    """Measure ``c_a = E_x ‖ΔW_a x‖ / E_x ‖W₀ x‖`` per module and adapter on the base model.

    The base model runs on ``tokens`` (under ``torch.no_grad``, in eval mode, with
    every PEFT adapter disabled if it is a ``PeftModel``). A forward hook on each
    target module takes its input ``x`` per non-padding token; ``ΔW_a x`` is computed
    in low rank as ``B̂_a (A_a x)`` and ``W₀ x`` as the module's output minus its bias.
    Nothing ``d_out × d_in`` is built. The averages are over tokens, so ``c_a`` is a
    ratio of sums; scaling adapter ``a`` by ``κ`` scales ``c_a`` by ``κ`` exactly.

    Parameters
    ----------
    model:
        A loaded ``transformers`` model (or ``PeftModel``) whose modules the adapters'
        keys name.
    adapters:
        The adapters to measure.
    tokens:
        Calibration tokens (:func:`calibration_tokens`).
    keys:
        The modules to probe (default: every module of any adapter).
    batch_size:
        Sequences per forward pass.
    show_progress:
        Show a progress bar over batches.

    Example
    -------
    >>> probe = probe_update_ratios(model, [task, domain], calibration_tokens(ids))  # doctest: +SKIP
    >>> probe.ratios["base_model.model.model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
    [0.012, 0.034]
    """
    if model is None or not isinstance(model, torch.nn.Module):
        raise MergeError(
            f"the probe needs a loaded base model (a torch.nn.Module), got {type(model).__name__}; "
            "load it with mergeprobe.models.load_base_model."
        )
    if batch_size < 1:
        raise MergeError(f"batch_size must be a positive integer, got {batch_size!r}.")
    _check_token_range(model, tokens)
    keys = sorted({k for a in adapters for k in a.modules}) if keys is None else list(keys)
    mask_ref = [tokens.attention_mask[:0]]
    probes: dict[str, _ModuleProbe] = {}
    handles = []
    try:
        for key in keys:
            module = _bare_module(model, key)
            factors = [a.modules[key].folded() if key in a.modules else None for a in adapters]
            probe = _ModuleProbe(factors, mask_ref)
            probes[key] = probe
            handles.append(module.register_forward_hook(probe, with_kwargs=True))
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        was_training = model.training
        is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        total = -(-tokens.num_sequences // batch_size)
        model.eval()
        try:
            with model.disable_adapter() if is_peft else contextlib.nullcontext(), torch.no_grad():
                batches = tokens.batches(batch_size)
                for input_ids, attention_mask in tqdm(batches, total=total, desc="probing base model", unit="batch", disable=not show_progress):
                    mask_ref[0] = attention_mask
                    model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        finally:
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()

    ratios: dict[str, list[float]] = {}
    base_norms: dict[str, float] = {}
    for key, probe in probes.items():
        if probe.count == 0:
            raise MergeError(f"module {key!r} never ran during the probe; does the base model use it on these inputs?")
        base_norms[key] = probe.base_sum / probe.count
        if probe.base_sum > 0.0:
            ratios[key] = [s / probe.base_sum for s in probe.update_sums]
        else:
            ratios[key] = [0.0] * len(adapters)
    return ProbeResult(ratios=ratios, base_norms=base_norms, num_tokens=tokens.num_tokens, num_sequences=tokens.num_sequences)
