"""The command line's edges: what a shell pipeline does to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(60)
def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """`interpq status | head -0`: the reader is gone before anything is written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERPQ_")}
    env["INTERPQ_DATABASE_URL"] = f"sqlite:///{tmp_path / 'interpq.db'}"
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run(
        [sys.executable, "-m", "interpq.cli", "status"],
        stdout=write, stderr=subprocess.PIPE, env=env, cwd=tmp_path, timeout=50,
    )  # fmt: skip
    os.close(write)
    assert proc.stderr.decode() == "", proc.stderr.decode()
    assert proc.returncode == 141  # as a command killed by SIGPIPE
