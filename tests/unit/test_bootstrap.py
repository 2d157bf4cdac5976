"""Opening the ledger: a deadlock with another process's schema set-up is retried, nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from server import bootstrap


class _Db:
    def __init__(self) -> None:
        self.env: dict[str, str] = {}


def _ledger_failing(errors: list[Exception]) -> Any:
    calls: list[int] = []

    def ledger(env: dict[str, str]) -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "ledger"

    ledger.calls = calls  # type: ignore[attr-defined]
    return ledger


def test_a_deadlocked_schema_set_up_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _ledger_failing([RuntimeError("deadlock detected"), RuntimeError("deadlock detected")])
    monkeypatch.setattr(bootstrap, "Ledger", fake)
    monkeypatch.setattr(bootstrap.time, "sleep", lambda _s: None)

    assert bootstrap._ledger(_Db()) == "ledger"  # type: ignore[arg-type]
    assert len(fake.calls) == 3


def test_any_other_error_and_the_last_deadlock_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap.time, "sleep", lambda _s: None)
    other = _ledger_failing([RuntimeError("permission denied for schema x")])
    monkeypatch.setattr(bootstrap, "Ledger", other)
    with pytest.raises(RuntimeError, match="permission denied"):
        bootstrap._ledger(_Db())  # type: ignore[arg-type]
    assert len(other.calls) == 1

    always = _ledger_failing([RuntimeError("deadlock detected")] * bootstrap.DDL_ATTEMPTS)
    monkeypatch.setattr(bootstrap, "Ledger", always)
    with pytest.raises(RuntimeError, match="deadlock detected"):
        bootstrap._ledger(_Db())  # type: ignore[arg-type]
    assert len(always.calls) == bootstrap.DDL_ATTEMPTS
