"""The domain's error vocabulary: every refusal the ledger can give, one class each."""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every domain error; the message is safe to show to a caller."""


class InvalidArgumentError(LedgerError):
    """A request is malformed: wrong shape, non-finite number, bad value."""


class InvalidSpecError(InvalidArgumentError):
    """A learner specification is incomplete or out of range."""


class NonFiniteValueError(InvalidArgumentError):
    """A NaN or infinite float was offered where only finite numbers may go."""


class NotFoundError(LedgerError):
    """Something named by the caller does not exist."""


class ModelNotFoundError(NotFoundError):
    """No model is registered under that name or id."""


class VersionNotFoundError(NotFoundError):
    """The model has no such version (or no version at that time)."""


class PredictionNotFoundError(NotFoundError):
    """No prediction was recorded under that id."""


class AlreadyExistsError(LedgerError):
    """The thing being created exists already, with different content."""


class ModelExistsError(AlreadyExistsError):
    """A model with that name is registered already."""


class ConflictingLabelError(AlreadyExistsError):
    """The prediction was labeled already, with a different label."""


class ConflictingPredictionError(AlreadyExistsError):
    """A prediction id was reused with different features or model."""


class FailedPreconditionError(LedgerError):
    """The request is well-formed but the model's state forbids it now."""


class ModelPausedError(FailedPreconditionError):
    """Learning is paused for this model."""


class ConcurrencyError(LedgerError):
    """Another writer appended to the same aggregate first; reload and retry."""
