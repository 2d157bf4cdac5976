"""The bulk fold (large reads + ``lax.scan``) is bit-identical to the step-by-step ``Replayer``."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.ledger import Ledger
from domain.policy import SafetyPolicy
from domain.prediction import make_default_label_event, make_label_event
from domain.spec import LearnerSpec
from projections import bulk_fold
from projections.bulk_fold import BulkFoldStats, replayed_digests, state_at_fast, verify_fast
from projections.digest import state_digest
from projections.learners import make_batch, make_learner
from projections.learning import LabeledExample
from projections.replay import Replayer
from server.services import LedgerService
from server.simulate import run_simulation
from server.streams import drifting_binary_stream, random_label_delays
from tests.factories import prediction_events

_names = (f"bulk{i}" for i in itertools.count())
PROPERTY = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Every learner kind and head, every optimizer, with and without standardisation, at the
# batch sizes the service uses (16, 32: where ARCHITECTURE.md saw scan and loop differ)
# and small odd ones. max_batch_wait_s > 0 lets the history hold partial batches.
WAIT = 1.0
SPECS = [
    LearnerSpec(kind="logistic", n_features=4, batch_size=16, learning_rate=0.05, max_batch_wait_s=WAIT),
    LearnerSpec(kind="logistic", n_features=3, batch_size=5, optimizer="sgd", standardize=False, max_batch_wait_s=WAIT),
    LearnerSpec(kind="softmax", n_features=4, n_classes=3, batch_size=32, optimizer="adagrad", max_batch_wait_s=WAIT),
    LearnerSpec(kind="linear", n_features=4, batch_size=32, optimizer="sgd", l2=0.01, max_batch_wait_s=WAIT),
    LearnerSpec(kind="linear", n_features=4, batch_size=16, max_batch_wait_s=WAIT),
    LearnerSpec(kind="mlp", n_features=4, head="binary", hidden=(8,), batch_size=16, seed=3, max_batch_wait_s=WAIT),
    LearnerSpec(
        kind="mlp", n_features=4, head="multiclass", n_classes=3, hidden=(6, 5), batch_size=4, max_batch_wait_s=1
    ),
    LearnerSpec(
        kind="mlp", n_features=4, head="regression", hidden=(5,), optimizer="sgd", batch_size=32, max_batch_wait_s=1
    ),
]


def _labels(spec: LearnerSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if spec.head == "multiclass":
        return (np.abs(x[:, 0] * 7).astype(int) % spec.n_classes).astype(float)
    if spec.head == "regression":
        return np.asarray(x @ np.linspace(-1, 1, spec.n_features) * 0.01)
    return y


def _simulate(rt: Any, name: str, spec: LearnerSpec, n: int, seed: int) -> None:
    stream = drifting_binary_stream(n, n_features=spec.n_features, seed=seed)
    delays = random_label_delays(n, mean_delay=4.0, seed=seed)
    run_simulation(rt.service, name, stream.x, _labels(spec, stream.x, stream.y), label_delays=delays)


def _partial_updates(rt: Any, name: str, extra: int, seed: int) -> None:
    """Label ``extra`` more predictions and step until the buffer is empty: the last step is partial."""
    live = rt.service.live_learner(name)
    spec, model = live.model.spec, live.model
    if (len(live.buffer) + extra) % spec.batch_size == 0:
        extra += 1
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(extra, spec.n_features))
    y = _labels(spec, x, (x[:, 0] > 0).astype(float))
    now = datetime.now(UTC)
    made = prediction_events(model, extra, when=now, features=lambda i: x[i].tolist())
    labels = [_label_event(e.originator_id, model.id, float(y[i])) for i, e in enumerate(made)]
    rt.ledger.record([*made, *labels])
    for event, label in zip(made, labels, strict=True):
        live.add(LabeledExample(event.originator_id, tuple(event.features), label.label))
    sizes = []
    while live.buffer:
        sizes.append(min(len(live.buffer), spec.batch_size))
        # received = 0.0, so a partial batch is overdue at any ``now``.
        rt.ledger.record(live.step(now=1e12))
    assert sizes[-1] < spec.batch_size


def _history(rt: Any, spec: LearnerSpec, seed: int, rollback_at: float) -> str:
    """Updates (labels out of order), partial batches, a rollback, then more learning.

    A second model learns in between, so the first one's examples are interleaved with
    another model's rows in the log.
    """
    name, neighbour = next(_names), next(_names)
    rt.service.register_model(name, spec, "test")
    rt.service.register_model(neighbour, spec, "test")
    _simulate(rt, name, spec, 6 * spec.batch_size + 3, seed)
    _simulate(rt, neighbour, spec, 2 * spec.batch_size, seed + 1)
    _partial_updates(rt, name, 3, seed)
    model = rt.ledger.get_model(name)
    target = max(1, min(model.version - 1, round(rollback_at * model.version)))
    rt.service.roll_back(name, target, "property test", "auditor")
    _simulate(rt, name, spec, 3 * spec.batch_size, seed + 2)
    _partial_updates(rt, name, 1, seed + 3)
    return name


@PROPERTY
@given(
    spec=st.sampled_from(SPECS),
    seed=st.integers(0, 1000),
    rollback_at=st.floats(0.0, 1.0),
    chunk=st.sampled_from([4, 128]),
)
def test_bulk_digests_equal_the_replayer_at_every_version(
    runtime: Any, spec: LearnerSpec, seed: int, rollback_at: float, chunk: int
) -> None:
    name = _history(runtime, spec, seed, rollback_at)
    model = runtime.ledger.get_model(name)
    replayer = Replayer(runtime.ledger, write_snapshots=False)
    stats = BulkFoldStats()

    folded = replayed_digests(runtime.ledger, model.id, max_chunk_steps=chunk, stats=stats)

    expected = [replayer.state_at(model.id, v, use_snapshots=False).digest for v in range(1, model.version + 1)]
    assert [f.digest for f in folded] == expected
    assert [f.version for f in folded] == list(range(1, model.version + 1))
    assert all(f.recorded in (None, f.digest) for f in folded)
    # The scan produced every step: no step needed the per-step safety net.
    assert stats.stepwise_steps == 0 and stats.scanned_steps == model.updates_applied
    assert "RolledBack" in {f.event for f in folded}
    # Time travel from the snapshots simulate cached (every 10 versions here) agrees too.
    bounded = [state_at_fast(runtime.ledger, model.id, v).digest for v in range(1, model.version + 1)]
    assert bounded == expected


@PROPERTY
@given(spec=st.sampled_from(SPECS), seed=st.integers(0, 1000), rollback_at=st.floats(0.0, 1.0))
def test_verify_fast_reports_what_replayer_verify_reports(
    runtime: Any, spec: LearnerSpec, seed: int, rollback_at: float
) -> None:
    name = _history(runtime, spec, seed, rollback_at)
    model = runtime.ledger.get_model(name)
    runtime.service.store.delete_snapshots(model.id)

    fast = verify_fast(runtime.ledger, model.id, snapshot_interval=3)

    assert fast == Replayer(runtime.ledger, write_snapshots=False).verify_stepwise(model.id)
    assert fast.verified and fast.versions_checked == model.version
    # The snapshots it cached are the states the step-by-step fold reaches.
    assert runtime.service.store.count_snapshots(model.id) == model.version // 3
    for version in range(1, model.version + 1):
        assert runtime.service.replayer.state_at(model.id, version).digest == folded_digest(runtime, model.id, version)


def folded_digest(rt: Any, model_id: Any, version: int) -> str:
    """The step-by-step fold's digest at ``version`` (no snapshots)."""
    return str(Replayer(rt.ledger, write_snapshots=False).state_at(model_id, version, use_snapshots=False).digest)


