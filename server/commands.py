"""The CLI's command bodies: parse → call a service → print (imports jax lazily via bootstrap)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from domain.errors import ModelNotFoundError
from domain.spec import LearnerSpec
from server.bootstrap import Runtime, runtime
from server.cli import EXIT_DIVERGED, CliError, emit, load_json_file

CLI_ACTOR = "cli"
SPEC_FLAGS = (
    "kind",
    "n_features",
    "head",
    "n_classes",
    "hidden",
    "optimizer",
    "learning_rate",
    "l2",
    "batch_size",
    "seed",
)


def spec_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> LearnerSpec:
    """Merge defaults, ``--spec FILE`` and flags (flags win) into a validated spec."""
    values: dict[str, Any] = dict(defaults or {})
    if getattr(args, "spec", None):
        data = load_json_file(args.spec)
        if not isinstance(data, dict):
            raise CliError(f"{args.spec} must hold a JSON object of spec fields")
        values.update(data)
    for flag in SPEC_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            values[flag] = value
    if "kind" not in values:
        raise CliError("give --learner KIND or a --spec file with 'kind'")
    if "n_features" not in values:
        raise CliError("give --features N or a --spec file with 'n_features'")
    return LearnerSpec.from_dict(values)


def cmd_register(args: argparse.Namespace) -> int:
    """``learnledger register``."""
    spec = spec_from_args(args)
    with runtime() as rt:
        model = rt.service.register_model(args.model, spec, CLI_ACTOR)
        emit(
            args, _model_json(model), f"registered {model.name} ({spec.kind}, {spec.n_features} features) at version 1"
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``learnledger models``."""
    with runtime() as rt:
        models = rt.ledger.list_models()
        rows = [_model_json(m) for m in models]
        text = (
            "\n".join(
                f"{m['name']:<24} v{m['version']:<8} {m['kind']:<9} "
                f"{'paused' if m['paused'] else 'learning':<8} {m['params_digest'][:19]}"
                for m in rows
            )
            or "no models"
        )
        emit(args, {"models": rows}, text)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``learnledger history MODEL``."""
    with runtime() as rt:
        rows = rt.service.history(args.model)
        text = "\n".join(
            f"v{r.version:<7} {r.event:<15} {r.time.isoformat(timespec='seconds')}  batch={r.batch_size:<4} "
            f"{r.params_digest[:19]}  {_loss_text(r.loss_before, r.loss_after)}{r.detail}"
            for r in rows
        )
        emit(args, {"model": args.model, "versions": [r.to_json() for r in rows]}, text)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """``learnledger audit verify [MODEL]``."""
    with runtime() as rt:
        if args.model:
            rt.ledger.get_model(args.model)  # a clear NOT FOUND before any replay
        reports = rt.service.verify(args.model)
        seals = rt.service.verify_seals()
    payload = verify_payload(reports, seals)
    lines = []
    for r in reports:
        status = "verified" if r.verified else f"DIVERGED at version {r.divergence.version if r.divergence else '?'}"
        lines.append(f"{r.model}: {status} ({r.versions_checked} versions, {r.updates_replayed} updates replayed)")
        if r.platform_differences:
            lines.append(f"  platform differs from registration: {_platform_text(r.platform_differences)}")
        if r.divergence:
            lines.append(f"  recorded {r.divergence.recorded or '-'} replayed {r.divergence.replayed}")
    lines.append(
        f"seals: {'verified' if seals.verified else 'TAMPERING DETECTED'} ({seals.seals_checked} seals, "
        f"{seals.positions_sealed} positions; head {seals.head[:23]}…)"
    )
    lines.extend(f"  {f.kind} at position {f.position}: {f.detail}" for f in seals.findings)
    emit(args, payload, "\n".join(lines))
    return 0 if payload["verified"] else EXIT_DIVERGED


def cmd_audit_seal(args: argparse.Namespace) -> int:
    """``learnledger audit seal``."""
    with runtime() as rt:
        sealed = rt.service.seal(CLI_ACTOR)
    if sealed is None:
        emit(args, {"sealed": False}, "nothing new to seal")
        return 0
    payload = {"sealed": True, "first": sealed.first, "last": sealed.last, "count": sealed.count, "seal": sealed.seal}
    emit(args, payload, f"sealed positions {sealed.first}..{sealed.last} ({sealed.count} rows): {sealed.seal}")
    return 0


def verify_payload(reports: list[Any], seals: Any = None) -> dict[str, Any]:
    """The JSON answer of ``audit verify``: replayed digests, and the seals when given."""
    first = next((r for r in reports if not r.verified), None)
    platform_differs = any(r.platform_differences for r in reports)
    payload: dict[str, Any] = {
        "verified": first is None and (seals is None or seals.verified),
        "versions_checked": sum(r.versions_checked for r in reports),
        "updates_replayed": sum(r.updates_replayed for r in reports),
        "models": [
            {
                "model": r.model,
                "verified": r.verified,
                "versions_checked": r.versions_checked,
                "platform_differences": {k: list(v) for k, v in r.platform_differences.items()},
            }
            for r in reports
        ],
        "platform_differs": platform_differs,
    }
    if seals is not None:
        payload["seals"] = seals.to_json()
    if first is not None and first.divergence is not None:
        payload["first_divergence"] = {
            "model": first.model,
            "version": first.divergence.version,
            "event": first.divergence.event,
            "recorded": first.divergence.recorded,
            "replayed": first.divergence.replayed,
            # On another platform a digest mismatch is expected, not evidence of tampering.
            "cause": "platform differs" if first.platform_differences else "log or code changed",
        }
    return payload


def cmd_at(args: argparse.Namespace) -> int:
    """``learnledger at MODEL --version V | --time T [--predict X]``."""
    features = None
    if args.predict is not None:
        try:
            features = orjson.loads(args.predict)
        except orjson.JSONDecodeError:
            raise CliError(f"--predict must be a JSON list of numbers, got {args.predict!r}") from None
        if not isinstance(features, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in features
        ):
            raise CliError("--predict must be a JSON list of numbers")
    with runtime() as rt:
        model = rt.ledger.get_model(args.model)
        folded = rt.service.state_at(args.model, version=args.version, at_time=args.time)
        payload: dict[str, Any] = {"model": model.name, "version": folded.version, "params_digest": folded.digest}
        text = f"{model.name} at version {folded.version}: {folded.digest}"
        if features is not None:
            scored = rt.service.score(folded, model.spec, [float(v) for v in features])
            payload.update(score=scored.score, decision=scored.decision)
            text += f"\nscore {scored.score:.6f} decision {scored.decision:g}"
        emit(args, payload, text)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """``learnledger rollback MODEL --to-version V --reason TEXT``."""
    with runtime() as rt:
        model = rt.service.roll_back(args.model, args.to_version, args.reason, CLI_ACTOR)
        emit(
            args,
            {**_model_json(model), "rolled_back_to": args.to_version},
            f"{model.name} rolled back to version {args.to_version} as version {model.version} ({model.digest})",
        )
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    """``learnledger pause MODEL --reason TEXT``."""
    with runtime() as rt:
        model = rt.service.pause(args.model, args.reason, CLI_ACTOR)
        emit(args, _model_json(model), f"{model.name} paused at version {model.version}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """``learnledger resume MODEL --reason TEXT``."""
    with runtime() as rt:
        model = rt.service.resume(args.model, args.reason, CLI_ACTOR)
        emit(args, _model_json(model), f"{model.name} resumed at version {model.version}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """``learnledger simulate MODEL --input FILE.jsonl``."""
    x, y = read_jsonl(args.input)
    with runtime() as rt:
        spec = _ensure_model(rt, args, x, y)
        if x.shape[1] != spec.n_features:
            raise CliError(
                f"{args.input} has {x.shape[1]} features per line; model {args.model!r} expects {spec.n_features}"
            )
        _check_labels(spec, y, args.input)
        delays = np.full(len(y), args.label_delay, dtype=np.int64)
        result = _simulate_and_verify(rt, args.model, x, y, delays, quiet=args.json)
    emit(args, result, _result_text(result))
    return 0 if result["audit_verified"] else EXIT_DIVERGED


# The demo's safety policy: a 10 % holdout gate, ADWIN on the served errors, and on drift
# a rebaseline on ADWIN's recent window rolled out as a canary (25 % → all; learning
# waits while a rollout runs, so a short demo keeps its stages few).
DEMO_POLICY: dict[str, Any] = {
    "holdout_fraction": 0.1,
    "gate_tolerance": 0.05,
    "drift_detectors": ["adwin"],
    "drift_action": "rebaseline",
    "rollout_stages": [0.25, 1.0],
    "rollout_min_labels": 25,
    "rollout_tolerance": 0.02,
}


def cmd_demo(args: argparse.Namespace) -> int:
    """``learnledger demo``: the main job on a fresh machine, through a real gRPC server."""
    from server.demo import run_grpc_demo
    from server.streams import drifting_binary_stream, random_label_delays

    stream = drifting_binary_stream(args.events, seed=args.seed)
    delays = random_label_delays(args.events, mean_delay=20.0, seed=args.seed + 1)
    spec = {
        "kind": "logistic",
        "n_features": int(stream.x.shape[1]),
        "optimizer": "adam",
        "learning_rate": 0.05,
        "batch_size": 32,
        "seed": args.seed,
    }
    if not args.no_safety:
        spec["policy"] = DEMO_POLICY
    with runtime() as rt:
        if not args.json:
            print(f"learnledger demo: PostgreSQL at {rt.database.display_url()}", file=sys.stderr)
            print(
                f"  streaming {args.events} examples through an in-process gRPC server; "
                "labels arrive late and out of order",
                file=sys.stderr,
            )

        def show(p: Any) -> None:
            if not args.json:
                acc = f"{p.accuracy:.3f}" if p.accuracy is not None else "-"
                print(
                    f"\r  {p.predictions:>8} predictions  {p.labels:>8} labels  v{p.model_version:<7} "
                    f"accuracy {acc}  {p.predictions / max(p.seconds, 1e-9):,.0f}/s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )

        result = run_grpc_demo(rt.service, args.model, spec, stream.x, stream.y, delays, progress=show)
        if not args.json:
            print(file=sys.stderr)
        result["safety"] = _safety_summary(rt, args.model)
        rt.service.seal("demo")
        seals = rt.service.verify_seals()
        result["seals_verified"] = seals.verified
        result["head_seal"] = seals.head
        result["audit_verified"] = bool(result["audit_verified"] and seals.verified)
    result["drift_at"] = list(stream.drift_at)
    text = (
        "learnledger demo finished\n"
        f"  model          {result['model']} at version {result['model_version']} ({result['params_digest'][:23]}…)\n"
        f"  predictions    {result['predictions']} over gRPC (PredictBatch)\n"
        f"  labels         {result['labels']} ({result['late_labels']} late), delayed and out of order\n"
        f"  updates        {result['updates']} learned online by the server\n"
        f"  prequential    accuracy {result['prequential_accuracy']:.4f}, log loss {result['log_loss']:.4f} "
        f"(concept drifts at {', '.join(map(str, stream.drift_at))})\n"
        f"  throughput     {result['examples_per_s']:,.0f} examples/s end to end, every event committed\n"
        f"  safety         {_safety_text(result['safety'])}\n"
        f"  audit          {'verified' if result['audit_verified'] else 'FAILED'} "
        f"({result['versions_checked']} versions replayed from genesis)"
    )
    emit(args, result, text)
    return 0 if result["audit_verified"] else EXIT_DIVERGED


def _safety_summary(rt: Runtime, name: str) -> dict[str, Any]:
    """What the model's safety policy did: gate refusals, detections, rebaselines, rollouts."""
    from domain.model import Model

    model = rt.ledger.get_model(name)
    events = rt.ledger.get_model_events(model.id)
    return {
        "updates_rejected": model.updates_rejected,
        "drift_detected_at_version": [e.originator_version for e in events if isinstance(e, Model.DriftDetected)],
        "rebaselines": model.rebaselines,
        "rollouts_completed": sum(isinstance(e, Model.RolloutCompleted) for e in events),
        "rollouts_aborted": sum(isinstance(e, Model.RolloutAborted) for e in events),
        "rollout_in_progress": model.rollout is not None,
    }


