"""``mergeprobe demo``: the whole product on the embedded default model, start to finish.

Three LoRA adapters are trained one after another on benchmark tasks with
:class:`~mergeprobe.callbacks.MergeProbeCallback` attached (one task chosen to conflict
with another: the same input format, a different output). After each probe window the
pairwise predicted retention and the set decision are printed; an adapter predicted
unmergeable is stopped early; the rest is merged with the method the decision picks
and evaluated against each single adapter. Everything lands in one directory: the
probe store, the TensorBoard logs and the merged adapter.

Example
-------
>>> from mergeprobe.demo import DemoConfig, run_demo
>>> summary = run_demo(DemoConfig(quick=True, out_dir="demo-out"))  # doctest: +SKIP
>>> summary["decision"]["action"]  # doctest: +SKIP
'merge'
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DemoConfig:
    """What the demo trains. ``quick`` swaps in a tiny Llama built from a config (no real learning)."""

    # Tasks SmolLM2-135M learns in this budget (see benchmarks/results/mergebench.md); reverse_chars
    # and sort_chars share their input format and want different outputs: the conflicting pair.
    tasks: tuple[str, ...] = ("reverse_chars", "sort_chars", "stdlib")
    steps: int = 60
    learning_rate: float = 3e-3
    max_length: int = 48
    rank: int = 8
    batch_size: int = 8
    train_examples: int = 480
    test_examples: int = 64
    out_dir: str = "mergeprobe-demo"
    model: str = "default"
    quick: bool = False
    predictor: Any = "default"
    seed: int = 0
    overwrite: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.quick:
            self.steps = min(self.steps, 10)
            self.train_examples = min(self.train_examples, 80)
            self.test_examples = min(self.test_examples, 16)


def _tiny_model(tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # The LM head over SmolLM2's 49k-token vocabulary dominates the cost: keep the width small.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    model.config.name_or_path = "tiny-llama-demo"
    return model


def _load(config: DemoConfig) -> tuple[Any, Any]:
    from mergeprobe.models import load_base_model

    if not config.quick:
        return load_base_model(config.model)
    from transformers import AutoTokenizer

    from mergeprobe.models import default_model_file

    path = default_model_file()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return _tiny_model(tokenizer), tokenizer


def _retention_table(console: Any, run: str, callback: Any) -> None:
    from rich import box
    from rich.table import Table

    comparisons = callback._probe.comparisons if callback._probe else {}
    if not comparisons:
        console.print(f"[dim]{run}: first run in the store, nothing to compare yet.[/dim]")
        return
    table = Table(title=f"after {run}'s probe window (step {callback.window_end})", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption=f"predicted: {run}'s retention merged with the other, mean (≥ lower bound)")
    for column in ("pair", "update cos", "gradient cos", "cross-disturb.", "predicted"):
        table.add_column(column, justify="right" if column != "pair" else "left", no_wrap=True)
    for other, comparison in comparisons.items():
        f = comparison.features
        predicted = "—" if comparison.predicted_retention is None else f"{comparison.predicted_retention:.2f} (≥{comparison.predicted_lower:.2f})"
        table.add_row(f"{run} + {other}", f"{f.get('update_alignment.mean', float('nan')):+.3f}",
                      f"{f.get('gradient_alignment.mean', float('nan')):+.3f}", f"{f.get('cross_disturbance.mean', float('nan')):.3f}", predicted)
    console.print(table)
    if callback.decision is not None:
        d = callback.decision
        method = f" with {d.method}" if d.method else ""
        console.print(f"[bold]decision:[/bold] {d.action}{method}")
        for reason in d.reasons:
            console.print(f"  • {reason}")


def run_demo(config: DemoConfig | None = None, console: Any = None) -> dict[str, Any]:
    """Train, probe, decide, merge and evaluate; returns the summary (also written as JSON)."""
    import json

    from peft import LoraConfig, PeftModel, get_peft_model
    from rich.console import Console
    from transformers import Trainer, TrainingArguments

    from mergeprobe.callbacks import MergeProbeCallback
    from mergeprobe.merging import merge_adapters
    from mergeprobe.store import ProbeStore
    from mergeprobe.tasks import TaskDataset, collate, get_task, score

    config = config or DemoConfig()
    console = console or Console()
    out = Path(config.out_dir)
    if out.exists() and config.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    console.rule("mergeprobe demo")
    console.print(f"loading {'a tiny Llama (--quick)' if config.quick else 'the embedded SmolLM2-135M-Instruct'} …")
    base, tokenizer = _load(config)
    torch.manual_seed(config.seed)
    tasks = [get_task(name) for name in config.tasks]
    test_sets = {t.name: t.examples("test", config.test_examples, seed=config.seed) for t in tasks}
    base_scores = {t.name: score(base, tokenizer, t, test_sets[t.name]) for t in tasks}
    store_path = out / "probe-store"
    summary: dict[str, Any] = {"config": asdict(config), "runs": {}, "base_scores": base_scores}
    callbacks: dict[str, Any] = {}
    for task in tasks:
        console.rule(f"training {task.name}: {task.description}")
        model = get_peft_model(base, LoraConfig(r=config.rank, lora_alpha=2 * config.rank, target_modules=ALL_LINEAR, lora_dropout=0.0))
        args = TrainingArguments(
            output_dir=str(out / "runs" / task.name), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate, lr_scheduler_type="constant", logging_steps=5, save_strategy="no",
            report_to=["tensorboard"], use_cpu=True, seed=config.seed, disable_tqdm=False,
        )
        callback = MergeProbeCallback(str(store_path), run_name=task.name, predictor=config.predictor, stop_unmergeable=True,
                                      track_every=20)
        data = TaskDataset(tokenizer, task.examples("train", config.train_examples, seed=config.seed), max_length=config.max_length)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                          data_collator=lambda rows: collate(rows, tokenizer.pad_token_id or 0))
        trainer.train()
        callbacks[task.name] = callback
        _retention_table(console, task.name, callback)
        single = score(model, tokenizer, task, test_sets[task.name])
        summary["runs"][task.name] = {
            "steps_trained": int(trainer.state.global_step), "steps_planned": config.steps, "stopped": callback.stop_reason,
            "base_score": base_scores[task.name], "single_score": single,
        }
        console.print(f"{task.name}: score {single:.2f} alone (base model {base_scores[task.name]:.2f}), "
                      f"{trainer.state.global_step}/{config.steps} steps")
        base = model.unload()  # the base weights back, without LoRA layers
    decision = callbacks[tasks[-1].name].decision
    store = ProbeStore(store_path)
    finished = [name for name in config.tasks if store.load(name).meta.get("status") == "finished"]
    summary["decision"] = decision.to_dict() if decision is not None else None

    def merge_and_score(members: list[str], method: str, params: dict[str, Any], weights: list[float] | None, where: Path) -> dict[str, Any]:
        nonlocal base
        calibration = torch.cat([store.load(m).tensors["probe_input_ids"] for m in members]) if method == "tada" else None
        merge_adapters([store.load(m).adapter_path for m in members], method=method, weights=weights, out_dir=where,
                       overwrite=True, base_model=base if method == "tada" else None, calibration=calibration, **params)
        merged_model = PeftModel.from_pretrained(base, str(where))
        scores = {m: score(merged_model, tokenizer, get_task(m), test_sets[m]) for m in members}
        base = merged_model.unload()
        return {"members": members, "method": method, "adapter": str(where), "scores": scores}

    if decision is not None:
        members = [m for m in decision.merge_set if m in finished]
        method = decision.method or "linear"
        params = {"base": decision.base_method} if method == "pico" and decision.base_method else {}
        weights = [decision.weights.get(m, 1.0) for m in members]
    else:
        console.print("[yellow]no retention predictor is available: merging every finished adapter with task arithmetic.[/yellow]")
        members, method, params, weights = finished, "linear", {}, None
    if len(members) >= 2:
        console.rule(f"merging {', '.join(members)} with {method}, as decided")
        summary["merged"] = merge_and_score(members, method, params, weights, out / "merged-adapter")
    else:
        console.print(f"[bold]nothing to merge:[/bold] the decision keeps {', '.join(decision.routed) if decision else 'every adapter'} "
                      "separate (route).")
    # What ignoring the decision would have cost: task arithmetic of every adapter, measured.
    everyone = [m for m in config.tasks if store.load(m).adapter_path is not None]
    if len(everyone) >= 2 and (sorted(everyone) != sorted(members) or method != "linear"):
        console.rule(f"for comparison: task arithmetic of all {len(everyone)} adapters, ignoring the decision")
        summary["blind_merge"] = merge_and_score(everyone, "linear", {}, None, out / "blind-merge")
    _print_summary(console, summary, callbacks, out)
    summary["seconds"] = round(time.time() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _print_summary(console: Any, summary: dict[str, Any], callbacks: dict[str, Any], out: Path) -> None:
    from rich import box
    from rich.table import Table

    merged = summary.get("merged") or {}
    blind = summary.get("blind_merge") or {}
    decision = summary.get("decision") or {}
    predicted = decision.get("member_retention", {}) if decision else {}

    def cell(result: dict[str, Any], name: str, single: float) -> str:
        value = result.get("scores", {}).get(name)
        if value is None:
            return "—"
        return f"{value:.2f} ({value / single:.2f})" if single > 0 else f"{value:.2f}"

    table = Table(title="summary: held-out scores (retention = merged / alone)", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="decided: the merge the decision made; TA all: task arithmetic of every adapter, ignoring the decision; stop: stopped early")
    for column in ("adapter", "base → alone", "predicted", "decided", "TA all", "steps"):
        table.add_column(column, justify="left" if column == "adapter" else "right", no_wrap=True)
    for name, run in summary["runs"].items():
        single = run["single_score"]
        table.add_row(
            name, f"{run['base_score']:.2f} → {single:.2f}",
            f"{predicted[name]:.2f}" if name in predicted else "—",
            "routed" if name in decision.get("routed", []) else cell(merged, name, single),
            cell(blind, name, single),
            f"{run['steps_trained']}/{run['steps_planned']}" + (" stop" if run["stopped"] else ""),
        )
    console.print(table)
    if decision:
        console.print(f"decision: [bold]{decision['action']}[/bold]; merged {', '.join(decision['merge_set']) or 'nothing'}"
                      f"; routed {', '.join(decision['routed']) or 'nothing'}")
    if merged:
        console.print(f"merged adapter: {merged['adapter']}  (PeftModel.from_pretrained(base, {merged['adapter']!r}))")
    console.print(f"probe store: {out / 'probe-store'}   TensorBoard logs: {out / 'runs'}")
    console.print(f"open TensorBoard: [bold]tensorboard --logdir {out / 'runs'}[/bold]")
