"""TensorBoard logging: the layer × projection heatmap image and the event files MergeabilityLogger writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from mergeprobe.tracking import MergeabilityLogger, heatmap_image

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def spanning(rows: int = 30, cols: int = 7) -> np.ndarray:
    """Values from −1 to 1 over the cells."""
    return np.linspace(-1.0, 1.0, rows * cols).reshape(rows, cols)


def test_heatmap_is_an_rgb_image_with_warm_and_cool_cells():
    image = heatmap_image(spanning(), list(range(30)), KINDS, "update alignment: math vs code")
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert image.shape[0] > 300 and image.shape[1] > 300
    r, g, b = (image[..., i].astype(int) for i in range(3))
    warm = (r - b > 100).sum()  # coolwarm's red end
    cool = (b - r > 100).sum()  # and its blue end
    assert warm > 1000 and cool > 1000
    dark = (image.max(axis=-1) < 80).sum()  # black text, ticks and frame
    assert dark > 500


def test_heatmap_leaves_nan_cells_blank_and_fits_a_long_title():
    matrix = spanning(3, 7)
    matrix[1, 2] = np.nan
    short = heatmap_image(matrix, [0, 1, 2], KINDS, "a vs b")
    long = heatmap_image(matrix, [0, 1, 2], KINDS, "update alignment: " + "a_very_long_run_name " * 4 + "vs b")
    assert short.shape[2] == 3 and long.shape[0] == short.shape[0]
    assert long.shape[1] > short.shape[1]  # the figure widens to hold the title instead of cutting it off
    assert (long[:, :3] == 255).all() and (long[:, -3:] == 255).all()  # and nothing is drawn at its edges


def test_heatmap_does_not_import_pyplot():
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from mergeprobe.tracking import heatmap_image
        image = heatmap_image(np.zeros((2, 3)), [0, 1], ["q_proj", "k_proj", "v_proj"], "t")
        assert image.shape[2] == 3
        assert "matplotlib.figure" in sys.modules
        assert "matplotlib.pyplot" not in sys.modules, "heatmap_image imported matplotlib.pyplot"
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_logger_writes_scalars_heatmap_and_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MergeabilityLogger(tmp_path)
    logger.scalars({"update_alignment/code": 0.25, "cross_disturbance/code": float("nan")}, step=3)
    logger.heatmap("depth_profile/code", spanning(4, 7), list(range(4)), KINDS, step=3)
    logger.text("decision", "**merge**", step=3)
    logger.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert tags["scalars"] == ["mergeprobe/update_alignment/code"]  # the NaN is skipped
    assert events.Scalars("mergeprobe/update_alignment/code")[0].value == 0.25
    (image,) = events.Images("mergeprobe/depth_profile/code")
    assert image.step == 3 and image.width > 100 and image.height > 50
    assert "mergeprobe/decision/text_summary" in tags["tensors"]
