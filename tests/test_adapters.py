"""Adapter I/O: every scaling convention survives a round trip through PEFT's own loader."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from mergeprobe import load_adapter, merge_adapters
from mergeprobe.adapters import adapter_from_state_dict, find_module, module_kind, module_layer, save_adapter
from tests.conftest import build_lora_model, build_tiny_llama


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA module, from PEFT's own ``get_delta_weight``."""
    return {
        name: module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
    }


def deltas_from_dir(path, base=None) -> dict[str, torch.Tensor]:
    return peft_deltas(PeftModel.from_pretrained(base or build_tiny_llama(), str(path)))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


VARIANTS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True),
    "rank_pattern": dict(r=6, lora_alpha=12, rank_pattern={"q_proj": 2, "down_proj": 3}, alpha_pattern={"v_proj": 3}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loaded_factors_give_peft_delta(make_adapter, variant):
    path = make_adapter(variant, seed=3, **VARIANTS[variant])
    adapter = load_adapter(path)
    reference = deltas_from_dir(path)
    assert set(adapter.modules) == set(reference)
    for key, delta in reference.items():
        assert relative_error(adapter.delta(key), delta) < 1e-6, key


def test_linear_exact_round_trip_across_ranks_and_scalings(make_adapter, tmp_path):
    paths = [make_adapter(name, seed=i + 1, **VARIANTS[name]) for i, name in enumerate(sorted(VARIANTS))]
    weights = [0.7, 1.3, -0.4]
    merge_adapters(paths, method="linear", weights=weights, rank="exact", out_dir=tmp_path / "merged", show_progress=False)
    merged = deltas_from_dir(tmp_path / "merged")
    inputs = [deltas_from_dir(p) for p in paths]
    assert set(merged) == set(inputs[0])
    for key, delta in merged.items():
        expected = sum(w * d[key] for w, d in zip(weights, inputs))
        assert relative_error(delta, expected) < 1e-5, key
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["r"] == 4 + 8 + 6  # exact rank = sum of ranks on the modules without a rank_pattern


def test_peft_model_and_state_dict_sources_agree(make_adapter):
    model = build_lora_model(seed=5, r=4, lora_alpha=16, use_rslora=True)
    from_model = load_adapter(model)
    path = make_adapter("saved", seed=5, r=4, lora_alpha=16, use_rslora=True)
    from_dir = load_adapter(path)
    assert set(from_model.modules) == set(from_dir.modules)
    for key in from_dir.modules:
        torch.testing.assert_close(from_model.delta(key), from_dir.delta(key))


def test_state_dict_with_adapter_names_in_keys():
    model = build_lora_model(seed=2, r=2, lora_alpha=2)
    raw = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert any(".default." in k for k in raw)
    adapter = adapter_from_state_dict(raw, {"r": 2, "lora_alpha": 2})
    expected = peft_deltas(model)
    for key, delta in expected.items():
        torch.testing.assert_close(adapter.delta(key), delta)


def test_fan_in_fan_out_conv1d_round_trip(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()

    paths = []
    for seed in (1, 2):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
        model = get_peft_model(gpt2(), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator))
        model.save_pretrained(str(tmp_path / f"a{seed}"))
        paths.append(tmp_path / f"a{seed}")
    merge_adapters(paths, method="linear", rank="exact", out_dir=tmp_path / "merged", show_progress=False)
    merged = peft_deltas(PeftModel.from_pretrained(gpt2(), str(tmp_path / "merged")))
    inputs = [peft_deltas(PeftModel.from_pretrained(gpt2(), str(p))) for p in paths]
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    for key, delta in merged.items():
        assert relative_error(delta, inputs[0][key] + inputs[1][key]) < 1e-5, key


def test_save_adapter_refuses_path_like_keys(tmp_path):
    factors = (torch.ones(3, 1), torch.ones(1, 3))
    with pytest.raises(Exception, match="plain names"):
        save_adapter({"../../evil": factors}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_saved_adapter_is_readable_as_the_umask_allows(tmp_path):
    # Merged adapters land in shared probe stores: a private (0700) directory would lock the other users out.
    import os

    umask = os.umask(0o022)
    try:
        out = save_adapter({"model.layers.0.mlp.up_proj": (torch.ones(3, 1), torch.ones(1, 3))}, tmp_path / "merged")
    finally:
        os.umask(umask)
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        "adapter_config.json": "0o644",
        "adapter_model.safetensors": "0o644",
    }


def test_module_key_helpers(tiny_llama):
    key = "base_model.model.model.layers.1.mlp.up_proj"
    assert module_layer(key) == 1
    assert module_kind(key) == "up_proj"
    assert find_module(tiny_llama, key) is tiny_llama.model.layers[1].mlp.up_proj
