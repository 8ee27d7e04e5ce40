"""Screenshots of mergeprobe's TensorBoard logs, taken by headless Chromium.

Starts ``tensorboard`` on loopback over a log directory and saves two PNGs of its
Images and Scalars dashboards, filtered with the ``tagFilter`` URL parameter:

- ``tensorboard_heatmap.png``: the layer × projection heatmaps (``mergeprobe/depth_profile/*``),
- ``tensorboard_retention.png``: ``mergeprobe/predicted_retention/*`` and ``mergeprobe/update_alignment/*``.

Without a log directory it first runs the quick demo (``mergeprobe demo --quick``, about
a minute on 2 cores) into a temporary folder and uses its ``runs/``.

    python docs/make_screenshots.py                      # quick demo, PNGs into docs/
    python docs/make_screenshots.py mergeprobe-demo/runs --out-dir /tmp/shots

Needs a Chromium binary (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mergeprobe, installed or not

# file name: (dashboard, tag filter, a tag the filter must show). The legacy Scalars and Images
# dashboards draw single points as dots (the quick demo's series are one point each) and
# label every image with its run, tag and step.
VIEWS = {
    "tensorboard_heatmap.png": ("images", "depth_profile", "mergeprobe/depth_profile/"),
    "tensorboard_retention.png": ("scalars", "predicted_retention|update_alignment", "mergeprobe/predicted_retention/"),
}


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("no Chromium binary found: apt-get install chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_quick_demo(out: Path) -> Path:
    """What ``mergeprobe demo --quick --out OUT`` does; returns its TensorBoard directory."""
    from mergeprobe.demo import DemoConfig, run_demo

    run_demo(DemoConfig(quick=True, out_dir=str(out)))
    return out / "runs"


def wait_for_tags(url: str, timeout: float = 120) -> dict:
    """Poll the server until it has loaded the logs (the same tag lists twice in a row)."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as response:
                tags = json.load(response)
            if tags and tags == last:
                return tags
            last = tags
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"tensorboard at {url} served no tags within {timeout:.0f} s")


def chromium(binary: str, url: str, profiles: Path, budget_ms: int, *args: str) -> str:
    # --run-all-compositor-stages-before-draw: without it, on a loaded machine the virtual time budget can run out
    # before a frame has drawn, and the dashboard's cards (rendered when they intersect the viewport) stay empty.
    profiles.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(dir=profiles)
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--no-first-run", "--run-all-compositor-stages-before-draw", f"--user-data-dir={profile}", "--window-size=1400,1000",
               f"--virtual-time-budget={budget_ms}", *args, url]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        sys.exit(f"chromium failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", nargs="?", type=Path, help="TensorBoard log directory (default: run the quick demo)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--budget-ms", type=int, default=20000, help="Chromium's virtual time budget per page")
    options = parser.parse_args()
    binary = find_chromium()
    with tempfile.TemporaryDirectory(prefix="mergeprobe-shots-") as tmp:
        logdir = options.logdir or run_quick_demo(Path(tmp) / "demo")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
             "--reload_interval", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_tags(url)
            options.out_dir.mkdir(parents=True, exist_ok=True)
            profiles = Path(tmp) / "profiles"
            for name, (dashboard, tag_filter, expected) in VIEWS.items():
                query = f"tagFilter={urllib.parse.quote(tag_filter)}"
                # The legacy dashboards keep their cards in shadow DOM, which --dump-dom leaves out: check with the
                # Time Series dashboard, same filter, that the page renders the cards within the time budget.
                check = f"{url}/?darkMode=false&{query}#timeseries"
                for budget in (options.budget_ms, 3 * options.budget_ms):
                    if f'title="{expected}' in chromium(binary, check, profiles, budget, "--dump-dom"):
                        break
                else:
                    print(f"warning: no {expected}* card rendered at {check}", file=sys.stderr)
                page = f"{url}/?darkMode=false#{dashboard}&{query}"
                chromium(binary, page, profiles, budget, f"--screenshot={options.out_dir / name}")
                print(f"{options.out_dir / name}  ({page.replace(url, '')})")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
