"""Baseline merge methods (ties, dare_linear, dare_ties, tsvm, knots) and their shared sparsify operations."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.utils.merge_utils import ties as peft_ties

from mergeprobe import MergeError, merge_adapters
from mergeprobe.core import CoreSpace
from mergeprobe.merging.base import ModuleInputs
from mergeprobe.merging.registry import get_method
from mergeprobe.merging.sparsify import random_drop
from tests.conftest import build_tiny_llama

DT = torch.float64


def rand_update(d_out: int, d_in: int, r: int, seed: int, positive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if positive:
        return torch.rand(d_out, r, generator=g, dtype=DT), torch.rand(r, d_in, generator=g, dtype=DT)
    return torch.randn(d_out, r, generator=g, dtype=DT), torch.randn(r, d_in, generator=g, dtype=DT)


def empty_update(d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(d_out, 0, dtype=DT), torch.zeros(0, d_in, dtype=DT)


def module_inputs(updates, weights=None, key: str = "layers.0.q_proj") -> ModuleInputs:
    weights = weights or [1.0] * len(updates)
    return ModuleInputs(key, list(updates), list(weights), [b.shape[1] > 0 for b, _ in updates])


def merged_dense(method: str, inputs: ModuleInputs, rank: int | None = None, **params) -> torch.Tensor:
    out = get_method(method, **params).merge_module(inputs, rank)
    return out.B @ out.A


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def peft_deltas(model) -> dict[str, dict[str, torch.Tensor]]:
    """Module name → adapter name → ``get_delta_weight`` of every LoRA layer of a PeftModel."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
            out[name] = {adapter: module.get_delta_weight(adapter).detach() for adapter in module.lora_A}
    return out


# --- every method through merge_adapters and back through PEFT -----------------------------------

CASES = [
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.7, "space": "full", "lam": 1.5}),
    ("dare_linear", {"density": 0.6, "seed": 1}),
    ("dare_ties", {"density": 0.6, "space": "full"}),
    ("tsvm", {}),
    ("knots", {"merge": "ties"}),
    ("knots", {"merge": "dare_linear", "density": 0.8}),
]


