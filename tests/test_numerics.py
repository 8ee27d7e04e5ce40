"""Numerics of merging, for every registered method.

- bf16 and fp16 adapters are merged in float32 and written back in their own dtype: the
  written file is exactly the float32 merge of the same values, cast;
- float64 adapters are merged and written in float64;
- a merge whose factors overflow float16 when written back is a clear error, not Infs on disk;
- zero adapters (B = 0, as PEFT initialises them), rank-deficient adapters, identical
  adapters and adapters whose updates differ in norm by 10¹² give no NaN or Inf, with
  the properties each method documents.

TaDA runs with the tiny Llama as its base model and random calibration token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from mergeprobe import load_adapter, merge_adapters
from mergeprobe.adapters import LoraAdapter, LoraModule
from mergeprobe.core import frobenius_norm
from mergeprobe.errors import AdapterError
from mergeprobe.merging import available_methods
from mergeprobe.merging.registry import method_class
from tests.conftest import build_lora_model, build_tiny_llama

METHODS = available_methods()
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return build_tiny_llama()


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pair() -> tuple[LoraAdapter, LoraAdapter]:
    """Two random rank-4 adapters (alpha 8) on the tiny Llama's q_proj and v_proj, in memory."""
    return tuple(load_adapter(build_lora_model(seed=seed, target_modules=TARGETS)) for seed in (1, 2))  # type: ignore[return-value]


def merge(adapters: list[Any], method: str, base: Any, calibration: Any, **kwargs: Any) -> Any:
    if method_class(method).needs_base_model:
        kwargs.update(base_model=base, calibration=calibration)
    return merge_adapters(adapters, method=method, show_progress=False, **kwargs)


