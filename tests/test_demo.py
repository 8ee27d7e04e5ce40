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
    assert list(summary["runs"]) == ["reverse_chars", "sort_chars", "stdlib"]
    for run in summary["runs"].values():
        assert 0.0 <= run["single_score"] <= 1.0 and run["steps_trained"] >= 8
    decision = summary["decision"]
    assert decision is not None and decision["action"] in ("merge", "reweight", "prune", "route")
    decided = [m for m in decision["merge_set"] if summary["runs"][m]["stopped"] is None]
    if len(decided) >= 2:  # the set the decision merges, with the method it picked
        merged = summary["merged"]
        assert merged["method"] == decision["method"] and sorted(merged["members"]) == sorted(decided)
        assert (out / "merged-adapter" / "adapter_model.safetensors").exists()
        assert set(merged["scores"]) == set(merged["members"])
    else:
        assert "merged" not in summary and "nothing to merge" in result.output
    # the comparison the summary shows: what ignoring the decision would have kept
    blind = summary["blind_merge"]
    assert blind["method"] == "linear" and set(blind["scores"]) == set(summary["runs"])
    assert (out / "blind-merge" / "adapter_model.safetensors").exists()
    assert any((out / "runs").rglob("events.out.tfevents.*"))
    assert "tensorboard --logdir" in result.output and "summary" in result.output
