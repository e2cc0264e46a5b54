"""Training and preprocessing run again the way a careless user runs them: two processes into one run,
preprocessing under a running training, a damaged prior and its remedy, odd raw files."""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from test_prior_training import PRIOR
from test_training import TINY_MODEL, folders, write_processed_split

from conftest import REPOSITORY_ROOT, SCRIPTS_DIR, run_script


def start_training(base, *arguments):
    """A training started in the background, as a second terminal would."""
    command = [sys.executable, str(SCRIPTS_DIR / "cvae_training_224x224.py"), *TINY_MODEL, *folders(base)]
    return subprocess.Popen(
        [*command, *arguments],
        cwd=REPOSITORY_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )


def wait_for_lock(lock_file, words, process, seconds=180):
    """Until the lock file holds `words` (the process has taken its lock), or the process ended."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if lock_file.exists() and words in lock_file.read_text():
            return True
        time.sleep(0.1)
    return False


def last_line(finished):
    assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr[-3000:]
    return finished.stderr.strip().splitlines()[-1]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_raw(raw, count=3):
    rng = np.random.default_rng(1)
    for class_name in ("Normal", "ODA"):
        (raw / class_name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = rng.integers(0, 255, (40 + index, 44), dtype=np.uint8)
            Image.fromarray(pixels).save(raw / class_name / f"{index}.png")


@pytest.fixture(scope="module")
def finished_prior_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("prior_run")
    write_processed_split(base / "processed", images_per_class=6, test_images_per_class=1)
    finished = run_script("cvae_training_224x224", *TINY_MODEL, *folders(base), "--epochs=1", *PRIOR)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return base


def test_a_prior_only_training_takes_the_run_and_a_second_is_refused(finished_prior_run):
    base, run = finished_prior_run, finished_prior_run / "models" / "32x32"
    first = start_training(base, *PRIOR[1:], "--prior_epochs=400", "--continue_finished=True", "--epochs=1")
    try:
        assert wait_for_lock(run.parent / ".32x32.lock", f"process {first.pid} ", first)
        second = run_script(
            "cvae_training_224x224", *TINY_MODEL, *folders(base), "--epochs=1", *PRIOR[1:],
            "--prior_epochs=3", "--continue_finished=True",
        )  # fmt: skip
        line = last_line(second)
        assert f"{run} is being written by process {first.pid}" in line and "cvae_training_224x224.py" in line
    finally:
        first.kill()
        first.wait()


def test_preprocessing_under_a_running_training_is_refused_naming_it(finished_prior_run, tmp_path):
    base = finished_prior_run
    write_raw(tmp_path / "raw")
    first = start_training(base, *PRIOR[1:], "--prior_epochs=400", "--continue_finished=True", "--epochs=1")
    try:
        lock_file = base / "processed" / ".32x32.lock"
        assert wait_for_lock(lock_file, f"reading: process {first.pid} ", first)
        before = sorted((base / "processed" / "32x32").rglob("*"))
        finished = run_script(
            "cvae_pre_processing",
            f"--raw_images_dir={tmp_path / 'raw'}",
            f"--processed_images_dir={base / 'processed'}",
            "--image_size=32",
            "--resize_mode=pad",
        )
        line = last_line(finished)
        assert f"32x32 is being read by process {first.pid}" in line and "cvae_training_224x224.py" in line
        assert sorted((base / "processed" / "32x32").rglob("*")) == before, "nothing written"
    finally:
        first.kill()
        first.wait()


def test_a_damaged_prior_is_refused_and_its_remedy_repairs_it(finished_prior_run):
    base, run = finished_prior_run, finished_prior_run / "models" / "32x32"
    prior_file = run / "latent_prior.keras"
    recorded = json.loads((run / "cvae_parameters.json").read_text())["latent_prior"]
    whole = prior_file.read_bytes()
    prior_file.write_bytes(whole[: len(whole) // 2])
    generate = (
        "cvae_inference",
        "--image_size=32",
        "--sampling=diffusion",
        "--images_per_class=1",
        "--figures=False",
        "--sampling_steps=2",
        "--restore_aspect=False",
        *folders(base),
        f"--generated_images_dir={base / 'generated'}",
    )
    line = last_line(run_script(*generate))
    assert "latent_prior.keras" in line and "--continue_finished=True --prior_epochs=N" in line
    # The remedy the message names, with the prior's own epoch count: written again from its checkpoint.
    remedy = run_script(
        "cvae_training_224x224", *TINY_MODEL, *folders(base), "--epochs=1", *PRIOR[1:],
        f"--prior_epochs={recorded['epochs_done']}", "--continue_finished=True",
    )  # fmt: skip
    assert remedy.returncode == 0, remedy.stderr[-3000:]
    assert "is not the file its training recorded" in remedy.stdout
    assert (
        digest(prior_file) == json.loads((run / "cvae_parameters.json").read_text())["latent_prior"]["sha256"]
    )
    assert run_script(*generate).returncode == 0

    # The standardisation is covered by the record: an edit of it is refused, not sampled with.
    parameters_path = run / "cvae_parameters.json"
    parameters = json.loads(parameters_path.read_text())
    parameters["latent_prior"]["prior_config"]["latent_scale"] *= 3
    parameters_path.write_text(json.dumps(parameters))
    line = last_line(run_script(*generate))
    assert "standardisation included) was changed after training" in line


def test_a_changed_or_foreign_encoder_is_one_line_before_the_prior_trains(finished_prior_run, tmp_path):
    import shutil

    base = tmp_path / "copy"
    shutil.copytree(finished_prior_run, base)
    encoder = base / "models" / "32x32" / "cvae_encoder.keras"
    encoder.write_bytes(encoder.read_bytes()[:1000])
    arguments = (*TINY_MODEL, *folders(base), "--epochs=1", *PRIOR[1:], "--prior_epochs=9")
    line = last_line(run_script("cvae_training_224x224", *arguments, "--continue_finished=True"))
    assert "cvae_encoder.keras is not the encoder its run saved" in line


def preprocess(raw, processed, *arguments):
    return run_script(
        "cvae_pre_processing",
        f"--raw_images_dir={raw}",
        f"--processed_images_dir={processed}",
        *arguments,
    )


def test_the_data_fingerprint_covers_resize_mode_and_size_and_folders_are_open(tmp_path):
    write_raw(tmp_path / "raw")
    fingerprints = {}
    for name, arguments in {
        "squash 32": ("--image_size=32",),
        "pad 32": ("--image_size=32", "--resize_mode=pad"),
        "squash 40": ("--image_size=40",),
    }.items():
        processed = tmp_path / name
        finished = preprocess(tmp_path / "raw", processed, *arguments)
        assert finished.returncode == 0, finished.stderr[-2000:]
        size = arguments[0].split("=")[1]
        facts = json.loads((processed / f"{size}x{size}" / "preprocessing.json").read_text())
        fingerprints[name] = facts["fingerprint"]
        for folder in [processed / f"{size}x{size}", *(processed / f"{size}x{size}").rglob("*")]:
            if folder.is_dir():
                assert folder.stat().st_mode & 0o777 == 0o777 & ~current_umask(), folder
    assert len(set(fingerprints.values())) == 3, fingerprints


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_one_strip_among_crops_moves_no_aspect_statistic_and_an_empty_file_is_called_empty(tmp_path):
    import pandas as pd

    raw, rng = tmp_path / "raw", np.random.default_rng(2)
    for class_name in ("Normal", "ODA"):
        (raw / class_name).mkdir(parents=True)
        for index in range(20):
            width = int(rng.normal(100, 10))
            Image.fromarray(rng.integers(0, 255, (100, width), dtype=np.uint8)).save(
                raw / class_name / f"{index}.png"
            )
    statistics = {}
    for name in ("plain", "with a strip"):
        if name == "with a strip":
            Image.fromarray(np.full((20, 20000), 128, np.uint8)).save(raw / "ODA" / "strip.png")
            (raw / "ODA" / "empty.png").write_bytes(b"")
        finished = preprocess(raw, tmp_path / name, "--image_size=32")
        assert finished.returncode == 0, finished.stderr[-2000:]
        statistics[name] = pd.read_csv(tmp_path / name / "raw_image_statistics.csv").iloc[0]
    plain, strip = statistics["plain"], statistics["with a strip"]
    assert 0.8 < plain["aspect_ratio_mean"] < 1.2 and plain["aspect_ratio_std"] < 0.3
    assert abs(strip["aspect_ratio_mean"] - plain["aspect_ratio_mean"]) < 0.02
    assert abs(strip["aspect_ratio_std"] - plain["aspect_ratio_std"]) < 0.02
    manifest = pd.read_csv(tmp_path / "with a strip" / "32x32" / "manifest.csv").set_index("source_path")
    assert manifest.loc["ODA/strip.png", "outcome"] == "rejected"
    assert "longer than 4:1" in manifest.loc["ODA/strip.png", "reason"]
    assert manifest.loc["ODA/empty.png", "reason"] == "empty file (0 bytes)"


def test_images_replaced_between_reading_the_facts_and_the_lock_are_refused(tmp_path):
    from cilia_cvae import runs
    from cilia_cvae.config import UserError
    from cilia_cvae.layout import RunLayout

    write_processed_split(tmp_path / "processed", images_per_class=2, test_images_per_class=1)
    facts_path = tmp_path / "processed" / "32x32" / "preprocessing.json"
    facts = json.loads(facts_path.read_text())
    settings = {"PROCESSED_IMAGES_DIR": tmp_path / "processed", "IMAGE_SIZE": 32}
    layout = RunLayout(tmp_path / "models", tmp_path / "latents", 32)
    # What the script read before TensorFlow loaded, then a preprocessing replaced the images.
    facts_path.write_text(json.dumps(dict(facts, fingerprint="another")))
    with pytest.raises(UserError, match="were replaced while this training started"):
        runs.lock_run(layout, settings, facts)


@pytest.mark.parametrize("resize_mode, resumes", [("squash", True), ("pad", False)])
def test_a_run_recorded_before_the_fingerprint_covered_the_resize_mode(tmp_path, resize_mode, resumes):
    from cilia_cvae import runs
    from cilia_cvae.layout import RunLayout

    write_processed_split(tmp_path / "processed", images_per_class=2, test_images_per_class=1)
    facts_path = tmp_path / "processed" / "32x32" / "preprocessing.json"
    facts = dict(json.loads(facts_path.read_text()), resize_mode=resize_mode)
    facts.update(fingerprint="covers the resize mode", pixels_fingerprint="the paths and pixels only")
    facts_path.write_text(json.dumps(facts))
    settings = {"PROCESSED_IMAGES_DIR": str(tmp_path / "processed"), "IMAGE_SIZE": 32, "EPOCHS": 1}
    layout = RunLayout(tmp_path / "models", tmp_path / "latents", 32)
    layout.checkpoints.mkdir(parents=True)
    comparable = runs.comparable_settings(settings, facts["fingerprint"])
    layout.run_settings.write_text(json.dumps(dict(comparable, DATA_FINGERPRINT="the paths and pixels only")))
    changed = runs._recorded_changes(layout, comparable, settings)
    assert (changed == "") == resumes, changed
