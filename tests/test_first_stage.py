"""The first stage's look: the grain model, the adversarial patch loss and the texture measures.

Tiny runs at 32 px, as a user runs them (subprocesses), plus the numerical parts checked on
images whose grain is known.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from test_training import folders, train, write_processed_split

from conftest import REPOSITORY_ROOT, SCRIPTS_DIR, run_script

ADVERSARIAL = ["--adversarial_weight=0.5", "--adversarial_start_epoch=2", "--kl_warmup_epochs=1"]


def grainy_images(count, side=64, seed=0, grain=0.06):
    """Smooth discs (what a decoder draws) and the same discs with grain whose strength follows the grey level."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:side, :side] / side - 0.5
    smooth, grainy = [], []
    for _ in range(count):
        centre = rng.uniform(-0.1, 0.1, 2)
        disc = 0.75 - 0.45 * (np.hypot(x - centre[0], y - centre[1]) < rng.uniform(0.2, 0.35))
        disc = ndimage.gaussian_filter(disc, 2.0)
        # Pixel-scale grain: finer than the grain model's longest wavelength at any size.
        noise = rng.standard_normal((side, side))
        smooth.append(disc)
        grainy.append(np.clip(disc + grain * (0.5 + disc) * noise, 0, 1))
    return np.array(smooth), np.array(grainy)


def test_grain_model_restores_the_fine_scale_power_a_decoder_loses(tmp_path):
    from cilia_cvae import grain, texture_report

    smooth, grainy = grainy_images(40, side=128)
    accumulator = grain.GrainAccumulator(128)
    accumulator.add(grainy[:20], smooth[:20])
    model = accumulator.model({"run_fingerprint": "test"})
    grain.check_model(json.loads(json.dumps(model)), 128)
    # Stronger grain where the image is lighter, as drawn.
    strengths = np.asarray(model["strength_by_grey"])
    centres = np.asarray(model["grey_centres"])
    assert np.interp(0.75, centres, strengths) > 1.2 * np.interp(0.32, centres, strengths)

    def save(images, folder):
        folder.mkdir()
        paths = []
        for index, image in enumerate(images):
            path = folder / f"{index}.png"
            Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)).save(path)
            paths.append(path)
        return paths

    real = save(grainy[20:], tmp_path / "real")
    decoded = (np.rint(smooth[20:] * 255)).astype(np.uint8)
    with_grain = grain.add_grain(decoded, model, grain.image_rngs(0, 0, range(20)))
    labels = np.zeros(20, dtype=int)
    blurred = texture_report.texture_report(save(smooth[20:], tmp_path / "smooth"), labels, real, labels)
    restored = texture_report.texture_report(
        save(with_grain / 255.0, tmp_path / "grain"), labels, real, labels
    )
    assert blurred["finest_scale_power_ratio"] < 0.2
    assert 0.6 < restored["finest_scale_power_ratio"] < 1.6
    assert blurred["statistics"]["fine_grain_share"]["median_percentile"] < 5
    assert restored["statistics"]["fine_grain_share"]["in_band"]
    # The same seed and image numbers draw the same grain; another number draws other grain.
    again = grain.add_grain(decoded, model, grain.image_rngs(0, 0, range(20)))
    shifted = grain.add_grain(decoded, model, grain.image_rngs(0, 0, range(1, 21)))
    assert np.array_equal(again, with_grain) and not np.array_equal(shifted, with_grain)


def test_a_damaged_grain_model_is_refused_with_its_reason():
    from cilia_cvae import grain

    smooth, grainy = grainy_images(4, side=32)
    accumulator = grain.GrainAccumulator(32)
    accumulator.add(grainy, smooth)
    model = accumulator.model({})
    for change, reason in (
        ({"power_profile": model["power_profile"][:-1]}, "power_profile"),
        ({"strength_by_grey": [float("nan")] * grain.GREY_BINS}, "finite"),
        ({"version": 0}, "version"),
        ({"image_size": 64}, "measured at 64 px, not 32"),
    ):
        with pytest.raises(ValueError, match=reason):
            grain.check_model({**model, **change}, 32)


