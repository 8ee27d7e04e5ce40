"""Bad inputs to ``merge_adapters`` and ``mergeprobe merge``: each is a clear error and leaves nothing behind.

Every error case runs through the Python API and through the CLI: the message must name
the offending input and say how to fix it, the CLI must print it as one ``error: …``
line with exit code 2 and no traceback, and neither the output directory nor a
temporary directory beside it may be left.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergeprobe import load_adapter, merge_adapters
from mergeprobe.cli import app
from mergeprobe.errors import AdapterError, MergeError, MergeProbeError, OutputExistsError, UnsupportedAdapterError
from mergeprobe.merging import available_methods
from mergeprobe.merging.registry import method_class
from tests.conftest import build_lora_model, build_tiny_llama

VIA = ["api", "cli"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two valid rank-4 adapters on the tiny Llama, saved once for the whole module."""
    root = tmp_path_factory.mktemp("pair")
    paths = []
    for name, seed in (("a", 1), ("b", 2)):
        build_lora_model(seed=seed, target_modules=["q_proj", "v_proj"]).save_pretrained(str(root / name))
        paths.append(root / name)
    return paths[0], paths[1]


def copy_adapter(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def edit_config(adapter: Path, **changes: object) -> None:
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def assert_nothing_written(out: Path) -> None:
    """Neither ``out`` nor a temporary/trash directory beside it exists."""
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


def merge_error(via: str, adapters: list[Path], out: Path, method: str = "linear", cli_args: tuple[str, ...] = (), **api_kwargs: object) -> str:
    """Run a merge that must fail; return the error message (API exception text or the CLI's error line)."""
    if via == "api":
        with pytest.raises(MergeProbeError) as info:
            merge_adapters(adapters, method=method, out_dir=out, show_progress=False, **api_kwargs)
        return str(info.value)
    result = CliRunner().invoke(app, ["merge", *map(str, adapters), "--method", method, "--out", str(out), *cli_args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    return error_lines[0]


@pytest.mark.parametrize("via", VIA)
def test_different_base_models_are_refused_unless_allowed(via: str, pair: tuple[Path, Path], tmp_path: Path) -> None:
    a = copy_adapter(pair[0], tmp_path / "a")
    b = copy_adapter(pair[1], tmp_path / "b")
    edit_config(a, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    edit_config(b, base_model_name_or_path="mistralai/Mistral-7B-v0.1")
    out = tmp_path / "merged"
    message = merge_error(via, [a, b], out)
    assert "meta-llama/Llama-2-7b-hf" in message and "mistralai/Mistral-7B-v0.1" in message
    assert str(a) in message and str(b) in message
    assert "--allow-base-mismatch" in message
    assert_nothing_written(out)

    if via == "api":
        merge_adapters([a, b], out_dir=out, allow_base_mismatch=True, show_progress=False)
    else:
        result = CliRunner().invoke(app, ["merge", str(a), str(b), "--method", "linear", "--out", str(out), "--allow-base-mismatch"])
        assert result.exit_code == 0, result.output
    assert load_adapter(out).modules.keys() == load_adapter(a).modules.keys()


@pytest.mark.parametrize("via", VIA)
def test_same_module_with_different_shapes(via: str, pair: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    wide = get_peft_model(build_tiny_llama(hidden_size=48), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wide.save_pretrained(str(tmp_path / "wide"))
    out = tmp_path / "merged"
    message = merge_error(via, [pair[0], tmp_path / "wide"], out)
    assert "q_proj" in message or "v_proj" in message
    assert "32×32" in message and "48×48" in message
    assert str(tmp_path / "wide") in message
    assert "same base model" in message
    assert_nothing_written(out)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_non_finite_weights_name_adapter_and_module(via: str, bad_value: float, pair: tuple[Path, Path], tmp_path: Path) -> None:
    broken = copy_adapter(pair[1], tmp_path / "broken")
    weights_file = broken / "adapter_model.safetensors"
    tensors = load_file(str(weights_file))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = bad_value
    save_file(tensors, str(weights_file))
    out = tmp_path / "merged"
    message = merge_error(via, [pair[0], broken], out)
    assert str(broken) in message
    assert key.removesuffix(".lora_B.weight") in message
    assert "NaN or Inf" in message and "Retrain" in message
    assert_nothing_written(out)


def _ia3(path: Path) -> None:
    from peft import IA3Config, get_peft_model

    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(build_tiny_llama(), config).save_pretrained(str(path))


def _lokr(path: Path) -> None:
    from peft import LoKrConfig, get_peft_model

    get_peft_model(build_tiny_llama(), LoKrConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(path))


def _dora(path: Path) -> None:
    build_lora_model(seed=3, target_modules=["q_proj", "v_proj"], use_dora=True).save_pretrained(str(path))


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize(("kind", "build", "words"), [("ia3", _ia3, ["IA3", "LoRA adapters only"]), ("lokr", _lokr, ["LOKR", "LoRA adapters only"]), ("dora", _dora, ["DoRA", "use_dora=False"])])
def test_unsupported_adapters(via: str, kind: str, build, words: list[str], pair: tuple[Path, Path], tmp_path: Path) -> None:
    build(tmp_path / kind)
    with pytest.raises(UnsupportedAdapterError):
        load_adapter(tmp_path / kind)
    out = tmp_path / "merged"
    message = merge_error(via, [pair[0], tmp_path / kind], out)
    assert "unsupported" in message
    assert str(tmp_path / kind) in message
    for word in words:
        assert word in message
    assert_nothing_written(out)


@pytest.mark.parametrize("via", VIA)
def test_missing_weights_file(via: str, pair: tuple[Path, Path], tmp_path: Path) -> None:
    broken = copy_adapter(pair[1], tmp_path / "broken")
    (broken / "adapter_model.safetensors").unlink()
    out = tmp_path / "merged"
    message = merge_error(via, [pair[0], broken], out)
    assert str(broken) in message
    assert "adapter_model.safetensors" in message and "re-save" in message
    assert_nothing_written(out)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_weights_file(via: str, keep: float, pair: tuple[Path, Path], tmp_path: Path) -> None:
    broken = copy_adapter(pair[1], tmp_path / "broken")
    weights_file = broken / "adapter_model.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "merged"
    message = merge_error(via, [pair[0], broken], out)
    assert str(broken) in message
    assert "truncated or corrupt" in message and "re-save" in message
    assert_nothing_written(out)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("existing", ["dir", "file"])
def test_existing_output_is_refused_then_replaced_atomically_with_overwrite(via: str, existing: str, pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    if existing == "dir":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    else:
        out.write_text("user data")
    message = merge_error(via, list(pair), out)
    assert str(out) in message and "--overwrite" in message
    assert (out / "keep.txt" if existing == "dir" else out).read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]

    if via == "api":
        merge_adapters(list(pair), out_dir=out, overwrite=True, show_progress=False)
    else:
        result = CliRunner().invoke(app, ["merge", *map(str, pair), "--method", "linear", "--out", str(out), "--overwrite"])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "mergeprobe_merge.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary or trash directory left beside it


@pytest.mark.parametrize("via", VIA)
def test_fewer_than_two_adapters(via: str, pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    message = merge_error(via, [pair[0]], out)
    assert "at least two adapters" in message and "got 1" in message
    assert_nothing_written(out)


@pytest.mark.parametrize("via", VIA)
def test_unknown_method(via: str, pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    message = merge_error(via, list(pair), out, method="frobnicate")
    assert "'frobnicate'" in message and "choose one of" in message and "linear" in message
    assert_nothing_written(out)


@pytest.mark.parametrize("via", VIA)
def test_unknown_method_parameter(via: str, pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    message = merge_error(via, list(pair), out, cli_args=("--param", "sparsity=0.3"), sparsity=0.3)
    assert "'linear'" in message and "sparsity" in message and "it accepts" in message
    assert_nothing_written(out)


def test_error_classes_say_what_went_wrong(pair: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(OutputExistsError):
        merge_adapters(list(pair), out_dir=tmp_path, show_progress=False)
    with pytest.raises(MergeError):
        merge_adapters([pair[0]], show_progress=False)
    with pytest.raises(AdapterError):
        merge_adapters([pair[0], tmp_path / "missing"], show_progress=False)


def test_bin_adapter_loads_with_weights_only(tmp_path: Path) -> None:
    model = build_lora_model(seed=5, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    model.save_pretrained(str(tmp_path / "st"))
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    from_bin, from_st = load_adapter(tmp_path / "bin"), load_adapter(tmp_path / "st")
    assert from_bin.modules.keys() == from_st.modules.keys()
    for key in from_st.modules:
        torch.testing.assert_close(from_bin.delta(key), from_st.delta(key))
    merged = merge_adapters([tmp_path / "bin", tmp_path / "st"], rank="exact", show_progress=False)
    key = next(iter(from_st.modules))
    torch.testing.assert_close(merged.delta(key), 2 * from_st.delta(key), rtol=1e-4, atol=1e-6)


def test_bin_adapter_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    adapter = tmp_path / "evil"
    build_lora_model(seed=5, target_modules=["q_proj"]).save_pretrained(str(adapter), safe_serialization=False)
    torch.save({"payload": Path("/")}, adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match="weights_only"):
        load_adapter(adapter)


@pytest.fixture(scope="module")
def partial_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Adapter a targets q_proj and v_proj, adapter b targets q_proj and k_proj."""
    root = tmp_path_factory.mktemp("partial")
    build_lora_model(seed=1, target_modules=["q_proj", "v_proj"]).save_pretrained(str(root / "a"))
    build_lora_model(seed=2, target_modules=["q_proj", "k_proj"]).save_pretrained(str(root / "b"))
    return root / "a", root / "b"


def test_module_in_one_adapter_only_is_merged_with_zero_update_for_the_other(partial_pair: tuple[Path, Path]) -> None:
    a, b = (load_adapter(p) for p in partial_pair)
    merged = merge_adapters(list(partial_pair), weights=[0.7, 1.3], rank="exact", show_progress=False)
    assert merged.modules.keys() == a.modules.keys() | b.modules.keys()
    for key in merged.modules:
        expected = torch.zeros_like(merged.delta(key))
        if key in a.modules:
            expected += 0.7 * a.delta(key)
        if key in b.modules:
            expected += 1.3 * b.delta(key)
        torch.testing.assert_close(merged.delta(key), expected, rtol=1e-4, atol=1e-6)
    only_a = next(k for k in merged.modules if k not in b.modules)
    assert merged.modules[only_a][1].shape[0] == a.modules[only_a].rank


@pytest.mark.parametrize("method", [m for m in available_methods() if not method_class(m).needs_base_model])
def test_every_method_accepts_a_module_missing_from_one_adapter(method: str, partial_pair: tuple[Path, Path]) -> None:
    a, b = (load_adapter(p) for p in partial_pair)
    merged = merge_adapters(list(partial_pair), method=method, show_progress=False)
    assert merged.modules.keys() == a.modules.keys() | b.modules.keys()
    for key, (factor_b, factor_a) in merged.modules.items():
        owner = a if key in a.modules else b
        assert merged.delta(key).shape == owner.modules[key].shape
        assert torch.isfinite(factor_b).all() and torch.isfinite(factor_a).all()
