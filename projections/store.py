"""PostgreSQL access for the ledger: the fast recorder, bulk reads, snapshots, append-only DDL.

Every line of psycopg in the project lives here (STYLE.md §8). The recorder keeps the
library's contract: the exclusive table lock (gap-free notification ids in commit
order), NOTIFY on the channel, and ``IntegrityError`` on a taken stream position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import retry
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier, Literal

from domain.ledger import MODEL_REGISTERED_TOPIC
from domain.prediction import DEFAULT_LABELED_TOPIC, LABELED_TOPIC, MADE_TOPIC, PREDICTION_TOPIC

# Settings for a read of a range of log positions, in log order (SET LOCAL: this
# transaction only). The planner underestimates such a range (it has no statistics
# for the notification id, or the filter's selectivity) and picks a bitmap scan plus a
# sort, which spills to disk: a 200k-row range of the seals took 0.75-1.3 s instead of
# 0.08-0.2 s by the index, which yields the rows in log order already. And once the
# table is large its cost estimate passes jit_above_cost, and compiling the expressions
# costs more than running them (a page of a 2M-row log: ~72 ms with JIT, ~25 ms
# without; PostgreSQL's CPU per verify of 1M examples 4.0-4.4 s -> 3.0 s).
_IN_LOG_ORDER = "SELECT set_config('enable_bitmapscan', 'off', true), set_config('jit', 'off', true)"


@dataclass(frozen=True)
class ExamplePage:
    """One model's prediction facts in a range of log positions, cut out of the rows by PostgreSQL.

    Every field is one value for the whole range, in log order (``None`` when no row
    qualified): the bulk replay turns each into an array with one C-level parse instead
    of decoding ~2 rows per example in Python.

    Attributes:
        made_ids: the ids of the model's ``Made`` rows, 16 raw bytes each, back to back
            (``uuid_send``: a third of the text's bytes, and no text to format or parse).
        features: their ``features`` arrays without brackets, ``;`` between rows.
        label_ids: the ids of every other prediction row: the model's labels, and any
            prediction event of another type (of any model), 16 raw bytes each.
        label_kinds: one letter per ``label_ids`` entry: ``L`` labeled in the window,
            ``l`` labeled late, ``D`` default label, ``O`` anything else.
        labels: the label values of the ``L``/``l``/``D`` rows, comma-separated.
        unusual: a row the cut-out cannot be trusted on (a key it looks for is missing):
            the reader then takes the whole range through the typed path.
    """

    made_ids: bytes | None
    features: bytes | None
    label_ids: bytes | None
    label_kinds: str | None
    labels: bytes | None
    unusual: bool


class LedgerRecorder(PostgresApplicationRecorder):
    """The library's application recorder with a COPY insert and the reads replay needs.

    ``COPY … FROM STDIN (FORMAT BINARY)`` writes ~5x faster than the stock ``unnest``
    insert (ARCHITECTURE.md: recorder ceiling ~113k vs ~24k events/s). It cannot run in
    pipeline mode and returns no ids, so ids are read back from the sequence: under the
    exclusive table lock no other transaction can take values between ours, so the
    batch's ids are the ``n`` values ending at ``currval``.
    """

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name=events_table_name)
        schema = Identifier(self.datastore.schema)
        table = Identifier(self.events_table_name)
        qualified = f"{self.datastore.schema}.{self.events_table_name}"
        self.copy_statement = SQL(
            "COPY {schema}.{table} (originator_id, originator_version, topic, state) FROM STDIN (FORMAT BINARY)"
        ).format(schema=schema, table=table)
        self.currval_statement = SQL("SELECT currval(pg_get_serial_sequence({q}, 'notification_id')) AS last").format(
            q=Literal(qualified)
        )
        self.select_many_statement = SQL(
            "SELECT originator_id, originator_version, topic, state FROM {schema}.{table} "
            "WHERE originator_id = ANY(%s) ORDER BY originator_id, originator_version"
        ).format(schema=schema, table=table)
        self.select_aggregate_statement = SQL(
            "SELECT originator_version, topic, state FROM {schema}.{table} "
            "WHERE originator_id = %s ORDER BY originator_version"
        ).format(schema=schema, table=table)
        self.select_ids_by_topic_statement = SQL(
            "SELECT originator_id FROM {schema}.{table} WHERE topic = %s ORDER BY notification_id"
        ).format(schema=schema, table=table)
        # The page is cut out with byte searches on the orjson text (no JSON parsing in
        # PostgreSQL: ~1.7 µs a row). Keys are found by their exact serialised form
        # (orjson writes no spaces).
        self.select_example_page_statement = SQL(
            "SELECT "
            "string_agg(uuid_send(originator_id), '') FILTER (WHERE topic = {made}), "
            "string_agg(substring(tail FROM 1 FOR greatest(position('\\x5d'::bytea IN tail) - 1, 0)), '\\x3b'::bytea) "
            "FILTER (WHERE topic = {made}), "
            "string_agg(uuid_send(originator_id), '') FILTER (WHERE topic <> {made}), "
            "string_agg(CASE WHEN topic = {default} THEN 'D' WHEN topic <> {labeled} THEN 'O' "
            # The key is near the end of a Labeled row: its last 64 bytes are searched
            # first (the same answer, as the whole row is searched next; ~5 % of the query).
            "WHEN position('\"in_window\":true'::bytea IN substring(state FROM length(state) - 63)) > 0 THEN 'L' "
            "WHEN position('\"in_window\":true'::bytea IN state) > 0 THEN 'L' "
            "WHEN position('\"in_window\":false'::bytea IN state) > 0 THEN 'l' ELSE 'O' END, '') "
            "FILTER (WHERE topic <> {made}), "
            "string_agg(substring(tail FROM 1 FOR greatest(position('\\x2c'::bytea IN tail) - 1, 0)), '\\x2c'::bytea) "
            "FILTER (WHERE topic IN ({labeled}, {default})), "
            "coalesce(bool_or(at = 0), false) "
            "FROM (SELECT originator_id, topic, state, at, "
            "CASE WHEN topic = {made} THEN substring(state FROM at + 12) "
            "ELSE substring(state FROM at + 8 FOR 40) END AS tail "
            "FROM (SELECT originator_id, topic, state, "
            "CASE WHEN topic = {made} THEN position('\"features\":['::bytea IN state) "
            "WHEN topic IN ({labeled}, {default}) THEN position('\"label\":'::bytea IN state) "
            "ELSE 1 END AS at "
            # The model's Made/Labeled/DefaultLabeled rows, and every other prediction event
            # of any model (the reader then takes the typed path for its id). Written so
            # that the common row costs two topic compares and the key search, without the
            # prefix test: ~12 % of PostgreSQL's time a page.
            "FROM {schema}.{table} WHERE notification_id BETWEEN %s AND %s "
            "AND ((topic IN ({made}, {labeled}, {default}) AND position(%s::bytea IN state) > 0) "
            "OR (topic NOT IN ({made}, {labeled}, {default}) AND starts_with(topic, {prefix}))) "
            "ORDER BY notification_id) AS matched) AS cut"
        ).format(
            schema=schema,
            table=table,
            made=Literal(MADE_TOPIC),
            labeled=Literal(LABELED_TOPIC),
            default=Literal(DEFAULT_LABELED_TOPIC),
            prefix=Literal(PREDICTION_TOPIC + "."),
        )
        guard = Identifier(f"{self.events_table_name}_append_only")
        self.sql_create_statements.extend(
            [
                # Models are few and listing them must not scan millions of predictions.
                SQL(
                    "CREATE INDEX IF NOT EXISTS {index} ON {schema}.{table} (notification_id) WHERE topic = {topic}"
                ).format(
                    topic=Literal(MODEL_REGISTERED_TOPIC),
                    index=Identifier(f"{self.events_table_name}_model_topic_idx"),
                    schema=schema,
                    table=table,
                ),
                # Invariant 7: the log is append-only for every role the service uses.
                SQL(
                    "CREATE OR REPLACE FUNCTION {schema}.{func}() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'the event log is append-only: % on % is refused', "
                    "TG_OP, TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege'; END $$"
                ).format(schema=schema, func=guard),
                SQL(
                    "CREATE OR REPLACE TRIGGER {trigger} BEFORE UPDATE OR DELETE ON {schema}.{table} "
                    "FOR EACH ROW EXECUTE FUNCTION {schema}.{func}()"
                ).format(trigger=guard, schema=schema, table=table, func=guard),
                SQL(
                    "CREATE OR REPLACE TRIGGER {trigger} BEFORE TRUNCATE ON {schema}.{table} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{func}()"
                ).format(
                    trigger=Identifier(f"{self.events_table_name}_no_truncate"),
                    schema=schema,
                    table=table,
                    func=guard,
                ),
                # Leaf hashes of sealed rows: authenticated by the seals' Merkle roots, they
                # let the audit name the exact row that was changed or removed.
                SQL(
                    "CREATE TABLE IF NOT EXISTS {schema}.{leaves} (position bigint PRIMARY KEY, leaf bytea NOT NULL)"
                ).format(schema=schema, leaves=Identifier(self.seal_leaves_table_name)),
                SQL(
                    "CREATE TABLE IF NOT EXISTS {schema}.{snapshots} ("
                    "model_id uuid NOT NULL, version bigint NOT NULL, digest text NOT NULL, "
                    "state bytea NOT NULL, PRIMARY KEY (model_id, version))"
                ).format(schema=schema, snapshots=Identifier(self.snapshots_table_name)),
            ]
        )

    @property
    def seal_leaves_table_name(self) -> str:
        """Per-row leaf hashes of sealed ranges."""
        return self.events_table_name.replace("_events", "") + "_seal_leaves"

    def select_rows(self, first: int, last: int) -> list[tuple[int, UUID, int, str, bytes]]:
        """Raw event rows with positions ``first``..``last``, in log order."""
        rows = self._range(first, last, SQL("originator_id"))
        return [(int(n), oid, int(v), topic, bytes(state)) for n, oid, v, topic, state in rows]

    def select_sealable_rows(self, first: int, last: int) -> list[tuple[int, bytes, int, str, bytes]]:
        """``select_rows`` with each originator id as its 16 raw bytes: what a seal hashes.

        A ``UUID`` object per row cost ~4x the rest of the read (0.86 against 0.2 s for
        200k rows, the collector scanning them included), and a seal needs the bytes only.
        """
        rows: list[tuple[int, bytes, int, str, bytes]] = self._range(first, last, SQL("uuid_send(originator_id)"))
        return rows

    def _range(self, first: int, last: int, originator_id: SQL) -> list[Any]:
        # Binary mode and plain tuples: the text protocol hex-decodes every bytea and the
        # default factory builds a dict per row, twice the cost of the read itself
        # (measured in bench/replay.py: ~90k rows/s against ~190k).
        statement = SQL(
            "SELECT notification_id, {oid}, originator_version, topic, state FROM {schema}.{table} "
            "WHERE notification_id BETWEEN %s AND %s ORDER BY notification_id"
        ).format(oid=originator_id, schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name))
        with (
            self.datastore.get_connection() as conn,
            conn.transaction(),
            conn.cursor(binary=True, row_factory=tuple_row) as curs,
        ):
            curs.execute(_IN_LOG_ORDER)
            curs.execute(statement, (first, last))
            return curs.fetchall()

    def select_example_page(self, first: int, last: int, model_key: bytes) -> ExamplePage:
        """The prediction facts of one model at log positions ``first``..``last``, cut out by PostgreSQL.

        Args:
            first: the first log position of the range.
            last: the last log position of the range.
            model_key: the exact bytes every ``Made``/``Labeled``/``DefaultLabeled`` row of
                the model carries (``"model_id":"<uuid>"``); rows without it are skipped.
        """
        with (
            self.datastore.get_connection() as conn,
            conn.transaction(),
            conn.cursor(binary=True, row_factory=tuple_row) as curs,
        ):
            curs.execute(_IN_LOG_ORDER)
            curs.execute(self.select_example_page_statement, (first, last, model_key))
            row = curs.fetchone()
        assert row is not None
        made_ids, features, label_ids, kinds, labels, unusual = row
        return ExamplePage(
            bytes(made_ids) if made_ids is not None else None,
            bytes(features) if features is not None else None,
            bytes(label_ids) if label_ids is not None else None,
            kinds,
            bytes(labels) if labels is not None else None,
            bool(unusual),
        )

    def put_seal_leaves(self, leaves: Sequence[tuple[int, bytes]]) -> None:
        """Store leaf hashes (idempotent: a position's leaf never changes)."""
        statement = SQL(
            "INSERT INTO {schema}.{t} (position, leaf) SELECT * FROM unnest(%s::bigint[], %s::bytea[]) "
            "ON CONFLICT (position) DO NOTHING"
        ).format(schema=Identifier(self.datastore.schema), t=Identifier(self.seal_leaves_table_name))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, ([p for p, _ in leaves], [leaf for _, leaf in leaves]))

    def get_seal_leaves(self, first: int, last: int) -> dict[int, bytes]:
        """Stored leaf hashes for positions ``first``..``last``."""
        statement = SQL("SELECT position, leaf FROM {schema}.{t} WHERE position BETWEEN %s AND %s").format(
            schema=Identifier(self.datastore.schema), t=Identifier(self.seal_leaves_table_name)
        )
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (first, last))
            return {int(r["position"]): bytes(r["leaf"]) for r in curs.fetchall()}

    @property
    def snapshots_table_name(self) -> str:
        """Parameter snapshots (a cache: deleting rows changes nothing but speed)."""
        return self.events_table_name.replace("_events", "") + "_param_snapshots"

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """Insert events in one transaction with COPY; return their notification ids."""
        return self.insert_rows([(e.originator_id, e.originator_version, e.topic, e.state) for e in stored_events])

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_rows(self, rows: Sequence[tuple[Any, int, str, bytes]]) -> list[int]:
        """Insert ``(originator_id, originator_version, topic, state)`` rows in one transaction.

        Raises:
            IntegrityError: a row's stream position is taken; nothing was written.
        """
        if not rows:
            return []
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            self._lock_table(curs)
            self._notify_channel(curs)
            with curs.copy(self.copy_statement) as copy:
                copy.set_types(["uuid", "int8", "text", "bytea"])
                for row in rows:
                    copy.write_row(row)
            curs.execute(self.currval_statement)
            last_row = curs.fetchone()
            assert last_row is not None
            last = int(last_row["last"])
        return list(range(last - len(rows) + 1, last + 1))

    def select_aggregate_events(self, originator_id: UUID) -> list[StoredEvent]:
        """``select_events(originator_id)``, read in binary mode: a model's history for replay.

        The library's reader uses the text protocol, which hex-encodes every ``bytea`` and
        builds a dict per row: ~2x the time for a model with thousands of updates.
        """
        with self.datastore.get_connection() as conn, conn.cursor(binary=True, row_factory=tuple_row) as curs:
            curs.execute(self.select_aggregate_statement, (originator_id,))
            return [
                StoredEvent(originator_id=originator_id, originator_version=version, topic=topic, state=bytes(state))
                for version, topic, state in curs.fetchall()
            ]

    def select_events_for_originators(self, originator_ids: Sequence[UUID]) -> list[StoredEvent]:
        """Every stored event of the given aggregates, in one query."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self.select_many_statement, (list(originator_ids),))
            return [
                StoredEvent(
                    originator_id=row["originator_id"],
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=bytes(row["state"]),
                )
                for row in curs.fetchall()
            ]

    def select_states(self, originator_ids: Sequence[UUID], originator_version: int) -> dict[UUID, bytes]:
        """The encoded state of one version of many aggregates, in one query.

        Learners need one field of each ``Prediction.Made`` (the features as used);
        reading just those rows and that field is ~10x cheaper than rebuilding each
        prediction aggregate from all its events.
        """
        statement = SQL(
            "SELECT originator_id, state FROM {schema}.{table} "
            "WHERE originator_id = ANY(%s) AND originator_version = %s"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (list(originator_ids), originator_version))
            return {row["originator_id"]: bytes(row["state"]) for row in curs.fetchall()}

    def select_notification_id(self, originator_id: UUID, originator_version: int) -> int | None:
        """The log position of one event, if it was recorded."""
        statement = SQL(
            "SELECT notification_id FROM {schema}.{table} WHERE originator_id = %s AND originator_version = %s"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (originator_id, originator_version))
            row = curs.fetchone()
        return int(row["notification_id"]) if row else None

    def select_unanswered(self, topic: str, after: int, limit: int) -> list[tuple[int, StoredEvent]]:
        """Events of ``topic`` (first in their stream) whose stream has no second event yet.

        Used to find predictions still unlabeled; returns ``(notification_id, event)`` in
        log order after position ``after``.
        """
        statement = SQL(
            "SELECT e.notification_id, e.originator_id, e.originator_version, e.topic, e.state "
            "FROM {schema}.{table} e WHERE e.notification_id > %s AND e.topic = %s AND NOT EXISTS "
            "(SELECT 1 FROM {schema}.{table} n WHERE n.originator_id = e.originator_id "
            "AND n.originator_version = e.originator_version + 1) ORDER BY e.notification_id LIMIT %s"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (after, topic, limit))
            return [
                (
                    int(row["notification_id"]),
                    StoredEvent(row["originator_id"], row["originator_version"], row["topic"], bytes(row["state"])),
                )
                for row in curs.fetchall()
            ]

    def select_originator_ids_by_topic(self, topic: str) -> list[UUID]:
        """Ids of the aggregates that have an event of ``topic``, in log order."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self.select_ids_by_topic_statement, (topic,))
            return [row["originator_id"] for row in curs.fetchall()]

    # --- parameter snapshots ------------------------------------------------------------

    def put_snapshot(self, model_id: UUID, version: int, digest: str, state: bytes) -> None:
        """Store a parameter snapshot (idempotent: the same key always has the same bytes)."""
        statement = SQL(
            "INSERT INTO {schema}.{t} (model_id, version, digest, state) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (model_id, version) DO NOTHING"
        ).format(schema=Identifier(self.datastore.schema), t=Identifier(self.snapshots_table_name))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (model_id, version, digest, state))

    def snapshot_versions(self, model_id: UUID) -> set[int]:
        """The versions of the model that have a cached snapshot."""
        statement = SQL("SELECT version FROM {schema}.{t} WHERE model_id = %s").format(
            schema=Identifier(self.datastore.schema), t=Identifier(self.snapshots_table_name)
        )
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (model_id,))
            return {int(row["version"]) for row in curs.fetchall()}

    def get_snapshot(self, model_id: UUID, max_version: int) -> Snapshot | None:
        """The newest snapshot of the model at or before ``max_version``."""
        statement = SQL(
            "SELECT version, digest, state FROM {schema}.{t} WHERE model_id = %s AND version <= %s "
            "ORDER BY version DESC LIMIT 1"
        ).format(schema=Identifier(self.datastore.schema), t=Identifier(self.snapshots_table_name))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (model_id, max_version))
            row = curs.fetchone()
        if row is None:
            return None
        return Snapshot(model_id, int(row["version"]), row["digest"], bytes(row["state"]))

    def delete_snapshots(self, model_id: UUID | None = None) -> int:
        """Drop cached snapshots (of one model, or all); returns how many went."""
        base = SQL("DELETE FROM {schema}.{t}").format(
            schema=Identifier(self.datastore.schema), t=Identifier(self.snapshots_table_name)
        )
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            if model_id is None:
                curs.execute(base)
            else:
                curs.execute(base + SQL(" WHERE model_id = %s"), (model_id,))
            return curs.rowcount

    def count_snapshots(self, model_id: UUID) -> int:
        """How many snapshots are cached for the model."""
        statement = SQL("SELECT count(*) AS n FROM {schema}.{t} WHERE model_id = %s").format(
            schema=Identifier(self.datastore.schema), t=Identifier(self.snapshots_table_name)
        )
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (model_id,))
            row = curs.fetchone()
            return int(row["n"]) if row else 0

    def execute_raw(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run one SQL statement as the service's role (used by the append-only tests)."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement.encode(), params)  # type: ignore[arg-type]
            return curs.rowcount


@dataclass(frozen=True)
class Snapshot:
    """A stored parameter snapshot: params + optimizer state bytes and their digest."""

    model_id: UUID
    version: int
    digest: str
    state: bytes
