"""Headless Chromium at the edge: print an HTML report to PDF (no Python PDF stack needed)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Quiet, offline, throwaway profile: the report needs no network and must not touch a
# user's browser profile.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class ChromiumMissingError(RuntimeError):
    """No Chromium or Chrome executable was found on PATH."""


def find_chromium() -> str | None:
    """The first Chromium-like executable on PATH, or None."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def html_to_pdf(html: str, out: Path, *, timeout_s: float = 120.0) -> None:
    """Render ``html`` to ``out`` as PDF with headless Chromium's ``--print-to-pdf``.

    Raises:
        ChromiumMissingError: no Chromium on PATH.
        RuntimeError: Chromium failed or wrote nothing.
    """
    binary = find_chromium()
    if binary is None:
        raise ChromiumMissingError("PDF output needs Chromium (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="learnledger-pdf-") as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(html, encoding="utf-8")
        target = out.resolve()
        command = [
            binary,
            *FLAGS,
            f"--user-data-dir={tmp}/profile",
            "--no-pdf-header-footer",
            f"--print-to-pdf={target}",
            page.as_uri(),
        ]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0 or not target.exists() or target.stat().st_size == 0:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"chromium could not print the PDF: {tail[0]}")