def test_a_wrong_recorded_digest_is_reported_like_replayer_does(runtime: Any) -> None:
    spec = SPECS[3]
    name = next(_names)
    runtime.service.register_model(name, spec, "test")
    _simulate(runtime, name, spec, 4 * spec.batch_size, 7)
    live = runtime.service.live_learner(name)
    # An update whose recorded digest no replay can reproduce, then more honest ones.
    ids = tuple(prediction.originator_id for prediction in _labeled_predictions(runtime, live, 5))
    live.model.apply_update(ids, live.model.steps + 1, 0.5, 0.4, "sha256:" + "0" * 64, "mallory")
    runtime.ledger.save(live.model)
    model = runtime.ledger.get_model(name)
    stats = BulkFoldStats()

    fast = verify_fast(runtime.ledger, model.id, stats=stats)

    assert fast == Replayer(runtime.ledger, write_snapshots=False).verify_stepwise(model.id)
    assert fast.divergence is not None and fast.divergence.version == model.version
    assert stats.stepwise_steps == 1


def test_a_batch_naming_a_missing_prediction_is_reported_like_replayer_does(runtime: Any) -> None:
    spec = SPECS[0]
    name = next(_names)
    runtime.service.register_model(name, spec, "test")
    _simulate(runtime, name, spec, 3 * spec.batch_size, 11)
    model = runtime.ledger.get_model(name)
    ghost = prediction_events(model, 1, features=lambda i: [0.0] * spec.n_features)[0].originator_id  # unrecorded
    model.apply_update((ghost,), model.steps + 1, 0.5, 0.4, model.digest, "mallory")
    runtime.ledger.save(model)

    fast = verify_fast(runtime.ledger, model.id)

    assert fast == Replayer(runtime.ledger, write_snapshots=False).verify_stepwise(model.id)
    assert fast.divergence is not None and fast.divergence.event == "ReplayError"


