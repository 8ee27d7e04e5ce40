"""Several LoRA runs in sequence on one probe store, then the pairwise features the probes stored.

Each run's probe, at the end of its window, compares the run with every run already in
the store and writes the pair's features (update alignment, gradient alignment,
cross-disturbance, ...) to ``probe-store/pairs/``. ``reverse`` and ``sort_letters`` share
one input format but want different outputs: the pair built to conflict.

Run it::

    python examples/sequential_runs.py            # embedded SmolLM2-135M, 3 tasks x 60 steps
    python examples/sequential_runs.py --quick    # a tiny random Llama, 3 runs x 8 steps

Everything is written under ``--out`` (default ``mergeprobe-sequential``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from mergeprobe import MergeProbeCallback, ProbeStore
from mergeprobe.models import default_model_file, load_base_model
from mergeprobe.tasks import TaskDataset, collate, get_task

TASKS = ["reverse", "sort_letters", "arithmetic"]
SHOWN = ["update_alignment.mean", "gradient_alignment.mean", "cross_disturbance.mean", "b_crowding_top.mean"]


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


def train_one(base: Any, tokenizer: Any, task_name: str, out: Path, quick: bool) -> Any:
    """Train one LoRA adapter on ``task_name`` with the callback; returns the base model without it."""
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    task = get_task(task_name)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "runs" / task_name), max_steps=8 if quick else 60, per_device_train_batch_size=4 if quick else 8,
            learning_rate=2e-3, logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        ),
        train_dataset=TaskDataset(tokenizer, task.examples("train", 32 if quick else 480)),
        data_collator=lambda rows: collate(rows, tokenizer.pad_token_id),
        callbacks=[MergeProbeCallback(str(out / "probe-store"), run_name=task_name)],
    )
    trainer.train()
    return model.unload()  # the base weights back, without the LoRA layers, for the next run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), a Hub name or a local path")
    parser.add_argument("--out", default="mergeprobe-sequential", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and 8 steps per run, for a smoke test")
    options = parser.parse_args()
    out = Path(options.out)

    base, tokenizer = load_model(options.model, options.quick)
    for task_name in TASKS:
        base = train_one(base, tokenizer, task_name, out, options.quick)

    store = ProbeStore(out / "probe-store")
    print(f"runs in the store: {', '.join(store.runs())}")
    print(f"{'pair':<28}" + "".join(f"{name:>26}" for name in SHOWN))
    for a, b in store.pairs():  # both orientations of a pair, written by the later run's probe (features of a's retention)
        features = store.pair_features(a, b)
        print(f"{a + ' + ' + b:<28}" + "".join(f"{features[name]:>26.4f}" for name in SHOWN))


if __name__ == "__main__":
    main()
