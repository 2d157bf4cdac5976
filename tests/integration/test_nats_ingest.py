"""Broker ingestion against the machine's real NATS JetStream and real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import nats
import orjson
import pytest
from nats.js.errors import NotFoundError

from domain.ledger import LabelRequest
from domain.prediction import Prediction
from domain.spec import LearnerSpec
from server.ingest import FeedbackIngester, IngestConfig, open_ingester
from server.nats_topology import default_stream_name
from tests.conftest import IN_CI, make_runtime
from tests.factories import prediction_events

NATS_URL = os.environ.get("LEARNLEDGER_TEST_NATS_URL", "nats://127.0.0.1:4222")
SPEC = LearnerSpec(kind="logistic", n_features=2)
T = TypeVar("T")


def _reachable(url: str) -> bool:
    host, _, port = url.removeprefix("nats://").partition(":")
    try:
        with socket.create_connection((host, int(port or 4222)), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def nats_url() -> str:
    """The machine's NATS with JetStream; skipped where it does not run, but never in CI."""
    if not _reachable(NATS_URL):
        if IN_CI:
            pytest.fail(f"CI must reach NATS at {NATS_URL} (.ci/run starts it)")
        pytest.skip(f"no NATS at {NATS_URL}")
    return NATS_URL


@pytest.fixture
def subject(nats_url: str) -> Iterator[str]:
    """A subject of its own per test; its streams are deleted afterwards."""
    name = f"learnledger.test.{uuid.uuid4().hex[:12]}.labels"
    yield name
    stream = default_stream_name(name)
    _run(_with_js(nats_url, lambda js: _delete_streams(js, stream, f"{stream}_DLQ")))


def _run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _with_js(url: str, body: Callable[[Any], Awaitable[T]]) -> T:
    nc = await nats.connect(url)
    try:
        return await body(nc.jetstream())
    finally:
        await nc.close()


async def _delete_streams(js: Any, *names: str) -> None:
    for name in names:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(name)


async def _publish(js: Any, subject: str, payloads: list[bytes]) -> None:
    for payload in payloads:
        await js.publish(subject, payload)


async def _dead_letters(js: Any, stream: str) -> list[dict[str, Any]]:
    info = await js.stream_info(stream)
    return [orjson.loads((await js.get_msg(stream, seq)).data) for seq in range(1, info.state.last_seq + 1)]


def _label(pid: uuid.UUID, label: float, **extra: Any) -> bytes:
    return orjson.dumps({"prediction_id": str(pid), "label": label, **extra})


def _config(subject: str, url: str, **changes: Any) -> IngestConfig:
    # Short timings so redelivery and retries happen within a test's patience.
    values: dict[str, Any] = dict(fetch_timeout_s=1.0, ack_wait_s=1.0, retry_delay_s=0.1, max_deliver=3)
    values.update(changes)
    return IngestConfig(subject=subject, servers=url, **values)


def _predictions(model: Any, n: int) -> list[Prediction.Made]:
    return prediction_events(model, n)


def _label_events(rt: Any, pid: uuid.UUID) -> list[Prediction.Labeled]:
    return [e for e in rt.ledger.events.get(pid) if isinstance(e, Prediction.Labeled)]


async def _ingest_once(rt: Any, config: IngestConfig) -> tuple[dict[str, int], FeedbackIngester]:
    ingester = await open_ingester(rt.ledger, config)
    try:
        tally = await ingester.run(asyncio.Event(), once=True)
        return tally.to_json(), ingester
    finally:
        await ingester.nc.close()


async def _consumer_backlog(js: Any, config: IngestConfig) -> tuple[int, int]:
    info = await js.consumer_info(default_stream_name(config.subject), config.durable)
    return info.num_pending, info.num_ack_pending


def test_published_labels_are_committed_and_acked_once_each(runtime, nats_url: str, subject: str) -> None:  # type: ignore[no-untyped-def]
    rt = runtime
    model = rt.service.register_model("m", SPEC, "alice")
    made = _predictions(model, 3)
    rt.ledger.record(made)
    config = _config(subject, nats_url)

    async def scenario() -> tuple[dict[str, int], tuple[int, int]]:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        ingester = await open_ingester(rt.ledger, config)  # creates the stream and consumer
        labels = [_label(made[0].originator_id, 1), _label(made[1].originator_id, 0, source="crm")]
        # The same label published twice (a producer's retry), once in the same batch…
        labels += [_label(made[0].originator_id, 1.0)]
        await _publish(js, subject, labels)
        tally = await ingester.run(asyncio.Event(), once=True)
        # … and once in a later batch.
        await _publish(js, subject, [_label(made[0].originator_id, 1), _label(made[2].originator_id, 1)])
        tally = await ingester.run(asyncio.Event(), once=True)
        await ingester.nc.close()
        backlog = await _consumer_backlog(js, config)
        await nc.close()
        return tally.to_json(), backlog

    tally, backlog = _run(scenario())
    assert tally == {"received": 5, "accepted": 3, "duplicate": 2, "late": 0, "dead_lettered": 0, "retried": 0}
    assert backlog == (0, 0), "every message was acknowledged"
    for event, label in zip(made, (1.0, 0.0, 1.0), strict=True):
        (labeled,) = _label_events(rt, event.originator_id)
        assert labeled.label == label and labeled.actor == f"nats:{subject}"
    assert _label_events(rt, made[1].originator_id)[0].source == "crm"


