"""The platform fingerprint: recorded at registration, compared by the audit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from domain.spec import LearnerSpec
from projections.digest import state_digest
from projections.learners import make_learner
from projections.platform import platform_fingerprint
from server.commands import verify_payload
from server.simulate import run_simulation
from server.streams import drifting_binary_stream

SPEC = LearnerSpec(kind="logistic", n_features=6, batch_size=8)


def test_registration_records_the_fingerprint(runtime) -> None:  # type: ignore[no-untyped-def]
    model = runtime.service.register_model("m", SPEC, "alice")
    recorded = dict(runtime.ledger.get_model("m").platform)
    assert recorded == dict(platform_fingerprint())
    for key in ("jax", "jaxlib", "backend", "device_kind", "cpu_isa", "xla_flags"):
        assert recorded[key] != "" or key == "xla_flags"
    assert "--xla_gpu_deterministic_ops=true" in recorded["xla_flags"]
    assert model.version == 1


def test_audit_on_another_platform_says_so_instead_of_tampering(runtime) -> None:  # type: ignore[no-untyped-def]
    foreign = tuple(sorted({**dict(platform_fingerprint()), "jaxlib": "0.0.1", "device_kind": "NVIDIA H100"}.items()))
    learner = make_learner(SPEC)
    runtime.ledger.register_model("m", SPEC, platform=foreign, initial_digest=state_digest(learner.init()), actor="a")
    stream = drifting_binary_stream(64, seed=3)
    run_simulation(runtime.service, "m", stream.x, stream.y)
    (report,) = runtime.service.verify("m")
    assert report.verified  # same bytes here, but the auditor is told the platform moved
    assert set(report.platform_differences) == {"jaxlib", "device_kind"}
    payload = verify_payload([report])
    assert payload["verified"] is True and payload["platform_differs"] is True

    # A digest that differs on a different platform is reported as "platform differs".
    runtime.ledger.register_model("n", SPEC, platform=foreign, initial_digest="sha256:" + "0" * 64, actor="a")
    (bad,) = runtime.service.verify("n")
    assert not bad.verified and bad.divergence is not None and bad.divergence.version == 1
    assert verify_payload([bad])["first_divergence"]["cause"] == "platform differs"


def test_the_cli_sets_the_gpu_determinism_flag_before_jax_starts() -> None:
    code = (
        "import os, sys\n"
        "from server.cli import main\n"
        "assert 'jax' not in sys.modules, 'importing the CLI must not start JAX'\n"
        "try:\n    main(['models', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('XLA_FLAGS', ''))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--xla_gpu_deterministic_ops=true" in out.stdout.splitlines()[-1]


def test_replay_is_identical_in_a_fresh_process(runtime) -> None:  # type: ignore[no-untyped-def]
    spec = LearnerSpec(kind="mlp", n_features=6, head="binary", hidden=(8,), batch_size=8, seed=5)
    runtime.service.register_model("p", spec, "a")
    stream = drifting_binary_stream(80, seed=9)
    run_simulation(runtime.service, "p", stream.x, stream.y, label_delays=np.full(80, 2))
    head = runtime.ledger.get_model("p")
    db = runtime.database
    code = (
        "from tests.conftest import make_runtime; import sys; "
        f"rt = make_runtime({db.url!r}, {db.env['POSTGRES_SCHEMA']!r}); "
        "rt.service.store.delete_snapshots(); "
        "print(rt.service.state_at('p').digest)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == head.digest
