"""Every script in ``examples/`` runs as written, in its ``--quick`` form, and produces what it says.

Each example runs as a subprocess from a temporary working directory with ``--out``
inside it (nothing is written into the repository), and each test checks the files
the example promises (store records, pair features, merged adapters, a saved
predictor) and the lines it prints, not just the exit code.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergeprobe import MergeProbe, ProbeStore, load_adapter

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PYTHON_EXAMPLES = sorted(EXAMPLES.glob("*.py"))
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
RUNS = ["arithmetic", "reverse", "sort_letters"]  # the three tasks of sequential_runs.py and concurrent_runs.py, sorted


def run_example(command: list[str], cwd: Path, timeout: int = 300) -> str:
    """Run an example; fail with its output's tail unless it exits 0; return its stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,  # merge_cli.sh runs its Python steps with $PYTHON
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the `mergeprobe` command
    }
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def run_python_example(name: str, tmp_path: Path, *args: str) -> tuple[str, Path]:
    out = tmp_path / "out"
    return run_example([sys.executable, str(EXAMPLES / name), "--quick", "--out", str(out), *args], tmp_path), out


def gradient_sketches(record) -> list[torch.Tensor]:
    return [tensor for name, tensor in record.tensors.items() if name.startswith("gradient.")]


def test_every_example_says_what_it_shows_and_how_to_run_it():
    assert {p.name for p in PYTHON_EXAMPLES} >= {
        "trainer_callback.py", "sequential_runs.py", "concurrent_runs.py", "ddp_torchrun.py",
        "sft_trainer.py", "merge_python.py", "refit_predictor.py",
    }
    for path in PYTHON_EXAMPLES:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and "Run it" in doc and f"examples/{path.name} --quick" in doc, path.name
    shell = (EXAMPLES / "merge_cli.sh").read_text()
    assert "bash examples/merge_cli.sh --quick" in shell and "mergeprobe merge" in shell


def test_trainer_callback(tmp_path):
    stdout, out = run_python_example("trainer_callback.py", tmp_path)
    record = ProbeStore(out / "probe-store").load("arithmetic")
    assert record.status == "finished"
    assert record.meta["probe_steps"] == [0, 8]
    assert ADAPTER_FILES <= {p.name for p in record.adapter_path.iterdir()}
    assert f"run 'arithmetic': status finished, probe window steps 0-8, {len(record.tensors)} signal tensors" in stdout
    assert list((out / "runs" / "arithmetic" / "runs").glob("*/events.out.tfevents.*")), "no TensorBoard events"


def test_sequential_runs(tmp_path):
    stdout, out = run_python_example("sequential_runs.py", tmp_path)
    store = ProbeStore(out / "probe-store")
    assert store.runs(status="finished") == RUNS
    # Each later run compared itself with every earlier one and wrote both orientations of each pair.
    assert store.pairs() == sorted((a, b) for a in RUNS for b in RUNS if a != b)
    for a, b in store.pairs():
        line = next(line for line in stdout.splitlines() if line.startswith(f"{a} + {b} "))
        printed = [float(v) for v in line.split()[3:]]
        features = store.pair_features(a, b)
        stored = [features[k] for k in ("update_alignment.mean", "gradient_alignment.mean", "cross_disturbance.mean", "b_crowding_top.mean")]
        assert printed == pytest.approx(stored, abs=1e-4)


def test_concurrent_runs(tmp_path):
    stdout, out = run_python_example("concurrent_runs.py", tmp_path)
    store = ProbeStore(out / "probe-store")
    records = store.records()
    assert sorted(r.run_name for r in records) == RUNS
    assert all(r.status == "finished" for r in records)
    assert len({r.pid for r in records}) == 3, "the runs were not separate processes"
    # Each pair compared at least once, by whichever run saw the other's record first.
    assert {frozenset(pair) for pair in store.pairs()} == {frozenset(pair) for pair in itertools.combinations(RUNS, 2)}
    (merge,) = store.merges()  # merged exactly once, by the last run to finish
    assert merge["merged"] and merge["info"]["method"] == "ties"
    assert sorted(merge["info"]["runs"]) == RUNS
    assert ADAPTER_FILES <= {p.name for p in Path(merge["info"]["adapter"]).iterdir()}
    assert f"merge {merge['set_id']}: merged=True method=ties" in stdout
    for record in records:
        assert re.search(rf"^{record.run_name}\s+finished\s+0-8\s+{record.pid}\s", stdout, re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_torchrun(tmp_path):
    out = tmp_path / "out"
    stdout = run_example(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
         str(EXAMPLES / "ddp_torchrun.py"), "--quick", "--out", str(out)],
        tmp_path,
    )
    assert stdout.count("world size 2: run 'arithmetic' finished") == 1  # rank 0 only
    store = ProbeStore(out / "probe-store")
    assert store.runs() == ["arithmetic"]
    sketches = gradient_sketches(store.load("arithmetic"))
    assert sketches and all(torch.isfinite(s).all() and s.abs().sum() > 0 for s in sketches)
    assert len(list((out / "runs" / "arithmetic" / "runs").iterdir())) == 1  # only rank 0 writes TensorBoard events