def transformed(adapter: LoraAdapter, name: str, change: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> LoraAdapter:
    """A copy whose every module's (A, B) is replaced by ``change(A, B)``."""
    modules = {}
    for key, module in adapter.modules.items():
        a, b = change(module.A.clone(), module.B.clone())
        modules[key] = LoraModule(A=a, B=b, scaling=module.scaling)
    return LoraAdapter(modules, dict(adapter.config), name)


def rank_one(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every component the same: a rank-4 adapter whose update has rank 1."""
    return a[:1].repeat(a.shape[0], 1), b[:, :1].repeat(1, b.shape[1])


def scaled_to_norm(adapter: LoraAdapter, norm: float, name: str) -> LoraAdapter:
    """A copy with every module's ‖ΔW‖_F = norm (the factors scaled by √(norm / ‖ΔW‖) each)."""
    modules = {}
    for key, module in adapter.modules.items():
        factor = (norm / float(frobenius_norm(module.folded()))) ** 0.5
        modules[key] = LoraModule(A=module.A * factor, B=module.B * factor, scaling=module.scaling)
    return LoraAdapter(modules, dict(adapter.config), name)


def cases(pair: tuple[LoraAdapter, LoraAdapter]) -> dict[str, tuple[LoraAdapter, LoraAdapter]]:
    first, second = pair
    return {
        "zero_both": (transformed(first, "z1", lambda a, b: (a, torch.zeros_like(b))), transformed(second, "z2", lambda a, b: (a, torch.zeros_like(b)))),
        "zero_one": (transformed(first, "z", lambda a, b: (a, torch.zeros_like(b))), second),
        "zero_factors": (transformed(first, "z", lambda a, b: (torch.zeros_like(a), torch.zeros_like(b))), second),
        "identical": (first, transformed(first, "copy", lambda a, b: (a, b))),
        "rank_deficient": (transformed(first, "r1", rank_one), transformed(second, "r1b", rank_one)),
        "huge_ratio": (scaled_to_norm(first, 1e-6, "tiny"), scaled_to_norm(second, 1e6, "huge")),
    }


CASES = ["zero_both", "zero_one", "zero_factors", "identical", "rank_deficient", "huge_ratio"]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_no_nan_and_documented_behaviour(pair, base, calibration, case: str, method: str) -> None:
    first, second = cases(pair)[case]
    result = merge([first, second], method, base, calibration)
    assert set(result.modules) == set(first.modules)
    for key, (b, a) in result.modules.items():
        assert torch.isfinite(b).all() and torch.isfinite(a).all(), (case, method, key)
        assert b.shape[0] == first.modules[key].shape[0] and a.shape[1] == first.modules[key].shape[1]
        merged = result.delta(key)
        total = first.delta(key) + second.delta(key)
        scale = float(first.delta(key).norm() + second.delta(key).norm())
        assert float(merged.norm()) <= 4 * scale + 1e-30, "the merge grew far beyond its inputs"
        if case == "zero_both":
            assert float(merged.abs().max()) == 0.0  # nothing in, nothing out
        if method in ("linear", "knots") and (method == "linear" or case in ("zero_both",)):
            assert relative_error(merged, total) < 1e-5 or float(total.norm()) == 0.0
        if method in ("tsvm", "tada") and case in ("zero_one", "zero_factors"):
            assert relative_error(merged, second.delta(key)) < 1e-5  # a zero update has no singular directions to add
        if method == "pico" and case in ("zero_one", "zero_factors"):
            # A zero adapter counts in T: γ rescales to the mean norm, half of the other's (documented in pico.py).
            assert abs(float(merged.norm()) / float(second.delta(key).norm()) - 0.5) < 1e-4
        if method == "tsvm" and case == "identical":
            assert relative_error(merged, first.delta(key)) < 1e-5  # the polar factor of [U U] turns T copies back into one
        if method == "pico" and case == "identical":
            assert abs(float(merged.norm()) / float(first.delta(key).norm()) - 1) < 1e-4  # γ rescales to the mean norm
        if case == "huge_ratio" and method == "linear":
            # The 1e-6 update is below float32 resolution next to the 1e6 one: the sum is the large update to ~1e-7.
            assert relative_error(merged, second.delta(key)) < 1e-5
        if case == "rank_deficient" and method in ("linear", "tsvm", "pico", "tada"):
            # Methods that combine whole directions keep the rank of the inputs' span (2); element-wise methods
            # (TIES, DARE, KnOTS) act on entries of the cores and may raise it, as they do on dense updates.
            assert int(torch.linalg.matrix_rank(merged, rtol=1e-4)) <= 2


@pytest.mark.parametrize("method", METHODS)
def test_huge_ratio_keeps_the_small_update_when_it_is_alone(pair, base, calibration, method: str) -> None:
    """Norms 1e-6 and 1e6 on different modules: the 1e-6 update survives (no absolute threshold zeroes it)."""
    first, second = pair
    keys = sorted(first.modules)
    tiny = scaled_to_norm(LoraAdapter({keys[0]: first.modules[keys[0]]}, dict(first.config), "tiny"), 1e-6, "tiny")
    huge = scaled_to_norm(LoraAdapter({keys[1]: second.modules[keys[1]]}, dict(second.config), "huge"), 1e6, "huge")
    result = merge([tiny, huge], method, base, calibration)
    for key, adapter in ((keys[0], tiny), (keys[1], huge)):
        merged, alone = result.delta(key), adapter.delta(key)
        assert torch.isfinite(merged).all()
        ratio = float(merged.norm() / alone.norm())
        assert 1e-3 < ratio < 1e3, (method, key, ratio)  # same order of magnitude as the lone input


def half(adapter: LoraAdapter, dtype: torch.dtype, name: str) -> LoraAdapter:
    return transformed(adapter, name, lambda a, b: (a.to(dtype), b.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_is_merged_in_float32_and_written_in_its_dtype(pair, base, calibration, tmp_path: Path, dtype: torch.dtype, method: str) -> None:
    low = [half(adapter, dtype, f"{adapter.name}-{dtype}") for adapter in pair]
    widened = [half(adapter, torch.float32, f"{adapter.name}-f32") for adapter in low]  # the same values, in float32
    out = tmp_path / "merged"
    result = merge(low, method, base, calibration, out_dir=out)
    reference = merge(widened, method, base, calibration)
    assert result.dtype == dtype and reference.dtype == torch.float32
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as handle:
        written = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
    assert {t.dtype for t in written.values()} == {dtype}
    for key, (b, a) in reference.modules.items():
        assert b.dtype == a.dtype == torch.float32  # computed in float32
        assert torch.equal(written[f"{key}.lora_B.weight"], b.to(dtype))  # written = the float32 merge, cast
        assert torch.equal(written[f"{key}.lora_A.weight"], a.to(dtype))
        stored = written[f"{key}.lora_B.weight"].float() @ written[f"{key}.lora_A.weight"].float()
        assert relative_error(stored, reference.delta(key)) < (2e-2 if dtype == torch.bfloat16 else 2e-3)
    reloaded = load_adapter(out)
    assert reloaded.dtype == dtype


def test_mixed_dtypes_are_written_in_the_first_adapters_dtype(pair, tmp_path: Path) -> None:
    first, second = half(pair[0], torch.bfloat16, "bf16"), half(pair[1], torch.float16, "fp16")
    result = merge_adapters([first, second], out_dir=tmp_path / "merged", show_progress=False)
    assert result.dtype == torch.bfloat16 and load_adapter(tmp_path / "merged").dtype == torch.bfloat16


def test_float64_adapters_are_merged_and_written_in_float64(pair, tmp_path: Path) -> None:
    wide = [half(adapter, torch.float64, f"{adapter.name}-f64") for adapter in pair]
    result = merge_adapters(wide, rank="exact", out_dir=tmp_path / "merged", show_progress=False)
    key = next(iter(result.modules))
    assert result.modules[key][0].dtype == torch.float64 and load_adapter(tmp_path / "merged").dtype == torch.float64
    expected = wide[0].delta(key) + wide[1].delta(key)
    assert relative_error(result.modules[key][0] @ result.modules[key][1], expected) < 1e-12


def test_float16_overflow_on_write_is_a_clear_error(tmp_path: Path) -> None:
    """Valid fp16 inputs whose merged factors exceed float16's range (65504): refused, nothing written; float32 works."""
    generator = torch.Generator().manual_seed(0)

    def adapter(name: str) -> LoraAdapter:
        module = LoraModule(A=(torch.randn(4, 32, generator=generator) * 100).half(), B=(torch.randn(32, 4, generator=generator) * 100).half(), scaling=1e6)
        return LoraAdapter({"model.layers.0.q_proj": module}, {"r": 4, "lora_alpha": 4e6}, name)

    out = tmp_path / "merged"
    with pytest.raises(AdapterError, match="overflow torch.float16.*float32"):
        merge_adapters([adapter("a"), adapter("b")], out_dir=out, show_progress=False)
    assert list(tmp_path.iterdir()) == []
    result = merge_adapters([adapter("a"), adapter("b")], show_progress=False)
    result.dtype = torch.float32
    result.save(out)
    assert all(torch.isfinite(m.B).all() for m in load_adapter(out).modules.values())