def _safety_text(s: dict[str, Any]) -> str:
    drift = ", ".join(f"v{v}" for v in s["drift_detected_at_version"]) or "none"
    return (
        f"{s['updates_rejected']} update(s) refused by the gate; drift detected at {drift}; "
        f"{s['rebaselines']} rebaseline(s), {s['rollouts_completed']} rollout(s) completed, "
        f"{s['rollouts_aborted']} aborted" + ("; a rollout is in progress" if s["rollout_in_progress"] else "")
    )


def _simulate_and_verify(
    rt: Runtime, model: str, x: np.ndarray, y: np.ndarray, delays: np.ndarray, *, quiet: bool
) -> dict[str, Any]:
    from server.simulate import run_simulation

    def show(p: Any) -> None:
        if not quiet:
            acc = f"{p.accuracy:.3f}" if p.accuracy is not None else "-"
            print(
                f"\r  {p.predictions:>8} predictions  {p.labels:>8} labels  {p.updates:>6} updates  "
                f"v{p.model_version:<7} accuracy {acc}  {p.predictions / max(p.seconds, 1e-9):,.0f}/s",
                end="",
                file=sys.stderr,
                flush=True,
            )

    result = run_simulation(rt.service, model, x, y, label_delays=delays, progress=show)
    if not quiet:
        print(file=sys.stderr)
        print("  verifying: replaying the model from genesis ...", file=sys.stderr)
    rt.service.seal("simulate")
    reports = rt.service.verify(model)
    audit = verify_payload(reports, rt.service.verify_seals())
    return {
        "model": model,
        "examples": result.examples,
        "predictions": result.examples,
        "labels": result.labels,
        "late_labels": result.late_labels,
        "updates": result.updates,
        "rejected_updates": result.rejected_updates,
        "pending_labels": result.pending_labels,
        "model_version": result.model_version,
        "params_digest": result.params_digest,
        "accuracy": result.accuracy,
        "prequential_accuracy": result.accuracy,
        "log_loss": result.log_loss,
        "rmse": result.rmse,
        "seconds": round(result.seconds, 3),
        "setup_s": result.extra.get("setup_s", 0.0),
        "examples_per_s": round(result.examples_per_s, 1),
        "audit_verified": bool(audit["verified"]),
        "versions_checked": audit["versions_checked"],
    }


