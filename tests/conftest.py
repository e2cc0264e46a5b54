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


# The files that took longest, longest first (--durations=25 of the suite, 2026-12-04, summed per file:
# test_training 691 s, test_inference 473, test_evaluation 382, test_demo 201 in one test). `make test` gives each
# of the two workers a file at a time, in this order (--no-loadscope-reorder), so that no long file
# starts last while the other worker idles; the other files follow, the most tests first.
LONGEST_FILES_FIRST = ("test_training.py", "test_inference.py", "test_evaluation.py", "test_demo.py")


def pytest_collection_modifyitems(items):
    tests_per_file = {}
    for item in items:
        tests_per_file[item.path.name] = tests_per_file.get(item.path.name, 0) + 1

    def file_order(item):
        name = item.path.name
        if name in LONGEST_FILES_FIRST:
            return (LONGEST_FILES_FIRST.index(name), 0)
        return (len(LONGEST_FILES_FIRST), -tests_per_file[name])

    items.sort(key=file_order)  # a stable sort: each file's tests keep their order


@pytest.fixture
def script():
    return run_script


@pytest.fixture(scope="session")
def tiny_trained_model(tmp_path_factory):
    """Phantoms -> 32 px preprocessing -> a 1-epoch model: the folders a user has after training."""
    root = tmp_path_factory.mktemp("tiny_pipeline")
    folders = {name: root / name for name in ("raw", "processed", "models", "latents", "generated")}
    steps = [
        ("make_phantom_dataset", f"--raw_images_dir={folders['raw']}", "--num_images=100", "--seed=5"),
        (
            "cvae_pre_processing",
            f"--raw_images_dir={folders['raw']}",
            f"--processed_images_dir={folders['processed']}",
            "--image_size=32",
        ),
        (
            "cvae_training_224x224",
            "--image_size=32",
            "--epochs=1",
            "--latent_dim=16",
            "--base_channels=8",
            "--max_channels=32",
            f"--processed_images_dir={folders['processed']}",
            f"--models_dir={folders['models']}",
            f"--latent_tensors_dir={folders['latents']}",
        ),
    ]
    for name, *arguments in steps:
        finished = run_script(name, *arguments)
        assert finished.returncode == 0, f"{name} failed:\n{finished.stderr[-3000:]}"
    return folders
