"""What ``MergeProbeCallback`` costs a training run: wall time per step, one-off costs, peak memory.

The same LoRA training run is timed with and without the callback, side by side in
one invocation, on

- ``default``: the embedded SmolLM2-135M-Instruct (``load_base_model("default")``),
  LoRA r = 8 on every linear layer, batches of 8 sequences × 32 tokens of the real
  ``lm_licenses`` task (language modelling on the Debian license texts);
- ``tiny``: a 2-layer Llama built from a config (hidden 32), the same LoRA set-up on
  synthetic token patterns, 8 × 32 tokens — a model whose step is so cheap that every
  fixed cost of the callback shows.

Each training run is its own subprocess, so the peak RSS reported is that
configuration's own (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, with the
high-water mark reset through ``/proc/self/clear_refs`` once the model is loaded, so
the transient peak of dequantising the GGUF file does not hide the training peak).
The two processes of a with/without pair run at the same time but in lockstep: a
process works only while it holds the turn and hands it over at the end of every
step, so the configurations alternate A, B, A, B … step by step and never compete
for the CPU, and a change of the shared machine's load hits both alike (which
configuration takes each step first alternates between repeats). The "with" run
starts from a copy of a probe store that already holds ``--others`` short runs of
other tasks on the same base model (trained first, outside the timing), so its window
end writes a record *and* compares with real runs. Every callback argument is at its
default (window ``max(8, ⌈0.03 · steps⌉)`` steps, ``track_every=50``, TensorBoard on).

A small timing callback, registered last in both configurations, times every step:
from getting the turn back after step ``s − 1`` to the end of step ``s`` (after every
other callback's ``on_step_end``), in wall-clock and in process CPU time. Reported,
comparing the same step indices of the two configurations:

- total: ``trainer.train()`` wall time less the time spent waiting for the turn
  (train begin and train end included);
- in the window: the steps before the window's last step (gradient sketch hooks and
  probe-batch collection active);
- window end: the window's last step minus the same step without the callback —
  the signals, the record write, the comparisons and the TensorBoard images;
- outside the window: the median per-step ratio (the steady state) and the ratio of
  summed step times (tracking steps, every ``track_every``, included);
- peak RSS.

Usage::

    python benchmarks/callback_overhead.py --quick                 # tiny model, 30 steps
    python benchmarks/callback_overhead.py --model tiny            # tiny model, 200 steps, 3 repeats
    python benchmarks/callback_overhead.py --model default         # SmolLM2-135M, 200 steps, 1 repeat

Results: a rich table on stdout, JSON at ``--out`` and a Markdown table beside it
(same name, ``.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _rss import (  # sibling module: the scripts run as `python benchmarks/<name>.py`
    peak_rss_mb,
    rss_now_mb,
)

LORA_RANK = 8
LORA_ALPHA = 16
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = 8
SEQ_LEN = 32
TASK = "lm_licenses"
OTHER_TASKS = ["lm_docs", "stdlib"]
TINY_LLAMA = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
LEARNING_RATE = {"default": 2e-4, "tiny": 5e-3}
OTHER_RUN_STEPS = 4

TARGET_TOTAL = 0.03
TARGET_STEP_OUTSIDE = 0.005
TARGET_RSS = 0.10

# The callback's methods whose wall time the "with" worker records (class, method, phase).
PHASES = [
    ("callback", "on_train_begin", "train_begin"),
    ("callback", "on_step_end", "step_end_events"),
    ("callback", "_end_window", "window_end"),
    ("probe", "end_window", "signals_write_compare"),
    ("probe", "_write", "record_write"),
    ("probe", "_compare_all", "comparisons"),
    ("callback", "_log_comparisons", "tensorboard"),
    ("probe", "track", "tracking"),
    ("callback", "on_train_end", "train_end"),
    ("probe", "save_final_adapter", "final_record_write"),
]


# --- Workers (one per training run, in a subprocess) -----------------------------


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux ≥ 4.0); True when ``ru_maxrss`` followed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    now = rss_now_mb()
    return now is not None and peak_rss_mb() <= now + 16


def load_model(model: str, seed: int) -> tuple[Any, Any]:
    """The base model and (for the default model) its tokenizer."""
    import torch

    if model == "default":
        from mergeprobe.models import load_base_model

        model, tokenizer = load_base_model("default")
        # The GGUF file is dequantised to float32 on load, but transformers still marks the model as GGUF-quantised and
        # the Trainer refuses to train it; the weights are plain float32 tensors, so drop the marker.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
            model.config._is_quantized = False
        return model, tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)), None


def training_data(model: str, tokenizer: Any, task: str, seed: int, n: int = 512) -> tuple[Any, Any]:
    """``(dataset, collator)``: fixed-shape 8 × 32 batches of a real task (default) or of token patterns (tiny)."""
    import torch

    if model == "default":
        from mergeprobe.tasks import TaskDataset, get_task

        dataset = TaskDataset(tokenizer, get_task(task).examples("train", n, seed=seed), max_length=SEQ_LEN)
        pad = tokenizer.pad_token_id or 0
    else:
        generator = torch.Generator().manual_seed(1000 + seed)
        vocab = TINY_LLAMA["vocab_size"]
        start = torch.randint(0, vocab, (n, 1), generator=generator)
        ids = (start + torch.arange(SEQ_LEN) * (1 + seed % 3)) % vocab
        dataset = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
        pad = 0

    def collate_fixed(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        out = {
            "input_ids": torch.full((len(rows), SEQ_LEN), pad, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), SEQ_LEN), dtype=torch.long),
            "labels": torch.full((len(rows), SEQ_LEN), -100, dtype=torch.long),
        }
        for i, row in enumerate(rows):
            length = len(row["input_ids"])
            out["input_ids"][i, :length] = torch.tensor(row["input_ids"])
            out["attention_mask"][i, :length] = 1
            out["labels"][i, :length] = torch.tensor(row["labels"])
        return out

    return dataset, collate_fixed


def make_trainer(model: Any, dataset: Any, collator: Any, spec: dict[str, Any], output_dir: str, callbacks: list[Any]) -> Any:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=spec["steps"],
        per_device_train_batch_size=BATCH,
        learning_rate=LEARNING_RATE[spec["model"]],
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=spec["seed"],
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks)


def lora_model(base: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=ALL_LINEAR, lora_dropout=0.0))


class Turns:
    """Step-by-step alternation of two training processes through a pair of pipes.

    A process works only while it holds the turn: it hands the turn over at the end of
    every step and waits for it back, so the two configurations never run at the same
    time and alternate A, B, A, B … step by step — a change of the machine's load hits
    both alike. A process that finished (or died: end of file) stops being waited for.
    """

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self.peer_done = False
        self.waited = 0.0

    def wait(self) -> None:
        if self.peer_done:
            return
        start = time.perf_counter()
        token = os.read(self.read_fd, 1)
        self.waited += time.perf_counter() - start
        if token in (b"", b"D"):
            self.peer_done = True

    def hand_over(self, done: bool = False) -> None:
        if self.peer_done:
            return
        try:
            os.write(self.write_fd, b"D" if done else b"T")
        except BrokenPipeError:
            self.peer_done = True


def step_timer(turns: Turns) -> Any:
    """A callback (register it last) timing train begin, every step and train end within this process's turns.

    Step ``s`` runs from getting the turn back after step ``s − 1`` (train begin for
    the first step) to the end of step ``s``, after every other callback's
    ``on_step_end``; so it includes the logging, the next batch and the step itself.
    """
    from transformers import TrainerCallback

    def stamp() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin: tuple[float, float] | None = None
            self.steps: list[tuple[float, float]] = []
            self.end: tuple[float, float] | None = None
            self._resumed: tuple[float, float] | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = self._resumed = stamp()

        def on_step_end(self, args, state, control, **kwargs):
            now = stamp()
            self.steps.append((now[0] - self._resumed[0], now[1] - self._resumed[1]))
            turns.hand_over()
            turns.wait()
            self._resumed = stamp()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = (time.perf_counter() - self._resumed[0], time.process_time() - self._resumed[1])

    return StepTimer()


def instrument_phases(calls: list[dict[str, Any]]) -> None:
    """Wrap the callback's phase methods so every call's wall time lands in ``calls``."""
    import functools

    from mergeprobe.callbacks.merge_probe import MergeProbeCallback
    from mergeprobe.probe import ProbeRun

    owners = {"callback": MergeProbeCallback, "probe": ProbeRun}
    for owner, method, phase in PHASES:
        cls = owners[owner]
        original = getattr(cls, method)

        def timed(*args: Any, __original: Any = original, __phase: str = phase, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return __original(*args, **kwargs)
            finally:
                calls.append({"phase": __phase, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu})

        setattr(cls, method, functools.wraps(original)(timed))


def children_cpu_seconds() -> float:
    """CPU time of this process's ended and reaped child processes (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_training(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed training run, with or without the callback."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(spec["threads"])
    base, tokenizer = load_model(spec["model"], seed=0)
    torch.manual_seed(spec["seed"])
    model = lora_model(base)
    dataset, collator = training_data(spec["model"], tokenizer, TASK, spec["seed"])
    calls: list[dict[str, Any]] = []
    callbacks: list[Any] = []
    probe = None
    if spec["with_callback"]:
        from mergeprobe.callbacks import MergeProbeCallback

        instrument_phases(calls)
        probe = MergeProbeCallback(spec["store"], run_name="timed")
        callbacks.append(probe)
    turns = Turns(spec["turn_read_fd"], spec["turn_write_fd"])
    timer = step_timer(turns)
    callbacks.append(timer)
    trainer = make_trainer(model, dataset, collator, spec, spec["output_dir"], callbacks)
    rss_before = rss_now_mb()
    process_peak_before = peak_rss_mb()
    peak_reset = reset_peak_rss()
    os.write(spec["ready_fd"], b"R")
    turns.wait()  # the driver gives the first turn once both processes are ready
    waited = turns.waited
    start, start_cpu, start_children = time.perf_counter(), time.process_time(), children_cpu_seconds()
    trainer.train()
    total, total_cpu = time.perf_counter() - start - (turns.waited - waited), time.process_time() - start_cpu
    children_cpu = children_cpu_seconds() - start_children  # the predictor's child process, ended (and reaped) at train end
    turns.hand_over(done=True)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "total_seconds": total,
        "total_cpu_seconds": total_cpu,
        "children_cpu_seconds": children_cpu,
        "begin_seconds": timer.begin[0] - start,
        "end_seconds": timer.end[0],
        "step_seconds": [wall for wall, _ in timer.steps],
        "step_cpu_seconds": [cpu for _, cpu in timer.steps],
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_reset": peak_reset,
        "process_peak_rss_before_training_mb": process_peak_before,
        "rss_before_training_mb": rss_before,
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "phases": calls,
    }
    if probe is not None:
        result["window"] = [probe.window_start, probe.window_end]
        result["compared_with"] = sorted(probe._probe.comparisons) if probe._probe is not None else []
        result["track_every"] = probe.track_every
        comparisons = probe._probe.comparisons.values() if probe._probe is not None else []
        result["predicted_retention"] = any(c.predicted_retention is not None for c in comparisons)
    return result


