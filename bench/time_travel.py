"""Time travel: ``at --version V`` latency as one model's history grows from 10^3 to 10^6 examples.

`LEARNLEDGER_DATABASE_URL=postgresql://root@127.0.0.1:5432/test python bench/time_travel.py`

One model (logistic, 8 features, batch 16, the spec defaults) learns through ``simulate``'s
full path, in a fresh schema; the history grows once, and at each size (default 10^3,
10^4, 10^5, 10^6 labeled examples) ``--samples`` versions drawn uniformly from 1..head are
looked up with ``LedgerService.state_at`` (what ``learnledger at MODEL --version V`` runs,
minus process start-up), on a ``Replayer`` built as the service builds it (snapshot every
``LEARNLEDGER_SNAPSHOT_INTERVAL`` = 100 versions; the simulation caches them). Each lookup
is also split: the read of the model's events up to V (``Ledger.get_model_events(lte=V)``,
which ``Replayer.state_at`` does before dropping the events the snapshot covers) against
a read of only the events after the snapshot (``EventStore.get(gt=snapshot, lte=V)``).
Writes bench/time_travel.png and records the table in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from projections.platform import configure_jax_determinism  # noqa: E402

configure_jax_determinism()

import numpy as np  # noqa: E402
import psycopg  # noqa: E402

from bench.learners import replace_section  # noqa: E402
from domain.spec import LearnerSpec  # noqa: E402
from projections.bulk_fold import state_at_fast  # noqa: E402
from server.bootstrap import Runtime, Settings, build  # noqa: E402
from server.database import Database, env_for_url  # noqa: E402
from server.simulate import run_simulation  # noqa: E402
from server.streams import drifting_binary_stream, random_label_delays  # noqa: E402

README = ROOT / "bench" / "README.md"
PNG = ROOT / "bench" / "time_travel.png"
HEADING = "## `bench/time_travel.py` — `at --version V` latency as the history grows"
CHUNK = 100_000  # examples simulated per call: bounds the driver's memory


def main() -> int:
    """Grow the history, time lookups at each size, print and record the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--samples", type=int, default=60, help="random versions per size (default 60)")
    parser.add_argument("--schema", default="", help="default: bench_time_travel_<timestamp> (created, kept)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure a history --schema already holds (grown to the largest size): at size S, V is drawn "
        "from the first 1 + S/16 versions, which is exactly the history as it was at S",
    )
    parser.add_argument("--no-readme", action="store_true", help="do not update bench/README.md or the PNG")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    url = os.environ.get("LEARNLEDGER_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
    schema = args.schema or f"bench_time_travel_{int(time.time())}"
    interval = Settings.from_env().snapshot_interval
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    rt = build(
        Settings(snapshot_interval=interval, schema=schema), Database(url, env_for_url(url, schema=schema), False)
    )
    rows: list[dict[str, Any]] = []
    try:
        spec = LearnerSpec(kind="logistic", n_features=8, learning_rate=0.05)
        if not args.reuse:
            rt.service.register_model("travel", spec, "bench")
        grown = max(args.sizes) if args.reuse else 0
        rng = np.random.default_rng(0)
        for size in sorted(args.sizes):
            started = time.perf_counter()
            while grown < size:
                n = min(CHUNK, size - grown)
                stream = drifting_binary_stream(n, n_features=spec.n_features, seed=grown)
                delays = random_label_delays(n, mean_delay=5.0, seed=grown)
                run_simulation(rt.service, "travel", stream.x, stream.y, label_delays=delays)
                grown += n
            # Every label is delivered by the end of a simulate call: S examples, S/16 updates.
            top = 1 + size // spec.batch_size
            rows.append(_measure(rt, size, top, args.samples, rng, time.perf_counter() - started, interval))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        rt.close()
    text = _report(rows, args, schema, interval)
    print(json.dumps(rows, indent=1) if args.json else text)
    if not args.no_readme:
        _plot(rows, interval)
        replace_section(README, "time-travel", text, HEADING)
    return 0


def _measure(
    rt: Runtime, size: int, top: int, samples: int, rng: np.random.Generator, grow_s: float, interval: int
) -> dict[str, Any]:
    model = rt.ledger.get_model("travel")
    store = rt.service.store
    assert store is not None
    versions = rng.integers(1, min(top, model.version) + 1, samples)
    # Warm what a long-running service has warm: the model's aggregate cache, the compiled
    # step, and each scan length (powers of two, 8..128) state_at_fast may fold after a snapshot.
    base = (min(top, model.version) - 1) // interval * interval
    for v in sorted({min(top, model.version, base + d) for d in (1, 9, 17, 33, 65, interval - 1)}):
        rt.service.state_at("travel", version=v)
        state_at_fast(rt.ledger, model.id, v)
    load = [round(v, 2) for v in os.getloadavg()]
    latency, fast, full_read, bounded_read, folded = [], [], [], [], []
    for v in (int(x) for x in versions):
        started = time.perf_counter()
        state = rt.service.state_at("travel", version=v)
        latency.append(time.perf_counter() - started)
        assert state.version == v
        started = time.perf_counter()
        bounded = state_at_fast(rt.ledger, rt.ledger.get_model("travel").id, v)
        fast.append(time.perf_counter() - started)
        assert bounded.digest == state.digest
        snapshot = store.get_snapshot(model.id, v)
        after = snapshot.version if snapshot is not None else 0
        folded.append(v - after)
        started = time.perf_counter()
        rt.ledger.get_model_events(model.id, lte=v)
        full_read.append(time.perf_counter() - started)
        started = time.perf_counter()
        list(rt.ledger.events.get(model.id, gt=after, lte=v))
        bounded_read.append(time.perf_counter() - started)

    def ms(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)) * 1000, 1)

    return {
        "examples": size,
        "versions": min(top, model.version),
        "snapshot_interval": interval,
        "samples": samples,
        "p50_ms": ms(latency, 50),
        "p99_ms": ms(latency, 99),
        "max_ms": ms(latency, 100),
        "fast_p50_ms": ms(fast, 50),
        "fast_p99_ms": ms(fast, 99),
        "events_read_p50_ms": ms(full_read, 50),
        "events_after_snapshot_read_p50_ms": ms(bounded_read, 50),
        "max_versions_folded": int(max(folded)),
        "grow_s": round(grow_s, 1),
        "loadavg": load,
    }


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, schema: str, interval: int) -> str:
    lines = [
        f"`LEARNLEDGER_DATABASE_URL=postgresql://root@127.0.0.1:5432/test LEARNLEDGER_SCHEMA={schema} "
        f"python bench/time_travel.py --sizes {' '.join(map(str, args.sizes))} --samples {args.samples}"
        f"{' --schema ' + schema + ' --reuse' if args.reuse else ''}`",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on 2 cores shared with PostgreSQL (and other sessions); "
        f"logistic, batch 16, snapshot every {interval} versions; `LedgerService.state_at` at {args.samples} "
        "random versions per size.",
        "",
        "| labeled examples | versions | load avg (1/5/15) | `state_at` p50 ms | p99 ms | max ms "
        "| of which: read events ≤ V, p50 ms | read only events after the snapshot, p50 ms "
        "| `state_at_fast` p50 ms | p99 ms | most versions folded |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['examples']:,} | {r['versions']:,} | {'/'.join(f'{v:.2f}' for v in r['loadavg'])} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['events_read_p50_ms']} | "
            f"{r['events_after_snapshot_read_p50_ms']} | {r['fast_p50_ms']} | {r['fast_p99_ms']} | "
            f"{r['max_versions_folded']} |"
        )
    lines += ["", "![at --version latency](time_travel.png)"]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], interval: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the PNG only
    import matplotlib.pyplot as plt

    x = [r["examples"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(x, [r["p50_ms"] for r in rows], "o-", label="Replayer.state_at p50 (as the service runs it)")
    ax.plot(x, [r["p99_ms"] for r in rows], "s-", label="Replayer.state_at p99")
    ax.plot(x, [r["fast_p50_ms"] for r in rows], "o-", label="bulk_fold.state_at_fast p50 (bounded reads)")
    ax.plot(x, [r["fast_p99_ms"] for r in rows], "s-", label="bulk_fold.state_at_fast p99")
    ax.plot(x, [r["events_read_p50_ms"] for r in rows], "^--", label="of which: read all events ≤ V (p50)")
    ax.plot(x, [r["events_after_snapshot_read_p50_ms"] for r in rows], "v:", label="read events after snapshot (p50)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("labeled examples in the history")
    ax.set_ylabel("latency, ms")
    ax.set_title(f"`at --version V`, random V, snapshot every {interval} versions")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PNG)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