def test_without_postgres_the_typed_reader_gives_the_same_report() -> None:
    ledger = Ledger()
    service = LedgerService(ledger)
    spec = SPECS[1]
    model = service.register_model("in-memory", spec, "test")
    stream = drifting_binary_stream(40, n_features=spec.n_features, seed=5)
    run_simulation(service, "in-memory", stream.x, stream.y, label_delays=np.full(40, 2))

    fast = verify_fast(ledger, model.id)

    assert fast == Replayer(ledger).verify_stepwise(model.id)
    assert fast.verified and fast.updates_replayed == ledger.get_model("in-memory").updates_applied > 0


def _label_event(pid: Any, model_id: Any, label: float, *, in_window: bool = True, version: int = 2) -> Any:
    now = datetime.now(UTC)
    return make_label_event(
        pid,
        model_id=model_id,
        label=label,
        source="t",
        event_time=now,
        in_window=in_window,
        actor="t",
        timestamp=now,
        version=version,
    )


def _labeled_predictions(rt: Any, live: Any, k: int) -> list[Any]:
    now = datetime.now(UTC)
    made = prediction_events(live.model, k, when=now, features=lambda i: [float(i)] * live.model.spec.n_features)
    labels = [_label_event(e.originator_id, live.model.id, 0.5) for e in made]
    rt.ledger.record([*made, *labels])
    return made


def test_a_stateful_safety_policy_is_audited_like_replayer_does(runtime: Any) -> None:
    # Replayed examples name predictions already learned from; holdout rows and gates are
    # re-derived by the replay's SafetyAuditor from the bulk fold's states.
    policy = SafetyPolicy(replay_fraction=0.25, replay_pool=64, holdout_fraction=0.2)
    spec = LearnerSpec(kind="logistic", n_features=4, batch_size=16, learning_rate=0.05, policy=policy)
    name = next(_names)
    runtime.service.register_model(name, spec, "test")
    _simulate(runtime, name, spec, 30 * spec.batch_size, 13)
    model = runtime.ledger.get_model(name)
    events = runtime.ledger.get_model_events(model.id)
    assert any(getattr(e, "replayed_ids", ()) for e in events)
    stats = BulkFoldStats()

    fast = verify_fast(runtime.ledger, model.id, stats=stats)

    assert fast == Replayer(runtime.ledger, write_snapshots=False).verify_stepwise(model.id)
    assert fast.verified and stats.stepwise_steps == 0


def test_a_drift_rebaseline_and_rollout_history_verifies_like_replayer(runtime: Any) -> None:
    # Gate rejections split the runs of updates, a rebaseline re-fits on examples already
    # learned from (and of rejected batches), and an aborted rollout is a rollback.
    policy = SafetyPolicy(
        drift_detectors=("adwin",),
        drift_action="rebaseline",
        rollout_min_labels=20,
        holdout_fraction=0.1,
        replay_fraction=0.25,
    )
    spec = LearnerSpec(kind="logistic", n_features=6, learning_rate=0.05, policy=policy)
    model = runtime.service.register_model(next(_names), spec, "test")
    stream = drifting_binary_stream(8000, n_features=6, seed=2, drifts=2)
    run_simulation(runtime.service, model.name, stream.x, stream.y, label_delays=np.full(8000, 3))
    kinds = {type(e).__name__ for e in runtime.ledger.get_model_events(model.id)}
    assert {"UpdateRejected", "Rebaselined", "DriftDetected"} <= kinds
    stats = BulkFoldStats()

    fast = verify_fast(runtime.ledger, model.id, stats=stats)

    assert fast == Replayer(runtime.ledger, write_snapshots=False).verify_stepwise(model.id)
    assert fast.verified and stats.stepwise_steps == 0


