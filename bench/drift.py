"""Concept drift: prequential accuracy with the safety gates and drift actions on and off, vs River.

Two River concept-drift streams (Agrawal functions 0 → 2 → 6, SEA variants 0 → 2 → 3, each
switch a ``ConceptDriftStream`` of width 100) run test-then-train through learnledger's full
durable path (``server.simulate.run_simulation``: every prediction, label, update, gate verdict
and drift detection committed to PostgreSQL), once per safety configuration, and through River's
``StandardScaler | LogisticRegression`` with and without an ADWIN-triggered reset, all in one
process run so every row sees the same machine load.

    LEARNLEDGER_DATABASE_URL=postgresql://root@127.0.0.1:5432/test python bench/drift.py [--n 20000] [--json]

A fresh PostgreSQL schema is created for the run and dropped afterwards. Every learnledger model is
replayed by ``audit verify`` after its run (``--no-verify`` skips it); a crash or a divergence is
reported in the row's note, and the other rows still run.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import os
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.policy import SafetyPolicy
from domain.spec import LearnerSpec

AFTER = 2000  # "after a drift" = this many examples from the drift point on
WIDTH = 100  # ConceptDriftStream's sigmoid width: ~abrupt (it overflows below ~80 at 14,000)
AGRAWAL_NUMERIC = ("salary", "commission", "age", "hvalue", "hyears", "loan")
AGRAWAL_CATEGORIES = {"elevel": range(5), "car": range(1, 21), "zipcode": range(9)}
# The gate every gated configuration uses: 10 % of labels held out (never trained on), the last
# 500 of them judge each candidate; non-inferiority margin 0.01 nats at alpha 0.05, against the
# current head and the head 20 updates back (the policy's default anchor).
GATES = SafetyPolicy(holdout_fraction=0.1, holdout_size=500, gate_tolerance=0.01, gate_alpha=0.05)
CONFIGS: dict[str, SafetyPolicy] = {
    "ungated": SafetyPolicy(),
    "gates only": GATES,
    **{
        f"gates+drift({action})": replace(GATES, drift_detectors=("adwin",), drift_action=action)
        for action in ("alert", "rebaseline", "pause")
    },
}
LEARNERS: dict[str, dict[str, Any]] = {
    "logistic": {"kind": "logistic", "optimizer": "adam", "learning_rate": 0.05, "batch_size": 32},
    "mlp 64-32": {"kind": "mlp", "hidden": (64, 32), "optimizer": "adam", "learning_rate": 0.005, "batch_size": 32},
}


@dataclass(frozen=True)
class Stream:
    """A labeled stream and where its concepts switch."""

    name: str
    x: np.ndarray
    y: np.ndarray
    drifts: tuple[int, ...]


@dataclass
class Row:
    """One learner and configuration on one stream."""

    stream: str
    learner: str
    configuration: str
    accuracy: float
    after_drift: list[float]
    rejected: int | None
    detections: list[int]
    examples_per_s: float
    load_1min: float
    verified: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def agrawal_row(x: dict[str, Any]) -> list[float]:
    """Agrawal's numeric attributes as they are, its categorical ones one-hot (40 features)."""
    row = [float(x[k]) for k in AGRAWAL_NUMERIC]
    for key, values in AGRAWAL_CATEGORIES.items():
        row.extend(1.0 if x[key] == v else 0.0 for v in values)
    return row


def drift_points(n: int) -> tuple[int, int]:
    """Where the concepts switch: at 35 % and 70 % of the stream."""
    return int(n * 0.35), int(n * 0.7)


def make_streams(n: int) -> list[Stream]:
    """Agrawal 0 → 2 → 6 and SEA 0 → 2 → 3 (noise 0.1), concepts switching at 35 % and 70 % of n."""
    from river.datasets import synth

    drifts = drift_points(n)
    agrawal = [synth.Agrawal(classification_function=f, seed=s) for f, s in ((0, 1), (2, 2), (6, 3))]
    sea = [synth.SEA(variant=v, noise=0.1, seed=s) for v, s in ((0, 1), (2, 2), (3, 3))]
    out = []
    for name, parts, encode in (
        ("Agrawal f0→f2→f6", agrawal, agrawal_row),
        ("SEA v0→v2→v3, noise 0.1", sea, lambda x: [float(x[i]) for i in range(3)]),
    ):
        # Nested: the inner stream is drawn (almost) only before the second switch, so its
        # own position counts the outer stream's examples.
        inner = synth.ConceptDriftStream(parts[0], parts[1], position=drifts[0], width=WIDTH, seed=11)
        outer = synth.ConceptDriftStream(inner, parts[2], position=drifts[1], width=WIDTH, seed=12)
        xs, ys = zip(*((encode(x), float(y)) for x, y in outer.take(n)), strict=True)
        out.append(Stream(name, np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), drifts))
    return out


