"""Pico: the core-space implementation equals a dense reference of ALGORITHMS.md §3."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from mergeprobe import load_adapter, merge_adapters
from mergeprobe.errors import MergeError
from mergeprobe.merging.base import ModuleInputs
from mergeprobe.merging.registry import available_methods, get_method
from tests.conftest import build_tiny_llama

BASES = [
    "linear",
    pytest.param("ties", marks=pytest.mark.skipif("ties" not in available_methods(), reason="ties not available")),
    pytest.param("tsvm", marks=pytest.mark.skipif("tsvm" not in available_methods(), reason="tsvm not available")),
]


def dense_pico(updates, weights, base, rank, rescale, base_params=None):
    """Pico written with dense matrices: dense SVD of B_all, dense ΔW, dense truncation."""
    T = len(updates)
    b_all = torch.cat([b for b, _ in updates], dim=1)
    u, s, _ = torch.linalg.svd(b_all, full_matrices=False)
    shares = s**2 / (s**2).sum()
    alpha = 1.0 / (1.0 + (T - 1) * shares)
    calibrated = [(b + u @ torch.diag(alpha - 1) @ u.T @ b, a) for b, a in updates]
    if base == "linear":
        merged = sum(w * b @ a for (b, a), w in zip(calibrated, weights))
    else:  # the base merger itself is the other engineer's; Pico's part (calibrate, rescale, truncate) is dense here
        out = get_method(base, **(base_params or {})).merge_module(ModuleInputs("m", calibrated, weights, [True] * T), rank=None)
        merged = out.B @ out.A
    gamma = sum(torch.linalg.matrix_norm(w * b @ a) for (b, a), w in zip(updates, weights)) / T / torch.linalg.matrix_norm(merged)
    if rescale:
        merged = gamma * merged
    uu, ss, vh = torch.linalg.svd(merged)
    return uu[:, :rank] @ torch.diag(ss[:rank]) @ vh[:rank], float(gamma), float(shares.max())


def random_updates(shapes, seed, d_out=12, d_in=10):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(d_out, 1, generator=g, dtype=torch.float64)  # one direction crowded across adapters
    out = []
    for r in shapes:
        b = torch.randn(d_out, r, generator=g, dtype=torch.float64) + 2.0 * shared
        out.append((b, torch.randn(r, d_in, generator=g, dtype=torch.float64)))
    return out


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("ranks,weights", [([3, 2], [1.0, 1.0]), ([3, 2, 4], [0.7, 1.2, -0.4])])
def test_pico_equals_dense_reference(base, rescale, ranks, weights):
    updates = random_updates(ranks, seed=len(ranks))
    method = get_method("pico", base=base, rescale=rescale)
    result = method.merge_module(ModuleInputs("m", updates, weights, [True] * len(updates)), rank=3)
    reference, gamma, top = dense_pico(updates, weights, base, 3, rescale)
    got = result.B @ result.A
    assert result.A.shape[0] == 3
    assert torch.allclose(got, reference, atol=1e-9 * reference.norm()), (got - reference).norm() / reference.norm()
    assert result.diagnostics["gamma"] == pytest.approx(gamma, rel=1e-9)
    assert result.diagnostics["top_collision_share"] == pytest.approx(top, rel=1e-9)
    assert top > 1.0 / sum(ranks)  # the shared direction is crowded, so the calibration changed something


def test_pico_differs_from_its_base_merger():
    updates = random_updates([3, 2], seed=5)
    inputs = ModuleInputs("m", updates, [1.0, 1.0], [True, True])
    pico = get_method("pico", rescale=False).merge_module(inputs, rank=None)
    linear = get_method("linear").merge_module(inputs, rank=None)
    # the crowded direction is downscaled: the merge's energy along it shrinks
    shared = torch.linalg.svd(torch.cat([b for b, _ in updates], 1), full_matrices=False)[0][:, :1]
    assert (shared.T @ pico.B @ pico.A).norm() < 0.9 * (shared.T @ linear.B @ linear.A).norm()


def test_pico_absent_adapter_is_left_out_of_T():
    updates = random_updates([3, 2], seed=7)
    empty = (torch.zeros(12, 0, dtype=torch.float64), torch.zeros(0, 10, dtype=torch.float64))
    with_empty = get_method("pico").merge_module(ModuleInputs("m", updates + [empty], [1.0, 1.0, 1.0], [True, True, False]), rank=3)
    without = get_method("pico").merge_module(ModuleInputs("m", updates, [1.0, 1.0], [True, True]), rank=3)
    assert torch.allclose(with_empty.B @ with_empty.A, without.B @ without.A, atol=1e-10)


def test_pico_bad_base_is_a_merge_error():
    inputs = ModuleInputs("m", random_updates([2, 2], seed=1), [1.0, 1.0], [True, True])
    with pytest.raises(MergeError, match="no parameter"):
        get_method("pico", base="linear", base_params={"density": 0.5}).merge_module(inputs, rank=2)
    with pytest.raises(MergeError, match="unknown merge method"):
        get_method("pico", base="nope").merge_module(inputs, rank=2)
    with pytest.raises(MergeError, match="probes a base model"):
        get_method("pico", base="tada").merge_module(inputs, rank=2)


def test_pico_written_adapter_reloads_in_peft(make_adapter, tmp_path):
    paths = [make_adapter("a", seed=1, r=4, lora_alpha=8), make_adapter("b", seed=2, r=2, lora_alpha=4, use_rslora=True)]
    result = merge_adapters(paths, method="pico", weights=[1.0, 0.5], out_dir=tmp_path / "m", show_progress=False)
    loaded = [load_adapter(p) for p in paths]
    model = PeftModel.from_pretrained(build_tiny_llama(), str(tmp_path / "m"))
    seen = 0
    for name, module in model.named_modules():
        if not (hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})):
            continue
        peft_delta = module.get_delta_weight("default").detach().double()
        updates = [tuple(t.double() for t in a.modules[name].folded()) for a in loaded]
        reference, gamma, _ = dense_pico(updates, [1.0, 0.5], "linear", 4, True)
        assert torch.allclose(peft_delta, reference, atol=1e-5 * reference.norm()), name
        assert torch.allclose(result.delta(name).double(), peft_delta, atol=1e-6 * reference.norm()), name
        assert result.diagnostics[name]["gamma"] == pytest.approx(gamma, rel=1e-4)
        seen += 1
    assert seen == len(result.modules) == 14
