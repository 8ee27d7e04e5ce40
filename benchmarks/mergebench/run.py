"""Run MergeBench: ``python -m benchmarks.mergebench.run [--quick] [--stage train|merge|fit|report|all]``.

Stages (each resumable; what is cached under ``benchmarks/cache/mergebench[-quick]/`` is skipped):

``train``
    tiny part: the reduced tokenizer, the tiny Llama's pretraining, then every sweep
    adapter; smollm2 part (not with ``--quick``): one adapter per task on the embedded
    SmolLM2-135M-Instruct. Every adapter trains with ``MergeProbeCallback`` attached,
    into its part's probe store.
``merge``
    base and single-adapter scores, every merge job of the plan scored and labelled
    (recorded with ``store.record_outcome``), then the feature table of each part.
``fit``
    fit and evaluate MergeProbe (leave-one-task-out, across scale, baselines, decision
    agreement, policy value, merger quality); the full run saves the default predictor
    to ``mergeprobe/data/`` with the table it was fitted on.
``report``
    ``benchmarks/results/mergebench.{json,md}`` (``--quick``: under the cache folder).

Example
-------
``python -m benchmarks.mergebench.run --quick`` (a few minutes: tiny model only, few adapters)
``nohup python -m benchmarks.mergebench.run > mergebench.log 2>&1 &`` (the full run)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.mergebench.common import (
    cache_root,
    part_dir,
    read_json,
    set_threads,
    write_json,
)
from benchmarks.mergebench.plan import PartPlan, plan

STAGES = ("train", "merge", "fit", "report")


PART_FILTER: list[str] = []


def parts(quick: bool) -> list[str]:
    """The parts a run covers: the tiny sweep, and SmolLM2 unless ``quick`` (``--part`` picks one)."""
    chosen = ["tiny"] if quick else ["tiny", "smollm2"]
    return [p for p in chosen if not PART_FILTER or p in PART_FILTER]


def _store(folder: Path) -> Any:
    from mergeprobe.store import ProbeStore

    return ProbeStore(folder / "store")


def load_part(part: str, quick: bool) -> tuple[PartPlan, Any, Any, Path]:
    """The plan, base model (eval, float32), tokenizer and cache folder of ``part``; pretrains the tiny model once."""
    the_plan = plan(part, quick)
    folder = part_dir(quick, part)
    if part == "smollm2":
        from mergeprobe.models import load_base_model

        model, tokenizer = load_base_model("default")
        # The GGUF weights are dequantised to float32 on load; the GGUF "quantizer" left on the
        # model only makes Trainer refuse to train it (and .to(dtype) refuse to cast it).
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        return the_plan, model.eval(), tokenizer, folder
    from benchmarks.mergebench.tiny import load_tiny, pretrain_tiny, reduced_tokenizer

    options = the_plan.extra["pretrain"]
    tokenizer = reduced_tokenizer(folder, options["tasks"])
    base_dir = folder / "base"
    if read_json(base_dir / "pretrain_summary.json") is None:
        pretrain_tiny(base_dir, tokenizer, the_plan.extra["model"], options["tasks"], options["steps"], options["batch_size"],
                      options["lr"], max_length=the_plan.max_length)
    return the_plan, load_tiny(base_dir), tokenizer, folder


def stage_train(quick: bool, timings: dict[str, float]) -> None:
    from tqdm.auto import tqdm

    from benchmarks.mergebench.training import train_adapter, trained

    for part in parts(quick):
        start = time.perf_counter()
        the_plan, model, tokenizer, folder = load_part(part, quick)
        store = _store(folder)
        for spec in tqdm(the_plan.adapters, desc=f"{part}: training adapters", unit="adapter"):
            out = folder / "train" / spec.name
            if trained(store, spec, out):
                continue
            summary = train_adapter(model, tokenizer, spec, store, out, max_length=the_plan.max_length)
            tqdm.write(f"{part}: {spec.name} trained in {summary['seconds']:.0f} s, loss {summary['losses'][:1]} → {summary['losses'][-1:]}")
        timings[f"train.{part}"] = time.perf_counter() - start
        del model
        gc.collect()


def stage_merge(quick: bool, timings: dict[str, float]) -> None:
    from benchmarks.mergebench.labels import Labeller
    from benchmarks.mergebench.rows import RowBuilder

    for part in parts(quick):
        start = time.perf_counter()
        the_plan, model, tokenizer, folder = load_part(part, quick)
        store = _store(folder)
        dtype = the_plan.extra.get("eval_dtype")
        if dtype:
            import torch

            # Precision check: single-adapter and base scores in float32 too, before casting.
            check = Labeller(the_plan, model, tokenizer, store, folder, record=False)
            check.alone_scores("alone_float32.json")
            model = model.to(getattr(torch, dtype))
        results = Labeller(the_plan, model, tokenizer, store, folder).run_all()
        rows = RowBuilder(the_plan, model, store, folder).rows(results)
        table = folder / "table.jsonl"
        tmp = table.with_name(".table.jsonl.tmp")
        tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        os.replace(tmp, table)
        timings[f"merge.{part}"] = time.perf_counter() - start
        del model
        gc.collect()


def stage_fit(quick: bool, timings: dict[str, float]) -> None:
    from benchmarks.mergebench.analysis import analyse

    start = time.perf_counter()
    analyse(quick)
    timings["fit"] = time.perf_counter() - start


def stage_report(quick: bool, timings: dict[str, float], command: str) -> None:
    from benchmarks.mergebench.report import write_report

    write_report(quick, timings, command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mergebench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, few adapters (a few minutes)")
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    parser.add_argument("--part", choices=("tiny", "smollm2"), action="append", default=[],
                        help="train/merge only this part (repeatable; default: all parts of the mode)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP threads per "
                             "process wait on each other at every barrier; one thread was several times faster)")
    options = parser.parse_args(argv)
    PART_FILTER[:] = options.part
    set_threads(options.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    stages = STAGES if options.stage == "all" else (options.stage,)
    timing_file = cache_root(options.quick) / "timings.json"
    timings = read_json(timing_file) or {}
    command = "python -m benchmarks.mergebench.run" + (" --quick" if options.quick else "")
    for stage in stages:
        stage_timings: dict[str, float] = {}
        start = time.perf_counter()
        if stage == "train":
            stage_train(options.quick, stage_timings)
        elif stage == "merge":
            stage_merge(options.quick, stage_timings)
        elif stage == "fit":
            stage_fit(options.quick, stage_timings)
        else:
            stage_report(options.quick, timings, command)
        stage_timings[f"stage.{stage}"] = time.perf_counter() - start
        # A rerun that found the stage cached takes a fraction of the time: keep the wall time of the run that did the work.
        for key, value in stage_timings.items():
            if value >= 0.1 * timings.get(key, 0.0):
                timings[key] = value
        write_json(timing_file, timings)
        print(f"[mergebench] stage {stage} done in {stage_timings[f'stage.{stage}']:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
