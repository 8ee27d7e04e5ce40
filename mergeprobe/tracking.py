"""TensorBoard logging of mergeability: scalars, per-layer heatmaps and the decision as text.

:class:`MergeabilityLogger` writes into a run's own TensorBoard directory, so the
mergeability curves sit next to the loss curves the Trainer writes. Tags:

- ``mergeprobe/update_alignment/<other>``, ``mergeprobe/gradient_alignment/<other>``,
  ``mergeprobe/cross_disturbance/<other>``, ``mergeprobe/predicted_retention/<other>``
  (scalars, one curve per other run),
- ``mergeprobe/disturbance`` (this run's own representation disturbance),
- ``mergeprobe/depth_profile/<other>`` (image: layer × projection heatmap of update
  alignment),
- ``mergeprobe/decision`` (text).

Example
-------
>>> from mergeprobe.tracking import MergeabilityLogger
>>> logger = MergeabilityLogger("runs/math/tb")  # doctest: +SKIP
>>> logger.scalars({"update_alignment/code": 0.12}, step=10)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PREFIX = "mergeprobe"


def trainer_log_dir(output_dir: str, started_at: float | None = None) -> str:
    """The TensorBoard directory of a Trainer run, as transformers chooses it.

    ``TENSORBOARD_LOGGING_DIR`` if set; otherwise the newest
    ``output_dir/runs/<date>_<host>`` created since ``started_at`` (the Trainer's
    TensorBoard callback creates it at train begin, before ours runs); otherwise a new
    directory of that form.
    """
    env = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    runs = Path(output_dir) / "runs"
    host = socket.gethostname()
    if runs.is_dir():
        candidates = [p for p in runs.iterdir() if p.is_dir() and p.name.endswith("_" + host)]
        if started_at is not None:
            candidates = [p for p in candidates if p.stat().st_mtime >= started_at - 5]
        if candidates:
            return str(max(candidates, key=lambda p: p.stat().st_mtime))
    return str(runs / (time.strftime("%b%d_%H-%M-%S") + "_" + host))


# Layout of heatmap_image, in inches (drawn at 80 dpi): fixed margins sized from the label lengths instead of
# tight_layout, which measures every text on an extra draw. Text widths are estimated from a generous glyph
# width for DejaVu Sans, matplotlib's default font (digits 0.64 em, most letters less).
_TICK_PT, _LABEL_PT = 7, 8
_EM = 0.64 / 72  # inches per point of font size, per character
_LINE = 1.25 / 72  # inches per point of font size, one line of text
_EDGE = 0.08  # blank border around everything
_TICK_SPACE = 7 / 72  # tick length (3.5 pt) + tick label pad (3.5 pt)
_COLORBAR_GAP, _COLORBAR_WIDTH, _COLORBAR_HEIGHT = 0.15, 0.13, 4.0  # gap to the cells, width, greatest height


def heatmap_image(matrix: np.ndarray, rows: Sequence[Any], cols: Sequence[str], title: str, vmin: float = -1.0, vmax: float = 1.0) -> np.ndarray:
    """Render a layer × projection matrix as an RGB image (H × W × 3, uint8).

    Rows are layers (y axis, at most 23 tick labels), columns the projection
    names with ``_proj`` stripped; coolwarm colours from ``vmin`` to ``vmax`` with a
    colour bar, NaN cells blank. Drawn on a :class:`matplotlib.figure.Figure` with the
    Agg canvas directly — no pyplot and no global state, so it is safe from any thread.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(matrix, dtype=float)
    row_labels = [str(r) for r in rows]
    col_labels = [str(c).replace("_proj", "") for c in cols]
    step = max(1, len(row_labels) // 12)
    y_ticks = list(range(0, len(row_labels), step))
    longest_row = max((len(row_labels[i]) for i in y_ticks), default=1)
    longest_col = max((len(c) for c in col_labels), default=1)
    cells_height = max(0.22 * len(row_labels), 0.5)
    bar_height = min(cells_height, _COLORBAR_HEIGHT)
    colour_ticks = np.linspace(vmin, vmax, 5 if bar_height >= 1.2 else 3)
    longest_colour = max(4, *(len(f"{t:g}") for t in colour_ticks))

    left = _EDGE + _LABEL_PT * _LINE + 4 / 72 + longest_row * _TICK_PT * _EM + _TICK_SPACE
    # x tick labels are rotated by 45°: their height is (width + line height) · sin 45°
    bottom = _EDGE + _TICK_SPACE + (longest_col * _TICK_PT * _EM + _TICK_PT * _LINE) * 0.71
    top = _EDGE + 6 / 72 + _LABEL_PT * _LINE  # title pad (6 pt) and one line of title
    right = _COLORBAR_GAP + _COLORBAR_WIDTH + _TICK_SPACE + longest_colour * _TICK_PT * _EM + _EDGE
    # The title is centred over the cells: widen them if it would not fit inside the figure.
    title_width = len(title) * _LABEL_PT * _EM
    cells_width = max(0.6 * len(col_labels) - 0.15, title_width + 2 * _EDGE - 2 * min(left, right), 0.6)
    width, height = left + cells_width + right, top + cells_height + bottom

    fig = Figure(figsize=(width, height), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((left / width, bottom / height, cells_width / width, cells_height / height))
    shown = ax.imshow(values, aspect="auto", cmap="coolwarm", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, fontsize=_TICK_PT)
    ax.set_yticks(y_ticks, [row_labels[i] for i in y_ticks], fontsize=_TICK_PT)
    ax.set_ylabel("layer", fontsize=_LABEL_PT)
    ax.set_title(title, fontsize=_LABEL_PT, y=1.0)  # a fixed y: no search for overlapping tick labels at draw time
    # The colour bar: as tall as the cells (at most 4 inches), centred beside them.
    cax = fig.add_axes(((left + cells_width + _COLORBAR_GAP) / width, (bottom + (cells_height - bar_height) / 2) / height,
                        _COLORBAR_WIDTH / width, bar_height / height))
    bar = fig.colorbar(shown, cax=cax, ticks=colour_ticks)
    bar.ax.tick_params(labelsize=_TICK_PT)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def decision_markdown(decision: Any) -> str:
    """A decision as Markdown: the action, the sets and the reasons with their numbers."""
    lines = [
        f"**{decision.action}**" + (f" with `{decision.method}`" if decision.method else ""),
        "",
        f"- merge: {', '.join(decision.merge_set) or '—'}",
        f"- route: {', '.join(decision.routed) or '—'}",
        f"- predicted min retention: {decision.predicted_min_retention:.3f}",
    ]
    if decision.weights:
        lines.append("- weights: " + ", ".join(f"{k} {v:.2f}" for k, v in decision.weights.items()))
    lines += ["", *[f"1. {reason}" for reason in decision.reasons]]
    return "\n".join(lines)


class MergeabilityLogger:
    """Writes mergeprobe's scalars, heatmaps and decisions to one TensorBoard directory.

    Only the world-main process should create one. Creating it imports
    ``torch.utils.tensorboard``: about 0.05 s on 2 CPU cores in a process that has
    imported transformers' Trainer, which has already loaded what TensorBoard imports
    (boto3 among them, for S3 paths); 0.2–0.3 s in a bare process.
    """

    def __init__(self, log_dir: str | os.PathLike[str]):
        # Imported here, at train begin, on purpose: the first write comes at the probe window's end, so importing
        # lazily would only move the cost into training, and importing in a background thread during the window
        # slowed CPU training steps by about as much as the import takes (measured on 2 cores).
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(log_dir)
        self._writer = SummaryWriter(log_dir=self.log_dir)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write ``mergeprobe/<name>`` scalars; non-finite values are skipped."""
        for name, value in values.items():
            value = float(value)
            if np.isfinite(value):
                self._writer.add_scalar(f"{PREFIX}/{name}", value, global_step=step)

    def heatmap(self, name: str, matrix: np.ndarray, rows: Sequence[Any], cols: Sequence[str], step: int, title: str | None = None) -> None:
        """Write a layer × projection heatmap image under ``mergeprobe/<name>``."""
        image = heatmap_image(matrix, rows, cols, title or name)
        self._writer.add_image(f"{PREFIX}/{name}", image, global_step=step, dataformats="HWC")

    def text(self, name: str, markdown: str, step: int) -> None:
        """Write Markdown text under ``mergeprobe/<name>``."""
        self._writer.add_text(f"{PREFIX}/{name}", markdown, global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
