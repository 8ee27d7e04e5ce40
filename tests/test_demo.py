"""`mergeprobe demo --quick`: the whole pipeline on a tiny model, through the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mergeprobe.cli import app


def test_quick_demo_runs_to_its_summary(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == ["reverse", "arithmetic", "sort_letters"]
    for run in summary["runs"].values():
        assert 0.0 <= run["single_score"] <= 1.0 and run["steps_trained"] >= 8
    merged = summary["merged"]
    assert (out / "merged-adapter" / "adapter_model.safetensors").exists()
    assert set(merged["scores"]) == set(merged["members"]) and len(merged["members"]) >= 2
    assert any((out / "runs").rglob("events.out.tfevents.*"))
    assert "tensorboard --logdir" in result.output and "summary" in result.output
