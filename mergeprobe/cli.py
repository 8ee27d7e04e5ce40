"""The ``mergeprobe`` command line: a thin layer over the library.

Every command is a small function that parses its options, calls the library and
prints a short rich summary. Any :class:`~mergeprobe.errors.MergeProbeError` a
command raises is printed as one red line ``error: …`` and the process exits with
code 2, without a traceback; other exceptions propagate (they are bugs). Commands
added later only need the ``@app.command()`` decorator to get the same handling.

Example
-------
.. code-block:: console

    $ mergeprobe merge runs/math runs/code --method ties --param density=0.3 --out merged
    $ mergeprobe methods
    $ mergeprobe --version
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mergeprobe import __version__
from mergeprobe.errors import MergeProbeError

ERROR_EXIT_CODE = 2


def stdout_console() -> Console:
    """A console on the current ``sys.stdout`` (created per call, so test runners can capture it)."""
    return Console(highlight=False)


def stderr_console() -> Console:
    """A console on the current ``sys.stderr``."""
    return Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    """Print ``error: message`` as one red line on stderr (never wrapped, no markup interpreted)."""
    line = " ".join(str(message).split())
    stderr_console().print(Text(f"error: {line}", style="bold red"), soft_wrap=True)


class MergeProbeGroup(typer.core.TyperGroup):
    """The command group: turns every :class:`MergeProbeError` into ``error: …`` and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except MergeProbeError as err:
            print_error(str(err))
            raise typer.Exit(ERROR_EXIT_CODE) from None