def _result_text(r: dict[str, Any]) -> str:
    lines = [
        f"  model          {r['model']} at version {r['model_version']} ({r['params_digest'][:23]}…)",
        f"  predictions    {r['examples']}",
        f"  labels         {r['labels']} ({r['late_labels']} late, {r['pending_labels']} waiting for a full batch)",
        f"  updates        {r['updates']} applied, {r['rejected_updates']} rejected",
    ]
    if r.get("accuracy") is not None:
        lines.append(f"  prequential    accuracy {r['accuracy']:.4f}, log loss {r['log_loss']:.4f}")
    if r.get("rmse") is not None:
        lines.append(f"  prequential    rmse {r['rmse']:.4f}")
    lines.append(
        f"  throughput     {r['examples_per_s']:,.0f} examples/s, every event committed "
        f"(after {r['setup_s']:.1f} s loading and compiling the learner)"
    )
    lines.append(
        f"  audit          {'verified' if r['audit_verified'] else 'FAILED'} "
        f"({r['versions_checked']} versions replayed)"
    )
    return "\n".join(lines)


def read_jsonl(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``{"features": [...], "label": y}`` lines; any bad line is a one-line error."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    rows: list[list[float]] = []
    labels: list[float] = []
    width = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise CliError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(item, dict) or "features" not in item or "label" not in item:
            raise CliError(f'{path}:{number}: expected {{"features": [...], "label": y}}')
        features, label = item["features"], item["label"]
        if not isinstance(features, list) or not features or not all(_is_number(v) for v in features):
            raise CliError(f"{path}:{number}: features must be a non-empty list of numbers")
        if not _is_number(label):
            raise CliError(f"{path}:{number}: label must be a number")
        if width is None:
            width = len(features)
        elif len(features) != width:
            raise CliError(f"{path}:{number}: {len(features)} features, but the first line has {width}")
        if not all(math.isfinite(v) for v in features) or not math.isfinite(label):
            raise CliError(f"{path}:{number}: features and label must be finite numbers")
        rows.append([float(v) for v in features])
        labels.append(float(label))
    if not rows:
        raise CliError(f"{path} holds no examples")
    return np.asarray(rows, dtype=np.float64), np.asarray(labels, dtype=np.float64)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ensure_model(rt: Runtime, args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> LearnerSpec:
    try:
        model = rt.ledger.get_model(args.model)
    except ModelNotFoundError:
        spec = spec_from_args(args, defaults=default_spec_for(x, y))
        model = rt.service.register_model(args.model, spec, CLI_ACTOR)
        return model.spec
    given = [flag for flag in SPEC_FLAGS if getattr(args, flag, None) is not None] + (["spec"] if args.spec else [])
    if given:
        raise CliError(
            f"model {args.model!r} exists already; its spec cannot change (drop --{given[0].replace('_', '-')})"
        )
    return model.spec


def default_spec_for(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Defaults suited to a file: logistic for 0/1, softmax for classes, linear otherwise."""
    values = np.unique(y)
    base: dict[str, Any] = {"n_features": int(x.shape[1]), "optimizer": "adam", "batch_size": 32}
    if set(values.tolist()) <= {0.0, 1.0}:
        return {**base, "kind": "logistic", "learning_rate": 0.05}
    if np.all(values == np.round(values)) and values.min() >= 0 and values.max() < 1000:
        return {**base, "kind": "softmax", "n_classes": int(values.max()) + 1, "learning_rate": 0.05}
    return {**base, "kind": "linear", "learning_rate": 0.01}


def _check_labels(spec: LearnerSpec, y: np.ndarray, path: Path) -> None:
    from domain.errors import InvalidArgumentError
    from domain.prediction import validate_label

    for number, label in enumerate(y.tolist(), start=1):
        try:
            validate_label(spec, label)
        except InvalidArgumentError as exc:
            raise CliError(f"{path}: example {number}: {exc}") from None


def _model_json(model: Any) -> dict[str, Any]:
    return {
        "name": model.name,
        "id": str(model.id),
        "version": model.version,
        "kind": model.spec.kind,
        "spec": model.spec.to_dict(),
        "params_digest": model.digest,
        "paused": model.paused,
        "updates_applied": model.updates_applied,
        "updates_rejected": model.updates_rejected,
        "rollbacks": model.rollbacks,
    }


def _loss_text(before: float | None, after: float | None) -> str:
    if before is None:
        return ""
    return f"loss {before:.4f}→{after:.4f}  " if after is not None else f"loss {before:.4f}  "


def _platform_text(diff: dict[str, tuple[str, str]]) -> str:
    return ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in sorted(diff.items()))
