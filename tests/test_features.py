"""Tests of mergeprobe.features: pairwise and set features, alignment profiles, cross-disturbance."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mergeprobe.adapters import LoraAdapter, LoraModule, load_adapter, module_kind, module_layer
from mergeprobe.features import (
    MODULE_FEATURES,
    alignment_profile,
    b_collision_shares,
    MEMBER_PREFIXES,
    cross_disturbance,
    member_features,
    module_pair_features,
    oriented_pairwise_features,
    pairwise_features,
    per_module_features,
    set_cross_disturbance,
    set_features,
    subspace_overlap,
    swap_cross,
    symmetric_part,
    update_norm,
)
from mergeprobe.signals import RunSignals, self_disturbance, update_between
from tests.conftest import build_lora_model, build_tiny_llama

K = 8


@functools.lru_cache(maxsize=None)
def _random_adapter(model_seed: int) -> LoraAdapter:
    return load_adapter(build_lora_model(seed=model_seed))


def _signals(model_seed: int, sign: float = 1.0, scale: float = 1.0, batch_seed: int | None = None) -> RunSignals:
    """RunSignals of a random LoRA on the tiny Llama (window start B = 0), without training."""
    end = _random_adapter(model_seed)
    start = LoraAdapter({k: LoraModule(m.A, torch.zeros_like(m.B), m.scaling) for k, m in end.modules.items()}, end.config)
    update = {k: (sign * scale * b, a) for k, (b, a) in update_between(start, end).items()}
    g = torch.Generator().manual_seed(model_seed)
    gradient = {k: sign * torch.randn(K, K, generator=g) for k in update}
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(model_seed if batch_seed is None else batch_seed))
    return RunSignals(
        update=update,
        end_factors={k: m.folded() for k, m in end.modules.items()},
        gradient=gradient,
        disturbance=torch.tensor([0.1, 0.3]) * scale,
        relative_change=torch.tensor([0.2, 0.4]) * scale,
        probe_input_ids=ids,
        probe_attention_mask=torch.ones_like(ids),
        sketch_dim=K,
        sketch_seed=0,
    )


def test_update_alignment_is_one_with_itself_and_minus_one_with_its_negation():
    run = _signals(1)
    same = pairwise_features(run, run)
    negated = pairwise_features(run, _signals(1, sign=-1.0))
    for name in ("mean", "min", "max", "shallow", "q_proj", "down_proj"):
        assert same[f"update_alignment.{name}"] == pytest.approx(1.0, abs=1e-5)
        assert negated[f"update_alignment.{name}"] == pytest.approx(-1.0, abs=1e-5)
    assert same["gradient_alignment.mean"] == pytest.approx(1.0, abs=1e-6)
    assert negated["gradient_alignment.mean"] == pytest.approx(-1.0, abs=1e-6)
    assert same["a_overlap.mean"] == pytest.approx(1.0, abs=1e-5) and same["b_overlap.min"] == pytest.approx(1.0, abs=1e-5)
    assert same["log_norm_ratio.max"] == pytest.approx(0.0, abs=1e-6)


def test_unrelated_runs_are_less_aligned_and_features_are_symmetric():
    a, b = _signals(1), _signals(2, scale=3.0)
    ab, ba = pairwise_features(a, b), pairwise_features(b, a)
    assert ab.keys() == ba.keys()
    for name, value in ab.items():
        assert value == pytest.approx(ba[name], abs=1e-5), name
    assert abs(ab["update_alignment.mean"]) < 0.3
    scaled = pairwise_features(a, _signals(1, scale=3.0))
    assert scaled["log_norm_ratio.min"] == pytest.approx(math.log(3.0), abs=1e-4)
    assert scaled["update_alignment.min"] == pytest.approx(1.0, abs=1e-5)
    assert ab["a_overlap.max"] < 0.9  # independent random A rows in a 32–64 dim space
    assert ab["self_disturbance.max"] == pytest.approx(0.9, abs=1e-6)


def test_feature_names_are_stable_and_documented():
    features = pairwise_features(_signals(1), _signals(2))
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    expected = {f"{f}.{g}" for f in MODULE_FEATURES for g in ("mean", "max", "min", "shallow", "middle", "deep", *kinds)}
    expected |= {f"{s}.{g}" for s in ("self_disturbance", "self_relative_change") for g in ("mean", "max")}
    assert set(features) == expected
    # two layers: layer 0 → shallow, layer 1 → middle; the empty deep third takes the mean
    assert features["update_alignment.deep"] == features["update_alignment.mean"]
    assert features["update_alignment.shallow"] != features["update_alignment.middle"]


def test_features_are_finite_for_zero_updates_and_zero_sketches():
    zero = _signals(1, scale=0.0)
    zero.gradient = {k: torch.zeros(K, K) for k in zero.gradient}
    for features in (pairwise_features(zero, zero), pairwise_features(zero, _signals(2))):
        assert all(math.isfinite(v) for v in features.values())
        assert features["update_alignment.max"] == 0.0 and features["gradient_alignment.max"] == 0.0
        assert features["b_overlap.max"] == 0.0 and features["a_overlap.max"] <= 1.0 + 1e-6
    assert pairwise_features(zero, zero)["b_crowding_top.max"] == 0.0


def test_module_features_on_hand_built_factors():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(10, 2, generator=g), torch.randn(2, 7, generator=g)
    other_b = torch.linalg.qr(torch.cat([b, torch.randn(10, 2, generator=g)], 1))[0][:, 2:]  # ⟂ to b
    features = module_pair_features((b, a), (other_b, a))
    assert features["update_alignment"] == pytest.approx(0.0, abs=1e-5)
    assert features["b_overlap"] == pytest.approx(0.0, abs=1e-5) and features["a_overlap"] == pytest.approx(1.0, abs=1e-5)
    assert "gradient_alignment" not in features
    # identical B: the stack has rank 2 of 4 columns — crowded
    crowded = module_pair_features((b, a), (b, a))
    assert crowded["b_crowding_top"] > features["b_crowding_top"]
    assert crowded["b_crowding_entropy"] < features["b_crowding_entropy"]
    assert float(b_collision_shares([b, b])[2:].abs().max()) < 1e-6
    assert subspace_overlap(torch.zeros(5, 2), torch.randn(5, 2)) == 0.0


def test_alignment_profile_matches_per_module_values():
    a, b = _signals(1), _signals(2)
    layers, kinds, matrix = alignment_profile(a, b)
    assert layers == [0, 1] and len(kinds) == 7 and matrix.shape == (2, 7)
    key = "base_model.model.model.layers.1.self_attn.v_proj"
    expected = module_pair_features(a.update[key], b.update[key])["update_alignment"]
    assert float(matrix[1, kinds.index("v_proj")]) == pytest.approx(expected, abs=1e-6)
    _, _, grad_matrix = alignment_profile(a, a, signal="gradient")
    assert torch.allclose(grad_matrix, torch.ones(2, 7), atol=1e-6)
    with pytest.raises(ValueError):
        alignment_profile(a, b, signal="loss")


def test_incomparable_sketches_are_refused():
    other = _signals(2)
    other.sketch_seed = 1
    with pytest.raises(ValueError, match="sketch"):
        pairwise_features(_signals(1), other)


def test_cross_disturbance_is_zero_with_a_zero_partner_and_positive_otherwise():
    base = build_tiny_llama()
    a, zero = _signals(1), _signals(2, scale=0.0)
    quiet = cross_disturbance(base, a, zero)
    assert quiet["disturbance.a"].shape == (2,) and quiet["relative_change.b"].shape == (2,)
    # on a's batch the merge a + 0 is a itself ...
    assert float(quiet["disturbance.a"].max()) < 1e-6 and float(quiet["relative_change.a"].max()) < 1e-5
    # ... while on the partner's batch merging in a is a real change to the partner's (base) states
    assert float(quiet["disturbance.b"].min()) > 1e-3
    loud = cross_disturbance(base, a, _signals(2, batch_seed=5))
    assert loud["cross_disturbance.max"] > 1e-3 and loud["cross_relative_change.mean"] > 1e-2
    features = pairwise_features(a, zero, quiet)
    assert {"cross_disturbance.mean", "cross_disturbance.max", "cross_relative_change.mean"} <= set(features)
    assert "disturbance.a" not in features


def test_cross_disturbance_with_a_shared_cache_of_own_states_is_unchanged():
    base = build_tiny_llama()
    a, b, c = _signals(1), _signals(2, batch_seed=5), _signals(3, batch_seed=6)
    cache: dict = {}
    for other in (b, c):
        cached, fresh = cross_disturbance(base, a, other, own_states=cache), cross_disturbance(base, a, other)
        assert cached.keys() == fresh.keys()
        for name, value in fresh.items():
            assert torch.equal(cached[name], value) if isinstance(value, torch.Tensor) else cached[name] == value
    assert set(cache) == {id(a), id(b), id(c)}


def test_cross_disturbance_does_not_depend_on_how_the_passes_are_chunked():
    base = build_tiny_llama()
    a, b = _signals(1), _signals(2, batch_seed=5)
    whole = cross_disturbance(base, a, b)  # each probe batch in one pass (token budget)
    for chunking in ({"batch_size": 1}, {"max_tokens": 1}):
        split = cross_disturbance(base, a, b, **chunking)
        assert split.keys() == whole.keys()
        for name, value in whole.items():
            if isinstance(value, torch.Tensor):
                assert torch.allclose(split[name], value, rtol=1e-4, atol=1e-6), name
            else:
                assert split[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    cross_all = set_cross_disturbance(base, [a, b], batch_size=1)
    assert torch.allclose(cross_all["disturbance.1"], whole["disturbance.b"], rtol=1e-4, atol=1e-6)


def test_adapted_states_of_the_self_disturbance_are_the_own_states_of_the_cross_disturbance():
    # The probe seeds the cache with its self-disturbance's adapted states when its update is the window-end ΔW
    # (B started at 0), saving a pass: the result must be bitwise what the uncached computation gives.
    model = build_lora_model(seed=1)  # run a's own PeftModel, as in the callback
    a, b = _signals(1), _signals(2, batch_seed=5)
    assert all(torch.equal(a.update[k][0], a.end_factors[k][0]) and torch.equal(a.update[k][1], a.end_factors[k][1]) for k in a.update)
    _, adapted = self_disturbance(model, a.end_factors, a.probe_input_ids, a.probe_attention_mask)
    fresh = cross_disturbance(model, a, b)
    seeded = cross_disturbance(model, a, b, own_states={id(a): adapted})
    assert seeded.keys() == fresh.keys()
    for name, value in fresh.items():
        assert torch.equal(seeded[name], value) if isinstance(value, torch.Tensor) else seeded[name] == value
    assert oriented_pairwise_features(a, b, seeded) == oriented_pairwise_features(a, b, fresh)


def test_alignment_profile_cells_are_the_per_module_means_exactly():
    a, b = _signals(1), _signals(2, sign=-1.0)
    table = per_module_features(a, b)
    for signal, name in (("update", "update_alignment"), ("gradient", "gradient_alignment")):
        layers, kinds, matrix = alignment_profile(a, b, signal=signal)
        for key, row in table.items():
            cell = matrix[layers.index(module_layer(key)), kinds.index(module_kind(key))]
            assert float(cell) == float(torch.tensor(row[name], dtype=torch.float32))


def test_set_features_aggregate_pairs_and_add_the_set_cross_disturbance():
    runs = [_signals(1), _signals(2), _signals(1, sign=-1.0)]
    pairs = [pairwise_features(runs[i], runs[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    cross_all = set_cross_disturbance(build_tiny_llama(), runs)
    assert {"disturbance.0", "disturbance.2"} <= set(cross_all)
    features = set_features(runs, pairs, cross_all)
    assert features["set_size"] == 3.0
    assert features["update_alignment.mean.pair_min"] == pytest.approx(-1.0, abs=1e-5)
    values = [p["update_alignment.mean"] for p in pairs]
    assert features["update_alignment.mean.pair_mean"] == pytest.approx(sum(values) / 3)
    assert features["update_alignment.mean.pair_max"] == pytest.approx(max(values))
    # runs 0 and 2 cancel, so the merge of all three is run 1 alone: each member's own update is disturbed
    assert features["set_cross_disturbance.max"] > 1e-3
    assert all(math.isfinite(v) for v in features.values())


def test_member_features_tell_the_two_members_of_a_pair_apart():
    base = build_tiny_llama()
    a, zero = _signals(1), _signals(2, scale=0.0)
    cross = cross_disturbance(base, a, zero)
    for_a = oriented_pairwise_features(a, zero, cross)
    for_zero = oriented_pairwise_features(zero, a, swap_cross(cross))
    # the symmetric part is the pair's, whichever member is asked about
    assert symmetric_part(for_a) == pairwise_features(a, zero, cross)
    assert symmetric_part(for_zero) == pytest.approx(symmetric_part(for_a), rel=1e-5)
    # a keeps itself in a + 0, the zero adapter's (base) states move: the members differ, and the roles swap exactly
    assert for_a["member.cross_disturbance.max"] < 1e-6 < for_zero["member.cross_disturbance.max"]
    assert for_a["partner.cross_disturbance.mean"] == pytest.approx(for_zero["member.cross_disturbance.mean"])
    assert for_zero["partner.cross_relative_change.mean"] == pytest.approx(for_a["member.cross_relative_change.mean"])
    assert for_a["member.self_disturbance.mean"] == pytest.approx(0.2)
    assert for_zero["member.self_disturbance.mean"] == 0.0
    assert all(math.isfinite(v) for v in [*for_a.values(), *for_zero.values()])


def test_member_log_norm_ratio_is_signed_and_antisymmetric():
    a, b = _signals(1), _signals(2, scale=3.0)
    assert update_norm(_signals(2, scale=3.0)) == pytest.approx(3.0 * update_norm(_signals(2)))
    ab, ba = member_features(a, [b], None), member_features(b, [a], None)
    assert ab["member.log_norm_ratio"] == pytest.approx(-ba["member.log_norm_ratio"])
    assert ab["member.log_norm_ratio"] == pytest.approx(math.log(update_norm(a) / update_norm(b)))
    # without a forward pass only the self and norm features are there
    assert set(ab) == {"member.self_disturbance.mean", "member.self_relative_change.mean", "member.log_norm_ratio"}
    assert all(k.startswith(MEMBER_PREFIXES) for k in ab)


def test_member_features_in_a_set_average_over_partners():
    runs = [_signals(1), _signals(2, batch_seed=5), _signals(3, batch_seed=6)]
    cross_all = set_cross_disturbance(build_tiny_llama(), runs)
    features = member_features(runs[0], runs[1:], cross_all, ("0", ("1", "2")))
    partner = [float(cross_all[f"disturbance.{i}"].double().mean()) for i in (1, 2)]
    assert features["partner.cross_disturbance.mean"] == pytest.approx(sum(partner) / 2)
    assert features["member.cross_disturbance.max"] == pytest.approx(float(cross_all["disturbance.0"].max()))
    with pytest.raises(ValueError, match="partner"):
        member_features(runs[0], runs[1:], cross_all, ("0", ("1",)))
    with pytest.raises(ValueError, match="at least one partner"):
        member_features(runs[0], [], None)


# --- The batched fast path against the per-module computation it replaced ---------------------------------------------


def _reference_basis(matrix: torch.Tensor) -> torch.Tensor:
    """The former per-matrix ``_numerical_basis``: SVD in the compute dtype, float32-level rank tolerance."""
    matrix = matrix.to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return u[:, :0]
    return u[:, : int((s > s[0] * max(matrix.shape) * torch.finfo(torch.float32).eps).sum())]


def _reference_overlap(first: torch.Tensor, second: torch.Tensor) -> float:
    q_1, q_2 = _reference_basis(first), _reference_basis(second)
    rank = min(q_1.shape[1], q_2.shape[1])
    return 0.0 if rank == 0 else float(((q_1.T @ q_2.to(q_1.dtype)) ** 2).sum() / rank)


def _reference_module_features(update_a, update_b, gradient_a=None, gradient_b=None) -> dict[str, float]:
    """One module at a time, the way module_pair_features computed it before batching (dense ΔW: small shapes only)."""
    (b_a, a_a), (b_b, a_b) = update_a, update_b
    dtype = torch.float64 if torch.float64 in (b_a.dtype, a_a.dtype, b_b.dtype, a_b.dtype) else torch.float32
    dense_a, dense_b = b_a.to(dtype) @ a_a.to(dtype), b_b.to(dtype) @ a_b.to(dtype)
    norm_a, norm_b = float(torch.linalg.norm(dense_a)), float(torch.linalg.norm(dense_b))
    cosine = 0.0 if norm_a * norm_b <= 1e-12 else max(-1.0, min(1.0, float((dense_a * dense_b).sum()) / (norm_a * norm_b)))
    s = torch.linalg.svdvals(torch.cat([b_a.to(dtype), b_b.to(dtype)], dim=1))
    shares = s**2 / (s**2).sum() if float((s**2).sum()) > 0 else torch.zeros_like(s)
    positive = shares[shares > 0]
    entropy = float(-(positive * positive.log()).sum() / math.log(len(shares))) if len(positive) and len(shares) > 1 else 0.0
    features = {
        "update_alignment": cosine,
        "log_norm_ratio": abs(math.log((norm_a + 1e-12) / (norm_b + 1e-12))),
        "b_crowding_top": float(shares.max()),
        "b_crowding_entropy": entropy,
        "a_overlap": _reference_overlap(a_a.T, a_b.T),
        "b_overlap": _reference_overlap(b_a, b_b),
    }
    if gradient_a is not None and gradient_b is not None:
        g_a, g_b = gradient_a.double(), gradient_b.double()
        norms = float(torch.linalg.norm(g_a) * torch.linalg.norm(g_b))
        features["gradient_alignment"] = 0.0 if norms <= 1e-12 else max(-1.0, min(1.0, float((g_a * g_b).sum()) / norms))
    return features


def _reference_summaries(table: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = list(table)
    num_layers = max(module_layer(k) for k in keys) + 1
    third = {k: ("shallow", "middle", "deep")[min(2, 3 * module_layer(k) // num_layers)] for k in keys}
    out = {}
    for name in MODULE_FEATURES:
        values = {k: row[name] for k, row in table.items() if name in row}
        mean = sum(values.values()) / len(values)
        out |= {f"{name}.mean": mean, f"{name}.max": max(values.values()), f"{name}.min": min(values.values())}
        for group in ("shallow", "middle", "deep", *sorted({module_kind(k) for k in keys})):
            members = [v for k, v in values.items() if group in (third[k], module_kind(k))]
            out[f"{name}.{group}"] = sum(members) / len(members) if members else mean
    return out


def _mixed_runs(dtype_b: torch.dtype = torch.float32) -> tuple[RunSignals, RunSignals]:
    """Two runs on modules of mixed shapes and ranks, with the edge cases the batched path must get right."""
    g = torch.Generator().manual_seed(7)
    shapes = {"self_attn.q_proj": (12, 12), "self_attn.k_proj": (6, 12), "mlp.up_proj": (20, 12), "mlp.down_proj": (12, 20)}
    runs = []
    for run, (rank, dtype) in enumerate(((4, torch.float32), (8, dtype_b))):
        update, gradient = {}, {}
        for layer in range(4):
            for name, (d_out, d_in) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{name}"
                r = rank if (layer + run) % 2 else 4  # rank 4 against rank 8 (a 2r update) in half the modules
                b, a = torch.randn(d_out, r, generator=g) * 0.1, torch.randn(r, d_in, generator=g)
                if (run, layer, name) == (0, 1, "self_attn.q_proj"):
                    b = torch.zeros_like(b)  # a module not updated in one run
                if layer == 2 and name == "mlp.up_proj":
                    b = torch.zeros_like(b)  # ... nor in the other
                if (run, layer) == (1, 2):
                    b[:, 1] = 2 * b[:, 0]  # rank-deficient B
                    a[2] = a[0] - a[1]  # rank-deficient A
                update[key] = (b.to(dtype), a.to(dtype))
                if (run, layer, name) != (1, 0, "mlp.down_proj"):  # one module without a sketch
                    gradient[key] = torch.randn(K, K, generator=g) * (0.0 if layer == 3 and name == "mlp.up_proj" else 1.0)
        only = f"base_model.model.model.layers.0.self_attn.{'v' if run else 'o'}_proj"  # in one run only: excluded
        update[only] = (torch.randn(12, 4, generator=g), torch.randn(4, 12, generator=g))
        ids = torch.ones(1, 4, dtype=torch.long)
        runs.append(RunSignals(update, update, gradient, torch.rand(3, generator=g), torch.rand(3, generator=g), ids, ids, K, 0))
    return runs[0], runs[1]


@pytest.mark.parametrize("dtype_b", [torch.float32, torch.float64])
def test_batched_features_equal_the_per_module_computation(dtype_b):
    a, b = _mixed_runs(dtype_b)
    shared = sorted(set(a.update) & set(b.update))
    reference = {k: _reference_module_features(a.update[k], b.update[k], a.gradient.get(k), b.gradient.get(k)) for k in shared}
    table = per_module_features(a, b)
    assert list(table) == shared and len(shared) == 16
    for key, expected in reference.items():
        assert list(table[key]) == list(expected), key  # names, order, gradient_alignment only where both sketches are
        single = module_pair_features(a.update[key], b.update[key], a.gradient.get(key), b.gradient.get(key))
        for name, value in expected.items():
            assert table[key][name] == pytest.approx(value, abs=1e-6), (key, name)
            assert single[name] == pytest.approx(value, abs=1e-6), (key, name)
    # the edge cases are in there: zero updates, rank-deficient factors, ranks 4 against 8
    zero = "base_model.model.model.layers.2.mlp.up_proj"
    assert table[zero]["update_alignment"] == 0.0 and table[zero]["b_overlap"] == 0.0 and table[zero]["b_crowding_top"] == 0.0
    one_zero = "base_model.model.model.layers.1.self_attn.q_proj"
    assert table[one_zero]["update_alignment"] == 0.0 and table[one_zero]["b_overlap"] == 0.0
    assert table[one_zero]["log_norm_ratio"] > 10
    deficient, narrow = "base_model.model.model.layers.2.self_attn.q_proj", "base_model.model.model.layers.2.self_attn.k_proj"
    assert b.update[deficient][0].shape[1] == 8 and _reference_basis(b.update[deficient][0]).shape[1] == 7
    assert _reference_basis(b.update[deficient][1].T).shape[1] == 7
    assert b.update[narrow][0].shape == (6, 8)  # d_out = 6 < 4 + 8 stacked columns
    assert table["base_model.model.model.layers.0.mlp.down_proj"].keys() == set(MODULE_FEATURES) - {"gradient_alignment"}
    # and the summaries are the same means, maxima and minima of those values
    features = pairwise_features(a, b)
    expected = _reference_summaries(reference)
    assert [k for k in features if not k.startswith("self_")] == sorted(expected)
    for name, value in expected.items():
        assert features[name] == pytest.approx(value, abs=1e-6), name
    profile_layers, kinds, matrix = alignment_profile(a, b)
    for key, row in table.items():
        cell = matrix[profile_layers.index(module_layer(key)), kinds.index(module_kind(key))]
        assert float(cell) == float(torch.tensor(row["update_alignment"], dtype=torch.float32))


def test_numerical_ranks_use_the_tolerance_of_the_original_factor():
    # σ_4 / σ_1 = 1.6e-6 of B (20 × 4) lies between the float32-level tolerances of B itself (20 eps ≈ 2.4e-6) and of
    # its 8 × 4 block of core-space coordinates (8 eps ≈ 9.5e-7): the direction is dropped, as it was for B itself.
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(20, 7, generator=g, dtype=torch.float64))[0]
    u, w = basis[:, :4], basis[:, 4:]
    v = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    b = ((u * torch.tensor([1.0, 0.5, 0.3, 1.6e-6], dtype=torch.float64)) @ v.T).float()
    other = torch.cat([u[:, 3:], w], dim=1).float()  # B's dropped direction and three orthogonal to all of B
    a = torch.randn(4, 12, generator=g)
    assert _reference_basis(b).shape[1] == 3
    assert _reference_overlap(b, other) == pytest.approx(0.0, abs=1e-6)  # 0.25 if the 4th direction were kept
    assert module_pair_features((b, a), (other, a))["b_overlap"] == pytest.approx(0.0, abs=1e-6)
    assert subspace_overlap(b, other) == pytest.approx(0.0, abs=1e-6)
