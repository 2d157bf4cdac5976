"""Freshness: time from a label's commit to the commit of the update that learned it.

`LEARNLEDGER_DATABASE_URL=postgresql://root@127.0.0.1:5432/test python bench/freshness.py --rate 5000`

This process offers predictions and labels at ``--rate`` labels/s straight through the
ledger (one transaction per tick: the tick's predictions plus the labels of the
previous tick's, as a group-committing server would write them) and times each label
from the return of its commit. ``learnledger learn`` runs as its own process; a log
follower here sees each ``UpdateApplied`` (woken by NOTIFY) and charges every label in
its batch the time since that label committed. Seeing the update is a little after its
commit, so the figures are upper bounds. Prints the figures and records them in
bench/README.md between the freshness markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from projections.platform import configure_jax_determinism  # noqa: E402

configure_jax_determinism()

import numpy as np  # noqa: E402
import psycopg  # noqa: E402
from eventsourcing.utils import get_topic  # noqa: E402

from domain.model import Model  # noqa: E402
from domain.prediction import make_label_event, make_prediction_event  # noqa: E402
from domain.spec import LearnerSpec  # noqa: E402
from server.bootstrap import Settings, build  # noqa: E402
from server.database import Database, env_for_url  # noqa: E402
from server.log_follower import LogFollower  # noqa: E402

README = ROOT / "bench" / "README.md"
START, END = "<!-- freshness:start -->", "<!-- freshness:end -->"
UPDATE_TOPIC = get_topic(Model.UpdateApplied)


def main() -> int:
    """Run the benchmark; print and record the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=5000, help="labels offered per second (default 5000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to offer labels (default 10)")
    parser.add_argument("--tick", type=float, default=0.05, help="seconds per transaction (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=64, help="learner batch size (default 64)")
    parser.add_argument("--max-wait", type=float, default=0.2, help="max_batch_wait_s of the spec (default 0.2)")
    parser.add_argument("--schema", default="bench_freshness")
    parser.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    url = os.environ.get("LEARNLEDGER_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {args.schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {args.schema}")
    rt = build(Settings(schema=args.schema), Database(url, env_for_url(url, schema=args.schema), False))
    spec = LearnerSpec(
        kind="logistic", n_features=8, batch_size=args.batch_size, learning_rate=0.05, max_batch_wait_s=args.max_wait
    )
    model = rt.service.register_model("fresh", spec, "bench")
    env = dict(os.environ, LEARNLEDGER_DATABASE_URL=url, LEARNLEDGER_SCHEMA=args.schema, PYTHONUNBUFFERED="1")
    learner = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "learn", "--json", "--sweep-interval", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait_leading(learner)
        result = _run(rt, model, spec, args)
    finally:
        learner.send_signal(signal.SIGTERM)
        learner.wait(60)
        rt.close()
    text = _report(result, args)
    print(json.dumps(result) if args.json else text)
    if not args.no_readme:
        _write_readme(text)
    return 0


def _wait_leading(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"leading"' in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
            return
    raise SystemExit("learnledger learn exited before leading")


def _run(rt: Any, model: Model, spec: LearnerSpec, args: argparse.Namespace) -> dict[str, Any]:
    committed: dict[uuid.UUID, float] = {}
    fresh: list[float] = []
    stop = threading.Event()

    def observe() -> None:
        with LogFollower(rt.ledger, [UPDATE_TOPIC]) as follower:
            follower.seek(rt.ledger.recorder.max_notification_id() or 0)
            while not stop.is_set():
                events = follower.read()
                seen = time.monotonic()
                for _, event in events:
                    fresh.extend(seen - committed[pid] for pid in event.prediction_ids if pid in committed)
                if not events:
                    follower.wait(0.05)

    observer = threading.Thread(target=observe, daemon=True)
    observer.start()
    per_tick = max(1, round(args.rate * args.tick))
    rng = np.random.default_rng(0)
    pending: list[Any] = []
    offered = 0
    started = time.monotonic()
    next_tick = started
    k = 0
    while time.monotonic() - started < args.seconds:
        k += 1
        now = datetime.now(UTC)
        made = [
            make_prediction_event(
                uuid.uuid4(),
                model_id=model.id,
                model_name=model.name,
                model_version=1,
                spec=spec,
                features=rng.normal(size=spec.n_features).tolist(),
                score=0.5,
                decision=0.0,
                params_digest="-",
                routing="champion",
                actor="bench",
                timestamp=now,
            )
            for _ in range(per_tick)
        ]
        # Labels for the previous tick's predictions (committed already), in this tick's
        # transaction. Built as ``Ledger.prepare_labels`` builds them (in window: they
        # are a tick old), without its validation reads: the driver shares two cores
        # with PostgreSQL and the learner, and must not be what limits the rate.
        labels = [
            make_label_event(
                e.originator_id,
                model_id=model.id,
                label=float(i % 2),
                source="bench",
                event_time=now,
                in_window=True,
                actor="bench",
                timestamp=now,
            )
            for i, e in enumerate(pending)
        ]
        rt.ledger.record([*made, *labels])
        done = time.monotonic()
        for event in labels:
            committed[event.originator_id] = done
        offered += len(labels)
        pending = made
        next_tick += args.tick
        time.sleep(max(0.0, next_tick - time.monotonic()))
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 10
    while len(fresh) < offered and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    observer.join(5)
    values = np.asarray(fresh) * 1000
    return {
        "offered_labels_per_s": round(offered / elapsed),
        "labels": offered,
        "learned": len(fresh),
        "p50_ms": round(float(np.percentile(values, 50)), 1) if len(values) else None,
        "p99_ms": round(float(np.percentile(values, 99)), 1) if len(values) else None,
        "max_ms": round(float(values.max()), 1) if len(values) else None,
        "batch_size": spec.batch_size,
        "max_batch_wait_s": spec.max_batch_wait_s,
        "updates": rt.ledger.get_model(model.name).updates_applied,
    }


def _report(r: dict[str, Any], args: argparse.Namespace) -> str:
    target = "met" if r["p50_ms"] is not None and r["p50_ms"] < 1000 else "**not met**"
    return "\n".join(
        [
            f"`python bench/freshness.py --rate {args.rate} --seconds {args.seconds:g}` "
            f"({datetime.now(UTC):%Y-%m-%d}, `learnledger learn` as its own process, "
            "same 2-core machine as PostgreSQL)",
            "",
            "| offered labels/s | labels | learned | batch | max wait s | updates | p50 ms | p99 ms | max ms "
            "| target p50 < 1 s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {r['offered_labels_per_s']} | {r['labels']} | {r['learned']} | {r['batch_size']} | "
            f"{r['max_batch_wait_s']:g} | {r['updates']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {target} |",
        ]
    )


def _write_readme(text: str) -> None:
    content = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{START}\n{text}\n{END}"
    if START in content and END in content:
        content = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, content, flags=re.S)
    else:
        content = content.rstrip("\n") + (
            f"\n\n## `bench/freshness.py` — label commit to the commit of the update that learned it\n\n{block}\n"
        )
    README.write_text(content)


if __name__ == "__main__":
    sys.exit(main())