@PROPERTY
@given(
    spec=st.sampled_from(SPECS[:2] + SPECS[5:6]),
    seed=st.integers(0, 1000),
    page_rows=st.sampled_from([3, 7, 40]),
    ring_rows=st.sampled_from([0, 24, 1 << 19]),
)
def test_any_page_size_and_ring_size_give_the_replayer_report(
    runtime: Any, monkeypatch: Any, spec: LearnerSpec, seed: int, page_rows: int, ring_rows: int
) -> None:
    # Tiny pages cut a prediction's Made and Labeled rows (and a batch's examples) across
    # ranges; a tiny ring evicts examples whose labels come late, which must then take
    # the example-by-example path and still give the same report.
    monkeypatch.setattr(bulk_fold, "PAGE_ROWS", page_rows)
    monkeypatch.setattr(bulk_fold, "RING_ROWS", ring_rows)
    name = _history(runtime, spec, seed, 0.5)
    model = runtime.ledger.get_model(name)
    stats = BulkFoldStats()

    fast = verify_fast(runtime.ledger, model.id, stats=stats)

    assert fast == Replayer(runtime.ledger, write_snapshots=False).verify_stepwise(model.id)
    assert fast.verified and stats.stepwise_steps == 0
    assert stats.gathered_runs + stats.example_runs > 0


def test_a_long_history_through_a_small_ring_stays_on_the_fast_path(runtime: Any, monkeypatch: Any) -> None:
    # Many times the ring's capacity, and runs of updates that span several ranges: the id
    # index is pruned again and again, also in the middle of locating a run, and every
    # run must still find its examples in the ring.
    monkeypatch.setattr(bulk_fold, "PAGE_ROWS", 20)  # ~10 predictions a range
    monkeypatch.setattr(bulk_fold, "RING_ROWS", 100)
    monkeypatch.setattr(bulk_fold, "PAGE_EXAMPLES", 64)  # 4 updates a run
    spec = LearnerSpec(kind="logistic", n_features=4, batch_size=16, learning_rate=0.05)
    name = next(_names)
    runtime.service.register_model(name, spec, "test")
    stream = drifting_binary_stream(800, n_features=4, seed=9)
    run_simulation(runtime.service, name, stream.x, stream.y, label_delays=np.full(800, 2))
    model = runtime.ledger.get_model(name)
    stats = BulkFoldStats()

    fast = verify_fast(runtime.ledger, model.id, stats=stats)

    assert fast == Replayer(runtime.ledger, write_snapshots=False).verify_stepwise(model.id)
    assert fast.verified and stats.updates == 50
    assert stats.example_runs == 0 and stats.gathered_runs > 0


def test_a_plain_history_gathers_every_run_from_the_ring(runtime: Any) -> None:
    name = _history(runtime, SPECS[0], 5, 0.5)
    stats = BulkFoldStats()

    fast = verify_fast(runtime.ledger, runtime.ledger.get_model(name).id, stats=stats)

    assert fast.verified
    assert stats.gathered_runs > 0 and stats.example_runs == 0
    # The service trains on labels as they arrive: most runs are the next labels in log
    # order (not all: a rollback sends the fold back to versions whose labels were passed).
    assert stats.label_order_runs > 0