app = typer.Typer(
    name="mergeprobe",
    cls=MergeProbeGroup,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mergeprobe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Predict LoRA mergeability early in training; merge adapters in core space.

    Example: mergeprobe demo --quick

    Example: mergeprobe merge runs/math runs/code --method pico --out merged

    Example: mergeprobe report /shared/probe-store
    """


# ---------------------------------------------------------------------------
# Option parsing (pure functions, tested directly)
# ---------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A ``--param`` value as bool, int, float, ``None`` or str, in that order of preference.

    A comma-separated value is a list of such values (e.g. TaDA's ``roles=task,domain``).

    >>> [parse_value(v) for v in ["true", "3", "0.3", "1e-2", "none", "full"]]
    [True, 3, 0.3, 0.01, None, 'full']
    >>> parse_value("task,domain")
    ['task', 'domain']
    """
    if "," in text:
        return [parse_value(part) for part in text.split(",")]
    lowered = text.strip().lower()
    if lowered in {"true", "yes", "on"}:
        return True
    if lowered in {"false", "no", "off"}:
        return False
    if lowered in {"none", "null"}:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["density=0.3", "space=full"]`` → ``{"density": 0.3, "space": "full"}``.

    A dotted key fills a dict parameter: ``base_params.density=0.3`` →
    ``{"base_params": {"density": 0.3}}`` (e.g. Pico's base merger parameters).

    Raises
    ------
    typer.BadParameter
        For an item without ``=``, an empty key or a key given twice.
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        path = [part.strip() for part in key.split(".")]
        if not sep or not all(path):
            raise typer.BadParameter(f"{item!r} is not key=value; write e.g. --param density=0.3", param_hint="--param")
        target = params
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise typer.BadParameter(f"{key.strip()!r} conflicts with --param {part}=…; give a parameter either a value or dotted sub-keys", param_hint="--param")
        if path[-1] in target:
            raise typer.BadParameter(f"{key.strip()!r} is given twice; give each parameter once", param_hint="--param")
        target[path[-1]] = parse_value(value)
    return params


def parse_weights(text: str | None) -> list[float] | None:
    """``"0.5,0.5"`` → ``[0.5, 0.5]``; ``None`` stays ``None`` (weight 1 each)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers; write e.g. --weights 0.5,0.5", param_hint="--weights") from None


def parse_rank(text: str | None) -> int | str | None:
    """``"16"`` → 16, ``"exact"`` → ``"exact"``, ``None`` → ``None`` (largest input rank)."""
    if text is None or text == "exact":
        return text
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank < 1:
        raise typer.BadParameter(f"{text!r} is neither a positive integer nor 'exact'; write e.g. --rank 16", param_hint="--rank")
    return rank


def check_calibration_file(path: Path) -> Path:
    """``--calibration FILE`` must be an existing text file (checked before a slow model load)."""
    if not path.is_file():
        raise typer.BadParameter(f"{str(path)!r} is not a file; pass a UTF-8 text file with one calibration sequence per line", param_hint="--calibration")
    return path


def _describe_ranks(modules: dict[str, Any]) -> str:
    ranks = sorted({int(a.shape[0]) for _, a in modules.values()})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


@app.command()
def merge(
    adapters: Annotated[list[str], typer.Argument(metavar="ADAPTER", help="Two or more PEFT LoRA adapter directories.", show_default=False)],
    method: Annotated[str, typer.Option("--method", "-m", metavar="NAME", help="Merge method (see `mergeprobe methods`).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Output adapter directory (written atomically).", show_default=False)],
    weights: Annotated[str | None, typer.Option(metavar="W1,W2,...", help="Comma-separated weight per adapter, e.g. 0.5,0.5 (default 1 each).")] = None,
    rank: Annotated[str | None, typer.Option(metavar="N|exact", help="Output rank: an integer, or 'exact' to keep every component (default: largest input rank).")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", metavar="KEY=VALUE", help="Method parameter key=value (int/float/bool/str, a,b for a list; a.b=v fills dict parameter a); repeat for more.")] = None,
    base_model: Annotated[str | None, typer.Option(metavar="NAME_OR_PATH|default", help="Base model name or path, or 'default' for the embedded SmolLM2 (methods that probe it: tada).")] = None,
    calibration: Annotated[Path | None, typer.Option(metavar="FILE", help="Text file, one calibration sequence per line (with --base-model).")] = None,
    allow_base_mismatch: Annotated[bool, typer.Option("--allow-base-mismatch", help="Merge adapters whose configs name different base models.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (atomically).")] = False,
) -> None:
    """Merge LoRA adapters into one PEFT LoRA adapter, in core space.

    Example: mergeprobe merge runs/math runs/code --method ties --param density=0.3 --rank 16 --out merged

    Example: mergeprobe merge a b --method pico --param base=ties --param base_params.density=0.3 --weights 0.6,0.4 --out merged

    Example: mergeprobe merge task domain --method tada --base-model default --calibration calib.txt --param roles=task,domain --out merged
    """
    from mergeprobe.merging import merge_adapters
    from mergeprobe.merging.registry import method_class

    params = parse_params(param or [])
    weight_list = parse_weights(weights)
    out_rank = parse_rank(rank)
    needs_base = method_class(method).needs_base_model

    model, calibration_file, tokenizer = probe_inputs(method, needs_base, base_model, calibration)
    if tokenizer is not None and "tokenizer" in inspect.signature(method_class(method).__init__).parameters:
        params.setdefault("tokenizer", tokenizer)
    start = time.perf_counter()
    result = merge_adapters(
        adapters,
        method=method,
        weights=weight_list,
        rank=out_rank,
        out_dir=out,
        base_model=model,
        calibration=calibration_file,
        allow_base_mismatch=allow_base_mismatch,
        overwrite=overwrite,
        show_progress=True,
        **params,
    )
    seconds = time.perf_counter() - start
    _print_merge_summary(result, out, seconds)


def probe_inputs(method: str, needs_base: bool, base_model: str | None, calibration: Path | None) -> tuple[Any, Any, Any]:
    """``(base_model, calibration, tokenizer)`` for ``merge_adapters``; loads the model only if the method probes it.

    The calibration file goes to the method as its path, and the model's tokenizer as
    the method's ``tokenizer`` parameter: :func:`mergeprobe.merging.calibration.calibration_tokens`
    reads and tokenizes it (one sequence per non-empty line).
    """
    if not needs_base:
        for flag, value in (("--base-model", base_model), ("--calibration", calibration)):
            if value is not None:
                stderr_console().print(Text(f"note: method {method!r} does not probe a base model; {flag} is ignored.", style="yellow"))
        return None, None, None
    if base_model is None:
        return None, None, None  # merge_adapters raises the MergeError that says to pass --base-model
    calibration_file = None if calibration is None else str(check_calibration_file(calibration))
    from mergeprobe.models import load_base_model

    with stderr_console().status(f"loading base model {base_model!r}…"):
        model, tokenizer = load_base_model(base_model)
    return model, calibration_file, tokenizer


def _print_merge_summary(result: Any, out: Path, seconds: float) -> None:
    console = stdout_console()
    table = Table(title="merged", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    params = ", ".join(f"{k}={v!r}" for k, v in result.params.items())
    rows = [
        ("method", f"{result.method} ({params})" if params else result.method),
        ("adapters", str(len(result.sources))),
        ("modules", str(len(result.modules))),
        ("output rank", _describe_ranks(result.modules)),
        ("out dir", str(out)),
        ("seconds", f"{seconds:.2f}"),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    console.print(table)
    base = result.config.get("base_model_name_or_path") or "BASE_MODEL"
    console.print("Load it with:", style="bold")
    console.print(
        Text(f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{out}")'),
        soft_wrap=True,
    )


@app.command()
def methods() -> None:
    """List the registered merge methods with their parameters and defaults.

    Example: mergeprobe methods
    """
    from mergeprobe.merging.registry import available_methods, method_class

    table = Table(title="merge methods", title_justify="left")
    table.add_column("method", style="bold")
    table.add_column("parameters (default)")
    table.add_column("needs base model")
    table.add_column("description")
    for name in available_methods():
        cls = method_class(name)
        table.add_row(name, Text(method_parameters_text(cls)), "yes" if cls.needs_base_model else "no", Text(_first_line(cls.__doc__)))
    stdout_console().print(table)
    stdout_console().print("Pass parameters with --param key=value, e.g. mergeprobe merge a b --method ties --param density=0.3 --out merged")


def method_parameters_text(cls: type) -> str:
    """``"density=0.5, space='core'"`` from the keyword parameters of ``cls.__init__``."""
    parts = []
    for parameter in inspect.signature(cls.__init__).parameters.values():
        if parameter.name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = "required" if parameter.default is parameter.empty else repr(parameter.default)
        parts.append(f"{parameter.name}={default}")
    return ", ".join(parts) or "—"


def _first_line(doc: str | None) -> str:
    return inspect.cleandoc(doc).splitlines()[0].replace("``", "") if doc else ""



def _load_predictor_option(predictor: str | None) -> Any:
    """``None``/"default" → the shipped MergeProbe (or None if absent); a path → that model; "none" → no predictor."""
    from mergeprobe.errors import PredictorError
    from mergeprobe.predictor import MergeProbe

    if predictor == "none":
        return None
    if predictor in (None, "default"):
        try:
            return MergeProbe.default()
        except PredictorError:
            return None
    return MergeProbe.load(predictor)


def store_report(store_path: Path, predictor: Any) -> dict[str, Any]:
    """Everything ``mergeprobe report`` shows, as a JSON-safe dict."""
    from mergeprobe.probe import decide_for_store
    from mergeprobe.store import ProbeStore

    store = ProbeStore(store_path, create=False)
    records = store.records()
    runs = [r.run_name for r in records if r.meta.get("status") in ("complete", "finished", "stopped")]
    pairs = []
    for a in runs:
        for b in runs:
            if a == b:
                continue
            features = store.pairwise_features(a, b)
            row = {
                "run": a, "other": b,
                "update_alignment": features.get("update_alignment.mean"),
                "gradient_alignment": features.get("gradient_alignment.mean"),
                "cross_disturbance": features.get("cross_disturbance.mean"),
            }
            if predictor is not None:
                row["predicted_retention"] = float(predictor.predict_retention(features)[0])
                row["predicted_lower"] = float(predictor.predict_lower_retention(features)[0])
            pairs.append(row)
    decision = decide_for_store(store, runs, predictor) if predictor is not None and len(runs) >= 2 else None
    return {
        "store": str(store_path),
        "runs": [{"run": r.run_name, "status": r.meta.get("status"), "base_model": r.meta.get("base_model"),
                  "probe_steps": r.meta.get("probe_steps"), "stop_reason": r.meta.get("stop_reason")} for r in records],
        "pairs": pairs,
        "decision": decision.to_dict() if decision is not None else None,
        "merges": [{k: (str(v) if k == "path" else v) for k, v in m.items()} for m in store.merges()],
        "outcomes": len(store.outcomes()),
    }


@app.command()
def report(
    store: Annotated[Path, typer.Argument(help="The probe store directory.")],
    predictor: Annotated[str | None, typer.Option(help="'default' (shipped model), a saved .skops path, or 'none'.")] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a probe store: runs, the pairwise table, the set decision and its reasons.

    Example: mergeprobe report /shared/probe-store --json
    """
    import json

    data = store_report(store, _load_predictor_option(predictor))
    if as_json:
        typer.echo(json.dumps(data, indent=1, default=str))
        return
    console = stdout_console()
    runs = Table(title=f"runs in {store}")
    for column in ("run", "status", "base model", "probe steps", "stop reason"):
        runs.add_column(column)
    for r in data["runs"]:
        runs.add_row(r["run"], str(r["status"]), str(r["base_model"]), str(r["probe_steps"]), r["stop_reason"] or "")
    console.print(runs)
    if data["pairs"]:
        table = Table(title="pairwise (retention of run when merged with other)")
        columns = ["run", "other", "update_alignment", "gradient_alignment", "cross_disturbance"]
        columns += ["predicted_retention", "predicted_lower"] if "predicted_retention" in data["pairs"][0] else []
        for column in columns:
            table.add_column(column.replace("_", " "), justify="left" if column in ("run", "other") else "right")
        for row in data["pairs"]:
            table.add_row(*[row[c] if isinstance(row[c], str) else ("—" if row[c] is None else f"{row[c]:+.3f}") for c in columns])
        console.print(table)
    decision = data["decision"]
    if decision is None:
        console.print("no decision: it needs two comparable runs and a retention predictor (`mergeprobe fit`).")
    else:
        method = f" with {decision['method']}" if decision["method"] else ""
        console.print(f"decision: [bold]{decision['action']}[/bold]{method}; merge {', '.join(decision['merge_set']) or '—'}; "
                      f"route {', '.join(decision['routed']) or '—'}")
        for reason in decision["reasons"]:
            console.print(f"  • {reason}")
    for merge_info in data["merges"]:
        console.print(f"merge {merge_info['set_id']}: {'merged' if merge_info['merged'] else 'claimed'} {merge_info['info'] or ''}")


@app.command()
def fit(
    source: Annotated[Path, typer.Argument(help="A probe store with recorded outcomes, or a .jsonl/.csv table.")],
    out: Annotated[Path, typer.Option(help="Where to save the fitted predictor (.skops).")] = Path("mergeprobe.skops"),
    method: Annotated[str | None, typer.Option(help="Only outcomes merged with this method.")] = None,
) -> None:
    """Refit the MergeProbe predictor on your own merge outcomes.

    Outcomes come from `ProbeStore.record_outcome(...)` after real merges, or from a table
    with feature columns and a `retention` column.

    Example: mergeprobe fit /shared/probe-store --out my-predictor.skops
    """
    from mergeprobe.predictor import fit_from_store, fit_from_table, read_table
    from mergeprobe.store import ProbeStore

    if source.is_dir():
        probe = fit_from_store(ProbeStore(source, create=False), method=method)
        n = "the store's outcomes"
    else:
        rows = read_table(source)
        probe = fit_from_table(rows)
        n = f"{len(rows)} rows"
    probe.save(out)
    stdout_console().print(f"fitted MergeProbe on {n}; saved to {out}. Use it with MergeProbeCallback(..., predictor={str(out)!r}).")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="A tiny model instead of SmolLM2: the pipeline in about a minute.")] = False,
    out: Annotated[Path, typer.Option(help="Where the store, TensorBoard logs and merged adapter go.")] = Path("mergeprobe-demo"),
    steps: Annotated[int | None, typer.Option(help="Training steps per adapter.")] = None,
) -> None:
    """Train three LoRA adapters with the callback, decide, merge and evaluate, on the embedded default model.

    Example: mergeprobe demo --quick
    """
    from mergeprobe.demo import DemoConfig, run_demo

    config = DemoConfig(quick=quick, out_dir=str(out))
    if steps is not None:
        config.steps = steps
    run_demo(config, stdout_console())


if __name__ == "__main__":
    app()
