"""``learnledger status``: one row per model, from the log alone — text table and ``--json``."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from projections.status import _scan_label_backlog, list_status, select_label_backlog
from server.cli import main
from server.client import LedgerClient
from server.grpc_server import LedgerServer
from server.status_command import TEXT_COLUMNS, status_table
from tests.e2e.conftest import SPEC


def wait_for_version(client: LedgerClient, model: str, at_least: int, timeout: float = 30.0) -> int:
    """Poll until the model's version reaches ``at_least``."""
    deadline = time.monotonic() + timeout
    while True:
        version = client.get_model(model).version
        if version >= at_least or time.monotonic() > deadline:
            return version
        time.sleep(0.05)


def predict_and_label(client: LedgerClient, model: str, n: int) -> list[str]:
    """``n`` predictions, each labeled; their ids in order."""
    preds = client.predict_batch(model, [[float(i), 1.0 - i, 0.5 * i] for i in range(n)])
    for i, p in enumerate(preds):
        assert client.feedback(p.prediction_id, float(i % 2)) == "ACCEPTED"
    return [p.prediction_id for p in preds]


@pytest.fixture
def portfolio(start_server: Callable[..., LedgerServer]) -> LedgerServer:
    """Three models (batch size 4) in three states, learned by a real server's learner.

    - ``learned``: 10 labels → 2 updates, 2 labels still buffered (lag 2);
    - ``rolled``: 8 labels → 2 updates, then rolled back to version 2 (version 4);
    - ``paused``: paused first, then 6 labels that wait (lag 6).
    """
    server = start_server()
    with LedgerClient(server.address, retries=0) as c:
        for name in ("learned", "rolled", "paused"):
            c.register_model(name, SPEC)
        c.pause("paused", "investigating source crm-7")
        predict_and_label(c, "learned", 10)
        predict_and_label(c, "rolled", 8)
        predict_and_label(c, "paused", 6)
        assert wait_for_version(c, "learned", 3) == 3
        assert wait_for_version(c, "rolled", 3) == 3
        c.rollback("rolled", 2, "bad batch from source crm-7")
    return server


@pytest.fixture
def cli_database(monkeypatch: pytest.MonkeyPatch, database_url: str, schema: str) -> None:
    """Point the in-process CLI at the test's database and schema."""
    monkeypatch.setenv("LEARNLEDGER_DATABASE_URL", database_url)
    monkeypatch.setenv("LEARNLEDGER_SCHEMA", schema)


def test_status_json_has_one_row_per_model_in_its_state(
    portfolio: LedgerServer, cli_database: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in payload["models"]}
    assert list(rows) == ["learned", "rolled", "paused"]  # registration order

    learned = rows["learned"]
    assert (learned["state"], learned["version"]) == ("learning", 3)
    assert (learned["updates_applied"], learned["updates_rejected"], learned["rollbacks"]) == (2, 0, 0)
    assert learned["lag"]["labels"] == 2 and learned["lag"]["oldest_s"] >= 0.0
    assert learned["recent_updates"] == 2 and learned["recent_loss"] > 0.0
    assert learned["drift"] == {"detections": 0, "last_detector": None, "last_version": None}
    assert learned["rollout"] is None and learned["paused"] is False

    rolled = rows["rolled"]
    assert (rolled["state"], rolled["version"], rolled["rollbacks"]) == ("learning", 4, 1)
    assert rolled["lag"] == {"labels": 0, "oldest_s": None}  # two full batches, nothing left
    assert rolled["updates_applied"] == 2 and rolled["recent_updates"] == 2

    paused = rows["paused"]
    assert (paused["state"], paused["paused"], paused["pause_reason"]) == (
        "paused",
        True,
        "investigating source crm-7",
    )
    assert paused["version"] == 2 and paused["updates_applied"] == 0
    assert paused["lag"]["labels"] == 6 and paused["lag"]["oldest_s"] is not None
    assert paused["recent_loss"] is None and paused["recent_updates"] == 0