def segments(n: int, drifts: tuple[int, ...]) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` ranges cut at every drift point and ``AFTER`` past it."""
    cuts = sorted({0, n, *(d for d in drifts if d < n), *(min(d + AFTER, n) for d in drifts)})
    return list(itertools.pairwise(cuts))


def after_drift(correct: np.ndarray, drifts: tuple[int, ...]) -> list[float]:
    """Accuracy over the ``AFTER`` examples from each drift point."""
    return [float(correct[d : d + AFTER].mean()) for d in drifts]


def river_logreg(stream: Stream, *, reset_on_drift: bool) -> Row:
    """River ``StandardScaler | LogisticRegression`` (SGD, lr 0.01), per example.

    With ``reset_on_drift``, ``river.drift.ADWIN`` (delta 0.002) watches the 0/1 errors and a
    detection where the error estimate rose replaces the pipeline with a fresh one — the same
    rule learnledger's drift monitor applies (a falling error is a model learning, not drift).
    """
    from river import compose, drift, linear_model, preprocessing

    def fresh() -> compose.Pipeline:
        return preprocessing.StandardScaler() | linear_model.LogisticRegression()

    names = [f"x{i}" for i in range(stream.x.shape[1])]
    rows = [dict(zip(names, r, strict=True)) for r in stream.x.tolist()]
    labels = [bool(v) for v in stream.y.tolist()]
    model, adwin = fresh(), drift.ADWIN(delta=0.002)
    correct = np.zeros(len(rows), dtype=bool)
    detections: list[int] = []
    start = time.perf_counter()
    for i, (xi, yi) in enumerate(zip(rows, labels, strict=True)):
        correct[i] = model.predict_one(xi) == yi
        model.learn_one(xi, yi)
        if reset_on_drift:
            earlier = adwin.estimation
            adwin.update(0.0 if correct[i] else 1.0)
            if adwin.drift_detected and adwin.estimation > earlier:
                detections.append(i)
                model, adwin = fresh(), drift.ADWIN(delta=0.002)
    speed = len(rows) / (time.perf_counter() - start)
    return Row(
        stream.name,
        "River LR",
        "ADWIN reset" if reset_on_drift else "no reset",
        float(correct.mean()),
        after_drift(correct, stream.drifts),
        None,
        detections,
        speed,
        os.getloadavg()[0],
    )


def warm_up(spec: LearnerSpec, x: np.ndarray, y: np.ndarray) -> None:
    """Compile the spec's step, scorer and gate shapes in-process, outside any timing.

    Every jitted function is cached per spec (policy included), so each configuration would
    otherwise pay its own compilation inside the measured run.
    """
    from domain.ids import new_prediction_id
    from domain.model import Model
    from projections.learners import make_learner
    from projections.learning import LabeledExample, ModelLearner

    model = Model(name="warmup", spec=spec, platform=(), initial_digest="", actor="bench")
    live = ModelLearner(model, make_learner(spec).init())
    live.warm_up()
    for start in range(0, len(y), 64):
        xb, yb = x[start : start + 64], y[start : start + 64]
        for xi, yi, s in zip(xb, yb, live.predict(xb), strict=True):
            example = LabeledExample(
                new_prediction_id(), tuple(xi.tolist()), float(yi), score=s.score, decision=s.decision
            )
            live.add(example)
        while live.ready():
            live.step()


def learnledger_run(rt: Any, stream: Stream, learner: str, config: str, spec: LearnerSpec, *, verify: bool) -> Row:
    """Test-then-train through ``run_simulation``, split at the drift points to score each part.

    Splitting changes nothing learned (the learner and its buffered labels carry over from one
    call to the next); it only lets each part report its own accuracy.
    """
    from domain.model import Model
    from server.simulate import run_simulation

    name = f"drift-{uuid.uuid4().hex[:12]}"
    rt.service.register_model(name, spec, "bench")
    correct = np.zeros(len(stream.y), dtype=bool)
    seconds, rejected = 0.0, 0
    for a, b in segments(len(stream.y), stream.drifts):
        result = run_simulation(rt.service, name, stream.x[a:b], stream.y[a:b])
        right = round(float(result.accuracy or 0.0) * (b - a))
        correct[a : a + right] = True  # only the count matters within a segment
        seconds += result.seconds
        rejected += result.rejected_updates
    model = rt.ledger.get_model(name)
    events = rt.ledger.get_model_events(model.id)
    # Prediction ids are time-ordered and, with immediate labels, consumed in example order:
    # a detection's example index is the number of consumed ids before it.
    consumed = sorted(
        pid
        for e in events
        if isinstance(e, (Model.UpdateApplied, Model.UpdateRejected))
        for pid in (*e.prediction_ids, *e.holdout_ids)
    )
    detections = [bisect.bisect_left(consumed, e.at_prediction) for e in events if isinstance(e, Model.DriftDetected)]
    notes = []
    if model.paused:
        notes.append(f"paused; learned nothing after example {len(consumed)}")
    rebaselines = [e for e in events if isinstance(e, Model.Rebaselined)]
    if rebaselines:
        stage = f"{model.rollout.fraction:.0%}" if model.rollout is not None else "done"
        notes.append(
            f"{len(rebaselines)} rebaseline(s) on {len(rebaselines[0].prediction_ids)} examples; "
            f"rollout stage at end {stage}; learned nothing after example {len(consumed)}"
        )
    row = Row(
        stream.name,
        f"learnledger {learner}",
        config,
        float(correct.mean()),
        after_drift(correct, stream.drifts),
        rejected,
        detections,
        len(stream.y) / seconds,
        os.getloadavg()[0],
        note="; ".join(notes),
    )
    if verify:
        start = time.perf_counter()
        (report,) = rt.service.verify(name)
        row.verified = bool(report.verified)
        row.extra["verify_s"] = round(time.perf_counter() - start, 1)
        if not report.verified:
            row.note += f" AUDIT DIVERGENCE: {report.divergence}"
    return row


def runs(n: int, *, verify: bool) -> Iterator[Row]:
    """Every configuration on every stream, in one schema that is dropped at the end."""
    import psycopg

    from server.bootstrap import Settings, build
    from server.database import open_database

    schema = "bench_drift_" + uuid.uuid4().hex[:8]
    db = open_database(schema=schema)
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    rt = build(Settings(schema=schema), open_database(schema=schema))
    try:
        for s, stream in enumerate(make_streams(n)):
            for learner, kwargs in LEARNERS.items():
                for config, policy in CONFIGS.items():
                    spec = LearnerSpec(n_features=stream.x.shape[1], policy=policy, seed=s, **kwargs)
                    warm_up(spec, stream.x[:1500], stream.y[:1500])
                    try:
                        yield learnledger_run(rt, stream, learner, config, spec, verify=verify)
                    except Exception as exc:  # a crash is a finding: report it and go on
                        traceback.print_exc()
                        load = os.getloadavg()[0]
                        note = f"CRASH: {type(exc).__name__}: {exc}"
                        yield Row(
                            stream.name, f"learnledger {learner}", config, math.nan, [], None, [], 0.0, load, note=note
                        )
            yield river_logreg(stream, reset_on_drift=False)
            yield river_logreg(stream, reset_on_drift=True)
    finally:
        rt.close()
        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def render(rows: list[Row], loads: tuple[float, float], drifts: tuple[int, ...]) -> str:
    """Markdown table of every row, with the load average the run saw."""
    points = ", ".join(f"{d:,}" for d in drifts)
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores; 1-minute load average "
        f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end (per row in `--json`); drift points at "
        f'examples {points}; "after drift" = accuracy over the {AFTER:,} examples from each drift point.',
        "",
        "| stream | learner | configuration | prequential accuracy | after drift 1 / 2 | updates rejected "
        "| drift detections (at example) | examples/s | audit verify | note |",
        "|---|---|---|---:|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        after = " / ".join(f"{v:.4f}" for v in r.after_drift) or "–"
        found = ", ".join(f"{d:,}" for d in r.detections)
        count = f"{len(r.detections)}" + (f" ({found})" if found else "")
        audit = "–" if r.verified is None else ("verified" if r.verified else "**DIVERGED**")
        rejected = "–" if r.rejected is None else f"{r.rejected:,}"
        lines.append(
            f"| {r.stream} | {r.learner} | {r.configuration} | {r.accuracy:.4f} | {after} | {rejected} | {count} "
            f"| {r.examples_per_s:,.0f} | {audit} | {r.note} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run every configuration on every stream; print the table (or ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="examples per stream")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--no-verify", action="store_true", help="skip audit verify after each learnledger run")
    args = parser.parse_args()
    start_load = os.getloadavg()[0]
    rows: list[Row] = []
    for row in runs(args.n, verify=not args.no_verify):
        rows.append(row)
        print(
            f"# {row.stream} | {row.learner} | {row.configuration}: {row.accuracy:.4f} "
            f"{row.examples_per_s:,.0f} ex/s (load {row.load_1min:.1f}) {row.note}",
            file=sys.stderr,
            flush=True,
        )
    loads = (start_load, os.getloadavg()[0])
    if args.json:
        print(json.dumps({"load_average": loads, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(render(rows, loads, drift_points(args.n)))


if __name__ == "__main__":
    main()
