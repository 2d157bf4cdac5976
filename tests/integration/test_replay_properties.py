"""Replay laws on real PostgreSQL: determinism, snapshots, time travel, rollback."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.spec import LearnerSpec
from projections.digest import state_digest, state_to_bytes
from server.simulate import run_simulation
from server.streams import drifting_binary_stream

_names = (f"m{i}" for i in itertools.count())
PROPERTY = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

specs = st.sampled_from(
    [
        LearnerSpec(kind="logistic", n_features=4, optimizer="adam", learning_rate=0.05, batch_size=4),
        LearnerSpec(kind="logistic", n_features=4, optimizer="sgd", learning_rate=0.1, batch_size=3, standardize=False),
        LearnerSpec(kind="softmax", n_features=4, n_classes=3, optimizer="adagrad", learning_rate=0.1, batch_size=5),
        LearnerSpec(kind="linear", n_features=4, optimizer="sgd", learning_rate=0.01, batch_size=4),
        LearnerSpec(
            kind="mlp",
            n_features=4,
            head="binary",
            hidden=(8,),
            optimizer="adam",
            learning_rate=0.01,
            batch_size=4,
            seed=3,
        ),
        LearnerSpec(kind="mlp", n_features=4, head="multiclass", n_classes=3, hidden=(6, 5), batch_size=4),
        LearnerSpec(
            kind="mlp", n_features=4, head="regression", hidden=(5,), optimizer="sgd", learning_rate=0.01, batch_size=4
        ),
    ]
)


def _history(rt, spec: LearnerSpec, n: int, seed: int, delay: int = 3) -> str:  # type: ignore[no-untyped-def]
    name = next(_names)
    rt.service.register_model(name, spec, "test")
    stream = drifting_binary_stream(n, n_features=spec.n_features, seed=seed)
    y = stream.y
    if spec.head == "multiclass":
        y = (np.abs(stream.x[:, 0] * 7).astype(int) % spec.n_classes).astype(float)
    elif spec.head == "regression":
        y = stream.x @ np.linspace(-1, 1, spec.n_features) * 0.01
    run_simulation(rt.service, name, stream.x, y, label_delays=np.full(n, delay))
    return name


@PROPERTY
@given(spec=specs, seed=st.integers(0, 1000))
def test_replaying_twice_gives_identical_bytes_for_every_learner_kind(runtime, spec: LearnerSpec, seed: int) -> None:  # type: ignore[no-untyped-def]
    name = _history(runtime, spec, 60, seed)
    model = runtime.ledger.get_model(name)
    runtime.service.store.delete_snapshots(model.id)
    first = runtime.service.replayer.state_at(model.id, use_snapshots=False)
    second = runtime.service.replayer.state_at(model.id, use_snapshots=False)
    assert state_to_bytes(first.state) == state_to_bytes(second.state)
    assert first.digest == second.digest == model.digest == runtime.service.live_learner(name).digest
    (report,) = runtime.service.verify(name)
    assert report.verified and report.versions_checked == model.version


@PROPERTY
@given(spec=specs, seed=st.integers(0, 1000))
def test_snapshot_plus_rest_equals_full_replay_at_every_split(runtime, spec: LearnerSpec, seed: int) -> None:  # type: ignore[no-untyped-def]
    name = _history(runtime, spec, 40, seed)
    model = runtime.ledger.get_model(name)
    replayer = runtime.service.replayer
    store = runtime.service.store
    full = replayer.state_at(model.id, use_snapshots=False)
    for split in range(1, model.version + 1):
        store.delete_snapshots(model.id)
        prefix = replayer.state_at(model.id, split, use_snapshots=False)
        store.put_snapshot(model.id, split, prefix.digest, state_to_bytes(prefix.state))
        resumed = replayer.state_at(model.id)
        assert resumed.digest == full.digest
        assert state_to_bytes(resumed.state) == state_to_bytes(full.state)


@PROPERTY
@given(spec=specs, seed=st.integers(0, 1000))
def test_state_at_every_version_has_the_digest_recorded_at_that_version(runtime, spec: LearnerSpec, seed: int) -> None:  # type: ignore[no-untyped-def]
    name = _history(runtime, spec, 40, seed)
    for row in runtime.service.history(name):
        assert runtime.service.state_at(name, version=row.version).digest == row.params_digest


@PROPERTY
@given(spec=specs, seed=st.integers(0, 1000), data=st.data())
def test_rollback_head_is_bit_identical_to_the_target_and_learning_continues(
    runtime, spec: LearnerSpec, seed: int, data: st.DataObject
) -> None:  # type: ignore[no-untyped-def]
    name = _history(runtime, spec, 40, seed)
    model = runtime.ledger.get_model(name)
    target = data.draw(st.integers(1, model.version - 1))
    target_state = runtime.service.state_at(name, version=target)
    rolled = runtime.service.roll_back(name, target, "property test", "auditor")
    head = runtime.service.state_at(name)
    assert rolled.digest == head.digest == target_state.digest
    assert state_to_bytes(head.state) == state_to_bytes(target_state.state)
    assert runtime.service.live_learner(name).digest == target_state.digest
    stream = drifting_binary_stream(20, n_features=spec.n_features, seed=seed + 1)
    y = stream.y if spec.head == "binary" else np.zeros(20)
    run_simulation(runtime.service, name, stream.x, y)
    after = runtime.ledger.get_model(name)
    assert after.version > rolled.version
    assert state_digest(runtime.service.state_at(name).state) == after.digest
    (report,) = runtime.service.verify(name)
    assert report.verified
