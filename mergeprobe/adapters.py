"""Reading and writing PEFT LoRA adapters as per-module factors.

A :class:`LoraAdapter` holds, for every LoRA module, the factors ``A`` (``r × d_in``)
and ``B`` (``d_out × r``) and the scaling PEFT applies (``lora_alpha / r``, or
``lora_alpha / √r`` with rsLoRA, per-module ``rank_pattern`` / ``alpha_pattern``
resolved exactly as PEFT resolves them). ``fan_in_fan_out`` modules (GPT-2
``Conv1D``) store the same factors, so ``ΔW = s·B A`` is always ``d_out × d_in``.

Sources: a PEFT adapter directory (``adapter_model.safetensors``; an older
``adapter_model.bin`` is read with ``torch.load(weights_only=True)`` only), a
``PeftModel`` (by adapter name) or a state dict. Nothing is ever unpickled.

Writing (:func:`save_adapter`) produces a standard PEFT directory, written under a
temporary name and renamed into place, so a crash never leaves half an adapter.

Example
-------
>>> import torch
>>> from mergeprobe.adapters import LoraAdapter, LoraModule
>>> module = LoraModule(A=torch.ones(2, 4), B=torch.ones(3, 2), scaling=0.5)
>>> adapter = LoraAdapter({"model.layers.0.q_proj": module}, config={"r": 2, "lora_alpha": 1}, name="demo")
>>> adapter.delta("model.layers.0.q_proj").shape
torch.Size([3, 4])
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeprobe.core import Factors
from mergeprobe.errors import AdapterError, OutputExistsError, UnsupportedAdapterError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class LoraModule:
    """One LoRA module: ``ΔW = scaling · B @ A``."""

    A: Tensor
    B: Tensor
    scaling: float

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the update."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def folded(self, weight: float = 1.0) -> Factors:
        """``(weight · scaling · B, A)`` in a compute dtype (float32, or float64 if stored so)."""
        dtype = torch.float64 if self.B.dtype == torch.float64 else torch.float32
        return self.B.to(dtype) * (self.scaling * weight), self.A.to(dtype)


@dataclass
class LoraAdapter:
    """A LoRA adapter as a mapping from module key to :class:`LoraModule`.

    Module keys are the PEFT state-dict prefixes without ``.lora_A.weight``, e.g.
    ``base_model.model.model.layers.0.self_attn.q_proj``.
    """

    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(default_factory=dict)
    name: str = "adapter"

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path`` from the config, if recorded."""
        return self.config.get("base_model_name_or_path")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the factors are stored in (of the first module)."""
        return next(iter(self.modules.values())).A.dtype

    def delta(self, key: str) -> Tensor:
        """The dense ``ΔW`` of one module (``d_out × d_in``); for tests and small layers."""
        b, a = self.modules[key].folded()
        return b @ a

    def scaled(self, factor: float) -> LoraAdapter:
        """A copy whose every update is multiplied by ``factor``."""
        modules = {k: LoraModule(m.A, m.B * factor, m.scaling) for k, m in self.modules.items()}
        return LoraAdapter(modules, dict(self.config), f"{self.name}×{factor:g}")


def base_module_path(key: str) -> str:
    """The module's path inside the base model: the key without PEFT's ``base_model.model.``."""
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def find_module(model: Any, key: str) -> torch.nn.Module:
    """The module of ``model`` that a LoRA module key refers to.

    Works on a ``PeftModel`` (keys as saved, ``base_model.model.…``) and on the bare
    base model (the same key without PEFT's prefix).
    """
    modules = dict(model.named_modules())
    for candidate in (key, base_module_path(key), PEFT_PREFIX + key):
        if candidate in modules:
            return modules[candidate]
    raise AdapterError(f"module {key!r} is not in the model; is the adapter for this base model?")


def module_layer(key: str) -> int | None:
    """The transformer block index of a module key (first integer component), if any.

    >>> module_layer("base_model.model.model.layers.11.mlp.up_proj")
    11
    """
    for part in key.split("."):
        if part.isdigit():
            return int(part)
    return None


def module_kind(key: str) -> str:
    """The projection type of a module key (its last component), e.g. ``q_proj``."""
    return key.rsplit(".", 1)[-1]


def _pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """Resolve ``rank_pattern`` / ``alpha_pattern`` for a module as PEFT does."""
    path = base_module_path(key)
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", path):
            return patterns[pattern]
    return default


def _check_config(config: Mapping[str, Any], source: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"adapter {source!r} is a {peft_type} adapter; mergeprobe merges LoRA adapters only. "
            "Convert it to LoRA or merge it with its own tooling."
        )
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            f"adapter {source!r} is a DoRA adapter (use_dora=true), which is unsupported: its magnitude "
            "vector makes the update non-linear in B and A. Train with use_dora=False to merge it."
        )


def _scaling(config: Mapping[str, Any], key: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, key, config.get("lora_alpha", rank))
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


def adapter_from_state_dict(
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any] | None = None,
    name: str = "state_dict",
) -> LoraAdapter:
    """Build a :class:`LoraAdapter` from LoRA weights and their PEFT config.

    Keys may carry an adapter name (``…lora_A.default.weight``) or not (as saved by
    PEFT). Without ``config`` every module's scaling is 1.

    Raises
    ------
    UnsupportedAdapterError
        For DoRA magnitude vectors, LoRA embeddings, LoRA biases or full weights
        (``modules_to_save``), none of which is a low-rank update.
    AdapterError
        For a module with only one factor, inconsistent shapes, or NaN/Inf values.
    """
    config = dict(config or {})
    _check_config(config, name)
    factors: dict[str, dict[str, Tensor]] = {}
    adapters_seen: set[str] = set()
    for key, tensor in state_dict.items():
        match = _LORA_KEY.match(key)
        if match is None:
            what = (
                "a DoRA magnitude vector" if "lora_magnitude_vector" in key
                else "a LoRA embedding" if "lora_embedding" in key
                else "a LoRA bias" if ".lora_B" in key and key.endswith("bias")
                else "a full weight (modules_to_save?)"
            )
            raise UnsupportedAdapterError(
                f"adapter {name!r}: key {key!r} is {what}, which is not a low-rank update and cannot be merged "
                "in core space. Retrain without it (plain LoRA on linear layers) or drop that key."
            )
        if match["adapter"]:
            adapters_seen.add(match["adapter"])
        factors.setdefault(match["module"], {})[match["which"]] = tensor
    if len(adapters_seen) > 1:
        raise AdapterError(
            f"adapter {name!r}: the state dict holds several adapters {sorted(adapters_seen)}; "
            "pass one adapter's weights (peft.get_peft_model_state_dict(model, adapter_name=...))."
        )
    if not factors:
        raise UnsupportedAdapterError(f"adapter {name!r} has no LoRA weights (no '*.lora_A.weight' keys); is it a LoRA adapter?")
    modules: dict[str, LoraModule] = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterError(f"adapter {name!r}: module {module!r} has no lora_{missing} weight; the file is incomplete — re-save the adapter.")
        a = pair["A"].detach()
        b = pair["B"].detach()
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"adapter {name!r}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                "which do not form B @ A (expected r × d_in and d_out × r); is it a convolution LoRA? Only linear layers are supported."
            )
        for which, tensor in (("A", a), ("B", b)):
            if not torch.isfinite(tensor).all():
                raise AdapterError(
                    f"adapter {name!r}: module {module!r} lora_{which} contains NaN or Inf; the adapter diverged in training. "
                    "Retrain it or leave it out of the merge."
                )
        modules[module] = LoraModule(A=a, B=b, scaling=_scaling(config, module, int(a.shape[0])))
    return LoraAdapter(modules=modules, config=config, name=name)


def _read_weights(path: Path) -> dict[str, Tensor]:
    safetensors_file = path / SAFETENSORS_NAME
    bin_file = path / BIN_NAME
    if safetensors_file.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise AdapterError(
                f"adapter {str(path)!r}: cannot read {SAFETENSORS_NAME} ({err}); the file is truncated or corrupt — re-save the adapter."
            ) from err
    if bin_file.exists():
        try:
            return torch.load(str(bin_file), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError…
            raise AdapterError(
                f"adapter {str(path)!r}: cannot read {BIN_NAME} with torch.load(weights_only=True) ({err}); "
                "it is corrupt or holds more than tensors. Re-save it as safetensors."
            ) from err
    raise AdapterError(f"adapter {str(path)!r} has no {SAFETENSORS_NAME} (or {BIN_NAME}); is this a PEFT adapter directory?")


def load_adapter(source: str | os.PathLike[str] | Any, adapter_name: str = "default", config: Mapping[str, Any] | None = None) -> LoraAdapter:
    """Read a LoRA adapter from a PEFT directory, a ``PeftModel`` or a state dict.

    Parameters
    ----------
    source:
        A directory holding ``adapter_config.json`` and ``adapter_model.safetensors``;
        a ``peft.PeftModel``; or a mapping of LoRA weights (then pass ``config``).
    adapter_name:
        Which adapter of a ``PeftModel`` to read.
    config:
        The PEFT config of a state dict (``r``, ``lora_alpha``, patterns, rsLoRA).

    Example
    -------
    >>> from mergeprobe.adapters import load_adapter
    >>> adapter = load_adapter("runs/math/adapter")  # doctest: +SKIP
    >>> sorted(adapter.modules)[:1]  # doctest: +SKIP
    ['base_model.model.model.layers.0.self_attn.q_proj']
    """
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, Mapping):
        return adapter_from_state_dict(source, config, name="state_dict")
    if hasattr(source, "peft_config") and hasattr(source, "base_model"):
        return _adapter_from_peft_model(source, adapter_name)
    path = Path(source)
    if not path.is_dir():
        raise AdapterError(f"adapter {str(path)!r} is not a directory; pass a PEFT adapter directory, a PeftModel or a state dict.")
    config_file = path / CONFIG_NAME
    if not config_file.exists():
        raise AdapterError(f"adapter {str(path)!r} has no {CONFIG_NAME}; is this a PEFT adapter directory?")
    try:
        file_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"adapter {str(path)!r}: {CONFIG_NAME} is not valid JSON ({err}); re-save the adapter.") from err
    if not isinstance(file_config, dict):
        raise AdapterError(f"adapter {str(path)!r}: {CONFIG_NAME} is not a JSON object; re-save the adapter.")
    _check_config(file_config, str(path))
    return adapter_from_state_dict(_read_weights(path), file_config, name=str(path))


def _adapter_from_peft_model(model: Any, adapter_name: str) -> LoraAdapter:
    from peft import get_peft_model_state_dict

    if adapter_name not in model.peft_config:
        raise AdapterError(f"PeftModel has no adapter {adapter_name!r}; it has {sorted(model.peft_config)}.")
    config = _json_safe(model.peft_config[adapter_name].to_dict())
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = {k: v.detach().to("cpu").clone() for k, v in state.items()}
    return adapter_from_state_dict(state, config, name=f"PeftModel[{adapter_name}]")


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def load_adapters(sources: Iterable[Any]) -> list[LoraAdapter]:
    """Load several adapters with :func:`load_adapter`."""
    return [load_adapter(source) for source in sources]


def _check_output_key(key: str) -> None:
    parts = key.split(".")
    if not parts or any(not _SAFE_COMPONENT.match(p) for p in parts):
        raise AdapterError(
            f"module key {key!r} is not a dotted path of plain names; refusing to write it "
            "(keys become PEFT module paths and must not contain '/', '..' or other separators)."
        )


def adapter_config_for(modules: Mapping[str, Tensor | tuple[Tensor, Tensor]], template: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A PEFT LoRA config for merged factors with scaling 1 (``lora_alpha = r`` per module).

    ``modules`` maps module keys to ``(B, A)``. The most common rank becomes ``r``;
    modules of another rank get exact ``rank_pattern`` / ``alpha_pattern`` entries.
    """
    template = dict(template or {})
    ranks = {key: int(pair[1].shape[0]) for key, pair in modules.items()}
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    rank = max(counts, key=lambda r: (counts[r], r))
    pattern = {base_module_path(k): r for k, r in sorted(ranks.items()) if r != rank}
    return {
        "peft_type": "LORA",
        "task_type": template.get("task_type"),
        "base_model_name_or_path": template.get("base_model_name_or_path"),
        "revision": template.get("revision"),
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(template.get("fan_in_fan_out", False)),
        "target_modules": sorted(base_module_path(k) for k in modules),
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(
    modules: Mapping[str, tuple[Tensor, Tensor]],
    out_dir: str | os.PathLike[str],
    template_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write merged factors as a PEFT LoRA adapter directory, atomically.

    Parameters
    ----------
    modules:
        Module key → ``(B, A)`` with the scaling already folded in (written with
        ``lora_alpha = r``, i.e. scaling 1).
    out_dir:
        The adapter directory to create. It is written under a temporary name beside
        it and renamed into place; an existing directory is refused unless
        ``overwrite=True``.
    template_config:
        An input adapter's config: base model, task type and ``fan_in_fan_out`` are
        carried over.
    dtype:
        The dtype to store (default: as given).
    extra_files:
        More text files to place in the directory (e.g. a merge report).

    Returns
    -------
    Path
        The written directory; ``PeftModel.from_pretrained(base, path)`` loads it.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {str(out)!r} already exists; choose another path or pass overwrite=True (--overwrite).")
    if not modules:
        raise AdapterError("nothing to write: the merge produced no modules.")
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for key, (b, a) in modules.items():
        _check_output_key(key)
        tensors[f"{key}.lora_A.weight"] = a.to(dtype or a.dtype).contiguous()
        tensors[f"{key}.lora_B.weight"] = b.to(dtype or b.dtype).contiguous()
    config = adapter_config_for(modules, template_config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt", "producer": "mergeprobe"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file_name, text in (extra_files or {}).items():
            if "/" in file_name or file_name.startswith("."):
                raise AdapterError(f"extra file name {file_name!r} must be a plain file name.")
            (tmp / file_name).write_text(text)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
