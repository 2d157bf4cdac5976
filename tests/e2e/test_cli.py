"""The ``learnledger`` CLI as a user runs it: real processes, real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.streams import drifting_binary_stream


def run(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def run_json(env: dict[str, str], *args: str) -> dict:  # type: ignore[type-arg]
    out = run(env, *args, "--json").stdout
    return json.loads(out)


def count_events(env: dict[str, str]) -> int:
    import psycopg

    with psycopg.connect(env["LEARNLEDGER_DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = 'ledger_events'",
            (env["LEARNLEDGER_SCHEMA"],),
        ).fetchone()
        if not row or row[0] == 0:
            return 0
        result = conn.execute(f"SELECT count(*) FROM {env['LEARNLEDGER_SCHEMA']}.ledger_events").fetchone()
        return int(result[0]) if result else 0


def write_jsonl(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path.write_text(
        "".join(
            json.dumps({"features": row.tolist(), "label": float(label)}) + "\n"
            for row, label in zip(x, y, strict=True)
        )
    )
    return path


def test_demo_prints_a_summary_with_a_passing_audit(cli_env: dict[str, str]) -> None:
    result = run_json(cli_env, "demo", "--events", "3000")
    for key in ("predictions", "labels", "updates", "model_version", "prequential_accuracy", "audit_verified"):
        assert key in result
    assert result["predictions"] == 3000
    assert result["audit_verified"] is True
    # Every label is inside the window; a tenth of them is the gate's holdout (never
    # trained on), so about 0.9 × 3000 / 32 updates, and the drift at 1500 may add a
    # detection, a rebaseline and rollout events.
    assert result["labels"] == 3000 and 0.9 * 3000 // 32 - 6 <= result["updates"] <= 3000 // 32
    assert result["via"] == "grpc"
    assert result["prequential_accuracy"] > 0.75
    plain = run_json(cli_env, "demo", "--events", "3000", "--model", "plain", "--no-safety")
    # Without the safety policy the server learned every full batch of 32, nothing else.
    assert plain["updates"] == 3000 // 32 and plain["model_version"] == plain["updates"] + 1
    human = run(cli_env, "demo", "--events", "500")
    assert "audit          verified" in human.stdout


def test_register_history_time_travel_rollback_and_audit(cli_env: dict[str, str], tmp_path: Path) -> None:
    run(
        cli_env,
        "register",
        "credit",
        "--learner",
        "logistic",
        "--features",
        "6",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        "--batch-size",
        "10",
    )
    stream = drifting_binary_stream(300, seed=4)
    data = write_jsonl(tmp_path / "s.jsonl", stream.x, stream.y)
    sim = run_json(cli_env, "simulate", "credit", "--input", str(data), "--label-delay", "5")
    assert sim["examples"] == 300 and sim["audit_verified"] is True

    models = run_json(cli_env, "models")["models"]
    assert [m["name"] for m in models] == ["credit"] and models[0]["version"] == sim["model_version"]

    history = run_json(cli_env, "history", "credit")["versions"]
    assert history[0]["event"] == "Registered" and history[1]["event"] == "UpdateApplied"
    assert {"version", "event", "time", "batch_size", "params_digest"} <= set(history[1])
    assert history[1]["batch_size"] == 10

    features = json.dumps(stream.x[0].tolist())
    at5 = run_json(cli_env, "at", "credit", "--version", "5", "--predict", features)
    assert at5["version"] == 5 and at5["params_digest"] == history[4]["params_digest"] and 0.0 <= at5["score"] <= 1.0
    at_time = run_json(cli_env, "at", "credit", "--time", history[0]["time"])
    assert at_time["version"] >= 1

    rolled = run_json(cli_env, "rollback", "credit", "--to-version", "5", "--reason", "bad labels from source X")
    assert rolled["params_digest"] == history[4]["params_digest"] and rolled["version"] == sim["model_version"] + 1
    head = run_json(cli_env, "at", "credit", "--version", str(rolled["version"]), "--predict", features)
    assert head["params_digest"] == at5["params_digest"] and head["score"] == at5["score"]

    verified = run_json(cli_env, "audit", "verify")
    assert verified["verified"] is True and verified["versions_checked"] == rolled["version"]


def test_simulate_chooses_defaults_from_the_file(cli_env: dict[str, str], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    classes = write_jsonl(tmp_path / "c.jsonl", x, (x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int))
    reals = write_jsonl(tmp_path / "r.jsonl", x, x @ np.array([0.5, -1.0, 2.0]) + 0.1)
    assert run_json(cli_env, "simulate", "multi", "--input", str(classes))["audit_verified"] is True
    assert run_json(cli_env, "models")["models"][0]["kind"] == "softmax"
    reg = run_json(cli_env, "simulate", "reg", "--input", str(reals))
    assert reg["rmse"] is not None and reg["accuracy"] is None and reg["audit_verified"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["history", "nope"], "no model named 'nope'"),
        (["at", "nope", "--version", "1"], "no model named 'nope'"),
        (["rollback", "nope", "--to-version", "1", "--reason", "x"], "no model named 'nope'"),
        (["audit", "verify", "nope"], "no model named 'nope'"),
        (["register", "m", "--learner", "logistic"], "--features"),
        (["register", "m", "--learner", "logistic", "--features", "3", "--lr", "nan"], "learning_rate"),
        (["register", "bad name", "--learner", "logistic", "--features", "3"], "model name"),
        (["at", "m", "--version", "1", "--time", "2020-01-01T00:00:00Z"], "not allowed"),
        (["at", "m", "--time", "2020-01-01T00:00:00"], "timezone"),
        (["simulate", "m", "--input", "/does/not/exist.jsonl"], "cannot read"),
        (["demo", "--events", "-5"], "positive"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_writes_nothing(
    cli_env: dict[str, str], args: list[str], message: str
) -> None:
    before = count_events(cli_env)
    proc = run(cli_env, *args, ok=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert count_events(cli_env) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"features": [1, 2], "label": 1}\n{"features": [1], "label": 0}\n', ":2: 1 features"),
        ('{"features": [1, NaN], "label": 1}\n', "not valid JSON"),
        ('{"features": [1, 2], "label": 1e999}\n', "not valid JSON"),
        ('{"features": [1, "2"], "label": 1}\n', "list of numbers"),
        ('{"features": [1, 2]}\n', "expected"),
        ("not json\n", "not valid JSON"),
        ("", "no examples"),
    ],
)
def test_unreadable_simulate_input_writes_nothing(
    cli_env: dict[str, str], tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    before = count_events(cli_env)
    proc = run(cli_env, "simulate", "m", "--input", str(path), ok=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert count_events(cli_env) == before


def test_audit_verify_reports_the_first_divergent_version(cli_env: dict[str, str], tmp_path: Path) -> None:
    stream = drifting_binary_stream(100, seed=2)
    run_json(cli_env, "simulate", "t", "--input", str(write_jsonl(tmp_path / "t.jsonl", stream.x, stream.y)))
    # Tamper as a superuser would: drop the guard, rewrite one label, restore the guard.
    import psycopg

    schema = cli_env["LEARNLEDGER_SCHEMA"]
    with psycopg.connect(cli_env["LEARNLEDGER_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {schema}.ledger_events DISABLE TRIGGER ledger_events_append_only")
        conn.execute(
            f"UPDATE {schema}.ledger_events SET state = convert_to(replace(convert_from(state, 'UTF8'), "
            "'\"label\":1.0', '\"label\":0.0'), 'UTF8') WHERE notification_id = ("
            f"SELECT min(notification_id) FROM {schema}.ledger_events WHERE topic LIKE '%Labeled' "
            "AND convert_from(state, 'UTF8') LIKE '%\"label\":1.0%')"
        )
        conn.execute(f"ALTER TABLE {schema}.ledger_events ENABLE TRIGGER ledger_events_append_only")
        conn.execute(f"DELETE FROM {schema}.ledger_param_snapshots")
    proc = run(cli_env, "audit", "verify", "--json", ok=False)
    assert proc.returncode == 3
    result = json.loads(proc.stdout)
    assert result["verified"] is False
    assert result["first_divergence"]["version"] >= 2
    assert result["first_divergence"]["cause"] == "log or code changed"


def test_labels_the_model_cannot_take_are_refused_before_anything_is_written(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    run(cli_env, "register", "b", "--learner", "logistic", "--features", "2")
    path = tmp_path / "b.jsonl"
    path.write_text('{"features": [1, 2], "label": 1}\n{"features": [1, 2], "label": 2}\n')
    before = count_events(cli_env)
    proc = run(cli_env, "simulate", "b", "--input", str(path), ok=False)
    assert proc.returncode == 1 and "example 2" in proc.stderr and "labels 0 or 1" in proc.stderr
    assert count_events(cli_env) == before
    proc = run(cli_env, "simulate", "b", "--input", str(path), "--lr", "0.5", ok=False)
    assert "exists already" in proc.stderr
