"""Shared fixtures: tiny models built from a config and random LoRA adapters saved as PEFT directories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_tiny_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A 2-layer Llama built from a config (no download), deterministic for ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    return LlamaForCausalLM(config).eval()


def build_lora_model(
    seed: int = 0,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules: list[str] | None = None,
    model_seed: int = 0,
    **config: Any,
):
    """A PeftModel on the tiny Llama whose LoRA factors are random (B non-zero), seeded."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_llama(model_seed)
    lora = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules or ALL_LINEAR, lora_dropout=0.0, **config)
    model = get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return build_tiny_llama()


@pytest.fixture
def make_adapter(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_adapter(name, seed=…, r=…, **LoraConfig kwargs)`` saves a random adapter and returns its directory."""

    def make(name: str, seed: int = 0, **kwargs: Any) -> Path:
        model = build_lora_model(seed=seed, **kwargs)
        out = tmp_path / name
        model.save_pretrained(str(out))
        return out

    return make


@pytest.fixture(scope="session")
def alignment_predictor(tmp_path_factory) -> str:
    """A MergeProbe fitted on a constructed table: retention rises with update alignment.

    The callback mechanics are under test here, not the shipped model, so the
    predictor learns a known rule: opposed updates (alignment −1) keep nothing, aligned
    ones (+1) keep everything.
    """
    alignment = np.linspace(-1, 1, 81)
    rows = [{"update_alignment.mean": float(u)} for u in alignment]
    from mergeprobe.predictor import MergeProbe

    probe = MergeProbe(max_iter=60, min_samples_leaf=3).fit(rows, (1 + alignment) / 2)
    path = tmp_path_factory.mktemp("predictor") / "alignment.skops"
    probe.save(path)
    return str(path)
