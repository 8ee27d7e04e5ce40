"""Train one LoRA adapter on the tiny Llama with a real Trainer and MergeProbeCallback.

Used in-process by the tests, as a subprocess (concurrent runs on one store) and under
``torchrun`` (DDP on CPU with gloo). Each run learns a different token distribution,
so runs differ in how they align.

    python tests/scripts/tiny_train.py --store S --run-name a --output-dir O [--seed 0] [--max-steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import ALL_LINEAR, build_tiny_llama  # noqa: E402


class TokenDataset(torch.utils.data.Dataset):
    """Sequences drawn from a run-specific slice of the vocabulary (a learnable pattern)."""

    def __init__(self, seed: int, n: int = 64, length: int = 16, vocab: int = 128):
        generator = torch.Generator().manual_seed(1000 + seed)
        low = (seed * 29) % (vocab - 32)
        start = torch.randint(low, low + 32, (n, 1), generator=generator)
        self.ids = (start + torch.arange(length) * (1 + seed % 3)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def negated_lm_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Minus the causal-LM loss: training on it is gradient ascent."""
    logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1])
    return -torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAt` to stand for a killed training process."""


def _crash_callback():
    from transformers import TrainerCallback

    class CrashAtStep(TrainerCallback):
        def __init__(self, step: int):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                raise SimulatedCrash(f"simulated crash at step {self.step}")

    return CrashAtStep


def CrashAt(step: int):  # noqa: N802 - a factory that reads like the class it builds
    return _crash_callback()(step)


def train(store: str, run_name: str, output_dir: str, seed: int = 0, max_steps: int = 12, report_to: list[str] | None = None,
          resume: str | bool | None = None, save_steps: int | None = None, lr: float = 5e-3, crash_at: int | None = None,
          ascent: bool = False, data_seed: int | None = None, **callback_kwargs: Any):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from mergeprobe.callbacks import MergeProbeCallback

    torch.manual_seed(seed)
    model = get_peft_model(build_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0))
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        logging_steps=2,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=report_to if report_to is not None else [],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        restore_callback_states_from_checkpoint=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    callback_kwargs.setdefault("min_probe_steps", 4)
    callback_kwargs.setdefault("track_every", 4)
    callback = MergeProbeCallback(store, run_name=run_name, **callback_kwargs)
    callbacks = [callback] if crash_at is None else [callback, CrashAt(crash_at)]
    # ascent=True maximises the loss: its updates oppose those of the same run by descent (a constructed conflict).
    loss_func = negated_lm_loss if ascent else None
    dataset = TokenDataset(seed if data_seed is None else data_seed)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks, compute_loss_func=loss_func)
    trainer.train(resume_from_checkpoint=resume)
    # On resume the Trainer may rebuild the callback from its checkpointed state: return the live one.
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, MergeProbeCallback)]
    return trainer, callback


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--report-to", default="")
    parser.add_argument("--callback-kwargs", default="{}")
    parser.add_argument("--train-kwargs", default="{}")
    options = parser.parse_args()
    train(options.store, options.run_name, options.output_dir, options.seed, options.max_steps,
          report_to=[r for r in options.report_to.split(",") if r], **json.loads(options.train_kwargs),
          **json.loads(options.callback_kwargs))
    if torch.distributed.is_initialized():  # as in examples/ddp_torchrun.py: gloo can abort or hang at interpreter shutdown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
