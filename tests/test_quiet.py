"""Quiet start-up: on a machine without a GPU a script shows its own messages, not TensorFlow's notices."""

import os
import subprocess
import sys
import warnings

import numpy as np
from scipy import linalg

from cilia_cvae import metrics
from conftest import REPOSITORY_ROOT, SCRIPTS_DIR

# What TensorFlow, absl and SciPy print that a newcomer reads as a failure but cannot act on.
NOTICE_MARKERS = ("cuInit", "oneDNN", "E0000", "W0000", "I0000", "sqrtm", "WARNING")


def run_as_user(name, *arguments, environment=None):
    """Run `python Scripts/<name>.py` with the user's environment: no TF_CPP_MIN_LOG_LEVEL unless given."""
    user_environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    user_environment.update(environment or {})
    return subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / f"{name}.py"), *arguments],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env=user_environment,
    )


def notice_lines(stderr):
    return [line for line in stderr.splitlines() if any(marker in line for marker in NOTICE_MARKERS)]


def test_a_script_importing_tensorflow_shows_its_error_and_no_notice(tmp_path):
    # Generation imports TensorFlow before it looks for the model, so its refusal comes after the start-up.
    finished = run_as_user("cvae_inference", "--image_size=32", f"--models_dir={tmp_path / 'no_models'}")
    assert finished.returncode == 2, finished.stderr
    assert "error:" in finished.stderr and "no_models" in finished.stderr, finished.stderr
    assert notice_lines(finished.stderr) == [], finished.stderr


def test_the_users_own_log_level_wins(tmp_path):
    # Level 0 asks for every notice; seeing them also shows that the run above did start TensorFlow.
    finished = run_as_user(
        "cvae_inference",
        "--image_size=32",
        f"--models_dir={tmp_path / 'no_models'}",
        environment={"TF_CPP_MIN_LOG_LEVEL": "0"},
    )
    assert finished.returncode == 2, finished.stderr
    assert "oneDNN" in finished.stderr and "error:" in finished.stderr, finished.stderr


def test_fid_of_a_singular_covariance_is_unchanged_and_silent():
    # ReLU features, 8 of them dead as in a judge: both covariances are singular, which made sqrtm warn.
    rng = np.random.default_rng(0)
    features_a = np.maximum(rng.normal(size=(200, 64)), 0)
    features_b = np.maximum(rng.normal(0.3, 1.2, size=(200, 64)), 0)
    features_a[:, :8] = features_b[:, :8] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distance = metrics.frechet_distance(features_a, features_b)
        covariance_a, covariance_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
        root = np.real(linalg.sqrtm(covariance_a @ covariance_b))
    assert any("singular" in str(warning.message) for warning in caught)  # the case the test is about
    assert not [warning for warning in caught if warning.filename.endswith("metrics.py")]
    expected = (
        np.sum((features_a.mean(axis=0) - features_b.mean(axis=0)) ** 2)
        + np.trace(covariance_a)
        + np.trace(covariance_b)
        - 2 * np.trace(root)
    )
    assert distance == expected
