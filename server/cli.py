"""The ``learnledger`` command line: demo, register, simulate, history, time travel, audit."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import orjson

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3


class CliError(Exception):
    """A one-line error for stderr; the command exits non-zero without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"learnledger: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``learnledger`` console script."""
    from projections.platform import configure_jax_determinism

    configure_jax_determinism()  # before anything can import jax
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("learnledger: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place that turns any failure into one line
        from domain.errors import LedgerError

        if isinstance(exc, (CliError, LedgerError)):
            print(f"learnledger: error: {exc}", file=sys.stderr)
        else:
            print(f"learnledger: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(prog="learnledger", description="Event-sourced, audit-first online learning.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("demo", help="run the end-to-end demo on a drifting stream")
    p.add_argument("--events", type=_positive_int, default=20_000, help="examples to stream (default 20000)")
    p.add_argument("--model", default="demo", help="model name (default demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-safety", action="store_true", help="no holdout gate, drift detection or rollout")
    p.set_defaults(handler=_handler("demo"))

    p = sub.add_parser("register", help="register a model")
    p.add_argument("model")
    _add_spec_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_handler("register"))

    p = sub.add_parser("models", help="list models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_handler("models"))

    p = sub.add_parser("history", help="one row per model version")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_handler("history"))

    audit = sub.add_parser("audit", help="audit tools")
    audit_sub = audit.add_subparsers(dest="audit_command", parser_class=_Parser)
    p = audit_sub.add_parser("verify", help="replay from genesis, compare every recorded digest, check the seals")
    p.add_argument("model", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_handler("audit_verify"))
    p = audit_sub.add_parser("seal", help="seal the log written since the last seal (hash chain of Merkle roots)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_handler("audit_seal"))

    p = sub.add_parser("at", help="the model's state at a version or time")
    p.add_argument("model")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--version", type=_positive_int)
    when.add_argument("--time", type=_iso_time, help="ISO 8601 with timezone")
    p.add_argument("--predict", help="JSON list of feature values to score with that state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_handler("at"))

    p = sub.add_parser("rollback", help="make an earlier version's state the head state")
    p.add_argument("model")
    p.add_argument("--to-version", type=_positive_int, required=True)
    p.add_argument("--reason", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_handler("rollback"))

    # --- safety: rebaseline and rollout (bodies in server.rollout_commands) ---
    p = sub.add_parser("rebaseline", help="re-fit on a recent window and roll the result out as a candidate")
    p.add_argument("model")
    p.add_argument("--window", type=parse_duration, required=True, help="e.g. 6h, 7d: examples trained on since")
    p.add_argument("--epochs", type=_positive_int, help="passes over the window (default: the policy's)")
    p.add_argument("--reason", default="")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_rollout_handler("cmd_rebaseline"))
    p = sub.add_parser("rollout", help="a model's canary rollout: status, or abort")
    rollout = p.add_subparsers(dest="rollout_command", parser_class=_Parser, required=True)
    q = rollout.add_parser("status", help="the stage, and every rebaseline/rollout event")
    q.add_argument("model")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=_rollout_handler("cmd_rollout_status"))
    q = rollout.add_parser("abort", help="stop the rollout; the champion serves all traffic again")
    q.add_argument("model")
    q.add_argument("--reason", required=True)
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=_rollout_handler("cmd_rollout_abort"))
    # --- end safety ---

    for name, text in (("pause", "stop learning"), ("resume", "start learning again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model")
        p.add_argument("--reason", required=True)
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=_handler(name))

    p = sub.add_parser("simulate", help="backtest a learner on a JSONL file through the full path")
    p.add_argument("model")
    p.add_argument("--input", required=True, type=Path, help='JSONL: {"features": [...], "label": y} per line')
    p.add_argument("--label-delay", type=_non_negative_int, default=0, help="labels arrive N predictions later")
    _add_spec_flags(p, kind_required=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_handler("simulate"))

    p = sub.add_parser("serve", help="run the gRPC server (embedded PostgreSQL unless LEARNLEDGER_DATABASE_URL)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_non_negative_int, default=50051, help="TCP port; 0 picks one (default 50051)")
    p.add_argument("--tokens", type=Path, help='JSON {"tokens": [{"token", "name", "roles"}]}; none: no auth, loopback')
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key (with --tls-cert)")
    p.add_argument("--no-learner", action="store_true", help="do not run the learner loop in this process")
    _add_ops_flags(p, "the same host as gRPC")

    def serve(args: argparse.Namespace) -> int:
        from server.serve import cmd_serve

        _configure_logs(args)
        return cmd_serve(args)

    p.set_defaults(handler=serve)

    p = sub.add_parser("ingest", help="commit feedback from a NATS JetStream subject (ack after commit)")
    p.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server URL (default nats://127.0.0.1:4222)")
    p.add_argument("--subject", required=True, help="subject carrying JSON feedback messages")
    p.add_argument("--stream", help="JetStream stream (default: the one holding the subject, else created)")
    p.add_argument("--durable", default="learnledger-ingest", help="durable consumer name")
    p.add_argument("--dead-letter", help="dead-letter subject (default SUBJECT.dlq)")
    p.add_argument("--batch", type=_positive_int, default=256, help="messages per transaction (default 256)")
    p.add_argument("--max-deliver", type=_positive_int, default=5, help="deliveries before NOT_FOUND is dead-lettered")
    p.add_argument("--once", action="store_true", help="drain what is available, print a summary, exit")
    p.add_argument("--json", action="store_true")

    def ingest(args: argparse.Namespace) -> int:
        from server.ingest import cmd_ingest

        return cmd_ingest(args)

    p.set_defaults(handler=ingest)

    p = sub.add_parser("explain", help="why a past decision was made, re-derived from the log by replay")
    p.add_argument("prediction_id", help="the prediction's id (a UUID)")
    p.add_argument("--format", choices=["json", "html", "pdf"], default="json", help="report format (default json)")
    p.add_argument("--out", type=Path, help="write the report here (default stdout; pdf needs it)")
    p.add_argument("--json", action="store_true", help="with --out: print a JSON summary line")

    def explain(args: argparse.Namespace) -> int:
        from server.explain_command import cmd_explain

        return cmd_explain(args)

    p.set_defaults(handler=explain)

    p = sub.add_parser("learn", help="run learners as their own process (one elected leader per model)")
    p.add_argument("--models", help="comma-separated model names (default: every model, as registered)")
    p.add_argument("--poll-interval", type=float, default=0.5, help="log polling fallback in seconds (default 0.5)")
    p.add_argument("--sweep-interval", type=float, default=5.0, help="default-label sweep period, s; 0: off")
    p.add_argument("--seal-interval", type=float, default=60.0, help="seal the log every N seconds; 0: off")
    p.add_argument("--workers", type=_positive_int, help="worker threads shared by all led models (default 2-4)")
    p.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    _add_ops_flags(p, "127.0.0.1")

    def learn(args: argparse.Namespace) -> int:
        from server.learn import cmd_learn

        _configure_logs(args)
        return cmd_learn(args)

    p.set_defaults(handler=learn)

    # --- portfolio: staged enablement (body in server.portfolio) ---
    def _fraction(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if not 0.0 <= number <= 1.0:
            raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {value}")
        return number

    p = sub.add_parser("stage", help="let exactly a fraction of the models learn (pauses/resumes, on the record)")
    p.add_argument("--fraction", type=_fraction, required=True, help="share of the models that learn, 0 to 1")
    p.add_argument("--models", help="fnmatch pattern of the model names staged (default: all)")
    p.add_argument("--reason", default="", help="why, appended to the recorded reason")
    p.add_argument("--json", action="store_true")

    def stage(args: argparse.Namespace) -> int:
        from server.portfolio import cmd_stage

        return cmd_stage(args)

    p.set_defaults(handler=stage)

    # --- end portfolio: staged enablement ---

    # --- time-travel audits (bodies in server.audit_commands) ---
    def _audit_handler(name: str) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            from server import audit_commands

            return int(getattr(audit_commands, f"cmd_{name}")(args))

        return run

    p = sub.add_parser("report", help="regulator report: versions that served in a period, changes, accuracy")
    p.add_argument("model")
    p.add_argument("--from", dest="start", type=_iso_time, required=True, help="ISO 8601 with timezone")
    p.add_argument("--to", dest="end", type=_iso_time, required=True, help="ISO 8601 with timezone")
    p.add_argument("--format", choices=["json", "html", "pdf"], default="json", help="report format (default json)")
    p.add_argument("--out", type=Path, help="write the report here (default stdout; pdf needs it)")
    p.add_argument("--json", action="store_true", help="with --out: print a JSON summary line")
    p.set_defaults(handler=_audit_handler("report"))

    p = sub.add_parser("diff", help="which weights changed between two versions, and which batches moved them")
    p.add_argument("model")
    p.add_argument("v1", type=_positive_int)
    p.add_argument("v2", type=_positive_int)
    p.add_argument("--top", type=_positive_int, default=10, help="weights, batches and examples shown (default 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_audit_handler("diff"))

    p = sub.add_parser("counterfactual", help="replay without some labels into a recorded branch that never serves")
    p.add_argument("model")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--exclude-source", help="leave out every label from this feedback source")
    what.add_argument("--exclude-ids", type=Path, help="file of prediction ids (one per line, or a JSON list)")
    p.add_argument("--from", dest="from_version", type=_positive_int, default=1, help="branch point (default 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_audit_handler("counterfactual"))

    p = sub.add_parser("impact", help="taint analysis: versions descending from some labels, and what they served")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", help="every label from this feedback source")
    what.add_argument("--ids", type=Path, help="file of prediction ids (one per line, or a JSON list)")
    p.add_argument("--model", help="only this model (default: every model the labels belong to)")
    p.add_argument("--json", action="store_true", help="JSON, listing affected prediction ids (capped)")
    p.set_defaults(handler=_audit_handler("impact"))

    # --- portfolio status and the operator dashboard (server.status_command, server.dashboard) ---
    p = sub.add_parser("status", help="one line per model: state, freshness lag, recent loss, drift, rollout")
    p.add_argument("--json", action="store_true", help='print one JSON object {"models": [...]}')

    def status(args: argparse.Namespace) -> int:
        from server.status_command import cmd_status

        return cmd_status(args)

    p.set_defaults(handler=status)
    # Added here rather than beside serve's other flags, so this block stays self-contained.
    for command in ("serve", "learn"):
        sub.choices[command].add_argument(
            "--alert-webhook",
            help="POST drift/rollout alerts as JSON to this URL (retried; default $LEARNLEDGER_ALERT_WEBHOOK)",
        )
    sub.choices["serve"].add_argument(
        "--http-port",
        type=_non_negative_int,
        default=0,
        help="serve the read-only operator dashboard on this port of the gRPC host (default 0: off)",
    )
    # --- end of portfolio status and operator dashboard ---
    return parser


def _add_spec_flags(p: argparse.ArgumentParser, *, kind_required: bool = True) -> None:
    p.add_argument(
        "--learner",
        dest="kind",
        choices=["logistic", "softmax", "linear", "mlp"],
        help="learner kind" + (" (required unless --spec)" if kind_required else ""),
    )
    p.add_argument("--features", type=_positive_int, dest="n_features")
    p.add_argument("--head", choices=["binary", "multiclass", "regression"])
    p.add_argument("--classes", type=_positive_int, dest="n_classes")
    p.add_argument("--hidden", type=lambda s: tuple(int(v) for v in s.split(",")), help="e.g. 32,16")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adagrad"])
    p.add_argument("--lr", type=float, dest="learning_rate")
    p.add_argument("--l2", type=float)
    p.add_argument("--batch-size", type=_positive_int, dest="batch_size")
    p.add_argument("--seed", type=int)
    p.add_argument("--spec", type=Path, help="JSON file with any of the spec fields")


# --- operations flags of serve and learn (metrics endpoint, log format) ---
def _add_ops_flags(p: argparse.ArgumentParser, metrics_host: str) -> None:
    p.add_argument(
        "--metrics-port",
        type=_non_negative_int,
        default=0,
        help=f"serve Prometheus /metrics on this port of {metrics_host} (default 0: off)",
    )
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="stderr log lines (default text)")


def _configure_logs(args: argparse.Namespace) -> None:
    # Text stays the commands' own basicConfig; JSON replaces it (basicConfig then no-ops).
    if args.log_format == "json":
        from server.logs import configure_logging

        configure_logging("json")


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from server import commands

        result: int = getattr(commands, f"cmd_{name}")(args)
        return result

    return run


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``90s``, ``15m``, ``6h``, ``7d`` or ``2w``.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    found = _DURATION.match(text)
    if found is None or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"a duration such as 90s, 15m, 6h, 7d or 2w, got {text!r}")
    return float(found.group(1)) * _UNIT_S[found.group(2)]


def _rollout_handler(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from server import rollout_commands

        result: int = getattr(rollout_commands, name)(args)
        return result

    return run


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """Print ``payload`` as one JSON object with ``--json``, else the human text."""
    if getattr(args, "json", False):
        sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _iso_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"the time needs a timezone (e.g. Z or +00:00): {value!r}")
    return parsed


def load_json_file(path: Path) -> Any:
    """Read a JSON file or raise a one-line ``CliError``."""
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{path} is not valid JSON: {exc}") from None


if __name__ == "__main__":
    # Re-import so that `python -m server.cli` and the console script share one module
    # (and one CliError class) instead of a second copy named __main__.
    from server.cli import main as _main

    sys.exit(_main())