def test_status_text_is_an_aligned_table(
    portfolio: LedgerServer, cli_database: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    header, rows, notes = lines[0], lines[1:4], lines[4:]
    assert header.split() == [
        "MODEL",
        "STATE",
        "VERSION",
        "SERVING",
        "LAG",
        "OLDEST",
        "LOSS",
        "DRIFT",
        "ROLLOUT",
        "ACCEPTED",
        "REJECTED",
        "ROLLBACKS",
    ]
    assert [r.split()[:2] for r in rows] == [["learned", "learning"], ["rolled", "learning"], ["paused", "paused"]]
    # Every row has one cell under each heading: text columns start where their heading
    # starts, number columns end where theirs ends.
    heads = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", header)]
    for row in rows:
        cells = [(m.start(), m.end()) for m in re.finditer(r"\S+", row)]
        assert len(cells) == len(heads), row
        for (name, start, end), (cell_start, cell_end) in zip(heads, cells, strict=True):
            assert cell_start == start if name in TEXT_COLUMNS else cell_end == end, (name, row)
    assert rows[2].split()[4] == "6"  # the paused model's waiting labels
    assert notes == ["paused: paused — investigating source crm-7"]


def test_status_with_no_models(runtime: Any, cli_database: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 0
    assert capsys.readouterr().out.strip() == "no models"
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"models": []}


def test_the_backlog_query_agrees_with_a_scan_of_the_log(portfolio: LedgerServer, runtime: Any) -> None:
    models = runtime.ledger.list_models()
    through = {m.id: m.learned_through for m in models}
    assert select_label_backlog(runtime.ledger.recorder, through) == _scan_label_backlog(runtime.ledger, through)


def test_drift_and_rollout_come_from_the_recorded_events(runtime: Any) -> None:
    # Given facts as the learner records them (appended here through the domain's own
    # commands: the status reads events, it does not re-make decisions)
    ledger = runtime.ledger
    runtime.service.register_model("canary", _spec(), "test")
    model = ledger.get_model("canary")
    at = uuid.uuid4()
    model.detect_drift("adwin", at, {"estimation": 0.31, "width": 512.0}, "rebaseline", "learner")
    model.rebaseline((uuid.uuid4(), uuid.uuid4()), 3, 3600.0, "sha256:candidate", "drift: adwin", "learner")
    model.advance_rollout({"canary_loss": 0.21, "champion_loss": 0.25}, "learner")
    ledger.save(model)
    # When the status is read
    (row,) = list_status(ledger, now=datetime.now(UTC))
    # Then it shows the drift and the rollout in progress
    assert (row.state, row.version, row.rebaselines, row.drift_detections) == ("rollout", 4, 1, 1)
    assert row.last_drift_detector == "adwin" and row.last_drift_version is not None
    assert row.rollout is not None and (row.rollout["stage"], row.rollout["fraction"]) == (1, 0.05)
    assert f"v{row.rollout['candidate_version']} stage 1 5%" in status_table([row])
    assert f"1 (adwin@v{row.last_drift_version})" in status_table([row])


def test_serving_and_candidate_versions_name_the_versions_whose_state_serves(
    portfolio: LedgerServer, runtime: Any
) -> None:
    # Outside a rollout the head serves (predictions record the head version); a
    # rebaseline's candidate is the state its own event produced, and the champion is
    # the head before it. (Fails while Model's event bodies read ``self.version``, which
    # the library advances only after the body ran: every value is one version early.)
    ledger = runtime.ledger
    runtime.service.register_model("canary", _spec(), "test")
    model = ledger.get_model("canary")
    model.detect_drift("adwin", uuid.uuid4(), {"estimation": 0.31}, "rebaseline", "learner")
    model.rebaseline((uuid.uuid4(),), 3, 3600.0, "sha256:candidate", "drift: adwin", "learner")
    ledger.save(model)
    rows = {r.name: r for r in list_status(ledger, now=datetime.now(UTC))}
    assert [(rows[n].version, rows[n].serving_version) for n in ("learned", "rolled", "paused")] == [
        (3, 3),
        (4, 4),
        (2, 2),
    ]
    assert rows["canary"].rollout == {"candidate_version": 3, "champion_version": 2, "stage": 0, "fraction": 0.01}


def test_status_of_a_hundred_models_is_a_few_queries(runtime: Any) -> None:
    for i in range(100):
        runtime.service.register_model(f"m{i:03d}", _spec(), "test")
    list_status(runtime.ledger, now=datetime.now(UTC))  # warm the aggregate cache, as a server's is
    started = time.perf_counter()
    rows = list_status(runtime.ledger, now=datetime.now(UTC))
    elapsed = time.perf_counter() - started
    assert len(rows) == 100 and all(r.state == "learning" and r.lag_labels == 0 for r in rows)
    assert elapsed < 2.0, f"status of 100 models took {elapsed:.2f} s"


def _spec() -> Any:
    from domain.spec import LearnerSpec

    return LearnerSpec.from_dict(dict(SPEC))
