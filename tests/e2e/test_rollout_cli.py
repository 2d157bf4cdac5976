"""``learnledger rebaseline`` and ``learnledger rollout status|abort`` from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from server.cli import parse_duration
from tests.e2e.test_cli import count_events, run, run_json, write_jsonl


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90.0), ("15m", 900.0), ("6h", 21_600.0), ("7d", 604_800.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "0d", "-1h", "3y", "1.5.2d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_rebaseline_then_rollout_status_then_abort(cli_env: dict[str, str], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3))
    y = (x @ np.array([1.0, -1.0, 0.5]) > 0).astype(float)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "logistic", "n_features": 3, "policy": {"rollout_stages": [0.1, 1.0]}}))
    run(cli_env, "register", "m", "--spec", str(spec))
    run(cli_env, "simulate", "m", "--input", str(write_jsonl(tmp_path / "s.jsonl", x, y)))
    # A rebaseline starts a rollout at the policy's first stage
    started = run_json(cli_env, "rebaseline", "m", "--window", "1h", "--reason", "refresh")
    assert started["rollout"]["fraction"] == 0.1
    assert started["examples"] == 592  # every trained example of the hour (600 minus a partial batch)
    status = run_json(cli_env, "rollout", "status", "m")
    assert [h["event"] for h in status["history"]] == ["Rebaselined"]
    assert "serves 10%" in run(cli_env, "rollout", "status", "m").stdout
    # A second rebaseline while one runs is refused, one line, nothing written
    before = count_events(cli_env)
    refused = run(cli_env, "rebaseline", "m", "--window", "1h", ok=False)
    assert refused.returncode != 0 and "rollout in progress" in refused.stderr and "Traceback" not in refused.stderr
    assert count_events(cli_env) == before
    # Aborting puts the champion back
    aborted = run_json(cli_env, "rollout", "abort", "m", "--reason", "not now")
    assert aborted["rollout"] is None and aborted["serving_version"] == aborted["version"]
    assert run_json(cli_env, "audit", "verify", "m")["verified"] is True


def test_rebaseline_of_an_empty_window_is_refused(cli_env: dict[str, str]) -> None:
    run(cli_env, "register", "m", "--learner", "logistic", "--features", "2")
    refused = run(cli_env, "rebaseline", "m", "--window", "1h", ok=False)
    assert refused.returncode != 0 and "no examples" in refused.stderr
