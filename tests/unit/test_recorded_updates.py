"""The bulk replay's reading of ``UpdateApplied`` rows: ids cut out of the bytes, exactly or not at all."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from eventsourcing.persistence import StoredEvent
from hypothesis import given
from hypothesis import strategies as st

from projections.bulk_fold import RecordedUpdate, _cut_update, _recorded_updates

TOPIC = "domain.model:Model.UpdateApplied"
DIGEST = "sha256:" + "ab" * 32


def _state(trained: list[uuid.UUID], replayed: list[uuid.UUID] | None = None, **extra: Any) -> bytes:
    # The fields of an UpdateApplied row in the order the event writes them.
    data: dict[str, Any] = {"timestamp": "2026-11-28T05:14:33.684476+00:00", "prediction_ids": trained, "step": 1}
    data.update({"digest": DIGEST, "actor": "learner", "holdout_ids": []})
    if replayed is not None:
        data["replayed_ids"] = replayed
    data.update({"through": None, "gate": None}, **extra)
    return orjson.dumps(data)


def _row(state: bytes, version: int = 2) -> StoredEvent:
    return StoredEvent(originator_id=uuid.uuid4(), originator_version=version, topic=TOPIC, state=state)


def _ids(update: RecordedUpdate | None) -> list[uuid.UUID]:
    assert update is not None
    return [uuid.UUID(bytes=row.tobytes()) for row in update.ids]


@given(st.lists(st.lists(st.uuids(), max_size=5), min_size=1, max_size=6), st.data())
def test_rows_decode_to_the_ids_they_hold_in_training_order(batches: list[list[uuid.UUID]], data: Any) -> None:
    # Given update rows, some with replayed ids, some without the key at all
    replayed = [data.draw(st.one_of(st.none(), st.lists(st.uuids(), max_size=3))) for _ in batches]
    rows = [_row(_state(b, r), version=k + 2) for k, (b, r) in enumerate(zip(batches, replayed, strict=True))]
    # When they are read together
    updates = _recorded_updates(rows)
    # Then each holds its digest, version and ids: the new ones, then the replayed ones
    for update, b, r, row in zip(updates, batches, replayed, rows, strict=True):
        assert update is not None and update.digest == DIGEST
        assert update.originator_version == row.originator_version
        assert _ids(update) == b + (r or [])


@pytest.mark.parametrize(
    "state",
    [
        # not orjson's canonical form: a space after a colon
        _state([uuid.uuid4()]).replace(b'"step":1', b'"step": 1'),
        # a nested object holds the key too
        _state([uuid.uuid4()], gate={"prediction_ids": []}),
        # a newer class's row
        _state([uuid.uuid4()], class_version=2),
        # an id list whose items are not ids
        _state([uuid.uuid4()]).replace(b'"prediction_ids":["', b'"prediction_ids":[1,"', 1),
        # the key's value is not a list
        orjson.dumps({"prediction_ids": None, "digest": DIGEST}),
        # no digest
        orjson.dumps({"prediction_ids": [], "digest": None}),
        # not JSON
        b'{"prediction_ids":[],"digest":',
    ],
)
def test_a_row_that_is_not_certain_is_left_to_the_typed_decoder(state: bytes) -> None:
    assert _cut_update(state) is None


def test_an_odd_row_costs_only_itself_the_typed_path() -> None:
    # Given good rows around one whose items are not canonical ids (upper-case is; braces are not)
    good = [uuid.uuid4(), uuid.uuid4()]
    odd = _state([uuid.uuid4()]).replace(b'"prediction_ids":["', b'"prediction_ids":["{', 1)
    odd = odd.replace(b'"],"step"', b'}"],"step"', 1)
    upper = _state(good).replace(str(good[0]).encode(), str(good[0]).upper().encode())
    rows = [_row(_state(good)), _row(odd), _row(_state([], [good[1]])), _row(upper)]
    # When they are read together
    updates = _recorded_updates(rows)
    # Then only the odd row is None, and the others still hold their ids
    assert updates[1] is None
    assert _ids(updates[0]) == good and _ids(updates[2]) == [good[1]] and _ids(updates[3]) == good