def test_runs_out_of_label_order_are_found_by_id_and_the_order_resumes(runtime: Any, monkeypatch: Any) -> None:
    # Given 16 predictions labeled in order p0..p15, and updates that train on p0-p3 (in
    # label order), p5 p4 p7 p6 (shuffled), p9-p11 (p8 skipped), then p12-p15 and p8
    monkeypatch.setattr(bulk_fold, "PAGE_EXAMPLES", 1)  # one update a run
    spec = LearnerSpec(kind="logistic", n_features=3, batch_size=4, learning_rate=0.1, max_batch_wait_s=WAIT)
    name = next(_names)
    runtime.service.register_model(name, spec, "test")
    model = runtime.ledger.get_model(name)
    now = datetime.now(UTC)
    x = np.random.default_rng(4).normal(size=(16, 3))
    made = prediction_events(model, 16, when=now, features=lambda i: x[i].tolist())
    y = (x[:, 0] > 0).astype(float)
    runtime.ledger.record([*made, *(_label_event(e.originator_id, model.id, float(y[i])) for i, e in enumerate(made))])
    learner = make_learner(spec)
    state = learner.init()
    for step, batch in enumerate(([0, 1, 2, 3], [5, 4, 7, 6], [9, 10, 11], [12, 13, 14, 15], [8]), start=1):
        state, _ = learner.update_step(state, make_batch(spec, x[batch], y[batch]))
        model.apply_update(tuple(made[i].originator_id for i in batch), step, 0.7, 0.6, state_digest(state), "t")
    runtime.ledger.save(model)
    stats = BulkFoldStats()

    # When the bulk fold verifies it
    fast = verify_fast(runtime.ledger, model.id, stats=stats)

    # Then it reports what the Replayer does, every run gathered from the ring: the first
    # and fourth as the next labels in order (after a shuffled run and a skipped label,
    # the order picks up again), the others found through the id index
    assert fast == Replayer(runtime.ledger, write_snapshots=False).verify_stepwise(model.id)
    assert fast.verified and stats.gathered_runs == 5 and stats.example_runs == 0
    assert stats.label_order_runs == 2


def test_default_labels_count_and_late_labels_are_refused_like_replayer_does(runtime: Any) -> None:
    spec = LearnerSpec(kind="logistic", n_features=3, batch_size=4, default_label=0.0, feedback_window_s=60.0)
    name = next(_names)
    runtime.service.register_model(name, spec, "test")
    live = runtime.service.live_learner(name)
    now = datetime.now(UTC)
    made = prediction_events(live.model, 3, when=now, features=lambda i: [float(i), 1.0, -1.0])
    defaulted, late, relabeled = (e.originator_id for e in made)
    model_id = live.model.id
    events: list[Any] = [
        *made,
        make_default_label_event(defaulted, model_id=model_id, spec=spec, actor="t", timestamp=now),
        _label_event(late, model_id, 1.0, in_window=False),
        make_default_label_event(relabeled, model_id=model_id, spec=spec, actor="t", timestamp=now),
        # After a default label an observed one may follow (version 3); the first counts.
        _label_event(relabeled, model_id, 1.0, version=3),
    ]
    runtime.ledger.record(events)
    model = runtime.ledger.get_model(name)
    # Both train with label 0.0: the default, not the observed label that came after it.
    learner = make_learner(spec)
    stepped, _ = learner.update_step(
        learner.init(), make_batch(spec, np.array([[0.0, 1.0, -1.0], [2.0, 1.0, -1.0]]), np.zeros(2))
    )
    model.apply_update((defaulted, relabeled), 1, 0.7, 0.6, state_digest(stepped), "t")
    runtime.ledger.save(model)
    stats = BulkFoldStats()

    assert verify_fast(runtime.ledger, model.id, stats=stats).verified
    assert stats.gathered_runs == 1

    model = runtime.ledger.get_model(name)
    model.apply_update((late,), 2, 0.7, 0.6, model.digest, "mallory")
    runtime.ledger.save(model)

    fast = verify_fast(runtime.ledger, model.id)

    assert fast == Replayer(runtime.ledger, write_snapshots=False).verify_stepwise(model.id)
    assert fast.divergence is not None and "late" in fast.divergence.replayed


