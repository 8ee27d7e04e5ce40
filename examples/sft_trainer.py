"""TRL's ``SFTTrainer`` with ``MergeProbeCallback``: the callback works with any ``Trainer`` subclass.

``SFTTrainer`` wraps the model in LoRA itself (``peft_config=``) and tokenizes a
prompt–completion dataset, training on the completions only; the callback sees the
wrapped PEFT model at ``on_train_begin`` and probes it as usual.

Needs TRL (tested with ``trl==1.16.0`` on transformers 5.24 and peft 0.21.2)::

    pip install "trl>=1.16"

Run it::

    python examples/sft_trainer.py            # embedded SmolLM2-135M, task "arithmetic", 60 steps
    python examples/sft_trainer.py --quick    # a tiny random Llama, 8 steps

Everything is written under ``--out`` (default ``mergeprobe-sft``).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mergeprobe import MergeProbeCallback, ProbeStore
from mergeprobe.models import default_model_file, load_base_model
from mergeprobe.tasks import get_task


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
    parser.add_argument("--out", default="mergeprobe-sft", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and 8 steps, for a smoke test")
    options = parser.parse_args()
    if importlib.util.find_spec("trl") is None:
        raise SystemExit('this example needs TRL: pip install "trl>=1.16"')
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = Path(options.out)
    model, tokenizer = load_model(options.model, options.quick)
    task = get_task(options.task)
    examples = task.examples("train", 32 if options.quick else 480)
    data = Dataset.from_list([{"prompt": ex.prompt, "completion": " " + ex.answer} for ex in examples])

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out / "runs" / task.name),
            max_steps=8 if options.quick else 60,
            per_device_train_batch_size=4 if options.quick else 8,
            learning_rate=2e-3,
            logging_steps=4,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,  # SFTConfig defaults to bf16; plain float32 on CPU
            disable_tqdm=True,
        ),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
        callbacks=[MergeProbeCallback(str(out / "probe-store"), run_name=task.name)],
    )
    trainer.train()

    record = ProbeStore(out / "probe-store").load(task.name)
    first, last = record.meta["probe_steps"]
    print(f"SFTTrainer run {task.name!r}: status {record.status}, probe window steps {first}-{last}, "
          f"adapter at {record.adapter_path}")


if __name__ == "__main__":
    main()
