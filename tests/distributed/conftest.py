"""Start real multi-process runs on CPU (gloo) for the distributed tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Generous for 2 processes on 2 shared cores; a hung collective fails the test instead of the suite.
RUN_TIMEOUT_S = 240


def process_env() -> dict[str, str]:
    # One thread per process: two processes share the machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """`torchrun(args, nproc=2)`: `torchrun --standalone --nproc_per_node nproc <args>`, output captured."""

    def run(args: Sequence[str], nproc: int = 2) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        return subprocess.run(
            [*command, *args],
            cwd=REPO_ROOT,
            env=process_env(),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )

    return run
