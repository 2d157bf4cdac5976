"""Prequential accuracy and throughput: learnledger (durable) vs River, VW and scikit-learn.

Every anchor runs test-then-train on the same stream in the same process run, so the
ratios are measured under the same machine load. learnledger's figure includes writing
every prediction, label and update to PostgreSQL (committed) and excludes the final
audit replay, which is reported separately.

    python bench/learners.py [--n 20000] [--markdown bench/README.md]

Needs the ``bench`` extra (river, scikit-learn, vowpalwabbit) and PostgreSQL:
``LEARNLEDGER_DATABASE_URL`` or the embedded server.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Row:
    """One learner's result on one stream."""

    stream: str
    learner: str
    accuracy: float
    examples_per_s: float
    durable: bool
    note: str = ""


def river_logreg(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """River ``StandardScaler | LogisticRegression`` (defaults: SGD, lr 0.01), per example."""
    from river import linear_model, preprocessing

    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    names = [f"x{i}" for i in range(x.shape[1])]
    rows = [dict(zip(names, r, strict=True)) for r in x.tolist()]
    labels = [bool(v) for v in y.tolist()]
    correct = 0
    start = time.perf_counter()
    for xi, yi in zip(rows, labels, strict=True):
        correct += model.predict_one(xi) == yi
        model.learn_one(xi, yi)
    return correct / len(rows), len(rows) / (time.perf_counter() - start)


def vw_logistic(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Vowpal Wabbit ``--loss_function logistic --link logistic``, per example."""
    from vowpalwabbit import Workspace

    vw = Workspace("--loss_function logistic --link logistic --quiet")
    lines = [" | " + " ".join(f"x{i}:{v!r}" for i, v in enumerate(r)) for r in x.tolist()]
    labels = ["1" if v == 1.0 else "-1" for v in y.tolist()]
    correct = 0
    start = time.perf_counter()
    for line, label in zip(lines, labels, strict=True):
        p = vw.predict(line)
        correct += (p >= 0.5) == (label == "1")
        vw.learn(label + line)
    elapsed = time.perf_counter() - start
    vw.finish()
    return correct / len(lines), len(lines) / elapsed


def sklearn_sgd(x: np.ndarray, y: np.ndarray, batch: int) -> tuple[float, float]:
    """scikit-learn ``SGDClassifier(loss='log_loss').partial_fit`` on mini-batches, scaled online."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import StandardScaler

    model = SGDClassifier(loss="log_loss", random_state=0)
    scaler = StandardScaler()
    correct = 0
    start = time.perf_counter()
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        if i > 0:
            correct += int(np.sum(model.predict(scaler.transform(xb)) == yb))
        scaler.partial_fit(xb)
        model.partial_fit(scaler.transform(xb), yb, classes=np.array([0.0, 1.0]))
    return correct / len(y), len(y) / (time.perf_counter() - start)


def learnledger_simulate(x: np.ndarray, y: np.ndarray, batch: int) -> tuple[float, float, float]:
    """learnledger test-then-train through the full durable path; returns audit seconds too."""
    import psycopg

    from domain.spec import LearnerSpec
    from server.bootstrap import Settings, build
    from server.database import open_database
    from server.simulate import run_simulation

    schema = "bench_" + uuid.uuid4().hex[:8]
    db = open_database(schema=schema)
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    rt = build(Settings(schema=schema), open_database(schema=schema))
    try:
        spec = LearnerSpec(
            kind="logistic", n_features=x.shape[1], optimizer="adam", learning_rate=0.05, batch_size=batch
        )
        rt.service.register_model("bench", spec, "bench")
        # The same spec under another name compiles the very step the timed run uses.
        rt.service.register_model("warmup", spec, "bench")
        run_simulation(rt.service, "warmup", x[:4000], y[:4000])  # compile and warm caches outside the timing
        result = run_simulation(rt.service, "bench", x, y)
        start = time.perf_counter()
        (report,) = rt.service.verify("bench")
        audit_s = time.perf_counter() - start
        assert report.verified
        return float(result.accuracy or 0.0), result.examples_per_s, audit_s
    finally:
        rt.close()
        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def streams(n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The streams every learner sees: the demo's drifting stream and a stationary one."""
    from server.streams import drifting_binary_stream

    drifting = drifting_binary_stream(n, seed=0)
    stationary = drifting_binary_stream(n, seed=7, drifts=0)
    return {"drifting (demo)": (drifting.x, drifting.y), "stationary": (stationary.x, stationary.y)}


def main() -> None:
    """Run every learner on every stream and print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    rows: list[Row] = []
    for name, (x, y) in streams(args.n).items():
        acc, eps, audit_s = learnledger_simulate(x, y, args.batch)
        rows.append(
            Row(
                name,
                f"learnledger simulate (logistic, adam, batch {args.batch})",
                acc,
                eps,
                True,
                f"audit replay {args.n / audit_s:,.0f} ex/s",
            )
        )
        anchors: list[tuple[str, Callable[..., tuple[float, float]], tuple[object, ...]]] = [
            ("River StandardScaler \\| LogisticRegression", river_logreg, ()),
            ("Vowpal Wabbit --loss_function logistic", vw_logistic, ()),
            (f"scikit-learn SGDClassifier.partial_fit (batch {args.batch})", sklearn_sgd, (args.batch,)),
        ]
        for label, fn, extra in anchors:
            acc, eps = fn(x, y, *extra)
            rows.append(Row(name, label, acc, eps, False))
    table = render(rows)
    print(table)
    if args.markdown:
        replace_section(args.markdown, "learners", table)


def render(rows: list[Row]) -> str:
    """Markdown table with ratios against River on the same stream."""
    river = {r.stream: r for r in rows if r.learner.startswith("River")}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores; n = examples per stream.",
        "",
        "| stream | learner | durable | prequential accuracy | Δ vs River (points) | examples/s | × River speed "
        "| note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = river[r.stream]
        lines.append(
            f"| {r.stream} | {r.learner} | {'yes' if r.durable else 'no'} | {r.accuracy:.4f} | "
            f"{(r.accuracy - base.accuracy) * 100:+.2f} | {r.examples_per_s:,.0f} | "
            f"{r.examples_per_s / base.examples_per_s:.2f} | {r.note} |"
        )
    return "\n".join(lines)


def replace_section(path: Path, key: str, body: str, heading: str = "") -> None:
    """Replace the text between ``<!-- key:start -->`` and ``<!-- key:end -->`` in ``path``
    (every bench writes its table this way); a missing section is appended, under ``heading``."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
