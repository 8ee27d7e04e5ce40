"""The ``mergeprobe`` command line: merge end to end, option parsing, ``methods``, help and error handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from peft import PeftModel
from typer.testing import CliRunner

import mergeprobe
from mergeprobe.cli import MergeProbeGroup, app, method_parameters_text, parse_params, parse_rank, parse_value, parse_weights, probe_inputs
from mergeprobe.errors import StoreError
from mergeprobe.merging import available_methods
from mergeprobe.merging.registry import method_class
from tests.conftest import build_tiny_llama

WIDE = {"COLUMNS": "240"}


def peft_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Every module's ΔW as PEFT itself computes it after ``PeftModel.from_pretrained``."""
    model = PeftModel.from_pretrained(build_tiny_llama(), str(path))
    return {
        name: module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
    }


def test_merge_linear_exact_loads_in_peft_with_the_weighted_sum(make_adapter, tmp_path: Path) -> None:
    a = make_adapter("a", seed=1, r=4, lora_alpha=8)
    b = make_adapter("b", seed=2, r=8, lora_alpha=4, use_rslora=True)
    out = tmp_path / "m"
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--method", "linear", "--rank", "exact", "--weights", "0.7,1.3", "--out", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "PeftModel.from_pretrained" in result.stdout and str(out) in result.stdout
    assert "output rank" in result.stdout and "12" in result.stdout  # exact rank = 4 + 8
    da, db, dm = peft_deltas(a), peft_deltas(b), peft_deltas(out)
    assert dm.keys() == da.keys()
    for key in dm:
        expected = 0.7 * da[key] + 1.3 * db[key]
        assert (dm[key] - expected).norm() <= 1e-5 * expected.norm(), key


