"""Which labeled examples an audit question is about: all labels of a source, or listed ids."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID

from domain.errors import InvalidArgumentError, NotFoundError, PredictionNotFoundError
from domain.ledger import Ledger
from projections.audit_log import feedback, ids_from_source, sources_of

MAX_SHOWN = 3


@dataclass(frozen=True)
class Exclusion:
    """A set of prediction ids (whose labels are in question) and the rule that chose them."""

    rule: str
    ids: frozenset[UUID]
    source: str | None = None


def by_source(ledger: Ledger, source: str, model_id: UUID | None = None, model_name: str = "") -> Exclusion:
    """Every prediction (of one model, or of all) whose counting label came from ``source``.

    Raises:
        NotFoundError: no such label source was ever recorded (for that model).
    """
    labels = feedback(ledger, model_id)
    ids = ids_from_source(labels, source)
    if not ids:
        where = f" for model {model_name!r}" if model_name else ""
        known = ", ".join(repr(s) for s in sources_of(labels)) or "none"
        raise NotFoundError(f"no labels from source {source!r}{where} (sources recorded: {known})")
    return Exclusion(f"source={source}", ids, source)


def by_ids(ledger: Ledger, ids: Iterable[UUID], model_id: UUID | None = None, model_name: str = "") -> Exclusion:
    """Listed prediction ids, checked against the log.

    Raises:
        InvalidArgumentError: the list is empty.
        PredictionNotFoundError: an id names no logged prediction (of that model).
    """
    wanted = frozenset(ids)
    if not wanted:
        raise InvalidArgumentError("the id list is empty")
    found = ledger.get_predictions(wanted)
    missing = sorted(str(pid) for pid in wanted if pid not in found)
    if missing:
        shown = ", ".join(missing[:MAX_SHOWN]) + (" …" if len(missing) > MAX_SHOWN else "")
        raise PredictionNotFoundError(f"{len(missing)} listed id(s) name no logged prediction: {shown}")
    if model_id is not None:
        other = sorted(str(pid) for pid, p in found.items() if p.model_id != model_id)
        if other:
            shown = ", ".join(other[:MAX_SHOWN]) + (" …" if len(other) > MAX_SHOWN else "")
            raise PredictionNotFoundError(
                f"{len(other)} listed id(s) are predictions of another model than {model_name!r}: {shown}"
            )
    return Exclusion(f"ids={len(wanted)} listed", wanted)