def test_redelivery_after_a_crash_between_commit_and_ack_is_a_duplicate(  # type: ignore[no-untyped-def]
    runtime, nats_url: str, subject: str
) -> None:
    rt = runtime
    model = rt.service.register_model("m", SPEC, "alice")
    made = _predictions(model, 4)
    rt.ledger.record(made)
    # The restarted ingester's first fetch must outlast ack_wait, when the redelivery comes.
    config = _config(subject, nats_url, fetch_timeout_s=3.0)

    async def scenario() -> tuple[list[int], dict[str, int], tuple[int, int]]:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        crashed = await open_ingester(rt.ledger, config)
        await _publish(js, subject, [_label(m.originator_id, i % 2) for i, m in enumerate(made)])
        msgs = await crashed.subscription.fetch(config.batch, timeout=config.fetch_timeout_s)
        await crashed.handle(msgs)  # committed …
        await crashed.nc.close()  # … and the process is gone before any ack left it
        tally, _ = await _ingest_once(rt, config)
        backlog = await _consumer_backlog(js, config)
        await nc.close()
        return [m.metadata.num_delivered for m in msgs], tally, backlog

    first_deliveries, tally, backlog = _run(scenario())
    assert first_deliveries == [1, 1, 1, 1]
    assert tally == {"received": 4, "accepted": 0, "duplicate": 4, "late": 0, "dead_lettered": 0, "retried": 0}
    assert backlog == (0, 0)
    for i, m in enumerate(made):
        (labeled,) = _label_events(rt, m.originator_id)
        assert labeled.label == float(i % 2)


def test_bad_messages_are_dead_lettered_and_the_good_ones_in_their_batch_committed(  # type: ignore[no-untyped-def]
    runtime, nats_url: str, subject: str
) -> None:
    rt = runtime
    model = rt.service.register_model("m", SPEC, "alice")
    p0, p1, p2, p3, p4 = made = _predictions(model, 5)
    rt.ledger.record(made)
    now = datetime.now(UTC)
    (earlier,) = rt.ledger.prepare_labels([LabelRequest(p3.originator_id, 1.0, "crm", now, "bob")], received_at=now)
    rt.ledger.record([earlier.event])
    before = rt.ledger.recorder.max_notification_id()
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # RFC 3339 with Z
    far = "2099-01-02T03:04:05+01:00"  # outside the 30-day feedback window: stored, LATE
    bad: dict[bytes, str] = {
        b"{not json": "INVALID_ARGUMENT",
        orjson.dumps({"prediction_id": str(p1.originator_id)}): "INVALID_ARGUMENT",  # no label
        _label(p1.originator_id, 2): "INVALID_ARGUMENT",  # a binary model takes 0 or 1
        orjson.dumps({"prediction_id": str(p1.originator_id), "label": "1"}): "INVALID_ARGUMENT",
        _label(p1.originator_id, 1, event_time="yesterday"): "INVALID_ARGUMENT",
        b"\xff\xfe\x00": "INVALID_ARGUMENT",  # not even text
        _label(p3.originator_id, 0): "ALREADY_EXISTS",  # labeled 1 in the log
        _label(p0.originator_id, 0): "ALREADY_EXISTS",  # labeled 1 earlier in this batch
    }
    batch = [
        _label(p0.originator_id, 1),
        *bad,
        _label(p2.originator_id, 0, event_time=when),
        _label(p4.originator_id, 1, event_time=far),
    ]
    config = _config(subject, nats_url)

    async def scenario() -> tuple[dict[str, int], list[dict[str, Any]]]:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        ingester = await open_ingester(rt.ledger, config)
        await _publish(js, subject, batch)
        tally = await ingester.run(asyncio.Event(), once=True)
        await ingester.nc.close()
        letters = await _dead_letters(js, ingester.topology.dead_letter_stream)
        await nc.close()
        return tally.to_json(), letters

    tally, letters = _run(scenario())
    assert tally == {"received": 11, "accepted": 2, "duplicate": 0, "late": 1, "dead_lettered": 8, "retried": 0}
    # Only the three good labels were written; the refused ones left no trace in the log.
    assert rt.ledger.recorder.max_notification_id() == before + 3
    assert [e.label for e in _label_events(rt, p0.originator_id)] == [1.0]
    assert _label_events(rt, p1.originator_id) == []
    assert [e.label for e in _label_events(rt, p3.originator_id)] == [1.0]
    (labeled,) = _label_events(rt, p2.originator_id)
    assert labeled.event_time == datetime.fromisoformat(when) and labeled.in_window
    (late,) = _label_events(rt, p4.originator_id)
    assert late.event_time == datetime.fromisoformat(far) and not late.in_window
    # Each dead letter carries the original bytes, a reason and a code, in publish order.
    assert [letter["code"] for letter in letters] == list(bad.values())
    for letter, payload in zip(letters, bad, strict=True):
        original = base64.b64decode(letter["payload_b64"]) if "payload_b64" in letter else letter["payload"].encode()
        assert original == payload
        assert letter["reason"] and letter["subject"] == subject and letter["num_delivered"] == 1


