import torch
from peft import PeftModel

from mergeprobe import load_adapter, merge_adapters
from tests.conftest import build_tiny_llama


def peft_deltas(path):
    model = PeftModel.from_pretrained(build_tiny_llama(), str(path))
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            out[name] = module.get_delta_weight("default").detach()
    return out

def test_x(make_adapter, tmp_path):
    a = make_adapter("a", seed=1, r=4, lora_alpha=8)
    b = make_adapter("b", seed=2, r=8, lora_alpha=4, use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    res = merge_adapters([a, b], method="linear", weights=[0.7, 1.3], rank="exact", out_dir=tmp_path / "m", show_progress=False)
    da, db, dm = peft_deltas(a), peft_deltas(b), peft_deltas(tmp_path / "m")
    assert set(dm) == set(da)
    for k in dm:
        ref = 0.7 * da[k] + 1.3 * db[k]
        err = (dm[k] - ref).norm() / ref.norm()
        assert err < 1e-5, (k, err)
