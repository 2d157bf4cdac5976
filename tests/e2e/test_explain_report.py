"""``learnledger explain`` as a user runs it: JSON, HTML, PDF, and the page in a real browser."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from uuid import uuid4

import pytest

from domain.prediction import MADE_TOPIC
from server.headless import FLAGS
from server.streams import drifting_binary_stream

CHROMIUM = "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not IN_CI, reason=f"{CHROMIUM} missing (apt-get install chromium)"
)


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def prediction_id(cli_env: dict[str, str], tmp_path: Path) -> str:
    """A logged prediction from a short simulated history (served by a mid-history version)."""
    stream = drifting_binary_stream(240, n_features=4, seed=5)
    path = tmp_path / "stream.jsonl"
    path.write_text(
        "".join(
            json.dumps({"features": r.tolist(), "label": float(y)}) + "\n"
            for r, y in zip(stream.x, stream.y, strict=True)
        )
    )
    proc = run(cli_env, "simulate", "m", "--input", str(path), "--learner", "logistic", "--batch-size", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    import psycopg

    with psycopg.connect(cli_env["LEARNLEDGER_DATABASE_URL"]) as conn:
        rows = conn.execute(
            f"SELECT originator_id FROM {cli_env['LEARNLEDGER_SCHEMA']}.ledger_events "
            "WHERE topic = %s ORDER BY notification_id",
            (MADE_TOPIC,),
        ).fetchall()
    return str(rows[200][0])


def test_explain_prints_json_with_a_matching_score(cli_env: dict[str, str], prediction_id: str) -> None:
    proc = run(cli_env, "explain", prediction_id)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["schema"] == "learnledger.explanation/1"
    decision = report["decision"]
    assert decision["prediction_id"] == prediction_id
    assert decision["score_matches"] is True and decision["recomputed_score"] == decision["score"]
    assert decision["model_version"] > 1
    assert len(report["reasons"]["contributions"]) == 4 and report["reasons"]["top_reasons"]
    assert report["counterfactual"]["minimal"]["flips"] is True
    # simulate seals the log before its audit, so the decision is covered by a seal.
    assert report["attestation"]["seal"].startswith("sha256:")
    assert "covered by seal" in report["attestation"]["seal_note"]
    assert 1 <= len(report["performance"]["points"]) <= 50


def test_explain_writes_a_self_contained_html_report(
    cli_env: dict[str, str], prediction_id: str, tmp_path: Path
) -> None:
    out = tmp_path / "explanation.html"
    proc = run(cli_env, "explain", prediction_id, "--format", "html", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["out"] == str(out) and summary["score_matches"] is True
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2
    assert "The main reasons" in page and "this decision (version" in page
    # Self-contained: no scripts, no fetched assets (the SVG namespace is not a fetch).
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


@pytest.mark.parametrize("bad", ["not-a-uuid", str(uuid4())])
def test_explain_refuses_unknown_or_malformed_ids_in_one_line(cli_env: dict[str, str], bad: str) -> None:
    proc = run(cli_env, "explain", bad)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("learnledger: error:")
    assert ("not a prediction id" if bad == "not-a-uuid" else "no prediction") in lines[0]


@needs_chromium
def test_explain_prints_a_pdf(cli_env: dict[str, str], prediction_id: str, tmp_path: Path) -> None:
    out = tmp_path / "explanation.pdf"
    proc = run(cli_env, "explain", prediction_id, "--format", "pdf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data.startswith(b"%PDF-") and len(data) > 10_000


@needs_chromium
def test_the_html_report_renders_in_headless_chromium(
    cli_env: dict[str, str], prediction_id: str, tmp_path: Path
) -> None:
    page = tmp_path / "explanation.html"
    assert run(cli_env, "explain", prediction_id, "--format", "html", "--out", str(page)).returncode == 0
    png = tmp_path / "explanation.png"
    proc = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={png}",
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert png.exists(), proc.stderr
    width, height, colours = _png_summary(png)
    assert (width, height) == (1200, 1600)
    assert png.stat().st_size > 30_000  # text, two charts: far from a blank page
    assert colours > 50, "the page rendered as (almost) a single colour"


def _png_summary(path: Path) -> tuple[int, int, int]:
    """Width, height and a count of distinct colours (PIL if installed, else a sample of rows)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    try:
        from PIL import Image
    except ImportError:
        return width, height, _distinct_bytes_in_rows(data, width)
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return width, height, len(colours) if colours is not None else 1 << 20


def _distinct_bytes_in_rows(data: bytes, width: int) -> int:
    # Without PIL: inflate the IDAT stream and count distinct filtered scanline contents.
    # Not colours, but a blank page has one or two distinct rows; a report has hundreds.
    idat = b""
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * (4 if data[25] == 6 else 3)
    rows = {raw[i : i + stride] for i in range(0, len(raw), stride)}
    return len(rows)