@pytest.fixture(scope="module")
def grain_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("grain_run")
    write_processed_split(base / "processed")
    result = train(base, "--epochs=1")
    assert result.returncode == 0, result.stderr
    return base


def generate(base, name, *arguments, images_per_class=3):
    return run_script(
        "cvae_inference",
        "--image_size=32",
        f"--images_per_class={images_per_class}",
        "--restore_aspect=False",
        "--figures=False",
        "--temperature=0",
        f"--generated_images_dir={base / name}",
        *folders(base),
        *arguments,
    )


def manifest_rows(base, name):
    import csv

    with open(base / name / "32x32" / "generation_manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_grain_model_is_saved_with_the_run_and_grain_false_gives_the_decoders_own_output(grain_run):
    model_dir = grain_run / "models" / "32x32"
    parameters = json.loads((model_dir / "cvae_parameters.json").read_text())
    recorded = parameters["grain_model"]
    assert recorded["file"] == "grain_model.json" and recorded["grain_std"] > 0
    assert generate(grain_run, "with_grain", "--grain=True").returncode == 0
    # GRAIN=False is the default.
    plain = generate(grain_run, "without_grain")
    assert plain.returncode == 0, plain.stderr
    assert {row["grain"] for row in manifest_rows(grain_run, "with_grain")} == {"True"}
    assert {row["grain"] for row in manifest_rows(grain_run, "without_grain")} == {"False"}
    # In a fresh process, in safe mode: the decoder's own output for the rows' source latents (at
    # temperature 0 the latent is the stored mean) is the GRAIN=False image, bit for bit, and the
    # grain model, read back from its file, is what made the other images differ.
    check = """
import csv, json, sys
import numpy as np
from PIL import Image
import keras
from cilia_cvae import generation, grain
base, classes = sys.argv[1], json.loads(sys.argv[2])
decoder = keras.models.load_model(base + "/models/32x32/cvae_decoder.keras", safe_mode=True)
model = json.load(open(base + "/models/32x32/grain_model.json"))
grain.check_model(model, 32)
for name, differs in (("without_grain", False), ("with_grain", True)):
    rows = list(csv.DictReader(open(base + "/" + name + "/32x32/generation_manifest.csv")))
    for row in rows:
        label = classes.index(row["class"])
        z_mean = np.load(base + "/latents/32x32/z_mean_" + row["class"] + ".npy", allow_pickle=False)
        one_hot = np.eye(len(classes), dtype="float32")[[label]]
        decoded = decoder([z_mean[[int(row["source_latent_index"])]], one_hot], training=False)
        own = np.clip(np.rint(np.asarray(decoded)[0, :, :, 0] * 255), 0, 255).astype(np.uint8)
        written = np.asarray(Image.open(base + "/" + name + "/32x32/" + row["file"]))
        assert np.array_equal(written, own) != differs, (name, row["file"])
print("checked", len(rows))
"""
    finished = subprocess.run(
        [sys.executable, "-c", check, str(grain_run), json.dumps(parameters["class_names"])],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS_DIR), TF_CPP_MIN_LOG_LEVEL="2"),
        cwd=REPOSITORY_ROOT,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "checked 9" in finished.stdout


def test_a_tampered_grain_model_is_one_line_naming_the_file(grain_run, tmp_path):
    path = grain_run / "models" / "32x32" / "grain_model.json"
    original = path.read_bytes()
    try:
        model = json.loads(original)
        model["grain_std"] *= 2
        path.write_text(json.dumps(model))
        result = generate(grain_run, "tampered", "--grain=True")
    finally:
        path.write_bytes(original)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "grain_model.json" in message and "--fresh=True" in message


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("--adversarial_weight=-1", "--adversarial_weight must be 0 or a positive finite number"),
        # The command-line parser may refuse nan as a float before the check sees it: either way, one line.
        ("--adversarial_weight=nan", "--adversarial_weight"),
        ("--adversarial_start_epoch=0", "--adversarial_start_epoch must be at least 1"),
    ],
)
def test_adversarial_settings_refuse_bad_values_in_one_line(tmp_path, argument, message):
    write_processed_split(tmp_path / "processed", images_per_class=2, test_images_per_class=1)
    result = train(tmp_path, argument)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


