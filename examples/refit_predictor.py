"""Refit the retention predictor on your own merge outcomes, then use it in the callback.

1. Train four LoRA runs on one probe store with ``MergeProbeCallback`` (their adapters
   and pairwise features land in the store).
2. Merge every pair with Pico, score each member alone and merged with
   ``mergeprobe.tasks.score`` (answer likelihood here), and record the measured
   retention (merged / alone) with ``store.record_outcome``.
3. Fit a ``MergeProbe`` on those outcomes with ``fit_from_store`` and save it.
4. Train a fifth run with ``MergeProbeCallback(..., predictor=path)``: at the end of its
   probe window it predicts its retention with every stored run and decides for the set.

Six pairs are far too few for a trustworthy predictor: refit on dozens of real merges
(every evaluated merge you record makes the next fit better).

Run it::

    python examples/refit_predictor.py            # embedded SmolLM2-135M, 5 runs x 60 steps
    python examples/refit_predictor.py --quick    # a tiny random Llama, 5 runs x 8 steps

Everything is written under ``--out`` (default ``mergeprobe-refit``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from mergeprobe import MergeProbeCallback, ProbeStore, merge_adapters
from mergeprobe.models import default_model_file, load_base_model
from mergeprobe.predictor import fit_from_store
from mergeprobe.tasks import TaskDataset, collate, get_task, score

STORED_RUNS = ["reverse", "sort_letters", "arithmetic", "pyeval"]
NEW_RUN = "stdlib"
METHOD = "pico"  # the method the decision merges with; fit on outcomes of the method you will use


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


def train_run(base: Any, tokenizer: Any, task_name: str, out: Path, quick: bool, predictor: Any = "default") -> tuple[Any, Any]:
    """Train one LoRA run with the callback; returns the callback and the base model without the adapter."""
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    callback = MergeProbeCallback(str(out / "probe-store"), run_name=task_name, predictor=predictor)
    Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "runs" / task_name), max_steps=8 if quick else 60, per_device_train_batch_size=4 if quick else 8,
            learning_rate=2e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        ),
        train_dataset=TaskDataset(tokenizer, get_task(task_name).examples("train", 32 if quick else 480)),
        data_collator=lambda rows: collate(rows, tokenizer.pad_token_id),
        callbacks=[callback],
    ).train()
    return callback, model.unload()


def answer_likelihood(model: Any, tokenizer: Any, task_name: str, examples: list) -> float:
    """``exp(−loss)`` on the gold answers: unlike exact match, never 0 early in training (or on a random model).

    Score with your task's own metric (``score(model, tokenizer, get_task(name), examples)``)
    once your adapters have learnt it: retention = merged / alone needs alone > 0.
    """
    return score(model, tokenizer, dataclasses.replace(get_task(task_name), metric="exp_neg_loss"), examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), a Hub name or a local path")
    parser.add_argument("--out", default="mergeprobe-refit", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and 8 steps per run, for a smoke test")
    options = parser.parse_args()
    out = Path(options.out)

    # 1. Runs on one store (no predictor yet: signals are captured and compared all the same).
    base, tokenizer = load_model(options.model, options.quick)
    for task_name in STORED_RUNS:
        _, base = train_run(base, tokenizer, task_name, out, options.quick, predictor=None)
    store = ProbeStore(out / "probe-store")

    # 2. Real merges, scored: retention = merged score / score alone, per member.
    tests = {name: get_task(name).examples("test", 16 if options.quick else 64) for name in STORED_RUNS}

    def evaluate(adapter_dir: Any, names: list[str]) -> tuple[dict[str, float], Any]:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        scores = {name: answer_likelihood(model, tokenizer, name, tests[name]) for name in names}
        return scores, model.unload()

    alone = {}
    for name in STORED_RUNS:
        scores, base = evaluate(store.load(name).adapter_path, [name])
        alone.update(scores)
    for a, b in itertools.combinations(STORED_RUNS, 2):
        merged = merge_adapters([store.load(a).adapter_path, store.load(b).adapter_path], method=METHOD,
                                out_dir=out / "merges" / f"{a}+{b}", overwrite=True, show_progress=False)
        merged_scores, base = evaluate(merged.out_dir, [a, b])
        retention = {m: merged_scores[m] / alone[m] for m in (a, b)}
        store.record_outcome([a, b], METHOD, retention, scores={"alone": {m: alone[m] for m in (a, b)}, "merged": merged_scores})
        print(f"outcome {a} + {b}: retention " + ", ".join(f"{m} {value:.3f}" for m, value in retention.items()))

    # 3. Fit on the store's outcomes and save (skops, no pickle).
    probe = fit_from_store(store, method=METHOD, min_samples_leaf=2, max_iter=50)
    path = probe.save(out / "mergeprobe.skops")
    print(f"fitted MergeProbe on {len(store.outcomes())} outcomes, saved to {path}")

    # 4. A new run uses it: its probe predicts retention with every stored run and decides.
    callback, base = train_run(base, tokenizer, NEW_RUN, out, options.quick, predictor=str(path))
    for other in STORED_RUNS:
        features = store.pair_features(NEW_RUN, other)
        print(f"predicted retention of {NEW_RUN} merged with {other}: {probe.predict_retention(features)[0]:.3f}")
    decision = callback.decision
    print(f"decision: {decision.action} {sorted(decision.merge_set)} with {decision.method}; routed {sorted(decision.routed)}")


if __name__ == "__main__":
    main()