def test_param_values_are_parsed_and_passed_through(make_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mergeprobe.merging as merging

    real_merge = merging.merge_adapters
    seen: dict[str, object] = {}

    def recording_merge(adapters, **kwargs):
        seen.update(kwargs)
        return real_merge(adapters, method="linear", out_dir=kwargs["out_dir"], show_progress=False)

    monkeypatch.setattr(merging, "merge_adapters", recording_merge)
    a, b = make_adapter("a", seed=1), make_adapter("b", seed=2)
    args = ["merge", str(a), str(b), "-m", "linear", "-o", str(tmp_path / "m"), "--rank", "16", "--weights", "0.5,0.5"]
    args += ["--param", "density=0.3", "--param", "space=full", "-p", "k=3", "-p", "rescale=false", "-p", "base=ties"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["density"] == 0.3 and seen["space"] == "full" and seen["k"] == 3 and seen["rescale"] is False and seen["base"] == "ties"
    assert seen["rank"] == 16 and seen["weights"] == [0.5, 0.5]
    assert seen["allow_base_mismatch"] is False and seen["overwrite"] is False


@pytest.mark.skipif("pico" not in available_methods(), reason="pico is not registered")
def test_dotted_param_reaches_picos_base_merger(make_adapter, tmp_path: Path) -> None:
    a, b = make_adapter("a", seed=1), make_adapter("b", seed=2)
    out = tmp_path / "m"
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "-m", "pico", "-p", "base=ties", "-p", "base_params.density=0.3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "mergeprobe_merge.json").read_text())
    assert report["params"]["base"] == "ties" and report["params"]["base_params"] == {"density": 0.3}


def test_parse_helpers() -> None:
    assert [parse_value(v) for v in ["3", "-2", "0.3", "1e-3", "True", "off", "None", "tsvm"]] == [3, -2, 0.3, 1e-3, True, False, None, "tsvm"]
    assert parse_params(["a=1", "b = x=y"]) == {"a": 1, "b": " x=y"}
    assert parse_params(["roles=task,domain,domain", "mix=1,0.5,true"]) == {"roles": ["task", "domain", "domain"], "mix": [1, 0.5, True]}
    assert parse_params(["base=ties", "base_params.density=0.3", "base_params.space=full"]) == {
        "base": "ties",
        "base_params": {"density": 0.3, "space": "full"},
    }
    assert parse_weights("1,2.5") == [1.0, 2.5] and parse_weights(None) is None
    assert parse_rank("exact") == "exact" and parse_rank("8") == 8 and parse_rank(None) is None
    for bad in (["density"], ["=3"], ["a=1", "a=2"], ["a=1", "a.b=2"], ["a.=1"]):
        with pytest.raises(typer.BadParameter):
            parse_params(bad)
    with pytest.raises(typer.BadParameter):
        parse_weights("0.5;0.5")
    for bad_rank in ("0", "-1", "full"):
        with pytest.raises(typer.BadParameter):
            parse_rank(bad_rank)


@pytest.mark.parametrize(
    ("option", "value", "hint"),
    [("--param", "density", "key=value"), ("--weights", "a,b", "--weights 0.5,0.5"), ("--rank", "lots", "--rank 16")],
)
def test_malformed_options_are_usage_errors(option: str, value: str, hint: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["merge", "a", "b", "-m", "linear", "-o", str(tmp_path / "m"), option, value], env=WIDE)
    assert result.exit_code == 2
    assert hint in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


def test_methods_lists_every_method_with_its_parameters() -> None:
    result = CliRunner().invoke(app, ["methods"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "linear" in available_methods()
    for name in available_methods():
        assert name in result.stdout
        for part in method_parameters_text(method_class(name)).split(", "):
            assert part in result.stdout, (name, part)


def test_every_command_help_has_an_example() -> None:
    group = typer.main.get_command(app)
    assert {"merge", "methods"} <= set(group.commands)
    for args in ([], *([name] for name in group.commands)):
        result = CliRunner().invoke(app, [*args, "--help"])
        assert result.exit_code == 0, args
        assert "Example" in result.output and "mergeprobe" in result.output, args


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mergeprobe {mergeprobe.__version__}"


def test_base_model_is_not_loaded_for_methods_that_do_not_probe_it(make_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mergeprobe.models

    def refuse(*args, **kwargs):
        raise AssertionError("the base model must not be loaded for linear")

    monkeypatch.setattr(mergeprobe.models, "load_base_model", refuse)
    a, b = make_adapter("a", seed=1), make_adapter("b", seed=2)
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "-m", "linear", "--base-model", "default", "-o", str(tmp_path / "m")], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "--base-model is ignored" in result.stderr


class CharTokenizer:
    """A stand-in tokenizer: one id per character."""

    name_or_path = "chars"

    def __call__(self, texts, truncation=True, max_length=256):
        return {"input_ids": [[ord(c) % 128 for c in text][:max_length] for text in texts]}


def test_probe_inputs_load_the_model_only_for_probing_methods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mergeprobe.models

    monkeypatch.setattr(mergeprobe.models, "load_base_model", lambda name: (f"model:{name}", "tokenizer"))
    calibration = tmp_path / "calib.txt"
    calibration.write_text("first sequence\n\nsecond sequence\n")
    assert probe_inputs("tada", True, "default", calibration) == ("model:default", str(calibration), "tokenizer")
    assert probe_inputs("tada", True, "default", None) == ("model:default", None, "tokenizer")
    assert probe_inputs("linear", False, "default", calibration) == (None, None, None)
    with pytest.raises(typer.BadParameter, match="not a file"):
        probe_inputs("tada", True, "default", tmp_path / "missing.txt")


@pytest.mark.skipif("tada" not in available_methods(), reason="tada is not registered")
def test_merge_with_base_model_and_calibration_file(make_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mergeprobe.models

    loaded: list[str] = []

    def tiny_base(name: str):
        loaded.append(name)
        return build_tiny_llama(), CharTokenizer()

    monkeypatch.setattr(mergeprobe.models, "load_base_model", tiny_base)
    calibration = tmp_path / "calib.txt"
    calibration.write_text("the quick brown fox\njumps over the lazy dog\n\nlorem ipsum\n")
    a, b = make_adapter("task", seed=1), make_adapter("domain", seed=2)
    out = tmp_path / "m"
    args = ["merge", str(a), str(b), "-m", "tada", "--base-model", "tiny", "--calibration", str(calibration), "-p", "beta=2", "-p", "roles=task,domain"]
    args += ["-o", str(out)]
    result = CliRunner().invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert loaded == ["tiny"]
    report = json.loads((out / "mergeprobe_merge.json").read_text())
    assert report["params"]["beta"] == 2 and report["params"]["tokenizer"] == "chars"
    assert report["params"]["roles"] == ["task", "domain"]
    assert report["global"]["calibration_sequences"] == 3
    gates = [module["gate"] for module in report["modules"].values()]
    assert len(set(gates)) > 1  # the probe ran: gates follow the calibration signal, not 1/2 everywhere

    missing = CliRunner().invoke(app, ["merge", str(a), str(b), "-m", "tada", "-o", str(tmp_path / "m2")])
    assert missing.exit_code == 2 and "--base-model" in missing.stderr


def _app_with(error: Exception) -> typer.Typer:
    extra = typer.Typer(cls=MergeProbeGroup)

    @extra.command()
    def fail() -> None:
        """Raise.

        Example: test fail
        """
        raise error

    @extra.command()
    def other() -> None:
        """Do nothing."""

    return extra


def test_any_mergeprobe_error_is_one_red_line_and_exit_code_2() -> None:
    result = CliRunner().invoke(_app_with(StoreError("store 'runs/x' is locked [pid 7]; wait or remove the lock")), ["fail"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: store 'runs/x' is locked [pid 7]; wait or remove the lock"
    assert result.stdout == ""


def test_other_exceptions_propagate() -> None:
    result = CliRunner().invoke(_app_with(RuntimeError("bug")), ["fail"])
    assert isinstance(result.exception, RuntimeError)


def test_python_dash_m_runs_the_same_command_line():
    import subprocess
    import sys

    for module in ("mergeprobe", "mergeprobe.cli"):
        done = subprocess.run([sys.executable, "-m", module, "demo", "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Example:" in done.stdout and "--quick" in done.stdout
