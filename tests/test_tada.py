"""TaDA: probe invariance, gates, conflict dropping, calibration inputs and a real merge (ALGORITHMS.md §4)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from mergeprobe import load_adapter, merge_adapters
from mergeprobe.errors import MergeError
from mergeprobe.merging.base import MergeContext, ModuleInputs
from mergeprobe.merging.calibration import calibration_tokens, probe_update_ratios
from mergeprobe.merging.methods.tada import TaDA, probe_gates
from mergeprobe.merging.registry import get_method
from tests.conftest import build_lora_model, build_tiny_llama

KEY = "base_model.model.model.layers.1.self_attn.v_proj"


def tiny_adapter(seed, **kwargs):
    return load_adapter(build_lora_model(seed=seed, r=4, **kwargs))


def random_tokens(n=4, seq=8, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def word_tokenizer():
    """A real transformers tokenizer built in memory (word level, no pad token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cell protein binds to membrane and gene expression".split()
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


# -- gates ------------------------------------------------------------------------
def random_ratios(count, seed=0, modules=12):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i // 4}.p{i % 4}": (torch.rand(count, generator=g, dtype=torch.float64) + 0.05).tolist() for i in range(modules)}


@pytest.mark.parametrize("kappa", [0.01, 3.0, 1000.0])
@pytest.mark.parametrize("which", [0, 1])
def test_gates_invariant_to_adapter_scale(kappa, which):
    ratios = random_ratios(2)
    gates = probe_gates(ratios, ["task", "domain"])
    scaled = {k: [c * kappa if a == which else c for a, c in enumerate(v)] for k, v in ratios.items()}
    assert probe_gates(scaled, ["task", "domain"]) == pytest.approx(gates, abs=1e-12)
    values = torch.tensor(list(gates.values()))
    assert values.mean() == pytest.approx(0.5, abs=0.1) and values.max() - values.min() > 0.2  # a real depth profile


def test_normalized_probe_keeps_gates_invariant_with_several_adapters_per_role():
    ratios = random_ratios(3, seed=1)
    roles = ["task", "domain", "domain"]
    scaled = {k: [v[0], v[1] * 50.0, v[2]] for k, v in ratios.items()}
    assert probe_gates(scaled, roles, normalize=True) == pytest.approx(probe_gates(ratios, roles, normalize=True), abs=1e-12)
    moved = probe_gates(scaled, roles, normalize=False)
    assert max(abs(moved[k] - g) for k, g in probe_gates(ratios, roles, normalize=False).items()) > 0.05


def test_gate_edge_cases():
    assert probe_gates({"a": [1.0, 1.0], "b": [2.0, 2.0]}, ["task", "domain"]) == {"a": 0.5, "b": 0.5}  # spread 0 → z = 0
    gates = probe_gates({"a": [1.0, 0.0], "b": [1.0, 3.0], "c": [3.0, 1.0]}, ["task", "domain"])
    assert gates["a"] == 0.5 and gates["b"] < 0.5 < gates["c"]  # no domain signal in "a": left out of the centring
    assert probe_gates({"b": [1.0, 3.0], "c": [3.0, 1.0]}, ["task", "domain"], beta=0.0) == {"b": 0.5, "c": 0.5}


# -- conflict dropping ----------------------------------------------------------
def conflict_updates():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(8, 4, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(7, 4, generator=g, dtype=torch.float64))[0]
    task = (u[:, [0, 1]] * torch.tensor([3.0, 1.2], dtype=torch.float64), v[:, [0, 1]].T)
    # domain: the shared direction u0 v0ᵀ with the opposite sign, one own direction, and one that
    # overlaps the task's second direction with (uᵀu')(vᵀv') = −0.2·0.2/1.04 ≈ −0.038
    u_mix = (0.2 * u[:, 1] + u[:, 3]) / 1.04**0.5
    v_mix = (-0.2 * v[:, 1] + v[:, 3]) / 1.04**0.5
    domain_u = torch.stack([u[:, 0], u[:, 2], u_mix], 1)
    domain_v = torch.stack([v[:, 0], v[:, 2], v_mix], 1)
    domain = (domain_u * torch.tensor([-2.0, 1.5, 1.0], dtype=torch.float64), domain_v.T)
    shared = torch.outer(u[:, 0], v[:, 0])
    return task, domain, shared


def dense(pair):
    return pair[0] @ pair[1]


def test_conflicting_direction_dropped_from_the_smaller_gated_member():
    task, domain, shared = conflict_updates()
    method = TaDA(gating="uniform")
    out = method.merge_module(ModuleInputs("m", [task, domain], [1.0, 1.0], [True, True]), rank=None)
    assert out.diagnostics["dropped"] == [0, 1] and out.diagnostics["conflicts"] == 1
    assert torch.allclose(dense((out.B, out.A)), dense(task) + dense(domain) + 2.0 * shared, atol=1e-10)

    # gated singular values 0.5·3 < 1·2: now the task's member goes
    out = method.merge_module(ModuleInputs("m", [task, domain], [0.5, 1.0], [True, True]), rank=None)
    assert out.diagnostics["dropped"] == [1, 0]
    assert torch.allclose(dense((out.B, out.A)), 0.5 * dense(task) + dense(domain) - 1.5 * shared, atol=1e-10)

    # θ = 0.01 also catches the weak overlap (−0.038); the task's 1.2 beats the domain's 1.0
    out = TaDA(gating="uniform", theta=0.01).merge_module(ModuleInputs("m", [task, domain], [1.0, 1.0], [True, True]), rank=None)
    assert out.diagnostics["dropped"] == [0, 2] and out.diagnostics["conflicts"] == 2

    out = TaDA(gating="uniform", drop_conflicts=False).merge_module(ModuleInputs("m", [task, domain], [1.0, 1.0], [True, True]), rank=None)
    assert out.diagnostics["dropped"] == [0, 0]
    assert torch.allclose(dense((out.B, out.A)), dense(task) + dense(domain), atol=1e-10)


def test_no_conflicts_between_adapters_of_the_same_role():
    task, domain, _ = conflict_updates()
    out = TaDA(gating="uniform", roles="task, domain, domain").merge_module(
        ModuleInputs("m", [task, domain, domain], [1.0, 1.0, 1.0], [True] * 3), rank=None
    )
    assert out.diagnostics["dropped"] == [0, 1, 1]


# -- the probe -----------------------------------------------------------------
def test_probe_ratio_matches_dense_reference_with_padding_masked():
    model = build_tiny_llama(attention_bias=True)  # biased projections: W₀x is the output minus the bias
    adapter = tiny_adapter(1)
    tokens = calibration_tokens([{"input_ids": random_tokens(1, 9, seed=1)[0]}, {"input_ids": random_tokens(1, 4, seed=2)[0]}])
    probe = probe_update_ratios(model, [adapter], tokens, show_progress=False)

    module = model.model.layers[1].self_attn.v_proj
    captured = []
    handle = module.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    handle.remove()
    x = captured[0].reshape(-1, 32).double()
    keep = tokens.attention_mask.reshape(-1).bool()
    delta, weight = adapter.delta(KEY).double(), module.weight.detach().double()

    def ratio(rows):
        return (rows @ delta.T).norm(dim=1).mean() / (rows @ weight.T).norm(dim=1).mean()

    assert probe.num_tokens == 13
    assert probe.ratios[KEY][0] == pytest.approx(float(ratio(x[keep])), rel=1e-5)
    assert abs(float(ratio(x)) - float(ratio(x[keep]))) > 1e-4  # padding would have changed it


def test_probe_on_peft_model_disables_its_adapters():
    adapters = [tiny_adapter(1), tiny_adapter(2)]
    tokens = calibration_tokens(random_tokens())
    bare = probe_update_ratios(build_tiny_llama(), adapters, tokens, show_progress=False)
    peft_model = build_lora_model(seed=3)
    before = peft_model(input_ids=tokens.input_ids).logits
    wrapped = probe_update_ratios(peft_model, adapters, tokens, show_progress=False)
    for key, ratios in bare.ratios.items():
        assert wrapped.ratios[key] == pytest.approx(ratios, rel=1e-5)
    assert torch.allclose(peft_model(input_ids=tokens.input_ids).logits, before)  # adapters back on afterwards


def test_gates_invariant_end_to_end_on_tiny_llama():
    task, domain = tiny_adapter(1), tiny_adapter(2, lora_alpha=16)
    model, tokens = build_tiny_llama(), random_tokens(6, 10, seed=3)

    def run(first, second):
        return merge_adapters([first, second], method="tada", base_model=model, calibration=tokens, show_progress=False)

    reference = run(task, domain)
    gates = {k: d["gate"] for k, d in reference.diagnostics.items()}
    assert max(gates.values()) - min(gates.values()) > 0.1
    for kappa, first, second in [(0.01, task.scaled(0.01), domain), (1000.0, task.scaled(1000.0), domain), (3.0, task, domain.scaled(3.0))]:
        result = run(first, second)
        assert {k: d["gate"] for k, d in result.diagnostics.items()} == pytest.approx(gates, abs=1e-5)
        index = 0 if first is not task else 1
        for key, diag in result.diagnostics.items():
            assert diag["c"][index] == pytest.approx(kappa * reference.diagnostics[key]["c"][index], rel=1e-4)
            assert diag["c_normalized"] == pytest.approx(reference.diagnostics[key]["c_normalized"], rel=1e-4)
    profile = reference.global_diagnostics["depth_profile"]
    assert set(profile) == {0, 1}


def test_uniform_gates_without_dropping_is_task_arithmetic():
    adapters = [tiny_adapter(1), tiny_adapter(2, lora_alpha=16)]
    common = dict(weights=[0.8, 1.3], base_model=build_tiny_llama(), calibration=random_tokens(), show_progress=False)
    tada = merge_adapters(adapters, method="tada", gating="uniform", drop_conflicts=False, **common)
    linear = merge_adapters(adapters, method="linear", **common)
    for key in linear.modules:
        assert tada.modules[key][1].shape == linear.modules[key][1].shape
        ref = linear.delta(key)
        assert torch.allclose(tada.delta(key), ref, atol=1e-5 * ref.norm()), key
        assert tada.diagnostics[key]["gate"] == 0.5 and "c" in tada.diagnostics[key]


def test_missing_base_model_is_a_merge_error():
    adapters = [tiny_adapter(1), tiny_adapter(2)]
    with pytest.raises(MergeError, match="base_model"):
        merge_adapters(adapters, method="tada", calibration=random_tokens(), show_progress=False)
    with pytest.raises(MergeError, match="base_model"):
        TaDA().prepare(adapters, [1.0, 1.0], MergeContext(calibration=random_tokens()))
    with pytest.raises(MergeError, match="no probe gate"):
        TaDA().merge_module(ModuleInputs("m", [(torch.ones(3, 1), torch.ones(1, 2))] * 2, [1.0, 1.0], [True, True]), rank=1)
    with pytest.raises(MergeError, match="calibration"):
        merge_adapters(adapters, method="tada", base_model=build_tiny_llama(), show_progress=False)
    with pytest.raises(MergeError, match="'task' and one 'domain'"):
        TaDA(roles=["task", "task"]).prepare(adapters, [1.0, 1.0], MergeContext(build_tiny_llama(), random_tokens()))


def test_tada_writes_an_adapter_peft_loads(make_adapter, tmp_path):
    adapters = [make_adapter("task", seed=1, r=4), make_adapter("domain", seed=2, r=4, lora_alpha=16)]
    out = tmp_path / "merged"
    result = merge_adapters(adapters, method="tada", base_model=build_tiny_llama(), calibration=random_tokens(), out_dir=out, show_progress=False)
    model = PeftModel.from_pretrained(build_tiny_llama(), str(out))
    seen = 0
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            ref = result.delta(name)
            assert torch.allclose(module.get_delta_weight("default"), ref, atol=1e-6 * ref.norm()), name
            seen += 1
    assert seen == 14
    report = json.loads((out / "mergeprobe_merge.json").read_text())
    assert set(report["global"]["depth_profile"]) == {"0", "1"}
    assert report["params"]["gating"] == "probe"


# -- calibration inputs ---------------------------------------------------------
def test_calibration_forms(tmp_path):
    tokenizer = word_tokenizer()
    ids = calibration_tokens(random_tokens(40, 5))
    assert ids.num_sequences == 32 and ids.num_tokens == 160  # default: 32 sequences

    ragged = calibration_tokens([{"input_ids": [3, 4, 5]}, {"input_ids": torch.tensor([6, 7]), "attention_mask": [1, 0]}])
    assert ragged.input_ids.tolist() == [[3, 4, 5], [6, 0, 0]] and ragged.num_tokens == 4
    lists = calibration_tokens([[3, 4, 5], torch.tensor([6])])
    assert lists.input_ids.tolist() == [[3, 4, 5], [6, 0, 0]] and lists.num_tokens == 4
    assert calibration_tokens(random_tokens(2, 3).numpy()).input_ids.tolist() == random_tokens(2, 3).tolist()

    encoded = tokenizer(["the cell", "a protein binds to the membrane"])
    from_mapping = calibration_tokens(encoded)
    texts = calibration_tokens(["the cell", "a protein binds to the membrane"], tokenizer)
    file = tmp_path / "calib.txt"
    file.write_text("the cell\n\na protein binds to the membrane\n")
    from_file = calibration_tokens(file, tokenizer)
    for batch in (from_mapping, texts, from_file):
        assert batch.input_ids.tolist() == [[1, 3, 0, 0, 0, 0], [2, 4, 5, 6, 1, 7]]
        assert batch.attention_mask.sum(1).tolist() == [2, 6]
    assert calibration_tokens(str(file), tokenizer, max_sequences=1).num_sequences == 1

    capped = calibration_tokens(random_tokens(4, 5), max_tokens=7)
    assert capped.num_sequences == 2 and capped.attention_mask.sum(1).tolist() == [5, 2]


def test_calibration_errors(tmp_path):
    file = tmp_path / "calib.txt"
    file.write_text("the cell\n")
    with pytest.raises(MergeError, match="tokenizer"):
        calibration_tokens(["the cell"])
    with pytest.raises(MergeError, match="tokenizer"):
        calibration_tokens(file)
    with pytest.raises(MergeError, match="does not exist"):
        calibration_tokens(tmp_path / "missing.txt", word_tokenizer())
    with pytest.raises(MergeError, match="integer token ids"):
        calibration_tokens(torch.rand(2, 3))
    with pytest.raises(MergeError, match="no tokens"):
        calibration_tokens([])
    with pytest.raises(MergeError, match="vocabulary"):
        probe_update_ratios(build_tiny_llama(), [tiny_adapter(1)], calibration_tokens(torch.full((1, 3), 500)), show_progress=False)


def test_text_calibration_through_merge_adapters():
    adapters = [tiny_adapter(1), tiny_adapter(2)]
    result = merge_adapters(
        adapters, method="tada", base_model=build_tiny_llama(), calibration=["the cell binds", "a gene expression"],
        tokenizer=word_tokenizer(), show_progress=False,
    )
    assert result.global_diagnostics["calibration_tokens"] == 6
    assert isinstance(result.params["tokenizer"], str) and len(result.params["tokenizer"]) < 100  # named, not printed
    json.dumps(result.report())
    assert get_method("tada").params()["max_calibration_sequences"] == 32
