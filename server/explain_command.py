"""``learnledger explain PREDICTION_ID``: why one past decision was made, re-derived from the log."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson

from server.bootstrap import runtime
from server.cli import CliError, emit

FORMATS = ("json", "html", "pdf")


def parse_prediction_id(text: str) -> UUID:
    """A prediction id as printed by the service (a UUID), or a one-line ``CliError``."""
    try:
        return UUID(text.strip())
    except ValueError:
        raise CliError(f"not a prediction id (expected a UUID such as 0190…): {text!r}") from None


def build_report(prediction_id: UUID) -> dict[str, Any]:
    """The explanation of ``prediction_id`` as a JSON mapping, with the model's accuracy series."""
    from projections.explain import explain_prediction
    from projections.performance import performance_by_version

    with runtime() as rt:
        explanation = explain_prediction(rt.ledger, rt.service.replayer, prediction_id)
        model = rt.ledger.get_model(explanation.decision.model)
        series = performance_by_version(rt.ledger, model.id, model.spec, upto=explanation.attestation.log_position)
    return {**explanation.to_json(), "performance": series.to_json()}


def cmd_explain(args: argparse.Namespace) -> int:
    """``learnledger explain PREDICTION_ID [--format json|html|pdf] [--out FILE] [--json]``."""
    prediction_id = parse_prediction_id(args.prediction_id)
    out: Path | None = args.out
    if args.format == "pdf":
        from server.headless import find_chromium

        if out is None:
            raise CliError("--format pdf needs --out FILE")
        if find_chromium() is None:
            raise CliError("--format pdf needs Chromium on PATH (Debian: apt-get install chromium)")
    report = build_report(prediction_id)
    if args.format == "json":
        body = orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
    else:
        from server.report_html import render_explanation_html

        body = render_explanation_html(report, expand_details=args.format == "pdf").encode()
    if not write_report(body, args.format, out):
        return 0
    d = report["decision"]
    emit(
        args,
        {
            "prediction_id": d["prediction_id"],
            "model": d["model"],
            "model_version": d["model_version"],
            "score_matches": d["score_matches"],
            "format": args.format,
            "out": str(out),
            "log_position": report["attestation"]["log_position"],
        },
        f"explained prediction {d['prediction_id']} (model {d['model']} v{d['model_version']}, score reproduced) "
        f"→ {out}",
    )
    return 0


def write_report(body: bytes, fmt: str, out: Path | None) -> bool:
    """Write a rendered report: stdout when ``out`` is None (returns False), else the file.

    ``pdf`` renders the HTML body through headless Chromium.

    Raises:
        CliError: the file cannot be written.
    """
    if out is None:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
        return False
    try:
        if fmt == "pdf":
            from server.headless import html_to_pdf

            html_to_pdf(body.decode(), out)
        else:
            out.write_bytes(body)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None
    return True
