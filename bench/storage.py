"""Storage: bytes on disk per prediction (``Made`` + ``Labeled``), and what compression would save.

`LEARNLEDGER_DATABASE_URL=postgresql://root@127.0.0.1:5432/test python bench/storage.py --n 50000`

One model learns from ``--n`` examples through ``simulate``'s full path (so the table also
holds the ``UpdateApplied`` rows that name the batches), in a fresh schema. Measured:

- on disk: ``pg_relation_size`` of the events table (heap), each of its indexes, and
  ``pg_total_relation_size``, divided by the number of Made + Labeled pairs;
- per event type: the encoded state (orjson bytes) and the whole row (``pg_column_size``);
- the eventsourcing library's zlib compressor (``COMPRESSOR_TOPIC=eventsourcing.compressor:
  ZlibCompressor``): the same rows, compressed, copied into a second schema whose Ledger is
  configured with it (read back through its mapper to check), and measured the same way;
- leaner payloads (estimates on the same rows, nothing written): which fields dominate,
  without the derivable fields, and zlib with a preset dictionary.

The production encoding is not changed. Prints a table (or ``--json``) and records it in
bench/README.md between the storage markers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from projections.platform import configure_jax_determinism  # noqa: E402

configure_jax_determinism()

import orjson  # noqa: E402
import psycopg  # noqa: E402
from eventsourcing.compressor import ZlibCompressor  # noqa: E402
from eventsourcing.utils import get_topic  # noqa: E402

from bench.learners import replace_section  # noqa: E402
from domain.ledger import Ledger  # noqa: E402
from domain.prediction import LABELED_TOPIC, MADE_TOPIC  # noqa: E402
from domain.spec import LearnerSpec  # noqa: E402
from server.bootstrap import Settings, build  # noqa: E402
from server.database import Database, env_for_url  # noqa: E402
from server.simulate import run_simulation  # noqa: E402
from server.streams import drifting_binary_stream, random_label_delays  # noqa: E402

README = ROOT / "bench" / "README.md"
HEADING = "## `bench/storage.py` — bytes on disk per prediction, and what compression saves"
TABLE = "ledger_events"
# Fields a leaner Made/Labeled could drop because the log already holds them: the params
# digest is the model's digest at model_version; a label's model_id is its prediction's.
DERIVABLE = {MADE_TOPIC: ("params_digest",), LABELED_TOPIC: ("model_id",)}


def main() -> int:
    """Build the log, measure it and its compressed copy, print and record the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="predictions, each labeled (default 50000)")
    parser.add_argument("--schema", default="", help="default: bench_storage_<timestamp> (created, kept)")
    parser.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    url = os.environ.get("LEARNLEDGER_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
    schema = args.schema or f"bench_storage_{int(time.time())}"
    zschema = schema + "_zlib"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {zschema}")
    rt = build(Settings(schema=schema), Database(url, env_for_url(url, schema=schema), False))
    env = {**env_for_url(url, schema=zschema), "COMPRESSOR_TOPIC": get_topic(ZlibCompressor)}
    zledger = Ledger(env=env)
    try:
        spec = LearnerSpec(kind="logistic", n_features=8, learning_rate=0.05)
        rt.service.register_model("storage", spec, "bench")
        stream = drifting_binary_stream(args.n, n_features=spec.n_features, seed=0)
        delays = random_label_delays(args.n, mean_delay=5.0)
        run_simulation(rt.service, "storage", stream.x, stream.y, label_delays=delays)
        rows = _all_rows(rt.ledger)
        _copy_compressed(zledger, rows)
        result = {
            "n": args.n,
            "loadavg": [round(v, 2) for v in os.getloadavg()],
            "plain": _sizes(url, schema),
            "zlib": _sizes(url, zschema),
            "by_topic": _by_topic(url, schema, rows),
            "fields": {t: _fields(rows, t) for t in (MADE_TOPIC, LABELED_TOPIC)},
        }
    finally:
        rt.close()
        zledger.close()
    text = _report(result, args, schema)
    print(json.dumps(result, indent=1) if args.json else text)
    if not args.no_readme:
        replace_section(README, "storage", text, HEADING)
    return 0


def _all_rows(ledger: Ledger) -> list[tuple[Any, int, str, bytes]]:
    recorder: Any = ledger.recorder
    last = int(recorder.max_notification_id() or 0)
    out: list[tuple[Any, int, str, bytes]] = []
    for first in range(1, last + 1, 20_000):
        out.extend(
            (oid, version, topic, state)
            for _, oid, version, topic, state in recorder.select_rows(first, first + 19_999)
        )
    return out


def _copy_compressed(zledger: Ledger, rows: list[tuple[Any, int, str, bytes]]) -> None:
    compressor = ZlibCompressor()
    for start in range(0, len(rows), 5_000):
        chunk = rows[start : start + 5_000]
        zledger.record_rows([(oid, version, topic, compressor.compress(state)) for oid, version, topic, state in chunk])
    # The copy must be readable through the library's mapper with the compressor set.
    made = next(row for row in rows if row[2] == MADE_TOPIC)
    assert tuple(zledger.get_prediction(made[0]).features) == tuple(orjson.loads(made[3])["features"])


def _sizes(url: str, schema: str) -> dict[str, Any]:
    table = f"{schema}.{TABLE}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"VACUUM ANALYZE {table}")  # settle the visibility map and free-space map forks
        found = conn.execute(
            "SELECT pg_relation_size(%s::regclass), "
            "pg_total_relation_size(%s::regclass) - pg_relation_size(%s::regclass) - pg_indexes_size(%s::regclass), "
            "pg_total_relation_size(%s::regclass), "
            f"(SELECT count(*) FROM {table} WHERE topic = %s)",
            (table, table, table, table, table, LABELED_TOPIC),
        ).fetchone()
        assert found is not None
        heap, toast, total, pairs = found
        indexes: dict[str, int] = dict(
            conn.execute(
                "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes "
                "WHERE schemaname = %s AND relname = %s",
                (schema, TABLE),
            ).fetchall()
        )
    return {
        "pairs": int(pairs),
        "heap": int(heap),
        "toast_and_maps": int(toast),
        "indexes": {k: int(v) for k, v in indexes.items()},
        "total": int(total),
        "bytes_per_pair": round(int(total) / int(pairs), 1),
    }


def _by_topic(url: str, schema: str, rows: list[tuple[Any, int, str, bytes]]) -> dict[str, dict[str, float]]:
    with psycopg.connect(url) as conn:
        row_sizes: dict[str, float] = dict(
            conn.execute(f"SELECT topic, avg(pg_column_size(e.*)) FROM {schema}.{TABLE} e GROUP BY topic").fetchall()
        )
    states: dict[str, list[bytes]] = defaultdict(list)
    for _, _, topic, state in rows:
        states[topic].append(state)
    out: dict[str, dict[str, float]] = {}
    for topic, values in states.items():
        sample = values[: max(1, min(200, len(values) // 10))]
        zdict = b"".join(sample)[-32_768:]  # zlib's window: a preset dictionary of typical rows
        lean = [_lean(topic, v) for v in values]
        out[topic] = {
            "count": len(values),
            "row": round(float(row_sizes[topic]), 1),
            "state": _mean(len(v) for v in values),
            "zlib": _mean(len(zlib.compress(v)) for v in values),
            "lean": _mean(len(v) for v in lean),
            "lean_zlib": _mean(len(zlib.compress(v)) for v in lean),
            # Measured on the rows outside the sample; -1 when too few rows to tell.
            "zlib_preset_dict": _mean(len(_zdict_compress(v, zdict)) for v in values[len(sample) :])
            if len(values) >= 100
            else -1.0,
        }
    return out


def _lean(topic: str, state: bytes) -> bytes:
    data = orjson.loads(state)
    for key in DERIVABLE.get(topic, ()):
        data.pop(key, None)
    return orjson.dumps(data)


def _zdict_compress(data: bytes, zdict: bytes) -> bytes:
    compressor = zlib.compressobj(level=6, zdict=zdict)
    return compressor.compress(data) + compressor.flush()


def _fields(rows: list[tuple[Any, int, str, bytes]], topic: str) -> list[tuple[str, float, float]]:
    """(field, mean bytes of ``"key":value,``, share of the state) for one event type, largest first."""
    totals: dict[str, int] = defaultdict(int)
    count = size = 0
    for _, _, t, state in rows:
        if t != topic:
            continue
        count += 1
        size += len(state)
        for key, value in orjson.loads(state).items():
            totals[key] += len(orjson.dumps({key: value}))  # braces stand in for the comma
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return [(key, round(total / count, 1), round(total / size, 3)) for key, total in ranked]


def _mean(values: Any) -> float:
    items = list(values)
    return round(sum(items) / len(items), 1) if items else 0.0


def _report(r: dict[str, Any], args: argparse.Namespace, schema: str) -> str:
    plain, packed = r["plain"], r["zlib"]
    lines = [
        f"`LEARNLEDGER_DATABASE_URL=postgresql://root@127.0.0.1:5432/test LEARNLEDGER_SCHEMA={schema} "
        f"python bench/storage.py --n {args.n}`",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average {'/'.join(f'{v:.2f}' for v in r['loadavg'])} "
        f"(1/5/15 min), PostgreSQL 15; {plain['pairs']:,} Made + Labeled pairs of a logistic model with 8 features, "
        "batch 16, learned through `simulate` (so the table also holds one `UpdateApplied` per 16 pairs). "
        "Sizes after `VACUUM ANALYZE`; bytes per pair = everything in the table ÷ pairs.",
        "",
        "| encoding | heap MB | indexes MB | TOAST + maps MB | total MB | **bytes on disk per pair** | vs plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("orjson (production)", plain), ("orjson + library ZlibCompressor", packed)):
        lines.append(
            f"| {name} | {s['heap'] / 1e6:.2f} | {sum(s['indexes'].values()) / 1e6:.2f} | "
            f"{s['toast_and_maps'] / 1e6:.2f} | {s['total'] / 1e6:.2f} | **{s['bytes_per_pair']:,.0f}** | "
            f"{s['total'] / plain['total']:.2f} |"
        )
    index_text = ", ".join(f"`{k}` {v / plain['pairs']:.0f}" for k, v in plain["indexes"].items())
    lines += ["", f"Index bytes per pair (plain): {index_text}.", ""]
    lines += [
        "Per event type (mean bytes; *state* is the encoded payload, *row* is `pg_column_size` of the whole row; "
        "the last four columns are estimates on the same rows, nothing written):",
        "",
        "| event | rows | row | state | zlib | without derivable fields | that + zlib "
        "| zlib with a preset dictionary |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for topic, t in r["by_topic"].items():
        lines.append(
            f"| `{topic.split(':')[-1]}` | {t['count']:,} | {t['row']} | {t['state']} | {t['zlib']} | {t['lean']} | "
            f"{t['lean_zlib']} | {t['zlib_preset_dict'] if t['zlib_preset_dict'] >= 0 else '–'} |"
        )
    lines += ["", 'Which fields dominate the payload (mean bytes of `"key":value,` and share of the state):', ""]
    for topic, fields in r["fields"].items():
        parts = ", ".join(f"`{k}` {b:.0f} ({share:.0%})" for k, b, share in fields)
        lines.append(f"- `{topic.split(':')[-1]}`: {parts}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
