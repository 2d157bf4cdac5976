"""``learnledger rebaseline`` and ``learnledger rollout status|abort``: the rollout path by hand."""

from __future__ import annotations

import argparse
from typing import Any

from domain.model import Model
from server.bootstrap import runtime
from server.cli import emit
from server.commands import CLI_ACTOR


def cmd_rebaseline(args: argparse.Namespace) -> int:
    """``learnledger rebaseline MODEL --window 7d``: re-fit on the window, then roll out."""
    with runtime() as rt:
        model = rt.service.rebaseline(args.model, args.window, args.reason or "", CLI_ACTOR, epochs=args.epochs)
        payload = {**rollout_json(model), "examples": len(_last_rebaseline(rt, model).prediction_ids)}
        emit(args, payload, _status_text(payload))
    return 0


def cmd_rollout_status(args: argparse.Namespace) -> int:
    """``learnledger rollout status MODEL``: the stage, and every rollout event so far."""
    with runtime() as rt:
        model = rt.ledger.get_model(args.model)
        payload = {**rollout_json(model), "history": rollout_history(rt.ledger.get_model_events(model.id))}
        emit(args, payload, _status_text(payload))
    return 0


def cmd_rollout_abort(args: argparse.Namespace) -> int:
    """``learnledger rollout abort MODEL --reason TEXT``: the champion serves all traffic again."""
    with runtime() as rt:
        model = rt.service.abort_rollout(args.model, args.reason, CLI_ACTOR)
        payload = rollout_json(model)
        emit(args, payload, _status_text(payload))
    return 0


def rollout_json(model: Model) -> dict[str, Any]:
    """The model's rollout state as plain JSON."""
    rollout = model.rollout
    return {
        "model": model.name,
        "version": model.version,
        "serving_version": model.serving_version,
        "rollout": None
        if rollout is None
        else {
            "candidate_version": rollout.candidate_version,
            "champion_version": rollout.champion_version,
            "stage": rollout.stage,
            "fraction": rollout.fraction,
            "stages": list(model.spec.policy.rollout_stages),
            "min_labels_per_stage": model.spec.policy.rollout_min_labels,
        },
    }


def rollout_history(events: list[Any]) -> list[dict[str, Any]]:
    """Every rebaseline and rollout event, oldest first."""
    rows: list[dict[str, Any]] = []
    for e in events:
        row: dict[str, Any] = {"version": e.originator_version, "event": type(e).__name__, "time": e.timestamp}
        match e:
            case Model.Rebaselined():
                row.update(examples=len(e.prediction_ids), epochs=e.epochs, reason=e.reason, digest=e.digest)
            case Model.RolloutAdvanced():
                row.update(stage=e.stage, fraction=e.fraction, figures=e.figures)
            case Model.RolloutAborted():
                row.update(reason=e.reason, figures=e.figures, digest=e.digest, to_version=e.to_version)
            case Model.RolloutCompleted():
                row.update(figures=e.figures, digest=e.digest, to_version=e.to_version)
            case _:
                continue
        rows.append(row)
    return rows


def _last_rebaseline(rt: Any, model: Model) -> Model.Rebaselined:
    return next(e for e in reversed(rt.ledger.get_model_events(model.id)) if isinstance(e, Model.Rebaselined))


def _status_text(payload: dict[str, Any]) -> str:
    rollout = payload["rollout"]
    lines = [
        f"{payload['model']}: version {payload['version']}, serving version {payload['serving_version']}"
        + (
            ""
            if rollout is None
            else f"; candidate version {rollout['candidate_version']} serves {rollout['fraction']:.0%} "
            f"(stage {rollout['stage'] + 1} of {len(rollout['stages'])})"
        )
    ]
    if rollout is None:
        lines.append("no rollout in progress")
    for row in payload.get("history", []):
        extra = row.get("reason") or (f"{row['fraction']:.0%}" if "fraction" in row else "")
        lines.append(f"  v{row['version']:<6} {row['event']:<18} {extra}")
    return "\n".join(lines)
