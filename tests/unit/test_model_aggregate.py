"""Given/when/then for the Model aggregate: commands validate, events record decisions."""

from __future__ import annotations

from uuid import uuid4

import pytest

from domain.errors import FailedPreconditionError, InvalidArgumentError, ModelPausedError, NonFiniteValueError
from domain.model import Model, model_id_for, validate_model_name
from domain.spec import LearnerSpec

SPEC = LearnerSpec(kind="logistic", n_features=3)


def given_registered_model() -> Model:
    model = Model(name="m", spec=SPEC, platform=(("backend", "cpu"),), initial_digest="sha256:init", actor="alice")
    model.collect_events()
    return model


def test_registration_records_spec_platform_and_initial_digest() -> None:
    model = Model(name="m", spec=SPEC, platform=(("backend", "cpu"),), initial_digest="sha256:init", actor="alice")
    (registered,) = model.collect_events()
    assert isinstance(registered, Model.Registered)
    assert registered.spec == SPEC
    assert registered.initial_digest == "sha256:init"
    assert model.id == model_id_for("m")
    assert model.version == 1 and model.digest == "sha256:init" and not model.paused


def test_applied_update_records_batch_order_and_digest() -> None:
    model = given_registered_model()
    ids = (uuid4(), uuid4(), uuid4())
    model.apply_update(ids, 1, 0.7, 0.6, "sha256:v2", "learner")
    (event,) = model.collect_events()
    assert isinstance(event, Model.UpdateApplied)
    assert event.prediction_ids == ids
    assert (model.version, model.digest, model.learned_through) == (2, "sha256:v2", ids[-1])


@pytest.mark.parametrize("ids", [(), "dup"])
def test_update_with_empty_or_repeated_batch_is_refused(ids: object) -> None:
    model = given_registered_model()
    pid = uuid4()
    batch = (pid, pid) if ids == "dup" else ()
    with pytest.raises(InvalidArgumentError):
        model.apply_update(batch, 1, 0.5, 0.4, "sha256:x", "learner")
    assert model.collect_events() == [] and model.version == 1


def test_non_finite_loss_is_refused_before_any_event() -> None:
    model = given_registered_model()
    with pytest.raises(NonFiniteValueError):
        model.apply_update((uuid4(),), 1, float("nan"), 0.4, "sha256:x", "learner")
    assert model.collect_events() == []


def test_paused_model_refuses_updates_until_resumed() -> None:
    model = given_registered_model()
    model.pause("drift suspected", "bob")
    with pytest.raises(ModelPausedError):
        model.apply_update((uuid4(),), 1, 0.5, 0.4, "sha256:x", "learner")
    with pytest.raises(FailedPreconditionError):
        model.pause("again", "bob")
    model.resume("checked", "bob")
    model.apply_update((uuid4(),), 1, 0.5, 0.4, "sha256:x", "learner")
    kinds = [type(e).__name__ for e in model.collect_events()]
    assert kinds == ["Paused", "Resumed", "UpdateApplied"]


def test_rollback_takes_the_target_digest_and_is_a_new_version() -> None:
    model = given_registered_model()
    model.apply_update((uuid4(),), 1, 0.5, 0.4, "sha256:v2", "learner")
    model.apply_update((uuid4(),), 2, 0.5, 0.4, "sha256:v3", "learner")
    model.roll_back(2, "sha256:v2", "bad batch", "carol")
    *_, event = model.collect_events()
    assert isinstance(event, Model.RolledBack)
    assert (model.version, model.digest, model.rollbacks) == (4, "sha256:v2", 1)


@pytest.mark.parametrize("target", [0, 1_000, 2])
def test_rollback_to_a_version_that_is_not_earlier_is_refused(target: int) -> None:
    model = given_registered_model()
    model.apply_update((uuid4(),), 1, 0.5, 0.4, "sha256:v2", "learner")
    with pytest.raises(InvalidArgumentError):
        model.roll_back(target, "sha256:x", "why", "carol")


def test_rollback_needs_a_reason() -> None:
    model = given_registered_model()
    model.apply_update((uuid4(),), 1, 0.5, 0.4, "sha256:v2", "learner")
    with pytest.raises(InvalidArgumentError, match="reason"):
        model.roll_back(1, "sha256:init", "  ", "carol")


@pytest.mark.parametrize("name", ["", "a b", "x" * 201, "semi;colon"])
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgumentError):
        validate_model_name(name)
