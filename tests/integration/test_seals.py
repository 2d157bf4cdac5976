"""Tamper evidence: seals chain Merkle roots; an edited or deleted row is found and named."""

from __future__ import annotations

import re

import numpy as np
import psycopg
import pytest

from domain.errors import InvalidArgumentError
from domain.seal import GENESIS, leaf_hash, merkle_root, seal_hash
from domain.spec import LearnerSpec
from server.commands import verify_payload
from server.simulate import run_simulation
from server.streams import drifting_binary_stream

SPEC = LearnerSpec(kind="logistic", n_features=6, batch_size=8)


def _history(rt, n: int = 80) -> None:  # type: ignore[no-untyped-def]
    if not any(m.name == "m" for m in rt.ledger.list_models()):
        rt.service.register_model("m", SPEC, "alice")
    stream = drifting_binary_stream(n, seed=n)
    run_simulation(rt.service, "m", stream.x, stream.y, label_delays=np.full(n, 2))


def _superuser(rt, statement: str) -> None:  # type: ignore[no-untyped-def]
    schema = rt.ledger.recorder.datastore.schema
    with psycopg.connect(rt.database.url, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {schema}.ledger_events DISABLE TRIGGER ledger_events_append_only")
        conn.execute(statement.format(t=f"{schema}.ledger_events", leaves=f"{schema}.ledger_seal_leaves"))
        conn.execute(f"ALTER TABLE {schema}.ledger_events ENABLE TRIGGER ledger_events_append_only")


def test_merkle_root_and_chain_are_order_and_content_sensitive() -> None:
    leaves = [leaf_hash(i, __import__("uuid").UUID(int=i), 1, "t", b"x%d" % i) for i in range(1, 6)]
    assert merkle_root(leaves) != merkle_root(list(reversed(leaves)))
    assert merkle_root(leaves) != merkle_root(leaves[:-1])
    assert merkle_root([]) == GENESIS
    assert seal_hash(GENESIS, 1, 5, 5, merkle_root(leaves)) != seal_hash(GENESIS, 1, 5, 4, merkle_root(leaves))


def test_a_leaf_hashes_the_same_from_the_id_or_its_raw_bytes() -> None:
    # The seals read ids as 16 raw bytes (uuid_send); a UUID gives the same leaf.
    uid = __import__("uuid").uuid4()
    assert leaf_hash(7, uid, 2, "t", b"{}") == leaf_hash(7, uid.bytes, 2, "t", b"{}")
    with pytest.raises(InvalidArgumentError):
        leaf_hash(7, uid.bytes[:15], 2, "t", b"{}")


def test_seals_chain_and_verify(runtime) -> None:  # type: ignore[no-untyped-def]
    _history(runtime)
    first = runtime.service.seal("auditor")
    assert first is not None and first.first == 1 and first.previous == GENESIS
    _history(runtime, 40)
    second = runtime.service.seal("auditor")
    assert second is not None and second.first == first.last + 1 and second.previous == first.seal
    assert runtime.service.seal("auditor") is not None  # the second seal's own event is new
    report = runtime.service.verify_seals()
    assert report.verified and report.seals_checked == 3 and report.head != GENESIS
    assert report.positions_sealed == runtime.ledger.recorder.max_notification_id() - 1


def test_an_edited_score_is_named_although_replay_cannot_see_it(runtime) -> None:  # type: ignore[no-untyped-def]
    _history(runtime)
    runtime.service.seal("auditor")
    _superuser(
        runtime,
        "UPDATE {t} SET state = convert_to(regexp_replace(convert_from(state, 'UTF8'), '\"score\":[0-9.e-]+', "
        "'\"score\":0.99'), 'UTF8') WHERE notification_id = (SELECT min(notification_id) FROM {t} "
        "WHERE topic LIKE '%Prediction.Made')",
    )
    (digests,) = runtime.service.verify("m")
    assert digests.verified  # scores are not parameters: only the seals can catch this
    seals = runtime.service.verify_seals()
    assert [f.kind for f in seals.findings] == ["modified"]
    assert "Prediction" in seals.findings[0].detail
    # The row is named by its prediction's id, in the canonical text form.
    canonical_id = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    assert re.search(f"of {canonical_id} version 1 ", seals.findings[0].detail)
    payload = verify_payload([digests], seals)
    assert payload["verified"] is False and payload["seals"]["findings"][0]["kind"] == "modified"


def test_a_deleted_row_is_named(runtime) -> None:  # type: ignore[no-untyped-def]
    _history(runtime)
    sealed = runtime.service.seal("auditor")
    assert sealed is not None
    victim = sealed.first + 10
    _superuser(runtime, f"DELETE FROM {{t}} WHERE notification_id = {victim}")
    findings = runtime.service.verify_seals().findings
    assert [(f.kind, f.position) for f in findings] == [("deleted", victim)]


def test_rewriting_the_leaf_index_too_still_breaks_the_seal(runtime) -> None:  # type: ignore[no-untyped-def]
    _history(runtime)
    runtime.service.seal("auditor")
    _superuser(runtime, "DELETE FROM {t} WHERE notification_id = 5")
    _superuser(runtime, "DELETE FROM {leaves} WHERE position = 5")
    (finding,) = runtime.service.verify_seals().findings
    assert finding.kind == "range"


@pytest.mark.parametrize("field", ["root", "previous"])
def test_an_edited_seal_breaks_the_chain(runtime, field: str) -> None:  # type: ignore[no-untyped-def]
    _history(runtime)
    runtime.service.seal("auditor")
    _history(runtime, 24)
    runtime.service.seal("auditor")
    _superuser(
        runtime,
        # Insert a digit rather than overwrite one: writing a fixed digit over the first one
        # left the seal unchanged whenever it already was that digit (1 run in 16).
        f"UPDATE {{t}} SET state = convert_to(regexp_replace(convert_from(state, 'UTF8'), '\"{field}\":\"sha256:',"
        f" '\"{field}\":\"sha256:0'), 'UTF8') WHERE topic LIKE '%LogSeals.Sealed' AND originator_version = 2",
    )
    kinds = {f.kind for f in runtime.service.verify_seals().findings}
    assert "chain" in kinds


def test_an_explanation_is_attested_by_the_seal_covering_it(runtime) -> None:  # type: ignore[no-untyped-def]
    from projections.explain import SEAL_NONE, explain_prediction

    _history(runtime)
    schema = runtime.ledger.recorder.datastore.schema
    with psycopg.connect(runtime.database.url) as conn:
        row = conn.execute(
            f"SELECT originator_id FROM {schema}.ledger_events WHERE topic LIKE '%Prediction.Made' "
            "ORDER BY notification_id DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    before = explain_prediction(runtime.ledger, runtime.service.replayer, row[0])
    assert before.attestation.seal == SEAL_NONE
    sealed = runtime.service.seal("auditor")
    after = explain_prediction(runtime.ledger, runtime.service.replayer, row[0])
    assert sealed is not None and after.attestation.seal == sealed.seal


def test_the_learner_process_seals_the_log_periodically(runtime) -> None:  # type: ignore[no-untyped-def]
    import json
    import os
    import subprocess
    import sys

    _history(runtime)
    env = dict(os.environ)
    env.update(
        LEARNLEDGER_DATABASE_URL=runtime.database.url,
        LEARNLEDGER_SCHEMA=runtime.ledger.recorder.datastore.schema,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "learn", "--json", "--seal-interval", "0.2", "--sweep-interval", "0"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line).get("event") == "sealed":
                break
    finally:
        proc.terminate()
        proc.wait(60)
    report = runtime.service.verify_seals()
    assert report.verified and report.seals_checked >= 1
