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


def heatmap_image(matrix: np.ndarray, rows: Sequence[Any], cols: Sequence[str], title: str, vmin: float = -1.0, vmax: float = 1.0) -> np.ndarray:
    """Render a layer × projection matrix as an RGB image (H × W × 3, uint8)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(cols), 1.0 + 0.22 * len(rows)), dpi=80)
    shown = ax.imshow(np.asarray(matrix, dtype=float), aspect="auto", cmap="coolwarm", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), [str(c).replace("_proj", "") for c in cols], rotation=45, fontsize=7)
    step = max(1, len(rows) // 12)
    ax.set_yticks(range(0, len(rows), step), [str(r) for r in rows][::step], fontsize=7)
    ax.set_ylabel("layer", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


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

    Only the world-main process should create one; it is cheap when unused.
    """

    def __init__(self, log_dir: str | os.PathLike[str]):
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
