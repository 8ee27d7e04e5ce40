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

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight")
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_\-]+")
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes LoRA factors may be stored in; anything else (integers, bool, float8) is refused."""


@dataclass
class LoraModule:
    """One LoRA module: ``ΔW = scaling · B @ A``.

    Example
    -------
    >>> import torch
    >>> m = LoraModule(A=torch.ones(2, 5), B=torch.ones(4, 2), scaling=0.5)
    >>> m.rank, m.folded()[0].shape
    (2, torch.Size([4, 2]))
    """

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

    Example
    -------
    >>> adapter = load_adapter("runs/math")  # a PEFT adapter directory  # doctest: +SKIP
    >>> module = adapter.modules["base_model.model.model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
    >>> module.rank, adapter.base_model  # doctest: +SKIP
    (8, 'HuggingFaceTB/SmolLM2-135M-Instruct')
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


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_patterns(config: Mapping[str, Any], key: str, source: str, check_value: Any, expected: str) -> None:
    patterns = config.get(key)
    if patterns is None:
        return
    if not isinstance(patterns, Mapping):
        raise AdapterError(f"adapter {source!r}: {key} is {patterns!r}, not an object of module pattern → value; fix {CONFIG_NAME} or re-save the adapter.")
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise AdapterError(f"adapter {source!r}: {key} key {pattern!r} is not a valid regular expression ({err}); fix {CONFIG_NAME}.") from err
        if not check_value(value):
            raise AdapterError(f"adapter {source!r}: {key}[{pattern!r}] is {value!r}, not {expected}; fix {CONFIG_NAME}.")


def _check_config(config: Mapping[str, Any], source: str, require_alpha: bool = False) -> None:
    """Refuse configs mergeprobe cannot merge, or whose values have the wrong type.

    ``lora_alpha`` must be a finite number (negative is allowed: PEFT accepts it and the
    update changes sign); ``use_rslora``, ``use_dora`` and ``fan_in_fan_out`` must be
    booleans; ``r`` and ``rank_pattern`` values positive integers; pattern keys valid
    regular expressions; ``base_model_name_or_path`` a string. With ``require_alpha``
    (an ``adapter_config.json`` file) a missing ``lora_alpha`` is an error: PEFT would
    assume 8, a tool that omits it may mean something else.
    """
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise AdapterError(f"adapter {source!r}: peft_type is {peft_type!r}, not a string such as 'LORA'; fix {CONFIG_NAME} or re-save the adapter.")
    peft_type = peft_type.upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"adapter {source!r} has peft_type {peft_type}, which is unsupported: mergeprobe merges LoRA adapters only. "
            "Convert it to LoRA or merge it with its own tooling."
        )
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            raise AdapterError(f"adapter {source!r}: {flag} is {config[flag]!r}, not true or false; fix {CONFIG_NAME} or re-save the adapter.")
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            f"adapter {source!r} is a DoRA adapter (use_dora=true), which is unsupported: its magnitude "
            "vector makes the update non-linear in B and A. Train with use_dora=False to merge it."
        )
    alpha = config.get("lora_alpha")
    if alpha is None and require_alpha:
        raise AdapterError(
            f"adapter {source!r}: {CONFIG_NAME} has no lora_alpha, so the update's scale is unknown (PEFT would assume 8); "
            "add the lora_alpha the adapter was trained with."
        )
    if alpha is not None and not _is_number(alpha):
        raise AdapterError(f"adapter {source!r}: lora_alpha is {alpha!r}, not a finite number; fix {CONFIG_NAME} or re-save the adapter.")
    rank = config.get("r")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"adapter {source!r}: r is {rank!r}, not a positive integer; fix {CONFIG_NAME} or re-save the adapter.")
    _check_patterns(config, "alpha_pattern", source, _is_number, "a finite number")
    _check_patterns(config, "rank_pattern", source, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"adapter {source!r}: base_model_name_or_path is {base!r}, not a string; fix {CONFIG_NAME}.")


def _scaling(config: Mapping[str, Any], key: str, rank: int) -> float:
    default = config.get("lora_alpha")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, key, rank if default is None else default)
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
        For a module with only one factor, inconsistent shapes, rank 0, factors that
        are not float16/bfloat16/float32/float64, NaN/Inf values, a rank that differs
        from the config's ``r`` / ``rank_pattern``, a scaling that overflows the compute
        dtype, or config values of the wrong type (see :func:`_check_config`).
    """
    config = dict(config or {})
    _check_config(config, name)
    factors: dict[str, dict[str, Tensor]] = {}
    adapters_seen: set[str] = set()
    for key, tensor in state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, Tensor):
            raise AdapterError(f"adapter {name!r}: entry {key!r} is not a tensor named by a string; pass a state dict of LoRA weights.")
        match = _LORA_KEY.fullmatch(key)
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
        for which, tensor in (("A", a), ("B", b)):
            if tensor.dtype not in FACTOR_DTYPES:
                raise AdapterError(
                    f"adapter {name!r}: module {module!r} lora_{which} has dtype {tensor.dtype}; LoRA factors are float16, "
                    "bfloat16, float32 or float64. The file is corrupt or not a LoRA adapter — re-save it in one of those dtypes."
                )
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"adapter {name!r}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                "which do not form B @ A (expected r × d_in and d_out × r); is it a convolution LoRA? Only linear layers are supported."
            )
        if a.shape[0] == 0:
            raise AdapterError(f"adapter {name!r}: module {module!r} has rank 0 (empty lora_A and lora_B); drop the module or re-save the adapter.")
        expected_rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
        if expected_rank is not None and expected_rank != a.shape[0]:
            raise AdapterError(
                f"adapter {name!r}: module {module!r} has rank {a.shape[0]} in its weights but {expected_rank} in its config "
                f"(r / rank_pattern); the config does not belong to these weights — re-save the adapter."
            )
        for which, tensor in (("A", a), ("B", b)):
            if not torch.isfinite(tensor).all():
                raise AdapterError(
                    f"adapter {name!r}: module {module!r} lora_{which} contains NaN or Inf; the adapter diverged in training. "
                    "Retrain it or leave it out of the merge."
                )
        scaling = _scaling(config, module, int(a.shape[0]))
        limit = torch.finfo(torch.float64 if b.dtype == torch.float64 else torch.float32).max
        if b.numel() and float(b.abs().max()) * abs(scaling) >= limit:
            raise AdapterError(
                f"adapter {name!r}: module {module!r}: lora_B times the scaling {scaling:g} (lora_alpha / r) overflows the "
                "compute dtype; check lora_alpha in the config."
            )
        modules[module] = LoraModule(A=a, B=b, scaling=scaling)
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
    raise AdapterError(
        f"adapter {str(path)!r} has no {SAFETENSORS_NAME} (or {BIN_NAME}); point to a complete PEFT adapter directory "
        "or re-save the adapter with save_pretrained()."
    )


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterError(f"adapter {str(path)!r}: {CONFIG_NAME} is not valid JSON ({err}); re-save the adapter.") from err
    if not isinstance(file_config, dict):
        raise AdapterError(f"adapter {str(path)!r}: {CONFIG_NAME} is not a JSON object; re-save the adapter.")
    _check_config(file_config, str(path), require_alpha=True)
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
    parts = key.split(".") if isinstance(key, str) else []
    if not parts or any(not _SAFE_COMPONENT.fullmatch(p) for p in parts):
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

    Example
    -------
    >>> import tempfile, torch
    >>> key = "base_model.model.model.layers.0.self_attn.q_proj"
    >>> path = save_adapter({key: (torch.ones(8, 2), torch.ones(2, 8))}, tempfile.mkdtemp() + "/merged")
    >>> sorted(p.name for p in path.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']

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
        The dtype to store (default: as given). A factor that overflows it when cast
        (float16 tops out at 65504) raises :class:`AdapterError` before anything is written.
    extra_files:
        More text files to place in the directory (e.g. a merge report), by plain file
        name: ASCII letters, digits, ``_``, ``-`` and ``.``, not starting with ``.``.

    Returns
    -------
    Path
        The written directory; ``PeftModel.from_pretrained(base, path)`` loads it.

    Raises
    ------
    AdapterError
        A module key that is not a dotted path of plain names (``..``, ``/``, NUL, a
        newline…), an extra file name that is not a plain name, or a factor that is NaN
        or overflows ``dtype``. Nothing is written then, inside or beside ``out_dir``.
    OutputExistsError
        ``out_dir`` exists and ``overwrite`` is false.

    A process killed while writing leaves ``out_dir`` absent or complete, plus a hidden
    ``.<name>.tmp-*`` directory beside it; killed between the two renames of an
    overwrite, it leaves ``out_dir`` absent and the previous adapter in
    ``.<name>.old-*``. Neither is cleaned up automatically.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {str(out)!r} already exists; choose another path or pass overwrite=True (--overwrite).")
    if not modules:
        raise AdapterError("nothing to write: the merge produced no modules.")
    from safetensors.torch import save as safetensors_bytes

    for file_name in extra_files or {}:
        if not isinstance(file_name, str) or not _SAFE_FILE_NAME.fullmatch(file_name) or file_name in (CONFIG_NAME, SAFETENSORS_NAME):
            raise AdapterError(
                f"extra file name {file_name!r} must be a plain file name (letters, digits, '_', '-', '.'; not hidden, "
                f"no path separators) other than {CONFIG_NAME} and {SAFETENSORS_NAME}."
            )
    tensors: dict[str, Tensor] = {}
    for key, (b, a) in modules.items():
        _check_output_key(key)
        for which, factor in (("A", a), ("B", b)):
            stored = factor.to(dtype or factor.dtype).contiguous()
            if stored.is_floating_point() and not torch.isfinite(stored).all():
                raise AdapterError(
                    f"module {key!r}: lora_{which} has values that are NaN or overflow {stored.dtype} when written "
                    f"(largest magnitude {float(factor.abs().max()):.3g}); write it in float32 instead "
                    "(MergeResult.dtype = torch.float32 before .save(), or save_adapter(..., dtype=torch.float32))."
                )
            tensors[f"{key}.lora_{which}.weight"] = stored
    config = adapter_config_for(modules, template_config)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp, whose directory is private (0700): the adapter's modes follow the umask, so the other users of a
    # shared probe store can read a merged adapter written there.
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp, 0o777)
    try:
        # Bytes written by Python, not save_file, which creates its file private (0600) whatever the umask.
        (tmp / SAFETENSORS_NAME).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt", "producer": "mergeprobe"}))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
