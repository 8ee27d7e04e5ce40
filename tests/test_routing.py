"""Router and RoutedModel on the tiny Llama: separable inputs are routed right, each row gets its own adapter."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import skops.io as sio
import torch
from peft import LoraConfig

import mergeprobe
from mergeprobe.errors import PredictorError
from mergeprobe.routing import RoutedModel, Router, pooled_hidden_states, sidecar_path
from tests.conftest import ALL_LINEAR, build_lora_model, build_tiny_llama

SEQ = 12


def tokens(low: int, high: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(low, high, (n, SEQ), generator=torch.Generator().manual_seed(seed))


# Two "domains": disjoint, narrow vocabulary ranges. The tiny Llama's embeddings are
# random, so wide ranges would differ only by sampling noise; 8 tokens each make the
# domains as distinct as real domains are to a pretrained model.
def low_batch(n: int = 16, seed: int = 0) -> torch.Tensor:
    return tokens(3, 11, n, seed)  # ids 0–2 are special in the tiny Llama config


def high_batch(n: int = 16, seed: int = 1) -> torch.Tensor:
    return tokens(120, 128, n, seed)


@pytest.fixture(scope="module")
def two_adapter_model():
    """A PeftModel with adapters "default" (for the low domain) and "high", both with random non-zero factors."""
    model = build_lora_model(seed=1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0)
    model.add_adapter("high", config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and ".high." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.set_adapter("default")  # the "low" domain's adapter
    return model.eval()


@pytest.fixture(scope="module")
def router(two_adapter_model):
    ones = torch.ones(16, SEQ, dtype=torch.long)
    return Router.fit(two_adapter_model, {"default": (low_batch(), ones), "high": (high_batch(), None)})


def test_router_separates_disjoint_vocabularies(two_adapter_model, router):
    low, high = low_batch(6, seed=10), high_batch(6, seed=11)
    assert router.predict(two_adapter_model, low) == ["default"] * 6
    assert router.predict(two_adapter_model, high, torch.ones_like(high)) == ["high"] * 6
    assert router.runs == ["default", "high"] and router.hidden_size == 32


def test_router_uses_the_base_model_and_ignores_padding(two_adapter_model):
    ids = low_batch(3, seed=5)
    base = build_tiny_llama()
    torch.testing.assert_close(
        torch.from_numpy(pooled_hidden_states(two_adapter_model, ids)),
        torch.from_numpy(pooled_hidden_states(base, ids)),
    )
    padded = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(3, SEQ, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(
        torch.from_numpy(pooled_hidden_states(base, padded, mask)),
        torch.from_numpy(pooled_hidden_states(base, ids)),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(PredictorError, match="layer 7 does not exist"):
        pooled_hidden_states(base, ids, layer=7)


def test_routed_model_gives_each_row_its_own_adapter(two_adapter_model, router):
    model = two_adapter_model
    low, high = low_batch(2, seed=20), high_batch(2, seed=21)
    ids = torch.stack([low[0], high[0], low[1], high[1]])
    mask = torch.ones_like(ids)
    routed = RoutedModel(model, router)
    assert routed.route(ids, mask) == ["default", "high", "default", "high"]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        logits = routed(ids, mask).logits
        expected = []
        for row, adapter in enumerate(["default", "high", "default", "high"]):
            model.set_adapter(adapter)
            expected.append(model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits[0])
            other = "high" if adapter == "default" else "default"
            model.set_adapter(other)
            wrong = model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits[0]
            assert not torch.allclose(wrong, expected[-1], atol=1e-4)  # the adapters really differ
        model.set_adapter("default")
    torch.testing.assert_close(logits, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert model.active_adapter == "default"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_routed_generate_matches_per_adapter_generate(two_adapter_model, router):
    model = two_adapter_model
    ids = torch.stack([high_batch(1, seed=30)[0], low_batch(1, seed=31)[0]])
    routed = RoutedModel(model, router)
    out = routed.generate(ids, torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 2
    for row, adapter in enumerate(["high", "default"]):
        model.set_adapter(adapter)
        ref = model.generate(
            input_ids=ids[row : row + 1],
            attention_mask=torch.ones_like(ids[row : row + 1]),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )[0]
        assert torch.equal(out[row, : ref.shape[0]], ref)
    model.set_adapter("default")
    assert model.active_adapter == "default"


def test_router_save_load_round_trip(two_adapter_model, router, tmp_path):
    path = router.save(tmp_path / "router.skops")
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["runs"] == ["default", "high"] and meta["layer"] == -1
    loaded = Router.load(path)
    ids = torch.cat([low_batch(3, seed=40), high_batch(3, seed=41)])
    assert loaded.predict(two_adapter_model, ids) == router.predict(two_adapter_model, ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router.skops", "router.skops.json"]


def test_router_load_refuses_bad_files(router, tmp_path):
    path = router.save(tmp_path / "router.skops")
    side = sidecar_path(path)
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "runs": ["a", "b", "c"]}))
    with pytest.raises(PredictorError, match="does not match its sidecar"):
        Router.load(path)
    side.unlink()
    with pytest.raises(PredictorError, match="sidecar"):
        Router.load(path)
    evil = tmp_path / "evil.skops"
    router.classifier.extra_ = OrderedDict(a=1)
    try:
        sio.dump(router.classifier, evil)
    finally:
        del router.classifier.extra_
    sidecar_path(evil).write_text(json.dumps(meta))
    with pytest.raises(PredictorError, match=r"collections\.OrderedDict"):
        Router.load(evil)


def test_routed_model_checks_adapters(two_adapter_model, router):
    stranger = Router(router.classifier, ["default", "absent"], router.layer, router.hidden_size)
    with pytest.raises(PredictorError, match="absent"):
        RoutedModel(two_adapter_model, stranger)
    with pytest.raises(PredictorError, match="at least two runs"):
        Router.fit(two_adapter_model, {"default": (low_batch(), None)})


def test_reexported():
    assert mergeprobe.Router is Router and mergeprobe.RoutedModel is RoutedModel
