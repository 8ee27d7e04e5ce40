"""Train one LoRA adapter with a real ``Trainer`` and :class:`MergeProbeCallback` attached.

The adapter's early signals, pair features against the runs already in the store and
its final adapter all land in the probe store (the callback writes them); this module
only adds a small JSON summary (losses, wall time) next to the Trainer's output folder.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.mergebench.common import read_json, write_json
from benchmarks.mergebench.plan import ALL_LINEAR, AdapterSpec
from mergeprobe.tasks import TaskDataset, collate, get_task

SUMMARY = "train_summary.json"
TRAIN_SEED_OFFSET = 1000
"""Training examples are drawn with seed ``TRAIN_SEED_OFFSET + spec.seed`` (test sets use seed 0 of the test split)."""


def trained(store: Any, spec: AdapterSpec, out_dir: Path) -> bool:
    """Whether ``spec`` is already trained: a finished record with its final adapter, and our summary."""
    if spec.name not in store.runs():
        return False
    record = store.load(spec.name)
    return record.status == "finished" and record.adapter_path is not None and read_json(out_dir / SUMMARY) is not None


def train_adapter(
    base_model: Any,
    tokenizer: Any,
    spec: AdapterSpec,
    store: Any,
    out_dir: Path,
    max_length: int = 48,
    probe_fraction: float = 0.03,
    min_probe_steps: int = 8,
) -> dict[str, Any]:
    """Train ``spec`` on a copy of ``base_model`` with the probe callback; returns the summary.

    The run is named ``spec.name`` in ``store``; ``predictor=None`` (the benchmark labels
    merges, it does not decide them), no TensorBoard.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from mergeprobe.callbacks import MergeProbeCallback

    task = get_task(spec.task)
    examples = task.examples("train", spec.steps * spec.batch_size, seed=TRAIN_SEED_OFFSET + spec.seed)
    dataset = TaskDataset(tokenizer, examples, max_length=max_length)
    torch.manual_seed(spec.seed)
    model = get_peft_model(
        copy.deepcopy(base_model),
        LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=ALL_LINEAR, lora_dropout=0.0),
    )
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.lr,
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=max(1, spec.steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=spec.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    callback = MergeProbeCallback(
        store,
        run_name=spec.name,
        predictor=None,
        probe_fraction=probe_fraction,
        min_probe_steps=min_probe_steps,
        tensorboard=False,
        overwrite=True,
    )
    pad = tokenizer.pad_token_id or 0
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=lambda rows: collate(rows, pad_id=pad),
        callbacks=[callback],
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record = store.load(spec.name)
    summary = {
        "spec": spec.__dict__,
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, spec.steps),
        "losses": losses,
        "probe_steps": record.meta.get("probe_steps"),
        "status": record.status,
    }
    write_json(out_dir / SUMMARY, summary)
    del trainer, model
    return summary
