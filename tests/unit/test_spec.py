"""LearnerSpec: complete, explicit, validated, and round-trips through JSON."""

from __future__ import annotations

import pytest

from domain.errors import InvalidSpecError
from domain.spec import LearnerSpec


def test_defaults_are_filled_explicitly() -> None:
    spec = LearnerSpec(kind="softmax", n_features=2, n_classes=3)
    assert spec.head == "multiclass" and spec.feature_names == ("x0", "x1") and spec.n_outputs == 3


def test_round_trip_through_dict() -> None:
    spec = LearnerSpec(kind="mlp", n_features=3, head="regression", hidden=(8, 4), optimizer="sgd")
    assert LearnerSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "tree"}, "learner kind"),
        ({"n_features": 0}, "n_features"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"batch_size": 0}, "batch_size"),
        ({"l2": -0.1}, "l2"),
        ({"head": "regression"}, "head"),
        ({"feature_names": ("a", "a", "b")}, "unique"),
        ({"feature_names": ("a",)}, "names"),
    ],
)
def test_invalid_specs_name_the_field(changes: dict[str, object], message: str) -> None:
    base = {"kind": "logistic", "n_features": 3, **changes}
    with pytest.raises(InvalidSpecError, match=message):
        LearnerSpec.from_dict(base)


def test_unknown_fields_are_errors() -> None:
    with pytest.raises(InvalidSpecError, match="unknown spec field"):
        LearnerSpec.from_dict({"kind": "logistic", "n_features": 2, "learnig_rate": 0.1})
