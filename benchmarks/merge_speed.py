"""Merge speed and peak memory at Llama-2-7B shapes: every mergeprobe method against PEFT.

Builds T random rank-16 LoRA adapters (in memory, no base weights) on a Llama-2-7B
module set — per layer q, k, v, o (4096×4096), gate and up (11008×4096, out×in) and
down (4096×11008) — and times every registered merge method on all ``--layers``
layers. Each case runs in its own subprocess, so the peak RSS reported
(``resource.getrusage(...).ru_maxrss``) is that case's own: the T adapters held in
memory plus whatever the merge allocates, plus the interpreter and torch.

TaDA's merge step is timed without its probe: the worker registers a subclass whose
``prepare`` sets per-module gates from a synthetic depth profile (task strong in
shallow layers) instead of running the base model, so everything after the probe —
per-adapter SVDs through the cores, conflict dropping, the gated core merge and the
truncation — is what is timed.

PEFT's ``add_weighted_adapter`` is then timed on ``--peft-layers`` layers (default 1 =
7 modules, because its SVD combinations build every dense ΔW and run a full SVD per
module: minutes per layer on a CPU): a real ``PeftModel`` over a small ``nn.Module``
holding just those Linear layers with the 7B shapes (uninitialised weights, never read),
with the same random factors loaded into T adapters. Its time on ``--layers`` layers
is an *estimate*, ``seconds × layers / peft_layers``, and is labelled as such.

Usage::

    python benchmarks/merge_speed.py                      # 32 layers, T = 2 and 4, PEFT on 1 layer
    python benchmarks/merge_speed.py --layers 2 --skip-peft --adapters 2
    python benchmarks/merge_speed.py --out benchmarks/results/merge_speed.json

Threads: the core-space cases run with ``--threads`` (default 1: their operations are
``d × R`` QRs and ``R × R`` SVDs, and on an oversubscribed machine OpenMP barriers make
them far slower with more threads); PEFT keeps ``--peft-threads`` (default: every usable
core) for its dense SVDs, which favours PEFT.

Results: a rich table on stdout, JSON at ``--out`` and a Markdown table beside it
(same name, ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _rss import (  # sibling module: the scripts run as `python benchmarks/<name>.py`
    peak_rss_mb,
    rss_now_mb,
)

# --- The module set and the cases -------------------------------------------------

HIDDEN = 4096
INTERMEDIATE = 11008
RANK = 16
LORA_ALPHA = 32
BASE_MODEL = "meta-llama/Llama-2-7b-hf"
PROJECTIONS: list[tuple[str, str, int, int]] = [  # (block, name, d_out, d_in)
    ("self_attn", "q_proj", HIDDEN, HIDDEN),
    ("self_attn", "k_proj", HIDDEN, HIDDEN),
    ("self_attn", "v_proj", HIDDEN, HIDDEN),
    ("self_attn", "o_proj", HIDDEN, HIDDEN),
    ("mlp", "gate_proj", INTERMEDIATE, HIDDEN),
    ("mlp", "up_proj", INTERMEDIATE, HIDDEN),
    ("mlp", "down_proj", HIDDEN, INTERMEDIATE),
]
PEFT_PREFIX = "base_model.model."

# Which variants of each registered method to time (parameters a method does not accept are dropped).
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "ties": [{"space": "core"}],
    "dare_linear": [{"space": "core"}],
    "dare_ties": [{"space": "core"}],
    "pico": [{"base": "linear"}, {"base": "ties"}, {"base": "tsvm"}],
}
TADA_STEP = "tada_merge_step"

# The targets the merge engine is held to, for the full 7B-shaped pair.
TARGET_METHODS = ("linear", "pico", "tsvm", "tada")
TARGET_SECONDS = 5.0
TARGET_RSS_MB = 1536.0

PEFT_COMBINATIONS = ["svd", "ties_svd", "linear", "cat"]
PEFT_DENSITY = 0.5
PEFT_EXPLAINED = {
    "svd": "dense ΔW_t = s_t B_t A_t per adapter, Σ w_t ΔW_t, full torch.linalg.svd (full_matrices=True, PEFT's default) "
    "of the d_out×d_in sum, keep the top svd_rank. Same result as mergeprobe `linear` at that rank.",
    "ties_svd": f"dense ΔW_t, TIES on the dense entries (density {PEFT_DENSITY}), then the same full SVD. "
    "mergeprobe `ties` with space='full' is the analogue; space='core' runs TIES on the R×R cores instead.",
    "linear": "sums the factors, A = Σ √(w_t s_t) A_t and B = Σ √(w_t s_t) B_t, so B A contains the cross terms "
    "B_i A_j (i≠j): not task arithmetic, and only valid when every rank is equal. No SVD, no rank truncation.",
    "cat": "concatenates the factors, A = [w_t s_t A_t], B = [B_t]: exact task arithmetic at rank Σ r_t "
    "(no truncation; mergeprobe `linear --rank exact` gives the same ΔW, re-orthogonalised).",
}

# ALGORITHMS.md §1 anchor (2 idle cores): the conservative ratio column.
ANCHOR_PEFT_SVD_SECONDS = 282.0
ANCHOR_PEFT_SVD_LAYERS = 2


def module_key(layer: int, block: str, name: str) -> str:
    return f"{PEFT_PREFIX}model.layers.{layer}.{block}.{name}"


def factor_seed(adapter: int, layer: int, kind: int) -> int:
    """One seed per (adapter, layer, projection), so PEFT and mergeprobe get the same factors."""
    return 1_000_003 * (adapter + 1) + 1009 * layer + kind


def random_factors(adapter: int, layer: int, kind: int) -> tuple[Any, Any]:
    """``(A, B)``: A ~ N(0, 1/d_in) (r × d_in), B ~ N(0, 0.01²) (d_out × r), float32."""
    import torch

    _, _, d_out, d_in = PROJECTIONS[kind]
    generator = torch.Generator().manual_seed(factor_seed(adapter, layer, kind))
    a = torch.randn(RANK, d_in, generator=generator) / d_in**0.5
    b = torch.randn(d_out, RANK, generator=generator) * 0.01
    return a, b


def lora_config_dict() -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": LORA_ALPHA,
        "base_model_name_or_path": BASE_MODEL,
        "target_modules": [name for _, name, _, _ in PROJECTIONS],
    }


def build_adapters(count: int, layers: int) -> list[Any]:
    """``count`` in-memory :class:`~mergeprobe.adapters.LoraAdapter` s over ``layers`` 7B-shaped layers."""
    from mergeprobe.adapters import LoraAdapter, LoraModule

    adapters = []
    for t in range(count):
        modules = {}
        for layer in range(layers):
            for kind, (block, name, _, _) in enumerate(PROJECTIONS):
                a, b = random_factors(t, layer, kind)
                modules[module_key(layer, block, name)] = LoraModule(A=a, B=b, scaling=LORA_ALPHA / RANK)
        adapters.append(LoraAdapter(modules, lora_config_dict(), name=f"adapter{t}"))
    return adapters


def _small_adapter(index: int) -> Any:
    """A one-layer adapter with 256-wide modules, for warming up the linear-algebra kernels."""
    import torch

    from mergeprobe.adapters import LoraAdapter, LoraModule

    generator = torch.Generator().manual_seed(index)
    modules = {
        module_key(0, block, name): LoraModule(torch.randn(RANK, 256, generator=generator), torch.randn(256, RANK, generator=generator), 1.0)
        for block, name, _, _ in PROJECTIONS
    }
    return LoraAdapter(modules, lora_config_dict(), name=f"warmup{index}")


def core_cases() -> list[dict[str, Any]]:
    """Every registered method (and variant) to time; TaDA as its merge step."""
    import inspect

    from mergeprobe.merging.registry import available_methods, method_class

    cases = []
    for name in available_methods():
        cls = method_class(name)
        accepted = set(inspect.signature(cls.__init__).parameters)
        for variant in VARIANTS.get(name, [{}]):
            params = {k: v for k, v in variant.items() if k in accepted}
            label = name + "".join(f" {k}={v}" for k, v in params.items() if k != "space" or v != "core")
            if name == "tada":
                cases.append({"kind": "tada_step", "method": name, "label": "tada (merge step, probe excluded)", "params": params})
            elif cls.needs_base_model:
                continue  # a future probing method: needs its own merge-step harness
            else:
                cases.append({"kind": "core", "method": name, "label": label, "params": params})
    return cases


# --- Workers (one per case, in a subprocess) -------------------------------------


def register_tada_step() -> None:
    """Register ``tada_merge_step``: TaDA whose ``prepare`` sets gates from a synthetic probe (no base model)."""
    from mergeprobe.merging.methods.tada import TaDA, normalized_ratios, probe_gates
    from mergeprobe.merging.registry import register

    class TadaMergeStep(TaDA):
        """TaDA with precomputed probe ratios: what is timed is everything after the probe."""

        name = TADA_STEP

        def prepare(self, adapters, weights, context):  # noqa: ANN001 - the MergeMethod signature
            from mergeprobe.adapters import module_layer

            self._check_params()
            self._roles = self._resolve_roles(len(adapters))
            keys = sorted({k for a in adapters for k in a.modules})
            depth = max(module_layer(k) or 0 for k in keys) or 1
            ratios = {}
            for key in keys:
                x = (module_layer(key) or 0) / depth
                ratios[key] = [(1.0 - 0.6 * x) * 1e-2 if role == "task" else (0.4 + 0.6 * x) * 1e-2 for role in self._roles]
            self._probe = None
            self._normalized = normalized_ratios(ratios)
            self._gates = probe_gates(ratios, self._roles, self.beta, self.normalize_probe)

    register(TadaMergeStep)


def run_core_case(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from mergeprobe.merging import merge_adapters

    method, extra = spec["method"], {}
    if spec["kind"] == "tada_step":
        register_tada_step()
        method, extra = TADA_STEP, {"base_model": "synthetic probe (not used)"}
    # Warm-up on one small layer: loads torch's linear-algebra kernels, which is not merge work.
    warm = [_small_adapter(t) for t in range(spec["adapters"])]
    merge_adapters(warm, method=method, rank=RANK, show_progress=False, **extra, **spec["params"])
    del warm
    adapters = build_adapters(spec["adapters"], spec["layers"])
    before = rss_now_mb()
    times = []
    result = None
    for _ in range(spec["repeats"]):
        result = None  # release the previous repetition's output before the next one
        start = time.perf_counter()
        result = merge_adapters(adapters, method=method, rank=RANK, show_progress=False, **extra, **spec["params"])
        times.append(time.perf_counter() - start)
    energy = [d.get("energy_kept") for d in result.diagnostics.values() if isinstance(d.get("energy_kept"), float)]
    return {
        "seconds": min(times),
        "seconds_all": times,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_merge_mb": before,
        "modules": len(result.modules),
        "output_rank": RANK,
        "mean_energy_kept": sum(energy) / len(energy) if energy else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def build_peft_model(count: int, layers: int) -> Any:
    """A PeftModel over ``layers`` 7B-shaped layers (zero base weights) with ``count`` adapters ``a0…``."""
    import torch
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = torch.nn.Module()
            self.mlp = torch.nn.Module()
            for block, name, d_out, d_in in PROJECTIONS:
                layer = torch.nn.Linear(d_in, d_out, bias=False, device="meta")
                # Uninitialised (never read by add_weighted_adapter): the pages of the 7B-shaped base weights are
                # never touched, so they take no resident memory and the peak RSS is the merge's own.
                layer.weight = torch.nn.Parameter(torch.empty(d_out, d_in), requires_grad=False)
                setattr(getattr(self, block), name, layer)

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList(Block() for _ in range(layers))

        def forward(self, x):  # noqa: ANN001, ANN201 - never called
            return x

    config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, target_modules=[n for _, n, _, _ in PROJECTIONS], lora_dropout=0.0)
    model = get_peft_model(Stack(), config, adapter_name="a0")
    for t in range(1, count):
        model.add_adapter(f"a{t}", config)
    named = dict(model.named_modules())
    with torch.no_grad():
        for t in range(count):
            for layer in range(layers):
                for kind, (block, name, _, _) in enumerate(PROJECTIONS):
                    a, b = random_factors(t, layer, kind)
                    target = named[module_key(layer, block, name)]
                    target.lora_A[f"a{t}"].weight.copy_(a)
                    target.lora_B[f"a{t}"].weight.copy_(b)
    return model


def run_peft_case(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    model = build_peft_model(spec["adapters"], spec["layers"])
    combination = spec["combination"]
    names = [f"a{t}" for t in range(spec["adapters"])]
    kwargs: dict[str, Any] = {}
    if combination.endswith("svd"):
        kwargs["svd_rank"] = RANK
    if "ties" in combination:
        kwargs["density"] = PEFT_DENSITY
    before = rss_now_mb()
    start = time.perf_counter()
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=combination, **kwargs)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_merge_mb": before,
        "modules": spec["layers"] * len(PROJECTIONS),
        "output_rank": model.peft_config["merged"].r,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def worker(spec: dict[str, Any]) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = run_peft_case(spec) if spec["kind"] == "peft" else run_core_case(spec)
    print("RESULT " + json.dumps(result), flush=True)


def run_in_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter; returns its measurements or an ``error``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    # The workers measure this checkout's mergeprobe, whatever (if anything) is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    if spec.get("threads"):
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    if done.returncode < 0:
        return {"error": f"stopped by signal {-done.returncode}"}
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit code {done.returncode}: " + " | ".join(tail)}


# --- Driver -----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="7B-shaped layers merged by mergeprobe (default 32)")
    parser.add_argument("--peft-layers", type=int, default=1, help="layers merged by PEFT, then extrapolated (default 1)")
    parser.add_argument("--skip-peft", action="store_true", help="time mergeprobe only (then only the ratio against the ALGORITHMS.md anchor is given)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[2, 4], help="numbers of adapters T to merge (default 2 4)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these registered methods (default: all)")
    parser.add_argument("--peft-combinations", nargs="+", default=PEFT_COMBINATIONS, help="PEFT combination types (default: svd ties_svd linear cat)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per mergeprobe case; the fastest is reported (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the mergeprobe cases (default 1: core-space ops are d×R with R ≤ 64, too small to gain from threads)")
    parser.add_argument("--peft-threads", type=int, default=None, help="torch threads for the PEFT cases (default: torch's default, every usable core)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case before it is abandoned")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/merge_speed.json"), help="JSON output; the Markdown table goes beside it")
    parser.add_argument("--peft-results", type=Path, default=None, help="reuse the PEFT rows of an earlier run's JSON instead of measuring them again (they take the longest)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peft_svd_reference(peft_rows: list[dict[str, Any]], adapters: int, layers: int) -> float | None:
    """PEFT ``svd`` seconds measured in this run for T = ``adapters``, extrapolated to ``layers``; ``None`` if not measured."""
    for row in peft_rows:
        if row["combination"] == "svd" and row["T"] == adapters and "seconds" in row:
            return row["seconds"] * layers / row["layers"]
    return None


def target_met(row: dict[str, Any]) -> bool | None:
    if row["T"] != 2 or row["method"] not in TARGET_METHODS or row["layers"] != 32 or "seconds" not in row:
        return None
    return row["seconds"] <= TARGET_SECONDS and row["peak_rss_mb"] <= TARGET_RSS_MB


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    import peft
    import torch
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(width=max(Console().width, 150))
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    modules = args.layers * len(PROJECTIONS)
    console.print(f"[bold]merge speed[/] — {args.layers} Llama-2-7B-shaped layers ({modules} modules), rank {RANK}, T = {args.adapters}")

    cases = [c for c in core_cases() if args.methods is None or c["method"] in args.methods]
    core_rows: list[dict[str, Any]] = []
    for count in args.adapters:
        for case in cases:
            spec = {**case, "adapters": count, "layers": args.layers, "repeats": args.repeats, "threads": args.threads}
            row = {"label": case["label"], "method": case["method"], "params": case["params"], "T": count, "layers": args.layers}
            row.update(run_in_subprocess(spec, args.timeout))
            core_rows.append(row)
            shown = f"{row['seconds']:.2f} s, peak {row['peak_rss_mb']:.0f} MB" if "seconds" in row else row["error"]
            console.print(f"  {case['label']:<40} T={count}: {shown}")

    peft_rows: list[dict[str, Any]] = []
    if args.peft_results is not None:
        earlier = json.loads(args.peft_results.read_text())
        for row in earlier["peft"]:
            if "seconds" in row:
                row["extrapolated_seconds"] = row["seconds"] * args.layers / row["layers"]
        peft_rows = [dict(row, reused_from=str(args.peft_results)) for row in earlier["peft"] if row["T"] in args.adapters and "seconds" in row]
        args.peft_missing = [f"{row['combination']} T={row['T']} ({row['error']})" for row in earlier["peft"] if "seconds" not in row]
        args.peft_layers = peft_rows[0]["layers"] if peft_rows else args.peft_layers
        args.peft_combinations = sorted({row["combination"] for row in peft_rows}, key=PEFT_COMBINATIONS.index)
        args.peft_threads = earlier["config"].get("peft_threads")
        console.print(f"PEFT rows reused from {args.peft_results} ({earlier['date']})")
    elif not args.skip_peft:
        console.print(f"[bold]PEFT add_weighted_adapter[/] on {args.peft_layers} layer(s) ({args.peft_layers * len(PROJECTIONS)} modules)")
        for count in args.adapters:
            for combination in args.peft_combinations:
                spec = {"kind": "peft", "combination": combination, "adapters": count, "layers": args.peft_layers, "threads": args.peft_threads}
                row = {"combination": combination, "T": count, "layers": args.peft_layers, "computes": PEFT_EXPLAINED.get(combination, "")}
                row.update(run_in_subprocess(spec, args.timeout))
                if "seconds" in row:
                    row["extrapolated_seconds"] = row["seconds"] * args.layers / args.peft_layers
                peft_rows.append(row)
                shown = f"{row['seconds']:.1f} s, peak {row['peak_rss_mb']:.0f} MB" if "seconds" in row else row["error"]
                console.print(f"  {combination:<10} T={count}: {shown}")

    anchor = ANCHOR_PEFT_SVD_SECONDS * args.layers / ANCHOR_PEFT_SVD_LAYERS
    for row in core_rows:
        reference = peft_svd_reference(peft_rows, row["T"], args.layers)
        row["ratio_vs_peft_svd"] = reference / row["seconds"] if "seconds" in row and reference else None
        row["ratio_vs_anchor_peft_svd"] = anchor / row["seconds"] if "seconds" in row else None
        row["target_met"] = target_met(row)
    for row in peft_rows:
        reference = peft_svd_reference(peft_rows, row["T"], args.layers)
        row["ratio_vs_peft_svd"] = reference / row["extrapolated_seconds"] if "extrapolated_seconds" in row and reference else None
        row["ratio_vs_anchor_peft_svd"] = anchor / row["extrapolated_seconds"] if "extrapolated_seconds" in row else None

    table = Table(title=f"merging {args.layers} Llama-2-7B-shaped layers ({modules} modules), rank {RANK} output", title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    for row in core_rows:
        table.add_row(*(Text(cell) for cell in markdown_cells_core(row)))
    for row in peft_rows:
        table.add_row(*(Text(cell) for cell in markdown_cells_peft(row, args.layers)))
    console.print(table)
    notes = result_notes(args)
    for note in notes:
        console.print(Text(f"• {note}"))

    payload = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "peft": peft.__version__,
        },
        "config": {
            "layers": args.layers,
            "modules": modules,
            "rank": RANK,
            "lora_alpha": LORA_ALPHA,
            "adapters": args.adapters,
            "peft_layers": args.peft_layers if peft_rows else None,
            "threads": args.threads,
            "peft_threads": args.peft_threads,
            "repeats": args.repeats,
            "dtype": "float32",
        },
        "targets": {"methods": list(TARGET_METHODS), "T": 2, "seconds": TARGET_SECONDS, "peak_rss_mb": TARGET_RSS_MB},
        "mergeprobe": core_rows,
        "peft": peft_rows,
        "peft_combinations_explained": {k: v for k, v in PEFT_EXPLAINED.items() if k in args.peft_combinations},
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown_report(payload))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


COLUMNS = ("method", "T", "seconds", "peak RSS MB", "× vs PEFT svd here (extrap.)", "× vs anchor PEFT svd", "target ≤5 s, ≤1.5 GB")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown_cells_core(row: dict[str, Any]) -> list[str]:
    if "seconds" not in row:
        return [row["label"], str(row["T"]), f"error: {row['error']}", "", "", "", ""]
    met = row.get("target_met")
    ratio, anchor = row.get("ratio_vs_peft_svd"), row.get("ratio_vs_anchor_peft_svd")
    return [
        row["label"],
        str(row["T"]),
        _fmt(row["seconds"]),
        _fmt(row["peak_rss_mb"], 0),
        "—" if ratio is None else f"{ratio:,.0f}×",
        "—" if anchor is None else f"{anchor:,.0f}×",
        "" if met is None else ("yes" if met else "NO"),
    ]


def markdown_cells_peft(row: dict[str, Any], layers: int) -> list[str]:
    label = f"PEFT {row['combination']} ({row['layers']} layer → {layers}, est.)"
    if "seconds" not in row:
        return [label, str(row["T"]), f"error: {row['error']}", "", "", "", ""]
    ratio, anchor = row.get("ratio_vs_peft_svd"), row.get("ratio_vs_anchor_peft_svd")
    extrapolated = row["extrapolated_seconds"]
    seconds = f"{_fmt(extrapolated, 0 if extrapolated >= 100 else 2)} (measured {_fmt(row['seconds'])})"
    return [
        label,
        str(row["T"]),
        seconds,
        _fmt(row["peak_rss_mb"], 0),
        "—" if ratio is None else f"{ratio:,.2f}×",
        "—" if anchor is None else f"{anchor:,.2f}×",
        "",
    ]


def result_notes(args: argparse.Namespace) -> list[str]:
    notes = [
        f"mergeprobe rows: all {args.layers} layers, every case in its own subprocess; seconds = the fastest of "
        f"{args.repeats} repetitions after a small warm-up merge (the machine is shared: see load_average in the JSON); "
        "peak RSS is that process's ru_maxrss (the T float32 adapters in memory + the merge + interpreter and torch).",
        "tada row: the merge step only (per-adapter core SVDs, conflict dropping, gated merge, truncation); the probe "
        "(forward passes of the base model over the calibration data) is excluded — gates come from a synthetic depth profile.",
        f"threads: mergeprobe cases {args.threads}, PEFT cases {args.peft_threads or 'torch default (every usable core)'}; "
        "torch_threads per row in the JSON. On an oversubscribed machine two OpenMP threads make small QRs up to ~100× slower "
        "(barrier stalls), so the core-space cases run single-threaded; PEFT keeps every core for its dense SVDs, which favours PEFT.",
        "ties / dare_* rows run in core space (space='core'); dare_* and knots use their default density 0.5.",
    ]
    notes.append(
        f"ALGORITHMS.md anchor: PEFT svd took {ANCHOR_PEFT_SVD_SECONDS:.0f} s for {ANCHOR_PEFT_SVD_LAYERS} layers (T = 2) on 2 idle cores, i.e. "
        f"~{ANCHOR_PEFT_SVD_SECONDS * args.layers / ANCHOR_PEFT_SVD_LAYERS:,.0f} s for {args.layers} layers; "
        "ratio_vs_anchor_peft_svd in the JSON divides that by each row's seconds (a conservative ratio when this machine is loaded)."
    )
    if args.peft_results is not None:
        notes.append(f"PEFT rows reused from {args.peft_results} (measured in an earlier run of this script, same machine).")
        if getattr(args, "peft_missing", None):
            notes.append("PEFT cases not measured in that run: " + "; ".join(args.peft_missing) + ".")
    if args.skip_peft and args.peft_results is None:
        notes.append(
            "PEFT skipped: only the ratio against the ALGORITHMS.md anchor is given."
        )
    else:
        notes.append(
            f"PEFT rows: one run each, measured on {args.peft_layers} layer(s) and multiplied by {args.layers}/{args.peft_layers} — an "
            "ESTIMATE of the full-model time, not a measurement; the base weights are uninitialised and never read "
            "(not resident), so their peak RSS is the merge's own plus the adapters; in real use PEFT also needs the whole base "
            "model loaded (~27 GB float32 / 13.5 GB bf16 for 7B), which mergeprobe does not."
        )
        for combination in args.peft_combinations:
            notes.append(f"PEFT {combination}: {PEFT_EXPLAINED.get(combination, '')}")
    return notes


def markdown_report(payload: dict[str, Any]) -> str:
    config, machine = payload["config"], payload["machine"]
    lines = [
        "# Merge speed at Llama-2-7B shapes",
        "",
        f"Command: `{payload['command']}`  ",
        f"Date: {payload['date']}; {machine['cpus_usable']} usable CPU cores (torch threads {machine['torch_threads']}), "
        f"torch {machine['torch']}, peft {machine['peft']}, {machine['platform']}.",
        "",
        f"{config['layers']} layers × (q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008) = {config['modules']} modules, "
        f"random rank-{config['rank']} float32 adapters, output rank {config['rank']}. Target: the pair (T = 2) merged by "
        f"{', '.join(payload['targets']['methods'])} in ≤ {payload['targets']['seconds']:.0f} s with peak RSS ≤ "
        f"{payload['targets']['peak_rss_mb'] / 1024:.1f} GB.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in payload["mergeprobe"]:
        lines.append("| " + " | ".join(markdown_cells_core(row)) + " |")
    for row in payload["peft"]:
        lines.append("| " + " | ".join(markdown_cells_peft(row, config["layers"])) + " |")
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in payload["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