def test_sft_trainer(tmp_path):
    pytest.importorskip("trl", minversion="1.16", reason='examples/sft_trainer.py needs TRL: pip install "trl>=1.16"')
    stdout, out = run_python_example("sft_trainer.py", tmp_path)
    record = ProbeStore(out / "probe-store").load("arithmetic")
    assert record.status == "finished" and record.meta["probe_steps"] == [0, 8]
    sketches = gradient_sketches(record)  # gradients hooked under SFTTrainer (gradient checkpointing on)
    assert sketches and all(s.abs().sum() > 0 for s in sketches)
    assert "SFTTrainer run 'arithmetic': status finished" in stdout


def merge_report(directory: Path) -> dict:
    assert ADAPTER_FILES | {"mergeprobe_merge.json"} <= {p.name for p in directory.iterdir()}
    return json.loads((directory / "mergeprobe_merge.json").read_text())


def test_merge_cli(tmp_path):
    out = tmp_path / "out"
    stdout = run_example(["bash", str(EXAMPLES / "merge_cli.sh"), "--quick", "--out", str(out)], tmp_path, timeout=400)
    for method in ("linear", "ties", "pico", "tada"):
        assert re.search(rf"│ {method}\s+│", stdout), f"`mergeprobe methods` did not list {method}"
    ties, pico = merge_report(out / "merged-ties"), merge_report(out / "merged-pico")
    assert ties["method"] == "ties" and ties["params"]["density"] == 0.5
    assert pico["method"] == "pico" and pico["params"]["base"] == "ties" and pico["weights"] == [1.2, 0.9, 0.9]
    assert len(ties["sources"]) == 2 and len(pico["sources"]) == 3
    inputs = load_adapter(out / "probe-store" / "runs" / "reverse" / "adapter")
    assert set(load_adapter(out / "merged-ties").modules) == set(inputs.modules)


def test_merge_python(tmp_path):
    stdout, out = run_python_example("merge_python.py", tmp_path)
    pico, ties = merge_report(out / "merged-pico"), merge_report(out / "merged-ties")
    assert pico["method"] == "pico" and ties["method"] == "ties" and ties["params"]["density"] == 0.5
    merged = load_adapter(out / "merged-ties")
    assert set(merged.modules) == set(load_adapter(out / "adapters" / "reverse").modules)
    assert f"ties: {len(merged.modules)} modules" in stdout
    # Every adapter, the merged ones included, was loaded with PeftModel.from_pretrained and scored on both tasks.
    for label in ("reverse", "arithmetic", "merged (pico)", "merged (ties)"):
        line = next(line for line in stdout.splitlines() if line.startswith(f"{label} "))
        assert len(re.findall(r"\d+\.\d{3}", line)) == 2, line


def test_refit_predictor(tmp_path):
    stdout, out = run_python_example("refit_predictor.py", tmp_path)
    store = ProbeStore(out / "probe-store")
    outcomes = store.outcomes()
    assert len(outcomes) == 6 and {o["method"] for o in outcomes} == {"pico"}
    assert all(len(o["retention"]) == 2 and all(v > 0 for v in o["retention"].values()) for o in outcomes)
    probe = MergeProbe.load(out / "mergeprobe.skops")
    # The new run's probe stored its pair features with every run; the printed predictions are the saved model's.
    for other in ("reverse", "sort_letters", "arithmetic", "pyeval"):
        predicted = float(probe.predict_retention(store.pair_features("stdlib", other))[0])
        assert f"predicted retention of stdlib merged with {other}: {predicted:.3f}" in stdout
    assert re.search(r"^decision: (merge|reweight|prune|route) ", stdout, re.MULTILINE)
    assert store.load("stdlib").status == "finished"
