"""CLI bodies of the time-travel audits: ``report``, ``diff``, ``counterfactual``, ``impact``.

Each validates its input before reading much and before writing anything: a bad model,
version, period or id file is a one-line error and a non-zero exit (``server.cli``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson

from server.bootstrap import Runtime, runtime
from server.cli import CliError, emit
from server.explain_command import write_report

CLI_ACTOR = "cli"
SHOWN = 10


def read_ids_file(path: Path) -> list[UUID]:
    """Prediction ids from a file: a JSON list, or one UUID per line (``#`` comments allowed).

    Raises:
        CliError: the file cannot be read, or holds something that is not a UUID.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if text.lstrip().startswith("["):
        try:
            items = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise CliError(f"{path} is not valid JSON: {exc}") from None
        lines = [str(v) for v in items]
    else:
        lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    out: list[UUID] = []
    for number, item in enumerate(lines, start=1):
        if not item:
            continue
        try:
            out.append(UUID(item))
        except ValueError:
            raise CliError(f"{path}: item {number} is not a prediction id (UUID): {item[:60]!r}") from None
    if not out:
        raise CliError(f"{path} lists no prediction ids")
    return out


def _exclusion(rt: Runtime, args: argparse.Namespace, source: str | None, ids_file: Path | None, model: Any) -> Any:
    from projections.exclusion import by_ids, by_source

    model_id = model.id if model is not None else None
    name = model.name if model is not None else ""
    if ids_file is not None:
        return by_ids(rt.ledger, read_ids_file(ids_file), model_id, name)
    assert source is not None
    return by_source(rt.ledger, source, model_id, name)


def cmd_report(args: argparse.Namespace) -> int:
    """``learnledger report MODEL --from ISO --to ISO [--format json|html|pdf] [--out FILE]``."""
    from projections.model_report import model_report

    out: Path | None = args.out
    if args.start > args.end:
        raise CliError(f"--from {args.start.isoformat()} is after --to {args.end.isoformat()}")
    if args.format == "pdf":
        from server.headless import find_chromium

        if out is None:
            raise CliError("--format pdf needs --out FILE")
        if find_chromium() is None:
            raise CliError("--format pdf needs Chromium on PATH (Debian: apt-get install chromium)")
    with runtime() as rt:
        report = model_report(rt.ledger, rt.service.replayer, args.model, args.start, args.end)
    if args.format == "json":
        body = orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
    else:
        from server.model_report_html import render_model_report_html

        body = render_model_report_html(report).encode()
    if not write_report(body, args.format, out):
        return 0
    s = report["summary"]
    emit(
        args,
        {"model": report["model"], "format": args.format, "out": str(out), **s},
        f"report on {report['model']}: {s['versions_served']} versions served {s['predictions']} predictions → {out}",
    )
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """``learnledger diff MODEL V1 V2 [--top K] [--json]``."""
    from projections.diff import diff_versions

    with runtime() as rt:
        result = diff_versions(rt.ledger, rt.service.replayer, args.model, args.v1, args.v2, top=args.top)
    lines = [
        f"{result['model']} v{result['v1']} → v{result['v2']}: ‖Δθ‖ = {result['change_norm']:.6g}, "
        f"max |Δ| = {result['change_max']:.6g} ({result['updates']} updates, {result['rollbacks']} rollbacks)",
        "weights that changed most:",
        *(
            f"  {w['name']:<40} {w['before']:+.6g} → {w['after']:+.6g} (Δ {w['delta']:+.6g})"
            for w in result["top_weights"]
        ),
        "steps ranked by their share of the change:",
        *(
            f"  v{b['version']:<6} {b['kind']:<8} {b['examples']:>4} examples  share {b['share']:+.3f}  "
            f"‖δ‖ {b['step_norm']:.4g}"
            for b in result["batches"]
        ),
    ]
    for batch in result["top_batch_examples"]:
        lines.append(f"examples of v{batch['version']} ranked by push along the change:")
        lines.extend(f"  {e['prediction_id']}  label {e['label']:g}  push {e['push']:+.4g}" for e in batch["examples"])
    emit(args, result, "\n".join(lines))
    return 0


def cmd_counterfactual(args: argparse.Namespace) -> int:
    """``learnledger counterfactual MODEL (--exclude-source S | --exclude-ids FILE) [--from V]``."""
    from projections.branch import run_counterfactual

    ids_file: Path | None = args.exclude_ids
    if ids_file is not None:
        read_ids_file(ids_file)  # an unreadable file fails before any database work
    with runtime() as rt:
        model = rt.ledger.get_model(args.model)
        exclusion = _exclusion(rt, args, args.exclude_source, ids_file, model)
        result = run_counterfactual(
            rt.ledger, rt.service.replayer, model.name, exclusion, from_version=args.from_version, actor=CLI_ACTOR
        )
    payload = result.to_json()
    real, branch = payload["real"], payload["branch"]
    metric = "accuracy" if real["accuracy"] is not None else "mean_absolute_error"

    def figure(scores: dict[str, Any]) -> str:
        if not scores["labeled"]:
            return "no labeled predictions"
        return f"loss {scores['loss']:.4f}, {metric.replace('_', ' ')} {scores[metric]:.4f}"

    lines = [
        f"branch {result.branch_name} of {result.model} (recorded as {result.branch_id})",
        f"  excluded       {result.excluded} examples ({result.rule}); {result.rows_dropped} rows dropped from "
        f"{result.batches_changed} batches, {result.batches_skipped} batches skipped",
        f"  replayed       versions {result.from_version + 1}..{result.through_version} "
        f"({result.versions_folded} folded); first divergence: {result.first_divergent_version or 'none'}",
        f"  weights        ‖Δθ‖ {result.weight_change_norm:.6g}, max |Δ| {result.weight_change_max:.6g}",
        f"  real           {figure(real)}",
        f"  branch         {figure(branch)} ({real['labeled']} labeled predictions)",
        f"  decisions      {result.flipped} of {result.predictions_rescored} would have flipped "
        f"({result.flipped_to_correct} to the reported outcome, {result.flipped_to_wrong} away from it)",
        *(
            f"    {f.prediction_id} v{f.version}: {f.logged_decision:g} (score {f.logged_score:.4f}) → "
            f"{f.branch_decision:g} ({f.branch_score:.4f})"
            for f in result.flips[:SHOWN]
        ),
    ]
    emit(args, payload, "\n".join(lines))
    return 0


def cmd_impact(args: argparse.Namespace) -> int:
    """``learnledger impact (--source S | --ids FILE) [--model M]``."""
    from projections.impact import impact_report

    ids_file: Path | None = args.ids
    if ids_file is not None:
        read_ids_file(ids_file)
    with runtime() as rt:
        model = rt.ledger.get_model(args.model) if args.model else None
        exclusion = _exclusion(rt, args, args.source, ids_file, model)
        if model is not None:
            models = [model]
        else:
            involved = {p.model_id for p in rt.ledger.get_predictions(exclusion.ids).values()}
            models = [m for m in rt.ledger.list_models() if m.id in involved]
        report = impact_report(rt.ledger, exclusion.ids, exclusion.rule, models)
    lines = [f"impact of {report['examples']} examples ({report['rule']}):"]
    for m in report["models"]:
        ranges = ", ".join(f"{a}–{b}" if a != b else str(a) for a, b in m["tainted_ranges"]) or "none"
        lines.append(
            f"  {m['model']}: tainted versions {ranges} ({len(m['tainted_versions'])}); "
            f"{m['examples_learned']} examples learned in {len(m['tainted_updates'])} updates; "
            f"head {'TAINTED' if m['head_tainted'] else 'clean'}"
        )
        if m["cleared_by_rollbacks"]:
            lines.append(
                f"    cleared by the rollback(s) at version(s) {', '.join(map(str, m['cleared_by_rollbacks']))}"
            )
        lines.append(
            f"    {m['predictions']} predictions served by tainted versions"
            + (f", {m['first_prediction']} .. {m['last_prediction']}" if m["predictions"] else "")
        )
        lines.extend(f"      {pid}" for pid in m["sample_ids"])
    if not getattr(args, "json", False):
        for m in report["models"]:
            m.pop("prediction_ids", None)
    emit(args, report, "\n".join(lines))
    return 0
