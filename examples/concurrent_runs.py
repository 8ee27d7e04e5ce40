"""The same runs as concurrent processes sharing one probe store, then the store listing.

Each process trains one adapter with ``MergeProbeCallback``. The store is safe to share
(every write is atomic and locked), so a run whose window ends compares itself with
whatever runs are already there; ``merge_on_end`` with ``expected_runs`` makes the
last run to finish merge the set, exactly once, into ``probe-store/merges/``. The
processes could as well be separate jobs on machines sharing a file system.

Run it::

    python examples/concurrent_runs.py            # embedded SmolLM2-135M, 3 processes x 60 steps
    python examples/concurrent_runs.py --quick    # a tiny random Llama, 3 processes x 8 steps

Everything is written under ``--out`` (default ``mergeprobe-concurrent``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from mergeprobe import MergeProbeCallback, ProbeStore
from mergeprobe.models import default_model_file, load_base_model
from mergeprobe.tasks import TaskDataset, collate, get_task

TASKS = ["reverse", "sort_letters", "arithmetic"]


def load_model(name: str, quick: bool) -> tuple[Any, Any]:
    """``name``'s model and tokenizer ("default": the embedded SmolLM2-135M), or with ``quick`` a tiny random Llama."""
    if not quick:
        return load_base_model(name)
    path = default_model_file()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)  # every run must start from the same base weights
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config), tokenizer


def train_one(task_name: str, model_name: str, out: Path, quick: bool) -> None:
    """One training process: load the base model, train a LoRA adapter on ``task_name`` with the callback."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(TASKS)))  # share the cores between the processes
    base, tokenizer = load_model(model_name, quick)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    task = get_task(task_name)
    # predictor=None: merge every finished run when the last one ends. With the shipped predictor
    # (the default), merge_on_end merges only the set the decision keeps together, and these short
    # runs on unrelated tasks would be routed, leaving nothing to merge.
    callback = MergeProbeCallback(str(out / "probe-store"), run_name=task_name, merge_on_end="ties", expected_runs=TASKS,
                                  predictor=None)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "runs" / task_name), max_steps=8 if quick else 60, per_device_train_batch_size=4 if quick else 8,
            learning_rate=2e-3, logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        ),
        train_dataset=TaskDataset(tokenizer, task.examples("train", 32 if quick else 480)),
        data_collator=lambda rows: collate(rows, tokenizer.pad_token_id),
        callbacks=[callback],
    )
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), a Hub name or a local path")
    parser.add_argument("--out", default="mergeprobe-concurrent", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and 8 steps per run, for a smoke test")
    options = parser.parse_args()
    out = Path(options.out)

    spawn = multiprocessing.get_context("spawn")  # never fork a process that has imported torch
    processes = [spawn.Process(target=train_one, args=(name, options.model, out, options.quick), name=name) for name in TASKS]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        raise SystemExit(f"training failed for {', '.join(failed)}")

    store = ProbeStore(out / "probe-store")
    print(f"{'run':<14}{'status':<10}{'probe steps':<13}{'pid':>8}  adapter")
    for record in store.records():
        first, last = record.probe_steps
        print(f"{record.run_name:<14}{record.status:<10}{f'{first}-{last}':<13}{record.pid:>8}  {record.adapter_path}")
    print(f"pairs compared: {', '.join(f'{a}+{b}' for a, b in store.pairs())}")
    for merge in store.merges():
        info = merge["info"] or {}
        print(f"merge {merge['set_id']}: merged={merge['merged']} method={info.get('method')} "
              f"runs={','.join(info.get('runs', []))} adapter={info.get('adapter')}")


if __name__ == "__main__":
    main()
