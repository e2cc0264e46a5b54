"""Quiet start-up: on a machine without a GPU a script shows its own messages, not TensorFlow's notices."""

import json
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


def damaged_run(tmp_path):
    """A run whose record reads well and whose decoder does not load: refused after TensorFlow started."""
    run = tmp_path / "models" / "32x32"
    run.mkdir(parents=True)
    (run / "cvae_parameters.json").write_text(
        json.dumps({"class_names": ["CP", "Normal"], "latent_dim": 16, "image_size": 32})
    )
    (run / "cvae_decoder.keras").write_bytes(b"not a Keras file")
    return tmp_path / "models"


def test_a_script_importing_tensorflow_shows_its_error_and_no_notice(tmp_path):
    # Generation reads the run's record first, then starts TensorFlow to load the decoder, which fails.
    finished = run_as_user("cvae_inference", "--image_size=32", f"--models_dir={damaged_run(tmp_path)}")
    assert finished.returncode == 2, finished.stderr
    assert "error:" in finished.stderr and "cvae_decoder.keras cannot be loaded" in finished.stderr
    assert notice_lines(finished.stderr) == [], finished.stderr


def test_the_users_own_log_level_wins(tmp_path):
    # Level 0 asks for every notice; seeing them also shows that the run above did start TensorFlow.
    finished = run_as_user(
        "cvae_inference",
        "--image_size=32",
        f"--models_dir={damaged_run(tmp_path)}",
        environment={"TF_CPP_MIN_LOG_LEVEL": "0"},
    )
    assert finished.returncode == 2, finished.stderr
    # An INFO line (I0000...) shows on every processor; the oneDNN notice only where TensorFlow turns
    # oneDNN on by default (AVX-512 processors), so it cannot be the sign on the slower machine kind.
    information_lines = [line for line in finished.stderr.splitlines() if line.startswith("I0000")]
    assert information_lines and "error:" in finished.stderr, finished.stderr


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


def test_refusals_of_settings_answer_before_tensorflow_loads(tmp_path):
    from test_training import write_processed_split

    # TensorFlow takes 5-15 s to start on 2 cores: a mistyped value is refused without it.
    # `python -X importtime` lists every module the refused run imported.
    models, processed = damaged_run(tmp_path), write_processed_split(tmp_path / "processed")
    for name, argument, words in (
        ("cvae_training_224x224", "--prior_epochs=-1", "--prior_epochs must be at least 0"),
        ("cvae_training_224x224", "--latent_map_channels=0", "--latent_map_channels must be at least 1"),
        ("cvae_training_224x224", "--kl_weight=0", "--kl_weight must be a positive number"),
        ("cvae_training_224x224", "--prior_attention_side=-1", "--prior_attention_side must be at least 0"),
        ("cvae_training_224x224", "--image_size=64", "64"),  # a size that was never preprocessed
        ("cvae_inference", "--classes=Nonsense", "unknown class(es) Nonsense"),
        ("cvae_inference", "--sampling=best", "--sampling='best' is not one of"),
        ("cvae_evaluate", "--usefulness=True --usefulness_fractions=0,0.5", "--usefulness_fractions must be"),
        ("cvae_usefulness", "--fractions=2", "--fractions must be shares above 0"),
    ):
        finished = subprocess.run(
            [sys.executable, "-X", "importtime", str(SCRIPTS_DIR / f"{name}.py"), *argument.split()]
            + ["--image_size=32"] * ("--image_size" not in argument)
            + [f"--models_dir={models}", f"--processed_images_dir={processed}"],
            cwd=REPOSITORY_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert finished.returncode == 2, (name, argument, finished.stderr[-2000:])
        last_line = finished.stderr.strip().splitlines()[-1]
        assert last_line.startswith("error:") and words in last_line, (name, argument, last_line)
        imported = [
            line.split("|")[-1].strip() for line in finished.stderr.splitlines() if "import time:" in line
        ]
        assert imported and "tensorflow" not in imported, (name, argument)


def test_deprecations_inside_libraries_are_filtered_and_the_projects_own_are_not():
    # The pytest configuration (pyproject.toml) is in force inside a test; catch_warnings keeps it.
    with warnings.catch_warnings(record=True) as caught:
        for module in (
            "keras.src.backend.tensorflow.core",
            "tensorflow.python.framework.ops",
            "cilia_cvae.metrics",
        ):
            warnings.warn_explicit(
                "going away", DeprecationWarning, f"{module}.py", 1, module=module, registry={}
            )
    assert [warning.filename for warning in caught] == ["cilia_cvae.metrics.py"]