@pytest.mark.parametrize("n_adapters", [2, 3])
@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{'-'.join(map(str, p.values()))}" for m, p in CASES])
def test_merge_writes_an_adapter_peft_reloads(make_adapter, tmp_path, method, params, n_adapters):
    sources = [
        make_adapter("a", seed=1, r=4, lora_alpha=8),
        make_adapter("b", seed=2, r=2, lora_alpha=4, use_rslora=True),
        # only q/v: every other module gets a zero-width update from this adapter
        make_adapter("c", seed=3, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    ][:n_adapters]
    weights = [0.7, 1.3, 0.9][:n_adapters]
    out = tmp_path / "merged"
    result = merge_adapters(sources, method=method, weights=weights, out_dir=out, show_progress=False, **params)

    reloaded = peft_deltas(PeftModel.from_pretrained(build_tiny_llama(), str(out)))
    assert set(reloaded) == set(result.modules)
    for key, by_adapter in reloaded.items():
        ref = result.delta(key)
        assert ref.norm() > 0, key
        assert rel_err(by_adapter["default"], ref) < 1e-5, key
        assert result.modules[key][1].shape[0] <= 4  # default rank: the largest input rank
    report = json.loads((out / "mergeprobe_merge.json").read_text())
    assert report["method"] == method and report["params"] == result.params
    for diagnostics in result.diagnostics.values():
        assert 0.0 <= diagnostics["energy_kept"] <= 1.0 + 1e-9
        json.dumps(diagnostics, allow_nan=False)


# --- TIES -------------------------------------------------------------------------------------------


def reference_ties(tensors: list[torch.Tensor], density: float, lam: float) -> torch.Tensor:
    """TIES written out entry by entry: trim by a magnitude threshold, elect, disjoint mean."""
    trimmed = []
    for t in tensors:
        k = max(1, round(density * t.numel()))
        threshold = t.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    rows, cols = tensors[0].shape
    out = torch.zeros(rows, cols, dtype=tensors[0].dtype)
    for i in range(rows):
        for j in range(cols):
            values = [float(t[i, j]) for t in trimmed]
            sign = 1.0 if sum(values) >= 0 else -1.0
            agreeing = [v for v in values if v * sign > 0]
            out[i, j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return lam * out


def test_ties_core_space_equals_reference_on_the_cores():
    updates = [rand_update(10, 7, 3, 1), rand_update(10, 7, 2, 2), empty_update(10, 7), rand_update(10, 7, 3, 3)]
    inputs = module_inputs(updates, [0.8, 1.5, 1.0, -0.6])
    space = CoreSpace.from_factors(inputs.weighted)
    expected = space.dense(reference_ties(list(space.cores), density=0.4, lam=1.3))
    got = merged_dense("ties", inputs, density=0.4, lam=1.3)
    assert rel_err(got, expected) < 1e-10
    linear = merged_dense("linear", inputs)
    assert rel_err(got, linear) > 0.05  # the trim and the election really changed something


def test_ties_full_space_equals_peft_ties_on_dense_updates():
    # R = 6 ≥ min(d_out, d_in) = 5, so the full-space truncation keeps everything
    updates = [rand_update(6, 5, 3, 4), rand_update(6, 5, 3, 5)]
    inputs = module_inputs(updates)
    out = get_method("ties", density=0.4, space="full").merge_module(inputs, rank=None)
    assert out.A.shape[0] == 5  # rank=None: min(R, d_out, d_in)
    expected = peft_ties([b @ a for b, a in updates], torch.ones(2, dtype=DT), density=0.4)
    assert rel_err(out.B @ out.A, expected) < 1e-10
    assert 0.0 < out.diagnostics["sign_conflict"] < 1.0


def test_ties_density_one_same_signs_is_mean_times_lam():
    # positive factors: every dense entry positive in both tasks, no sign conflict
    updates = [rand_update(6, 5, 3, 6, positive=True), rand_update(6, 5, 3, 7, positive=True)]
    inputs = module_inputs(updates)
    out = get_method("ties", density=1.0, lam=0.8, space="full").merge_module(inputs, rank=None)
    mean = sum(b @ a for b, a in updates) / 2
    assert rel_err(out.B @ out.A, 0.8 * mean) < 1e-10
    assert out.diagnostics["sign_conflict"] == 0.0
    # core space: a scaled copy has the same signs entry by entry in the cores too
    b, a = rand_update(12, 9, 3, 8)
    copies = module_inputs([(b, a), (2.5 * b, a)])
    assert rel_err(merged_dense("ties", copies, density=1.0, lam=0.8), 0.8 * 1.75 * (b @ a)) < 1e-8


# --- DARE -------------------------------------------------------------------------------------------


def test_random_drop_applies_the_rescale():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 200, generator=g, dtype=DT) + 0.5
    dropped = random_drop(x, 0.5, torch.Generator().manual_seed(1))
    kept = dropped != 0
    assert abs(1 - float(kept.to(DT).mean()) - 0.5) < 0.02
    assert torch.allclose(dropped[kept], 2 * x[kept])
    assert abs(float(dropped.mean() / x.mean()) - 1) < 0.03


def test_dare_full_space_keeps_the_mean_and_drops_one_minus_density():
    # one positive rank-48 update on a 48×48 module: no truncation, the merge is the dropped ΔW itself
    update = rand_update(48, 48, 48, 9, positive=True)
    inputs = module_inputs([update, empty_update(48, 48)])
    out = get_method("dare_linear", density=0.5, space="full", seed=3).merge_module(inputs, rank=None)
    merged, dense = out.B @ out.A, update[0] @ update[1]
    zeroed = merged.abs() < 1e-6 * dense.mean()
    assert abs(float(zeroed.to(DT).mean()) - 0.5) < 0.05
    assert abs(float(merged.mean() / dense.mean()) - 1) < 0.08  # without the 1/density rescale: 0.5
    assert abs(out.diagnostics["dropped_share"] - 0.5) < 0.05


def test_dare_core_space_is_unbiased():
    inputs = module_inputs([rand_update(64, 64, 48, 10), empty_update(64, 64)])
    space = CoreSpace.from_factors(inputs.weighted)
    out = get_method("dare_linear", density=0.5, seed=0).merge_module(inputs, rank=None)
    merged, core = space.project(out.B @ out.A), space.cores[0]
    zeroed = merged.abs() < 1e-8 * core.abs().max()
    assert abs(float(zeroed.to(DT).mean()) - 0.5) < 0.05
    coefficient = float((merged * core).sum() / (core * core).sum())
    assert abs(coefficient - 1) < 0.15  # E[merged] = core; without the rescale: 0.5


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded_per_seed_and_per_module(method):
    inputs = module_inputs([rand_update(8, 6, 3, 11), rand_update(8, 6, 3, 12)])
    first = merged_dense(method, inputs, density=0.5, seed=7)
    assert torch.equal(first, merged_dense(method, inputs, density=0.5, seed=7))
    assert rel_err(first, merged_dense(method, inputs, density=0.5, seed=8)) > 1e-3
    other_key = module_inputs(inputs.updates, key="layers.1.q_proj")
    assert rel_err(first, merged_dense(method, other_key, density=0.5, seed=7)) > 1e-3
    undropped = merged_dense("ties", inputs, density=1.0) if method == "dare_ties" else merged_dense("linear", inputs)
    assert rel_err(merged_dense(method, inputs, density=1.0), undropped) < 1e-10


# --- TSV-M ------------------------------------------------------------------------------------------


def orthogonal_span_updates() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two rank-3 updates on 12×10 whose column spaces and row spaces are orthogonal."""
    (b1, a1), (b2, a2) = rand_update(4, 4, 3, 13), rand_update(4, 4, 3, 14)
    B1, B2 = torch.zeros(12, 3, dtype=DT), torch.zeros(12, 3, dtype=DT)
    A1, A2 = torch.zeros(3, 10, dtype=DT), torch.zeros(3, 10, dtype=DT)
    B1[:4], B2[4:8], A1[:, :4], A2[:, 4:8] = b1, b2, a1, a2
    return [(B1, A1), (B2, A2)]


def test_tsvm_with_orthogonal_spans_is_task_arithmetic():
    inputs = module_inputs(orthogonal_span_updates(), [0.5, 2.0])
    out = get_method("tsvm").merge_module(inputs, rank=None)
    assert rel_err(out.B @ out.A, merged_dense("linear", inputs)) < 1e-10
    assert out.diagnostics["orthogonality_gap"] < 1e-10
    assert out.diagnostics["components_per_task"] == [3, 3]


def test_tsvm_orthogonalises_overlapping_tasks_and_respects_rank():
    inputs = module_inputs([rand_update(6, 6, 4, s) for s in (15, 16, 17)])
    full = get_method("tsvm").merge_module(inputs, rank=None)
    assert full.diagnostics["components_per_task"] == [2, 2, 2]  # ⌊min(6, 6) / 3⌋ each
    assert full.diagnostics["orthogonality_gap"] > 0.1
    assert rel_err(full.B @ full.A, merged_dense("linear", inputs)) > 0.05
    truncated = get_method("tsvm").merge_module(inputs, rank=2)
    assert truncated.A.shape[0] <= 2 and truncated.B.shape[1] <= 2
    assert int(torch.linalg.matrix_rank(truncated.B @ truncated.A)) <= 2


# --- KnOTS ------------------------------------------------------------------------------------------


def test_knots_linear_is_task_arithmetic():
    updates = [rand_update(9, 7, 3, 18), empty_update(9, 7), rand_update(9, 7, 2, 19), rand_update(9, 7, 4, 20)]
    inputs = module_inputs(updates, [1.2, 1.0, -0.4, 0.7])
    assert rel_err(merged_dense("knots", inputs, merge="linear"), merged_dense("linear", inputs)) < 1e-10
    assert rel_err(merged_dense("knots", inputs, merge="ties", density=0.5), merged_dense("linear", inputs)) > 0.05


# --- agreement with PEFT where the definitions coincide --------------------------------------------


def test_linear_at_rank_k_matches_peft_svd_weighted_adapter(make_adapter):
    first = make_adapter("a", seed=21, r=4, lora_alpha=4)
    second = make_adapter("b", seed=22, r=4, lora_alpha=4)
    weights = [0.6, 1.4]
    result = merge_adapters([first, second], method="linear", weights=weights, rank=3, show_progress=False)

    model = PeftModel.from_pretrained(build_tiny_llama(), str(first), adapter_name="a")
    model.load_adapter(str(second), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "merged", combination_type="svd", svd_rank=3)
    deltas = peft_deltas(model)
    assert set(deltas) == set(result.modules)
    for key, by_adapter in deltas.items():
        assert rel_err(result.delta(key), by_adapter["merged"]) < 1e-4, key


# --- parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "name"),
    [
        ("ties", {"density": 0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("dare_linear", {"density": 0.0}, "density"),
        ("dare_ties", {"density": 2}, "density"),
        ("knots", {"density": -0.1}, "density"),
        ("ties", {"space": "dense"}, "space"),
        ("dare_linear", {"space": "weights"}, "space"),
        ("knots", {"merge": "mean"}, "merge"),
        ("tsvm", {"lam": float("nan")}, "lam"),
        ("dare_ties", {"seed": -1}, "seed"),
    ],
)
def test_invalid_parameters_name_the_parameter(method, params, name):
    with pytest.raises(MergeError, match=rf"^{name} must be"):
        get_method(method, **params)


def test_invalid_parameter_fails_before_reading_adapters(tmp_path):
    with pytest.raises(MergeError, match="density"):
        merge_adapters([tmp_path / "missing-a", tmp_path / "missing-b"], method="ties", density=0)


# --- adapters without the module -------------------------------------------------------------------

ALL_SPACES_CASES = [
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.5, "space": "full"}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.5, "space": "full"}),
    ("tsvm", {}),
    ("knots", {"merge": "ties", "density": 0.5}),
    ("knots", {"merge": "dare_ties", "density": 0.5}),
]


@pytest.mark.parametrize(("method", "params"), ALL_SPACES_CASES)
def test_an_adapter_without_the_module_changes_nothing(method, params):
    first, second = rand_update(8, 6, 3, 23), rand_update(8, 6, 2, 24)
    with_absent = module_inputs([first, empty_update(8, 6), second], [0.9, 5.0, 1.1])
    without = module_inputs([first, second], [0.9, 1.1])
    got = merged_dense(method, with_absent, rank=None, **params)
    assert got.norm() > 0
    assert rel_err(got, merged_dense(method, without, rank=None, **params)) < 1e-8
