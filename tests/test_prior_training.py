"""The second training stage, the latent prior, as a user runs it: trained, continued, resumed, refused."""

import csv
import hashlib
import json

import numpy as np
import tensorflow as tf
from test_training import TINY_MODEL, folders, write_processed_split

from cilia_cvae import latent_prior
from cilia_cvae.prior_training import (
    SAMPLE_GRID_COLUMNS,
    epoch_order,
    identity,
    mosaic,
    same_identity,
    sample_grid,
)
from conftest import run_script

# No sample grid but the last epoch's: its DDIM sampler costs more to trace than the tiny prior to train.
# The cosine schedule and class balance are on, so that a resumed run is seen to keep to both. No
# class filter (its training, after the prior's, is test_variation.py's filter_run): every run here
# would train one, at seconds each.
PRIOR = [
    "--prior_epochs=2",
    "--prior_batch_size=16",
    "--prior_width=8",
    "--prior_sample_every=0",
    "--prior_learning_rate_schedule=cosine",
    "--prior_class_balanced=True",
    "--class_filter_epochs=0",
]


def train(base, *arguments, environment=None):
    return run_script(
        "cvae_training_224x224",
        *TINY_MODEL,
        *folders(base),
        "--epochs=1",
        *arguments,
        environment=environment,
    )


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prior_rows(run):
    with open(run / "prior_history.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_the_prior_trains_after_the_cvae_resumes_after_a_kill_and_continues_alone(tmp_path):
    write_processed_split(tmp_path / "processed", images_per_class=6, test_images_per_class=1)
    run = tmp_path / "models" / "32x32"

    # Killed after the prior's first checkpoint: the CVAE had finished, the prior had not.
    killed = train(tmp_path, *PRIOR, environment={"CILIA_CVAE_CRASH_AFTER_PRIOR_CHECKPOINT": "1"})
    assert killed.returncode != 0
    assert "latent_prior" not in json.loads((run / "cvae_parameters.json").read_text())
    assert not (run / "latent_prior.keras").exists()
    decoder, history = digest(run / "cvae_decoder.keras"), (run / "training_history.csv").read_text()

    # The same command resumes the prior where it stopped, and leaves the CVAE as it was.
    resumed = train(tmp_path, *PRIOR)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the latent prior after epoch 1" in resumed.stdout
    parameters = json.loads((run / "cvae_parameters.json").read_text())
    prior = parameters["latent_prior"]
    assert prior["epochs_done"] == 2 and prior["run_fingerprint"] == parameters["run_fingerprint"]
    assert prior["sha256"] == digest(run / "latent_prior.keras")
    assert prior["training_latents"] == 18 * 8, "18 crops (6 per class), each in its eight orientations"
    assert prior["prior_config"]["map_side"] == 4 and prior["prior_config"]["latent_channels"] == 2
    assert prior["prior_config"]["latent_scale"] > 0
    assert [row["epoch"] for row in prior_rows(run)] == ["1", "2"]
    # Half-way down the cosine after the first of two epochs, at 0 after the second: the
    # resumed run went on from the step its checkpoint kept, not from the top of the curve.
    rates = [float(row["learning_rate"]) for row in prior_rows(run)]
    assert np.allclose(rates, [0.5e-3, 0.0], atol=1e-9), rates
    assert not (run / "prior_samples_epoch_1.png").exists()
    assert (run / "prior_samples_epoch_2.png").stat().st_size > 0
    assert digest(run / "cvae_decoder.keras") == decoder
    assert (run / "training_history.csv").read_text() == history

    # Continuing the finished run with more prior epochs trains the prior only.
    continued = train(tmp_path, *PRIOR[1:], "--prior_epochs=3", "--continue_finished=True")
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "training its second stage only" in continued.stdout
    assert digest(run / "cvae_decoder.keras") == decoder
    assert [row["epoch"] for row in prior_rows(run)] == ["1", "2", "3"]
    assert json.loads((run / "cvae_parameters.json").read_text())["latent_prior"]["epochs_done"] == 3

    # Asked again for what it has, it says so and changes nothing.
    prior_file = digest(run / "latent_prior.keras")
    again = train(tmp_path, *PRIOR[1:], "--prior_epochs=3", "--continue_finished=True")
    assert again.returncode == 0 and "latent prior of this run is trained (3 epochs)" in again.stdout
    assert digest(run / "latent_prior.keras") == prior_file


def test_bad_prior_settings_are_refused_in_one_line_before_training(tmp_path):
    write_processed_split(tmp_path / "processed", images_per_class=2, test_images_per_class=1)
    for argument, message in (
        ("--prior_epochs=-1", "--prior_epochs must be at least 0"),
        ("--prior_label_dropout=1", "--prior_label_dropout must be at least 0 and below 1"),
        ("--prior_prediction=x0", "--prior_prediction='x0' is not one of"),
        ("--prior_learning_rate=0", "--prior_learning_rate must be positive"),
        ("--prior_learning_rate_schedule=step", "--prior_learning_rate_schedule='step' is not one of"),
    ):
        refused = train(tmp_path, argument)
        assert refused.returncode == 2, (argument, refused.stderr[-2000:])
        assert message in refused.stderr and "Traceback" not in refused.stderr
        assert not (tmp_path / "models" / "32x32").exists(), "refused before anything is written"


def test_the_sample_grid_puts_a_class_in_each_row():
    # Image k of class c is a flat grey of 10 c + k: the row tells the class, the column the draw.
    rows, columns, side = 3, 4, 2
    images = np.stack(
        [np.full((side, side), (10 * c + k) / 255) for c in range(rows) for k in range(columns)]
    )
    picture = mosaic(images, rows)
    assert picture.shape == (rows * side, columns * side)
    assert picture[side * 2, side * 3] == 23 and picture[0, side] == 1 and picture[side, 0] == 10


def test_a_prior_trained_short_of_pure_noise_shows_redrawn_crops_not_draws():
    # Its sample grid starts from training maps noised to its highest level, never from pure noise
    # (levels it never learnt): the same maps in every row, each row redrawn under its class.
    prior_config = latent_prior.PriorConfig(map_side=4, latent_channels=2, num_classes=3, width=8)
    short_config = latent_prior.PriorConfig(**{**prior_config.to_json(), "max_noise_level": 0.5})
    denoiser = latent_prior.build_denoiser(short_config, name="ema_denoiser")
    maps = np.random.default_rng(0).standard_normal((24, 4, 4, 2)).astype("float32")
    calls = []

    class Prior:
        ema_denoiser = denoiser

    def decoder(inputs, training=False):
        calls.append(inputs[0])
        return tf.zeros((len(inputs[0]), 4, 4, 1))

    original_edit, edits = latent_prior.edit, []

    def recording_edit(*arguments, **keywords):
        edits.append((arguments[1], keywords["strength"]))
        return original_edit(*arguments, **keywords)

    latent_prior.edit = recording_edit
    try:
        grid = sample_grid({"prior_config": short_config, "prior": Prior, "maps": maps}, decoder, 3, seed=0)
    finally:
        latent_prior.edit = original_edit
    assert len(edits) == 1 and edits[0][1] == 0.5 and grid.shape == (3 * 4, SAMPLE_GRID_COLUMNS * 4)
    # Every row starts from the same training maps, spread over the training set.
    spread = maps[:: len(maps) // SAMPLE_GRID_COLUMNS][:SAMPLE_GRID_COLUMNS]
    assert np.array_equal(edits[0][0], np.tile(spread, (3, 1, 1, 1)))
    assert len(calls[0]) == 3 * SAMPLE_GRID_COLUMNS


def test_an_epoch_visits_each_map_once_or_every_class_equally():
    labels = np.array([0] * 90 + [1] * 10)
    order, steps = epoch_order(labels, batch_size=8, seed=3)
    assert steps == 12 and len(order) == 96 and len(set(order.tolist())) == 96, "each map at most once"

    order, steps = epoch_order(labels, batch_size=8, seed=3, class_balanced=True)
    assert steps == 12 and len(order) == 96
    rare_share = np.mean(labels[order] == 1)
    assert 0.35 < rare_share < 0.65, f"the rare class drawn {rare_share:.0%} of the time, not about half"
    assert len(set(order[labels[order] == 1].tolist())) > 5, "drawn from all its maps, not one"
    again, _ = epoch_order(labels, batch_size=8, seed=3, class_balanced=True)
    assert np.array_equal(order, again), "the same seed, the same epoch: a resumed run repeats it"


def test_a_prior_recorded_before_a_setting_existed_keeps_its_identity():
    settings = {"PRIOR_EPOCHS": 3, "PRIOR_WIDTH": 32, "PRIOR_ATTENTION_SIDE": 0}
    settings |= {"PRIOR_LEARNING_RATE_SCHEDULE": "constant", "PRIOR_CLASS_BALANCED": False}
    settings |= {"PRIOR_MAX_NOISE_LEVEL": 1.0}
    wanted = identity(settings, "fingerprint")
    older = {"PRIOR_WIDTH": 32, "RUN_FINGERPRINT": "fingerprint"}
    assert "PRIOR_EPOCHS" not in wanted and same_identity(older, wanted)
    assert not same_identity(older, identity(settings | {"PRIOR_CLASS_BALANCED": True}, "fingerprint"))
    assert not same_identity(older, identity(settings | {"PRIOR_MAX_NOISE_LEVEL": 0.7}, "fingerprint"))
    assert not same_identity(older, identity(settings, "another run")) and not same_identity(None, wanted)