def seed_store(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the other runs of the store: a few steps each on another task, with the callback."""
    import copy
    import warnings

    import torch

    from mergeprobe.callbacks import MergeProbeCallback

    warnings.filterwarnings("ignore")
    torch.set_num_threads(spec["threads"])
    base, tokenizer = load_model(spec["model"], seed=0)
    names = []
    for index in range(spec["others"]):
        task = OTHER_TASKS[index % len(OTHER_TASKS)]
        torch.manual_seed(100 + index)
        model = lora_model(copy.deepcopy(base))
        dataset, collator = training_data(spec["model"], tokenizer, task, seed=100 + index, n=64)
        name = f"other-{index}-{task}" if spec["model"] == "default" else f"other-{index}"
        callback = MergeProbeCallback(spec["store"], run_name=name, probe_steps=OTHER_RUN_STEPS, track_every=0, tensorboard=False)
        run_spec = {**spec, "steps": OTHER_RUN_STEPS, "seed": 100 + index}
        make_trainer(model, dataset, collator, run_spec, str(Path(spec["output_dir"]) / name), [callback]).train()
        names.append(name)
    return {"runs": names}


def worker(spec: dict[str, Any]) -> None:
    result = seed_store(spec) if spec["kind"] == "seed" else run_training(spec)
    print("RESULT " + json.dumps(result), flush=True)


def _worker_command(spec: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    # The workers measure this checkout's mergeprobe, whatever (if anything) is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return command, env


def _parse_result(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (stderr or stdout).strip().splitlines()[-5:]
    return {"error": f"exit code {returncode}: " + " | ".join(tail)}


def run_in_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; returns its measurements or an ``error``."""
    command, env = _worker_command(spec)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    return _parse_result(done.stdout, done.stderr, done.returncode)


def run_lockstep(first: dict[str, Any], second: dict[str, Any], timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run two training workers at once, alternating step by step (``first`` starts); their results."""
    first_read, second_write = os.pipe()  # the second process hands the turn to the first
    second_read, first_write = os.pipe()  # and the first to the second
    ready_read, ready_write = os.pipe()
    specs = [
        {**first, "turn_read_fd": first_read, "turn_write_fd": first_write, "ready_fd": ready_write},
        {**second, "turn_read_fd": second_read, "turn_write_fd": second_write, "ready_fd": ready_write},
    ]
    processes = []
    for spec in specs:
        command, env = _worker_command(spec)
        fds = (spec["turn_read_fd"], spec["turn_write_fd"], ready_write)
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, pass_fds=fds))
    for fd in (first_read, second_read, first_write, ready_write):
        os.close(fd)
    ready = b""
    while len(ready) < 2:  # both models are loaded (or a worker died: end of file)
        chunk = os.read(ready_read, 2 - len(ready))
        if not chunk:
            break
        ready += chunk
    os.close(ready_read)
    try:
        os.write(second_write, b"T")  # as if the second process handed over: the first one starts
    except BrokenPipeError:
        pass
    os.close(second_write)
    results = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            error = {"error": f"timed out after {timeout:.0f} s"}
            return error, error
        results.append(_parse_result(stdout, stderr, process.returncode))
    return results[0], results[1]


# --- Analysis ----------------------------------------------------------------------


def _ratio(with_value: float, without_value: float) -> float:
    return with_value / without_value - 1.0 if without_value > 0 else math.nan


def per_step_median(runs: list[dict[str, Any]], field: str = "step_seconds") -> list[float]:
    """Per step index, the median over repeats of that step's wall (or CPU) time."""
    return [statistics.median(values) for values in zip(*(r[field] for r in runs))]


def phase_totals(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = {}
    for call in run["phases"]:
        entry = totals.setdefault(call["phase"], {"calls": 0, "seconds": 0.0, "cpu_seconds": 0.0})
        entry["calls"] += 1
        entry["seconds"] += call["seconds"]
        entry["cpu_seconds"] += call["cpu_seconds"]
    return totals


def step_overheads(with_steps: list[float], without_steps: list[float], window: tuple[int, int], track_every: int) -> dict[str, Any]:
    """In-window, window-end and outside-window comparisons of per-step times (same step indices)."""
    window_start, window_end = window
    inside = list(range(window_start, window_end - 1))  # 0-based indices of steps window_start+1 … window_end−1
    end_index = window_end - 1
    outside = list(range(window_end, len(with_steps)))
    tracked = [i for i in outside if track_every and (i + 1) % track_every == 0]
    untracked = [i for i in outside if i not in tracked]

    def summed(indices: list[int]) -> tuple[float, float]:
        return sum(with_steps[i] for i in indices), sum(without_steps[i] for i in indices)

    inside_with, inside_without = summed(inside)
    outside_with, outside_without = summed(outside)
    ratios = [with_steps[i] / without_steps[i] for i in untracked if without_steps[i] > 0]
    return {
        "inside_window": {
            "steps": [i + 1 for i in inside],
            "mean_step_without": inside_without / max(1, len(inside)),
            "mean_step_with": inside_with / max(1, len(inside)),
            "overhead": _ratio(inside_with, inside_without),
        },
        "window_end_step": {
            "step": window_end,
            "without": without_steps[end_index],
            "with": with_steps[end_index],
            "one_off_seconds": with_steps[end_index] - without_steps[end_index],
        },
        "outside_window": {
            "steps": len(outside),
            "median_step_without": statistics.median(without_steps[i] for i in untracked) if untracked else math.nan,
            "median_step_with": statistics.median(with_steps[i] for i in untracked) if untracked else math.nan,
            "median_overhead": statistics.median(ratios) - 1.0 if ratios else math.nan,
            "summed_overhead": _ratio(outside_with, outside_without) if outside else math.nan,
            "tracking_steps": [i + 1 for i in tracked],
            "tracking_extra_seconds": sum(with_steps[i] - without_steps[i] for i in tracked),
        },
    }


def analyse(with_runs: list[dict[str, Any]], without_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Overheads of the callback, comparing the same step indices (medians over repeats).

    Wall time is what the targets are about; the same figures in process CPU time
    (``cpu``) are a cross-check that the machine's other jobs touch less.
    """
    window = tuple(with_runs[0]["window"])
    track_every = with_runs[0]["track_every"]
    wall = step_overheads(per_step_median(with_runs), per_step_median(without_runs), window, track_every)
    cpu = step_overheads(per_step_median(with_runs, "step_cpu_seconds"), per_step_median(without_runs, "step_cpu_seconds"), window, track_every)
    total_with = statistics.median(r["total_seconds"] for r in with_runs)
    total_without = statistics.median(r["total_seconds"] for r in without_runs)
    cpu_with = statistics.median(r["total_cpu_seconds"] for r in with_runs)
    cpu_without = statistics.median(r["total_cpu_seconds"] for r in without_runs)
    children_with = statistics.median(r.get("children_cpu_seconds", 0.0) for r in with_runs)
    children_without = statistics.median(r.get("children_cpu_seconds", 0.0) for r in without_runs)
    peak_with = statistics.median(r["peak_rss_mb"] for r in with_runs)
    peak_without = statistics.median(r["peak_rss_mb"] for r in without_runs)
    phases = [phase_totals(r) for r in with_runs]
    phase_summary = {
        name: {
            field: statistics.median(p.get(name, {}).get(field, 0) for p in phases)
            for field in ("calls", "seconds", "cpu_seconds")
        }
        for name in sorted({name for p in phases for name in p})
    }
    own = {
        field: statistics.median(sum(p.get(name, {}).get(field, 0.0) for name in ("train_begin", "step_end_events", "train_end")) for p in phases)
        for field in ("seconds", "cpu_seconds")
    }
    # The callback's own on_step_end, one call per step: its direct per-step cost on the untracked steps after the window.
    untracked = [i for i in range(window[1], len(with_runs[0]["step_seconds"])) if not (track_every and (i + 1) % track_every == 0)]
    step_end_calls = [[c["seconds"] for c in r["phases"] if c["phase"] == "step_end_events"] for r in with_runs]
    own_step = statistics.median(calls[i] for calls in step_end_calls for i in untracked if i < len(calls)) if untracked else math.nan
    wall["outside_window"]["callback_step_end_median_seconds"] = own_step
    wall["outside_window"]["callback_step_end_share"] = own_step / wall["outside_window"]["median_step_without"]
    return {
        "steps": len(with_runs[0]["step_seconds"]),
        "window": list(window),
        "track_every": track_every,
        "compared_with": with_runs[0].get("compared_with", []),
        "total_seconds": {"without": total_without, "with": total_with, "overhead": _ratio(total_with, total_without)},
        "total_pairs": [_ratio(w["total_seconds"], o["total_seconds"]) for w, o in zip(with_runs, without_runs)],
        "total_cpu_seconds": {"without": cpu_without, "with": cpu_with, "overhead": _ratio(cpu_with, cpu_without)},
        "children_cpu_seconds": {
            "without": children_without,
            "with": children_with,
            "overhead_with_children": _ratio(cpu_with + children_with, cpu_without + children_without),
        },
        "callback_own_seconds": {
            "wall": own["seconds"],
            "cpu": own["cpu_seconds"],
            "share_of_total": own["seconds"] / total_without,
            "share_of_total_cpu": own["cpu_seconds"] / cpu_without,
        },
        **wall,
        "cpu": cpu,
        "train_begin_extra_seconds": statistics.median(r["begin_seconds"] for r in with_runs)
        - statistics.median(r["begin_seconds"] for r in without_runs),
        "train_end_extra_seconds": statistics.median(r["end_seconds"] for r in with_runs)
        - statistics.median(r["end_seconds"] for r in without_runs),
        "peak_rss_mb": {"without": peak_without, "with": peak_with, "overhead": _ratio(peak_with, peak_without)},
        "phases": phase_summary,
        "same_losses": all(w["losses"] == o["losses"] for w, o in zip(with_runs, without_runs)),
        "final_loss": {"without": without_runs[0]["losses"][-1:], "with": with_runs[0]["losses"][-1:]},
    }


def targets_met(result: dict[str, Any]) -> dict[str, bool]:
    return {
        "total": result["total_seconds"]["overhead"] <= TARGET_TOTAL,
        "step_outside_window": result["outside_window"]["median_overhead"] <= TARGET_STEP_OUTSIDE,
        "step_outside_window_direct": result["outside_window"]["callback_step_end_share"] <= TARGET_STEP_OUTSIDE,
        "peak_rss": result["peak_rss_mb"]["overhead"] <= TARGET_RSS,
    }


# --- Driver ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["default", "tiny", "both"], default="both", help="which model(s) to train (default both)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--repeats", type=int, default=None, help="with/without pairs per model (default 1 for default, 3 for tiny)")
    parser.add_argument("--others", type=int, default=2, help="other runs already in the probe store (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process (default 1: steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 30 steps")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per training run before it is abandoned")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/callback_overhead.json"), help="JSON output; the Markdown table goes beside it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps = "tiny", 30
    return args


def benchmark_model(model: str, args: argparse.Namespace, console: Any, scratch: Path) -> dict[str, Any]:
    repeats = args.repeats or (1 if model == "default" else 3)
    seeded = scratch / f"{model}-seed-store"
    console.print(f"[bold]{model}[/]: seeding the probe store with {args.others} other run(s) (not timed)")
    seed = run_in_subprocess(
        {"kind": "seed", "model": model, "others": args.others, "store": str(seeded), "output_dir": str(scratch / f"{model}-others"),
         "steps": OTHER_RUN_STEPS, "seed": 0, "threads": args.threads},
        args.timeout,
    )
    if "error" in seed:
        raise RuntimeError(f"seeding the store failed: {seed['error']}")
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    order = []
    for repeat in range(repeats):
        store = scratch / f"{model}-store-{repeat}"
        shutil.copytree(seeded, store)
        specs = {
            with_callback: {"kind": "train", "model": model, "steps": args.steps, "seed": 0, "with_callback": with_callback,
                            "threads": args.threads, "store": str(store),
                            "output_dir": str(scratch / f"{model}-{'with' if with_callback else 'without'}-{repeat}")}
            for with_callback in (False, True)
        }
        first = repeat % 2 == 1  # the run that takes each step first alternates between repeats
        results = dict(zip((first, not first), run_lockstep(specs[first], specs[not first], args.timeout)))
        for with_callback in (first, not first):
            label = "with" if with_callback else "without"
            if "error" in results[with_callback]:
                raise RuntimeError(f"{model} {label} run {repeat} failed: {results[with_callback]['error']}")
            runs[with_callback].append(results[with_callback])
        order.append("with first" if first else "without first")
        console.print(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(
            f"{'with' if w else 'without'} {results[w]['total_seconds']:.1f} s (peak RSS {results[w]['peak_rss_mb']:.0f} MB)" for w in (False, True)
        ) + f", load {results[True]['load_average']:.1f}")
    result = analyse(runs[True], runs[False])
    result.update({"model": model, "repeats": repeats, "order": order, "other_runs": seed["runs"]})
    result["targets_met"] = targets_met(result)
    result["runs"] = {"with": runs[True], "without": runs[False]}
    return result


def _pct(value: float) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:+.2f} %"


def _s(value: float, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


COLUMNS = ("measure", "without", "with", "overhead (wall)", "overhead (CPU)", "target")


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per measure, in :data:`COLUMNS` order, for one model's result."""
    total, cpu_total, peak, cpu = result["total_seconds"], result["total_cpu_seconds"], result["peak_rss_mb"], result["cpu"]
    inside, end, outside = result["inside_window"], result["window_end_step"], result["outside_window"]
    own = result["callback_own_seconds"]
    children = result.get("children_cpu_seconds", {"without": math.nan, "with": math.nan, "overhead_with_children": math.nan})
    met = result["targets_met"]
    phases = result["phases"]

    def phase(name: str) -> str:
        entry = phases.get(name)
        if entry is None:
            return "—"
        calls = f", {entry['calls']:g}×" if entry["calls"] != 1 else ""
        return f"{entry['seconds']:.2f} s (CPU {entry['cpu_seconds']:.2f} s{calls})"

    def verdict(key: str, text: str) -> str:
        return f"{text}: {'met' if met[key] else 'MISSED'}"

    window = result["window"]
    begin_end = result["train_begin_extra_seconds"] + result["train_end_extra_seconds"]
    return [
        ["total `trainer.train()` (s)", _s(total["without"], 1), _s(total["with"], 1), _pct(total["overhead"]), _pct(cpu_total["overhead"]),
         verdict("total", "≤ 3 %")],
        ["  CPU of child processes (the retention predictor's), s", _s(children["without"], 1), _s(children["with"], 1), "",
         _pct(children["overhead_with_children"]) + " (total CPU incl. children)", ""],
        ["callback's own work: all its events, timed inside (s)", "", f"{own['wall']:.1f} (CPU {own['cpu']:.1f})",
         _pct(own["share_of_total"]), _pct(own["share_of_total_cpu"]), "hooks excluded"],
        [f"step in window, mean (steps {window[0] + 1}–{window[1] - 1}, s)", _s(inside["mean_step_without"]), _s(inside["mean_step_with"]),
         _pct(inside["overhead"]), _pct(cpu["inside_window"]["overhead"]), ""],
        [f"window-end step {end['step']} (s)", _s(end["without"]), _s(end["with"]), f"+{end['one_off_seconds']:.2f} s",
         f"+{cpu['window_end_step']['one_off_seconds']:.2f} s", "one-off"],
        ["  signals + record write + comparisons", "", phase("signals_write_compare"), "", "", ""],
        ["  of which record write", "", phase("record_write"), "", "", ""],
        [f"  of which comparisons with {len(result['compared_with'])} stored run(s)", "", phase("comparisons"), "", "", ""],
        ["  TensorBoard scalars + heatmaps", "", phase("tensorboard"), "", "", ""],
        ["step outside window, median (s)", _s(outside["median_step_without"]), _s(outside["median_step_with"]), _pct(outside["median_overhead"]),
         _pct(cpu["outside_window"]["median_overhead"]), verdict("step_outside_window", "≤ 0.5 %") + " (A/B)"],
        ["  the callback's own on_step_end there, median (ms)", "", f"{1e3 * outside['callback_step_end_median_seconds']:.3f}",
         _pct(outside["callback_step_end_share"]), "", verdict("step_outside_window_direct", "≤ 0.5 %")],
        [f"all {outside['steps']} steps outside window, summed (tracking incl.)", "", "", _pct(outside["summed_overhead"]),
         _pct(cpu["outside_window"]["summed_overhead"]), ""],
        [f"tracking at steps {', '.join(map(str, outside['tracking_steps'])) or '—'} + train end", "", phase("tracking"),
         f"+{outside['tracking_extra_seconds']:.2f} s", f"+{cpu['outside_window']['tracking_extra_seconds']:.2f} s", ""],
        ["train begin + train end (final record)", "", f"{phase('train_begin')}; {phase('train_end')}", f"+{begin_end:.2f} s", "", "one-off"],
        ["peak RSS (MB)", _s(peak["without"], 0), _s(peak["with"], 0), _pct(peak["overhead"]), "", verdict("peak_rss", "≤ +10 %")],
    ]


def describe(result: dict[str, Any], steps: int) -> str:
    model = "SmolLM2-135M-Instruct (embedded default)" if result["model"] == "default" else "tiny Llama from a config (2 layers, hidden 32)"
    data = f"`{TASK}` task" if result["model"] == "default" else "synthetic token patterns"
    return (f"{model}, LoRA r={LORA_RANK} on all linear layers, batch {BATCH} × {SEQ_LEN} tokens of {data}, {steps} steps, "
            f"window steps {result['window'][0] + 1}–{result['window'][1]}, track_every {result['track_every']}, "
            f"{result['repeats']} with/without pair(s) (order {', '.join(result['order'])}), store holding {len(result['other_runs'])} other run(s)")


def predictor_note(results: list[dict[str, Any]]) -> str:
    """Whether predictor='default' found a retention predictor in this working tree (then runs predict and decide)."""
    if any(r.get("predicted_retention") for result in results for r in result["runs"]["with"]):
        return ("The callback runs with every argument at its default; predictor='default' loaded the retention predictor in "
                "mergeprobe/data/, so the window end and every tracking step also predict retention and decide for the set.")
    return ("The callback runs with every argument at its default; no retention predictor was used (none found, or it failed on these "
            "features), so the run records and logs signals without predictions or a decision.")


def result_notes(results: list[dict[str, Any]], threads: int) -> list[str]:
    """Method notes, and what the results themselves show (identical losses, the peak-RSS reset)."""
    notes = [
        ("Each configuration is its own subprocess; the two of a pair run in lockstep, alternating step by step, so they never compete for "
         "the CPU and load drift hits both alike. Model loading is outside the timing. Step s = from getting the turn back after step s−1 to "
         "the end of step s (after every callback's on_step_end: logging, next batch, forward, backward, optimiser, callbacks), compared "
         "index by index; with several repeats each step's time is the median over repeats."),
        (f"torch runs {threads} thread(s) per process (--threads): on this shared 2-core machine two threads per process stall for seconds "
         "when other jobs hold a core. Wall time is what the targets are about; the CPU-time column is the same comparison in process CPU "
         "time (time.process_time), which the machine's other jobs disturb less."),
        ("In the window = summed step times of the window's steps before its last one (gradient-sketch hooks and probe-batch "
         "collection; the retention predictor loads meanwhile in a low-priority child process, whose CPU time is the 'child "
         "processes' row: on this machine it runs on the core the 1-thread training leaves free, on a machine whose cores training "
         "uses it competes with training at low priority). The "
         "window-end step carries the one-off cost: hidden states of the 16-sequence probe batch with the adapter off and on (2 forward "
         "passes of the probe batch), the record write (with those adapted states, this run's own states, as the record's cache), "
         "cross-disturbance against each stored run (base + merged update on both runs' batches: 2 passes per stored run; the stored "
         "run's own states come from its record's cache, this run's are the adapted states of its self-disturbance) and the TensorBoard "
         "heatmaps."),
        ("Outside the window: 'median' is the median over steps of the per-step ratio with/without (steps without tracking) — the steady "
         "state, as an A/B comparison of two processes, whose noise on this shared machine is about ±1.5 % for one pair of the default "
         "model (the same benchmark gave −1.4 % and +1.2 % on two occasions); 'direct' is the callback's own on_step_end time on those "
         "steps, timed inside it (its hooks are removed at the window end, so that is all it does there); 'summed' adds the tracking steps "
         "(update alignment and every pairwise feature against each stored run, every track_every steps) and step noise. On the tiny "
         "model (10 ms steps) a steady +1–3 % remains in the A/B comparison; earlier runs traced it to the libraries the callback "
         "imports into the training process, not to its code (with predictor=None and tensorboard=False it vanished). Since the "
         "retention predictor loads in a child process, scikit-learn is no longer among them; matplotlib (heatmaps) and TensorBoard's "
         "writer are (not re-traced since). On the default model it makes no measurable difference."),
        ("The predictor's child process needs about 3 s of CPU to load (a fresh interpreter importing NumPy, SciPy, scikit-learn and "
         "skops); a window that ends sooner waits for the rest at its last step. On the tiny model (a window of 8 steps of 10 ms) that "
         "wait is nearly all of its window-end step; on the default model the window takes about 17 s and nothing is waited for."),
        ("The default model is loaded with mergeprobe.models.load_base_model('default'); the benchmark then removes transformers' GGUF "
         "quantisation marker (the weights are already float32), without which Trainer refuses to train it."),
        predictor_note(results),
    ]
    for result in results:
        runs = result["runs"]["with"] + result["runs"]["without"]
        reset = all(r["peak_rss_reset"] for r in runs)
        notes.append(
            f"{result['model']}: peak RSS is ru_maxrss of each process "
            + ("with the high-water mark reset after model loading (/proc/self/clear_refs), i.e. the peak of training itself"
               if reset else "INCLUDING model loading (the high-water mark could not be reset)")
            + f"; losses of the two configurations are {'identical' if result['same_losses'] else 'DIFFERENT'} at every logged step."
        )
    return notes


def markdown_report(payload: dict[str, Any]) -> str:
    machine = payload["machine"]
    lines = [
        "# MergeProbeCallback overhead",
        "",
        f"Command: `{payload['command']}`  ",
        (f"Date: {payload['date']}; {machine['cpus_usable']} usable CPU cores (shared), torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}, peft {machine['peft']}, {machine['platform']}."),
        "",
        "Targets: total ≤ 3 % over a 200-step run with the default window, ≤ 0.5 % per step outside the window, peak RSS ≤ +10 %.",
    ]
    for result in payload["results"]:
        lines += ["", f"## {result['model']}", "", describe(result, result["steps"]) + ".", "",
                  "| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---:|---:|:---|"]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table_rows(result)]
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in payload["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    import peft
    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(width=max(Console().width, 150))
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    models = ["tiny", "default"] if args.model == "both" else [args.model]
    results = []
    with tempfile.TemporaryDirectory(prefix="mergeprobe-overhead-") as scratch:
        for model in models:
            results.append(benchmark_model(model, args, console, Path(scratch)))

    for result in results:
        table = Table(title=describe(result, args.steps), title_justify="left")
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("measure", "target") else "right")
        for row in table_rows(result):
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
    notes = result_notes(results, args.threads)
    for note in notes:
        console.print(Text(f"• {note}"))

    payload = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "torch_threads": args.threads,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "config": {"lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA, "target_modules": ALL_LINEAR, "batch": BATCH, "seq_len": SEQ_LEN,
                   "task": TASK, "other_tasks": OTHER_TASKS, "other_run_steps": OTHER_RUN_STEPS, "steps": args.steps,
                   "learning_rate": LEARNING_RATE, "callback": "MergeProbeCallback(store, run_name='timed') — every other argument at its default"},
        "targets": {"total": TARGET_TOTAL, "step_outside_window": TARGET_STEP_OUTSIDE, "peak_rss": TARGET_RSS},
        "results": results,
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown_report(payload))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
