"""Merging from Python: ``merge_adapters`` with Pico and TIES, then ``PeftModel.from_pretrained`` on the result.

Two LoRA adapters are trained briefly (tasks ``reverse`` and ``arithmetic``) and saved as
PEFT directories; any two LoRA adapters trained on the same base model would do.
They are merged in core space (the dense ``d×d`` updates are never built) into PEFT
adapter directories, each of which is loaded back with ``PeftModel.from_pretrained``
and scored on both tasks against the single adapters.

Run it::

    python examples/merge_python.py            # embedded SmolLM2-135M, 2 runs x 60 steps, real scores
    python examples/merge_python.py --quick    # a tiny random Llama, 2 runs x 8 steps (scores are 0)

Everything is written under ``--out`` (default ``mergeprobe-merge-python``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from mergeprobe import merge_adapters
from mergeprobe.models import default_model_file, load_base_model
from mergeprobe.tasks import TaskDataset, collate, get_task, score

TASKS = ["reverse", "arithmetic"]


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


def train_adapter(base: Any, tokenizer: Any, task_name: str, out: Path, quick: bool) -> tuple[Path, Any]:
    """Train a LoRA adapter on ``task_name`` and save it; returns its directory and the base model without it."""
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "runs" / task_name), max_steps=8 if quick else 60, per_device_train_batch_size=4 if quick else 8,
            learning_rate=2e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        ),
        train_dataset=TaskDataset(tokenizer, get_task(task_name).examples("train", 32 if quick else 480)),
        data_collator=lambda rows: collate(rows, tokenizer.pad_token_id),
    ).train()
    model.save_pretrained(str(out / "adapters" / task_name))
    return out / "adapters" / task_name, model.unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), a Hub name or a local path")
    parser.add_argument("--out", default="mergeprobe-merge-python", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and 8 steps per run, for a smoke test")
    options = parser.parse_args()
    out = Path(options.out)

    base, tokenizer = load_model(options.model, options.quick)
    adapters = []
    for task_name in TASKS:
        path, base = train_adapter(base, tokenizer, task_name, out, options.quick)
        adapters.append(path)

    # Pico (over task arithmetic) and TIES; overwrite=True replaces an earlier run's output.
    pico = merge_adapters(adapters, method="pico", out_dir=out / "merged-pico", overwrite=True)
    ties = merge_adapters(adapters, method="ties", density=0.5, out_dir=out / "merged-ties", overwrite=True)
    for result in (pico, ties):
        ranks = sorted({a.shape[0] for _, a in result.modules.values()})
        print(f"{result.method}: {len(result.modules)} modules, rank {ranks}, written to {result.out_dir}")

    tests = {name: get_task(name).examples("test", 16 if options.quick else 64) for name in TASKS}
    print(f"{'adapter':<26}" + "".join(f"{name:>12}" for name in TASKS))
    for label, directory in [*zip(TASKS, adapters), ("merged (pico)", pico.out_dir), ("merged (ties)", ties.out_dir)]:
        model = PeftModel.from_pretrained(base, str(directory))
        scores = [score(model, tokenizer, get_task(name), tests[name]) for name in TASKS]
        print(f"{label:<26}" + "".join(f"{value:>12.3f}" for value in scores))
        base = model.unload()


if __name__ == "__main__":
    main()