def test_a_prediction_row_written_by_a_newer_class_verifies_like_replayer_does(runtime: Any) -> None:
    # The library appends class_version to an event of a class at version > 1. With every
    # prediction class at version 1 nothing is upcast, so the cut-out must read such a row
    # exactly as the typed decoder does.
    spec = SPECS[3]  # linear: _labeled_predictions labels 0.5
    name = next(_names)
    runtime.service.register_model(name, spec, "test")
    _simulate(runtime, name, spec, 2 * spec.batch_size, 3)
    live = runtime.service.live_learner(name)
    made = _labeled_predictions(runtime, live, 1)[0]
    extra = prediction_events(live.model, 1, features=lambda i: [0.5] * spec.n_features)[0]
    row = runtime.ledger.mapper.to_row(extra)
    runtime.ledger.recorder.insert_rows([(*row[:3], row[3][:-1] + b',"class_version":1}')])
    runtime.ledger.record([_label_event(extra.originator_id, live.model.id, 1.0)])
    model = runtime.ledger.get_model(name)
    model.apply_update((made.originator_id, extra.originator_id), model.steps + 1, 0.5, 0.4, model.digest, "t")
    runtime.ledger.save(model)
    stats = BulkFoldStats()

    fast = verify_fast(runtime.ledger, model.id, stats=stats)

    assert fast == Replayer(runtime.ledger, write_snapshots=False).verify_stepwise(model.id)
    assert stats.gathered_runs >= 1


def test_a_range_read_keeps_the_models_facts_and_every_other_prediction_event(runtime: Any) -> None:
    # Given two models' predictions and labels interleaved in the log, an unknown kind of
    # prediction event of the other model, and a non-prediction row that names the model
    spec = SPECS[3]
    mine, other = next(_names), next(_names)
    for name in (mine, other):
        runtime.service.register_model(name, spec, "test")
    _simulate(runtime, mine, spec, 2 * spec.batch_size, 5)
    _simulate(runtime, other, spec, 2 * spec.batch_size, 6)
    model, other_model = runtime.ledger.get_model(mine), runtime.ledger.get_model(other)
    recorder = runtime.ledger.recorder
    key = b'"model_id":"' + str(model.id).encode() + b'"'
    stranger = uuid4()
    recorder.insert_rows(
        [
            (
                stranger,
                1,
                "domain.prediction:Prediction.Retracted",
                b'{"model_id":"' + str(other_model.id).encode() + b'"}',
            ),
            (uuid4(), 1, "domain.audit:Note.Written", b"{" + key + b"}"),
            # Labels whose in_window key is far from the row's end (a long actor name).
            *(
                (uuid4(), 2, "domain.prediction:Prediction.Labeled", _far_label(key, in_window))
                for in_window in (b"true", b"false")
            ),
        ]
    )
    rows = recorder.select_rows(1, recorder.max_notification_id())

    # When PostgreSQL cuts the whole log down to the first model's facts
    page = recorder.select_example_page(1, recorder.max_notification_id(), key)

    # Then it holds exactly that model's Made rows and, beside its labels, every other
    # kind of prediction event (of any model, as "O"), and nothing else
    prefix = "domain.prediction:Prediction."
    facts = {prefix + kind for kind in ("Made", "Labeled", "DefaultLabeled")}
    made = [oid for _, oid, _, topic, state in rows if topic == prefix + "Made" and key in state]
    others = [
        (oid, _kind(topic, state, facts))
        for _, oid, _, topic, state in rows
        if topic != prefix + "Made"
        and ((topic in facts and key in state) or (topic not in facts and topic.startswith(prefix)))
    ]
    assert page.made_ids == b"".join(oid.bytes for oid in made)
    assert page.label_ids == b"".join(oid.bytes for oid, _ in others)
    assert page.label_kinds == "".join(kind for _, kind in others)
    assert ("O" in page.label_kinds) and stranger.bytes in (page.label_ids or b"")
    assert page.label_kinds.endswith("Ll")  # the far labels
    assert len(made) == 2 * spec.batch_size and not page.unusual


def _far_label(key: bytes, in_window: bytes) -> bytes:
    return (
        b'{"timestamp":"2026-11-28T08:00:00.000001+00:00",' + key + b',"label":1.0,"source":"t",'
        b'"event_time":"2026-11-28T08:00:00.000001+00:00","in_window":' + in_window + b',"actor":"' + b"a" * 200 + b'"}'
    )


def _kind(topic: str, state: bytes, facts: set[str]) -> str:
    # The letter select_example_page gives a non-Made prediction row.
    if topic not in facts:
        return "O"
    if topic.endswith(".DefaultLabeled"):
        return "D"
    return "L" if b'"in_window":true' in state else "l"
