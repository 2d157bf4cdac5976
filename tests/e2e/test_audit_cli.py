"""``learnledger report|diff|counterfactual|impact`` as a user runs them, good input and bad."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from domain.spec import LearnerSpec
from projections.audit_log import feedback
from server.simulate import run_simulation
from tests.conftest import make_runtime

SPEC = LearnerSpec(kind="logistic", n_features=3, batch_size=8, optimizer="sgd", learning_rate=0.5)
SINCE, UNTIL = "2000-01-01T00:00:00+00:00", "2999-01-01T00:00:00+00:00"


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def _feed(rt: Any, n: int, seed: int, source: str, *, flip: bool = False) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float64)
    run_simulation(
        rt.service, "m", x, 1.0 - y if flip else y, label_delays=np.zeros(n, dtype=np.int64), label_source=source
    )


@pytest.fixture
def history(cli_env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Model ``m``: clean labels, a poisoned source, clean again, then a rollback before the poison."""
    rt = make_runtime(cli_env["LEARNLEDGER_DATABASE_URL"], cli_env["LEARNLEDGER_SCHEMA"])
    try:
        rt.service.register_model("m", SPEC, "test")
        _feed(rt, 96, 1, "clean")
        first_poison = rt.ledger.get_model("m").version + 1
        _feed(rt, 48, 2, "poison", flip=True)
        _feed(rt, 48, 3, "clean")
        rollback = rt.service.roll_back("m", first_poison - 1, "poisoned source", "operator").version
        _feed(rt, 32, 4, "clean")
        poison_ids = [str(pid) for pid, f in feedback(rt.ledger).items() if f.source == "poison"]
        yield {"first_poison": first_poison, "rollback": rollback, "poison_ids": poison_ids}
    finally:
        rt.close()


def _rows(env: dict[str, str]) -> int:
    with psycopg.connect(env["LEARNLEDGER_DATABASE_URL"]) as conn:
        row = conn.execute(f"SELECT count(*) FROM {env['LEARNLEDGER_SCHEMA']}.ledger_events").fetchone()
    assert row is not None
    return int(row[0])


def test_report_json_and_html(cli_env: dict[str, str], history: dict[str, Any], tmp_path: Path) -> None:
    proc = run(cli_env, "report", "m", "--from", SINCE, "--to", UNTIL)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["schema"] == "learnledger.model-report/1"
    assert report["summary"]["predictions"] == 96 + 48 + 48 + 32
    assert sum(v["predictions"] for v in report["versions"]) == report["summary"]["predictions"]
    assert [o["kind"] for o in report["operations"]] == ["rollback"]
    out = tmp_path / "report.html"
    proc = run(cli_env, "report", "m", "--from", SINCE, "--to", UNTIL, "--format", "html", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["out"] == str(out)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2 and "issue 5" in page


def test_diff_json(cli_env: dict[str, str], history: dict[str, Any]) -> None:
    proc = run(cli_env, "diff", "m", "1", str(history["rollback"] - 1), "--top", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["schema"] == "learnledger.diff/1" and len(result["batches"]) == 3
    shares = [b["share"] for b in result["batches"]]
    assert shares == sorted(shares, reverse=True)
    assert result["top_weights"][0]["name"].startswith("weight ")
    assert result["top_batch_examples"] and len(result["top_batch_examples"][0]["examples"]) <= 3


def test_counterfactual_by_source_and_by_ids(cli_env: dict[str, str], history: dict[str, Any], tmp_path: Path) -> None:
    before = _rows(cli_env)
    proc = run(cli_env, "counterfactual", "m", "--exclude-source", "poison", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["schema"] == "learnledger.counterfactual/1"
    assert result["first_divergent_version"] == history["first_poison"]
    assert result["rows_dropped"] == 48 and result["flipped"] > 0
    assert _rows(cli_env) == before + 2  # Branch.Created and Branch.Replayed
    ids = tmp_path / "ids.txt"
    ids.write_text("# the poisoned labels\n" + "\n".join(history["poison_ids"]) + "\n")
    proc = run(cli_env, "counterfactual", "m", "--exclude-ids", str(ids), "--from", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    by_ids = json.loads(proc.stdout)
    assert by_ids["branch_digest"] == result["branch_digest"] and by_ids["branch_id"] != result["branch_id"]
    proc = run(cli_env, "counterfactual", "m", "--exclude-source", "poison")
    assert proc.returncode == 0 and "would have flipped" in proc.stdout


def test_impact_json_lists_the_affected_predictions(cli_env: dict[str, str], history: dict[str, Any]) -> None:
    proc = run(cli_env, "impact", "--source", "poison", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    [m] = report["models"]
    assert m["tainted_versions"] == list(range(history["first_poison"], history["rollback"]))
    assert m["cleared_by_rollbacks"] == [history["rollback"]] and m["head_tainted"] is False
    assert len(m["prediction_ids"]) == m["predictions"] == report["affected_predictions"] > 0
    text = run(cli_env, "impact", "--source", "poison", "--model", "m")
    assert text.returncode == 0 and "tainted versions" in text.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("report", "nope", "--from", SINCE, "--to", UNTIL), "no model named 'nope'"),
        (("report", "m", "--from", UNTIL, "--to", SINCE), "is after --to"),
        (("diff", "nope", "1", "2"), "no model named 'nope'"),
        (("diff", "m", "5", "2"), "V1 must not come after V2"),
        (("diff", "m", "1", "9999"), "has versions 1 to"),
        (("counterfactual", "nope", "--exclude-source", "poison"), "no model named 'nope'"),
        (("counterfactual", "m", "--exclude-source", "nobody"), "no labels from source 'nobody'"),
        (("counterfactual", "m", "--exclude-source", "poison", "--from", "9999"), "has versions 1 to"),
        (("counterfactual", "m", "--exclude-ids", "/nonexistent/ids.txt"), "cannot read"),
        (("counterfactual", "m", "--exclude-ids", "BADFILE"), "is not a prediction id"),
        (("counterfactual", "m", "--exclude-ids", "UNKNOWNIDS"), "name no logged prediction"),
        (("impact", "--source", "nobody"), "no labels from source 'nobody'"),
        (("impact", "--source", "poison", "--model", "nope"), "no model named 'nope'"),
        (("impact", "--ids", "/nonexistent/ids.txt"), "cannot read"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    cli_env: dict[str, str], history: dict[str, Any], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("not-a-uuid\n")
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("01234567-89ab-7def-8123-456789abcdef\n")
    argv = [{"BADFILE": str(bad), "UNKNOWNIDS": str(unknown)}.get(a, a) for a in args]
    out = tmp_path / "out.html"
    if argv[0] == "report":
        argv += ["--format", "html", "--out", str(out)]
    before = _rows(cli_env)
    proc = run(cli_env, *argv)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert _rows(cli_env) == before and not out.exists()
