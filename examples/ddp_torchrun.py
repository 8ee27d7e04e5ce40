"""One run trained with DDP under ``torchrun``, with ``MergeProbeCallback`` on every rank.

Every rank takes part in the probe (the gradient sketches are all-reduced at the end
of the window); only rank 0 writes the store record, the adapter and the TensorBoard
events. On GPUs, drop ``use_cpu=True`` and ``ddp_backend="gloo"`` (NCCL is the default there).

Run it (two CPU processes, gloo)::

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py            # embedded SmolLM2-135M, 60 steps
    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --quick    # a tiny random Llama, 8 steps

Everything is written under ``--out`` (default ``mergeprobe-ddp``).
"""

from __future__ import annotations

import argparse
import os
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
    torch.manual_seed(0)  # every rank must start from the same base weights
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), a Hub name or a local path")
    parser.add_argument("--task", default="arithmetic", help="a task of mergeprobe.tasks")
    parser.add_argument("--out", default="mergeprobe-ddp", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and 8 steps, for a smoke test")
    options = parser.parse_args()
    out = Path(options.out)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    model, tokenizer = load_model(options.model, options.quick)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    task = get_task(options.task)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "runs" / task.name),
            max_steps=8 if options.quick else 60,
            per_device_train_batch_size=2 if options.quick else 4,  # per rank: the global batch is world_size times this
            learning_rate=2e-3,
            logging_steps=4,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            ddp_backend="gloo" if world_size > 1 else None,
            ddp_find_unused_parameters=False,  # every LoRA parameter takes part in every step
            disable_tqdm=True,
        ),
        train_dataset=TaskDataset(tokenizer, task.examples("train", 32 if options.quick else 480)),
        data_collator=lambda rows: collate(rows, tokenizer.pad_token_id),
        callbacks=[MergeProbeCallback(str(out / "probe-store"), run_name=task.name)],
    )
    trainer.train()

    if trainer.is_world_process_zero():
        record = ProbeStore(out / "probe-store").load(task.name)
        sketches = [name for name in record.tensors if name.startswith("gradient.")]
        print(f"world size {world_size}: run {task.name!r} {record.status}, {len(sketches)} gradient sketches "
              f"all-reduced over the ranks, adapter at {record.adapter_path}")
    # Tear the process group down before exit, once every rank's collectives are done: left to the interpreter's
    # shutdown, gloo can abort a rank ("terminate called without an active exception"), and torn down while its
    # worker threads still release the last all-gather's tensors, it can deadlock.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