def test_grain_setting_refuses_a_value_that_is_not_true_or_false(grain_run):
    result = generate(grain_run, "refused", "--grain=sometimes")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--grain" in result.stderr.strip().splitlines()[-1]


def discriminator_steps(checkpoints):
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(checkpoints))
    return int(
        tf.train.load_variable(latest, "discriminator_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")
    )


def test_the_discriminator_resumes_with_its_training_after_a_kill(tmp_path):
    """Killed right after the first adversarial epoch's checkpoint, then run again: the discriminator
    and its optimizer come back from the checkpoint (its step count goes on, not from zero)."""
    write_processed_split(tmp_path / "processed", images_per_class=8)
    killed = train(
        tmp_path, "--epochs=3", *ADVERSARIAL, environment={"CILIA_CVAE_CRASH_AFTER_CHECKPOINT": "2"}
    )
    assert killed.returncode == 137, killed.stderr[-2000:]
    checkpoints = tmp_path / "models" / "32x32" / "checkpoints"
    steps_per_epoch = discriminator_steps(checkpoints)
    assert steps_per_epoch > 0, "the discriminator did not train in its first epoch"
    resumed = train(tmp_path, "--epochs=3", *ADVERSARIAL)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch 2" in resumed.stdout
    assert discriminator_steps(checkpoints) == 2 * steps_per_epoch
    parameters = json.loads((tmp_path / "models" / "32x32" / "cvae_parameters.json").read_text())
    # Only an epoch the adversarial loss trained can be the saved one.
    assert parameters["best_epoch"] >= 2
    history = (tmp_path / "models" / "32x32" / "training_history.csv").read_text().splitlines()
    header = history[0].split(",")
    losses = [float(row.split(",")[header.index("discriminator_loss")]) for row in history[1:]]
    assert losses[0] == 0 and all(0 < value < 4 for value in losses[1:])


def test_a_blind_sheet_shuffles_real_and_generated_images_with_its_key_apart(grain_run, tmp_path):
    assert generate(grain_run, "for_sheet", "--grain=True", images_per_class=4).returncode == 0
    sheet = tmp_path / "sheet.png"
    arguments = [
        "--image_size=32",
        f"--processed_images_dir={grain_run / 'processed'}",
        f"--generated_images_dir={grain_run / 'for_sheet'}",
        f"--blind_sheet={sheet}",
        "--blind_sheet_images=3",
        "--blind_sheet_tile=64",
    ]
    result = run_script("cvae_evaluate", *arguments, "--seed=1")
    assert result.returncode == 0, result.stderr
    key = json.loads((tmp_path / "sheet_key.json").read_text())
    assert sorted(key["tiles_by_source"]) == ["generated", "real_test"]
    assert sorted(key["tiles_by_source"]["generated"] + key["tiles_by_source"]["real_test"]) == list(
        range(1, 7)
    )
    # Nothing on the sheet names a source: its tiles are only numbered.
    with Image.open(sheet) as image:
        assert image.size == (4 * (64 + 8), 2 * (64 + 8 + 22))
    again = run_script("cvae_evaluate", *arguments, "--seed=2", f"--blind_sheet={tmp_path / 'other.png'}")
    assert again.returncode == 0
    other = json.loads((tmp_path / "other_key.json").read_text())
    assert other["tiles"] != key["tiles"], "another seed gave the same sheet"
    refused = run_script("cvae_evaluate", *arguments, "--blind_sheet_images=500")
    assert refused.returncode == 2 and "--blind_sheet_images must be between 1 and 64" in refused.stderr
