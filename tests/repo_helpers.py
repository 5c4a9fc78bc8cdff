"""Test helpers shared by the end-to-end tests: a fresh copy of the repository, and a page seen by Chromium."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def repo_copy(dest: Path) -> Path:
    """The project's git-visible files in `dest`, without .dvc/ and dvc.lock (so every stage runs)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    shutil.rmtree(dest / ".dvc", ignore_errors=True)
    (dest / "dvc.lock").unlink(missing_ok=True)
    return dest


def chromium_dom(page: Path, profile: Path) -> str:
    """The DOM headless Chromium builds for `page` (its scripts run), or skip when Chromium is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (run scripts/sysdeps.sh)")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
