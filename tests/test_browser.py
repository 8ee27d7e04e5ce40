"""TensorBoard in a real browser: headless Chromium renders mergeprobe's scalars and heatmaps.

Two tiny LoRA runs share a probe store and log to TensorBoard; a ``tensorboard`` server
on loopback serves their directory and headless Chromium loads the Time Series dashboard,
filtered once to the scalar tags and once to the heatmap images. The tag names asserted
below are not in the page TensorBoard sends: its JavaScript puts them in the DOM only
after it has fetched the runs' tag lists from the server. The screenshots are checked for
the heatmap's own colours (the cells and colour bar of the PNG the server holds): they
must fill the images view and be absent from the scalars view.

Skipped when no Chromium binary is found (CI installs Debian's ``chromium``).
"""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.scripts.tiny_train import train

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome", "chrome") if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary on PATH (apt-get install chromium)")

RUNS = ("alpha", "beta")
SCALARS = [f"mergeprobe/{kind}/alpha" for kind in ("update_alignment", "gradient_alignment", "predicted_retention")]
IMAGE = "mergeprobe/depth_profile/alpha"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard_url(tmp_path_factory, alignment_predictor):
    """A tensorboard server on loopback over two tiny runs (beta compared with alpha every 4 steps)."""
    root = tmp_path_factory.mktemp("browser")
    for seed, name in enumerate(RUNS):
        train(str(root / "store"), name, str(root / "logs" / name), seed=seed, max_steps=16, report_to=["tensorboard"],
              predictor=alignment_predictor)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(root / "logs"), "--host", "127.0.0.1", "--port", str(port),
         "--reload_interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, tags = time.time() + 60, {}
        while time.time() < deadline and not any(SCALARS[0] in run for run in tags.values()):
            try:
                with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as response:
                    tags = json.load(response)
            except OSError:
                pass
            time.sleep(0.5)
        assert any(SCALARS[0] in run for run in tags.values()), f"tensorboard never served the tags: {tags}"
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def chromium(url: str, profiles: Path, *args: str, budget_ms: int = 20000) -> subprocess.CompletedProcess:
    # --run-all-compositor-stages-before-draw: without it, on a loaded machine the virtual time budget often ran out
    # before a frame had drawn, and the dashboard's cards (rendered when they intersect the viewport) stayed empty.
    profiles.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(dir=profiles)
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--no-first-run", "--run-all-compositor-stages-before-draw", f"--user-data-dir={profile}",
               "--window-size=1400,1000", f"--virtual-time-budget={budget_ms}", *args, url]
    for _ in range(2):  # a page normally takes 2-4 s; one retry if Chromium hangs
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            continue
        assert done.returncode == 0, done.stderr[-3000:]
        return done
    pytest.fail(f"chromium did not finish within 90 s, twice: {url}")


def rendered_dom(url: str, profiles: Path, wanted: list[str]) -> str:
    """The DOM after TensorBoard's scripts ran; one retry with more virtual time on a slow machine."""
    for budget in (20000, 60000):
        dom = chromium(url, profiles, "--dump-dom", budget_ms=budget).stdout
        if all(f'title="{tag}"' in dom for tag in wanted):
            break
    return dom


def test_static_page_does_not_hold_the_tags(tensorboard_url):
    # What the browser assertions below rely on: the tag names come from the scripts, not the HTML.
    with urllib.request.urlopen(tensorboard_url + "/", timeout=10) as response:
        page = response.read().decode()
    assert "<tb-webapp" in page and "mergeprobe/" not in page


def colours(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.int64)
    return pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2]


def screenshot(url: str, profiles: Path, path: Path, budget_ms: int = 20000) -> np.ndarray:
    from PIL import Image

    chromium(url, profiles, f"--screenshot={path}", budget_ms=budget_ms)
    assert path.exists() and path.stat().st_size > 20_000, "no screenshot, or a tiny one"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[:2] == (1000, 1400)
    assert pixels.astype(float).std() > 20, "the screenshot is blank"
    return pixels


def test_time_series_dashboard_renders_the_scalars_and_the_heatmap(tensorboard_url, tmp_path):
    from PIL import Image

    profiles = tmp_path / "profiles"
    scalars_url = f"{tensorboard_url}/?darkMode=false&tagFilter=update_alignment%7Cgradient_alignment%7Cpredicted_retention#timeseries"
    dom = rendered_dom(scalars_url, profiles, SCALARS)
    for tag in SCALARS:
        assert f'title="{tag}"' in dom, tag  # a scalar card's heading, rendered by the dashboard's scripts
    assert "beta/runs/" in dom  # the cards' data tables name the run that logged the values
    assert 'title="train/loss"' not in dom  # the URL's tag filter was applied

    images_url = f"{tensorboard_url}/?darkMode=false&tagFilter=depth_profile#timeseries"
    dom = rendered_dom(images_url, profiles, [IMAGE])
    assert f'title="{IMAGE}"' in dom
    sources = [html.unescape(s) for s in re.findall(r'<img[^>]* src="(data/plugin/timeseries/imageData\?[^"]+)"', dom)]
    assert sources, "no <img> for the heatmap in the dashboard"

    # Screenshots: the heatmap's own colours are on the images view and nowhere on the scalars view.
    with urllib.request.urlopen(f"{tensorboard_url}/{sources[0]}", timeout=10) as response:
        heatmap = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    saturation = heatmap.max(axis=-1).astype(int) - heatmap.min(axis=-1)
    heatmap_colours = np.unique(colours(heatmap)[saturation >= 30])  # cells and colour bar, not the grey axes and text
    assert len(heatmap_colours) > 10
    scalars_shot = screenshot(scalars_url, profiles, tmp_path / "scalars.png")
    for budget in (20000, 60000):  # one retry with more virtual time: a cold, loaded machine can draw before the image arrives
        images_shot = screenshot(images_url, profiles, tmp_path / "heatmap.png", budget_ms=budget)
        shown = int(np.isin(colours(images_shot), heatmap_colours).sum())
        if shown > 500:
            break
    elsewhere = int(np.isin(colours(scalars_shot), heatmap_colours).sum())
    assert shown > 500 and shown > 10 * elsewhere, (shown, elsewhere)
