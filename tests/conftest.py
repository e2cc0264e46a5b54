"""Shared test helpers: the scripts run as a user runs them, in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPOSITORY_ROOT / "Scripts"
REAL_SAMPLES_DIR = REPOSITORY_ROOT.parent / "shared" / "real-tem-samples"

sys.path.insert(0, str(SCRIPTS_DIR))


def run_script(name, *arguments, cwd=None, timeout=600, environment=None):
    """Run `python Scripts/<name>.py --key=value ...` and return the finished process."""
    env = dict(os.environ, PYTHONHASHSEED="0", TF_CPP_MIN_LOG_LEVEL="2")
    env.update(environment or {})
    return subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / f"{name}.py"), *arguments],
        cwd=cwd or REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def script():
    return run_script
