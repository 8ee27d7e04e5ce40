"""One Hugging Face ``Trainer`` run with ``MergeProbeCallback`` attached: the smallest useful code.

The callback watches the first steps of training (the probe window), writes this
run's mergeability signals and its adapter into a probe store, and logs them to
TensorBoard. Every later run that uses the same store is compared with this one.

Run it::

    python examples/trainer_callback.py                 # embedded SmolLM2-135M, task "arithmetic", 60 steps
    python examples/trainer_callback.py --quick         # a tiny random Llama, 8 steps (seconds)
    python examples/trainer_callback.py --model HuggingFaceTB/SmolLM2-360M --out my-run

Everything is written under ``--out`` (default ``mergeprobe-example``): the probe store
in ``probe-store/`` and the Trainer's output and TensorBoard logs in ``runs/arithmetic/``.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), a Hub name or a local path")
    parser.add_argument("--task", default="arithmetic", help="a task of mergeprobe.tasks")
    parser.add_argument("--out", default="mergeprobe-example", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and 8 steps, for a smoke test")
    options = parser.parse_args()
    out = Path(options.out)

    model, tokenizer = load_model(options.model, options.quick)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    task = get_task(options.task)
    data = TaskDataset(tokenizer, task.examples("train", 32 if options.quick else 480))

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "runs" / task.name),
            max_steps=8 if options.quick else 60,
            per_device_train_batch_size=4 if options.quick else 8,
            learning_rate=2e-3,
            logging_steps=4,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        ),
        train_dataset=data,
        data_collator=lambda rows: collate(rows, tokenizer.pad_token_id),
        callbacks=[MergeProbeCallback(str(out / "probe-store"), run_name=task.name)],
    )
    trainer.train()

    record = ProbeStore(out / "probe-store").load(task.name)
    first, last = record.meta["probe_steps"]
    print(f"run {task.name!r}: status {record.status}, probe window steps {first}-{last}, "
          f"{len(record.tensors)} signal tensors, adapter at {record.adapter_path}")
    print(f"see the signals: tensorboard --logdir {out / 'runs'}")


if __name__ == "__main__":
    main()