def test_a_label_that_overtakes_its_prediction_is_retried_until_the_prediction_commits(  # type: ignore[no-untyped-def]
    runtime, nats_url: str, subject: str
) -> None:
    rt = runtime
    model = rt.service.register_model("m", SPEC, "alice")
    (made,) = _predictions(model, 1)
    config = _config(subject, nats_url)

    async def scenario() -> tuple[dict[str, int], dict[str, int]]:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        ingester = await open_ingester(rt.ledger, config)
        await _publish(js, subject, [_label(made.originator_id, 1)])
        assert await ingester.step() == 1
        early = dict(ingester.tally.to_json())
        rt.ledger.record([made])  # the prediction commits after its label arrived
        tally = await ingester.run(asyncio.Event(), once=True)
        await ingester.nc.close()
        await nc.close()
        return early, tally.to_json()

    early, tally = _run(scenario())
    assert early == {"received": 1, "accepted": 0, "duplicate": 0, "late": 0, "dead_lettered": 0, "retried": 1}
    assert tally == {"received": 2, "accepted": 1, "duplicate": 0, "late": 0, "dead_lettered": 0, "retried": 1}
    assert [e.label for e in _label_events(rt, made.originator_id)] == [1.0]


def test_a_label_whose_prediction_never_comes_is_dead_lettered_not_found(  # type: ignore[no-untyped-def]
    runtime, nats_url: str, subject: str
) -> None:
    rt = runtime
    rt.service.register_model("m", SPEC, "alice")
    before = rt.ledger.recorder.max_notification_id()
    config = _config(subject, nats_url, max_deliver=3)
    payload = orjson.dumps({"prediction_id": "order-4711", "label": 1})

    async def scenario() -> tuple[dict[str, int], list[dict[str, Any]]]:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        ingester = await open_ingester(rt.ledger, config)
        await _publish(js, subject, [payload])
        tally = await ingester.run(asyncio.Event(), once=True)
        await ingester.nc.close()
        letters = await _dead_letters(js, ingester.topology.dead_letter_stream)
        await nc.close()
        return tally.to_json(), letters

    tally, letters = _run(scenario())
    assert tally == {"received": 3, "accepted": 0, "duplicate": 0, "late": 0, "dead_lettered": 1, "retried": 2}
    (letter,) = letters
    assert letter["code"] == "NOT_FOUND" and letter["num_delivered"] == 3 and "3 deliveries" in letter["reason"]
    assert letter["payload"].encode() == payload
    assert rt.ledger.recorder.max_notification_id() == before


def test_ingest_command_drains_once_and_stops_gracefully_on_sigterm(  # type: ignore[no-untyped-def]
    database_url: str, schema: str, cli_env: dict[str, str], nats_url: str, subject: str
) -> None:
    rt = make_runtime(database_url, schema)
    try:
        model = rt.service.register_model("m", SPEC, "alice")
        made = _predictions(model, 3)
        rt.ledger.record(made)
        command = [sys.executable, "-m", "server.cli", "ingest", "--nats", nats_url, "--subject", subject, "--json"]
        cwd = Path(__file__).resolve().parents[2]

        def once() -> dict[str, int]:
            done = subprocess.run(
                [*command, "--once"], env=cli_env, cwd=cwd, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stderr
            summary: dict[str, int] = orjson.loads(done.stdout)
            return summary

        # The first run creates the stream and the durable consumer; nothing is there yet.
        assert once()["received"] == 0
        _run(_with_js(nats_url, lambda js: _publish(js, subject, [_label(made[0].originator_id, 1), b"oops"])))
        assert once() == {"received": 2, "accepted": 1, "duplicate": 0, "late": 0, "dead_lettered": 1, "retried": 0}

        # A long-running ingester commits as labels arrive and exits 0 on SIGTERM.
        proc = subprocess.Popen(
            command, env=cli_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            _run(_with_js(nats_url, lambda js: _publish(js, subject, [_label(made[1].originator_id, 0)])))
            deadline = time.monotonic() + 60
            while not _label_events(rt, made[1].originator_id) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _label_events(rt, made[1].originator_id), "the running ingester committed the label"
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert orjson.loads(out)["accepted"] == 1
    finally:
        rt.close()


def test_ingest_command_reports_an_unreachable_broker_in_one_line(cli_env: dict[str, str]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cwd = Path(__file__).resolve().parents[2]
    unreachable = f"nats://127.0.0.1:{port}"
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "ingest", "--nats", unreachable, "--subject", "x", "--once"],
        env=cli_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "cannot reach NATS" in result.stderr
