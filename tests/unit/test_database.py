"""Resolving the database: the embedded server's package is imported quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_embedded_server_package_imports_without_the_runtime_dir_warning() -> None:
    # Given a process without XDG_RUNTIME_DIR (containers, CI) that turns warnings into errors
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    code = "from server.database import import_pgserver; import_pgserver()"
    # When the embedded server's package is imported the way start_embedded does
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    # Then nothing is printed and nothing is raised
    assert run.returncode == 0, run.stderr
    assert "XDG_RUNTIME_DIR" not in run.stderr
