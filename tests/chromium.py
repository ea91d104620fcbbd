"""Render a page in real headless Chromium (Debian's ``chromium``): its DOM after load, and a
screenshot. Tests that need it skip when no chromium is installed (``.ci/run`` installs it)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--virtual-time-budget=5000",
]  # fmt: skip


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(page: Path, *extra: str, timeout_s: float = 90) -> str:
    exe = chromium()
    assert exe, "chromium is not installed (apt-get install -y chromium)"
    with tempfile.TemporaryDirectory(prefix="interpq-chromium-") as profile:
        out = subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout_s, check=True,
        )  # fmt: skip
    return out.stdout


def rendered_dom(page: Path) -> str:
    """The DOM after Chromium loaded and laid out the page."""
    return _run(page, "--dump-dom")


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2400) -> np.ndarray:
    """A screenshot of the page's top ``width`` × ``height`` pixels, as an RGB(A) array."""
    from matplotlib.image import imread

    _run(page, f"--screenshot={png.resolve()}", f"--window-size={width},{height}")
    return imread(png)
