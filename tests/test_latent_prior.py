"""The latent diffusion prior at a tiny size: 4 x 4 x 4 maps, two classes, a 16-channel U-Net.

What the training stage relies on: the denoiser survives a save and a safe-mode load in a
fresh process; a short training on two classes of opposite sign learns them, so guided
samples and counterfactual edits land on the asked-for sign; guidance 1 is the conditional
model alone; sampling is deterministic; the train step runs under two mirrored CPU devices
through training.py's own step functions. The whole file takes about 30 s on 2 cores.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from cilia_cvae import latent_prior
from cilia_cvae.latent_prior import PriorConfig
from conftest import SCRIPTS_DIR

# Three levels (4, 2, 2) with attention at the lowest map and after the blocks of the 2 x 2
# levels, and the radius channel: every kind of layer a full-size denoiser can hold.
TINY = PriorConfig(
    map_side=4, latent_channels=4, num_classes=2, width=16, attention_side=2, position_channel=True
)
# Two levels, one block each and no attention: a quarter of the layers, for what is trained here.
SMALL = PriorConfig(
    map_side=4,
    latent_channels=4,
    num_classes=2,
    width=16,
    channel_multipliers=(1, 2),
    blocks_per_level=1,
    attention=False,
)


def start_python(code, *arguments):
    """Start a snippet in a fresh Python process with Scripts/ on the path; it runs while other tests do."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, arguments)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS_DIR), TF_CPP_MIN_LOG_LEVEL="2"),
    )


def randomised_denoiser(prior_config=TINY, seed=0):
    """A denoiser with random weights: a fresh one predicts exactly 0 (its zero-initialised head)."""
    denoiser = latent_prior.build_denoiser(prior_config)
    rng = np.random.default_rng(seed)
    denoiser.set_weights(
        [rng.normal(0, 0.2, weight.shape).astype("float32") for weight in denoiser.get_weights()]
    )
    return denoiser


def toy_latents(count_per_class, seed):
    """Class 0: maps near +1, class 1: maps near -1 (mean 0, spread about 1: already standardised)."""
    rng = np.random.default_rng(seed)
    signs = np.repeat([1.0, -1.0], count_per_class)
    maps = signs[:, None, None, None] + 0.1 * rng.standard_normal((len(signs), *SMALL.map_shape))
    return maps.astype("float32"), np.repeat([0, 1], count_per_class).astype("int32")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"map_side": 0}, "map_side"),
        ({"width": 2.5}, "width"),
        ({"channel_multipliers": ()}, "channel_multipliers"),
        ({"channel_multipliers": (1, 0)}, "channel_multipliers"),
        ({"label_dropout": 1.0}, "label_dropout"),
        ({"label_dropout": math.nan}, "label_dropout"),
        ({"prediction": "x0"}, "prediction"),
        ({"loss_weighting": "snr"}, "loss_weighting"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"attention_side": -1}, "attention_side"),
        ({"attention_side": 14.0}, "attention_side"),
        ({"latent_scale": 0.0}, "latent_scale"),
        ({"latent_shift": math.inf}, "latent_shift"),
        ({"position_channel": 1}, "position_channel"),
        ({"max_noise_level": 0.0}, "max_noise_level"),
        ({"max_noise_level": 1.5}, "max_noise_level"),
        ({"max_noise_level": math.nan}, "max_noise_level"),
    ],
)
def test_config_refuses_impossible_values_in_one_line(change, message):
    with pytest.raises(ValueError, match=message) as raised:
        PriorConfig(**{**TINY.to_json(), **change})
    assert "\n" not in str(raised.value)


def test_config_survives_json():
    config = PriorConfig(map_side=28, channel_multipliers=(1, 2, 4), latent_shift=0.25, latent_scale=3.5)
    assert PriorConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_min_snr_weights_cap_the_clean_maps_error_at_gamma():
    """In terms of the clean map's error, min-SNR weighting is min(SNR, 5) for either prediction."""
    levels = np.array([0.0, 0.2, 0.5, 0.8, 1.0], "float32")
    alpha, sigma = (np.asarray(rate) for rate in latent_prior.signal_and_noise_rates(levels))
    snr = alpha**2 / np.maximum(sigma**2, 1e-12)
    v_weights = np.asarray(latent_prior.loss_weights(alpha, sigma, "v", "min_snr"))
    noise_weights = np.asarray(latent_prior.loss_weights(alpha[:-1], sigma[:-1], "noise", "min_snr"))
    # The v error is (SNR + 1) times the clean map's error, the noise error SNR times it.
    np.testing.assert_allclose(v_weights * (snr + 1), np.minimum(snr, 5.0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(noise_weights * snr[:-1], np.minimum(snr[:-1], 5.0), rtol=1e-5)
    assert v_weights[-1] == 0.0 and np.all(np.isfinite(v_weights)) and v_weights[0] < 0.01
    np.testing.assert_array_equal(np.asarray(latent_prior.loss_weights(alpha, sigma, "v", "uniform")), 1.0)


def test_attention_side_adds_attention_after_the_blocks_of_the_levels_no_wider():
    """At 28: 0 keeps the lowest map's attention only (what every prior saved before the setting
    had), 14 adds it after each of the 2 + 2 blocks of the 14 and 7 levels, 28 to every level."""

    def attended_levels(attention_side):
        denoiser = latent_prior.build_denoiser(PriorConfig(map_side=28, attention_side=attention_side))
        names = [layer.name for layer in denoiser.layers if layer.name.endswith("_attention")]
        return sorted(name.split("_")[0] for name in names)

    assert attended_levels(0) == ["middle"]
    assert attended_levels(7) == ["down2", "down2", "middle", "up2", "up2"]
    assert attended_levels(14) == ["down1", "down1", "down2", "down2", "middle", "up1", "up1", "up2", "up2"]
    assert len(attended_levels(28)) == 13
    recorded_before_the_setting = {
        key: value for key, value in PriorConfig().to_json().items() if key != "attention_side"
    }
    assert PriorConfig.from_json(recorded_before_the_setting).attention_side == 0


def test_the_radius_channel_is_the_distance_from_the_centre_in_every_orientation():
    maps = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype("float32")
    extended = latent_prior.RadiusChannel()(maps).numpy()
    assert extended.shape == (2, 6, 6, 4) and np.array_equal(extended[..., :3], maps)
    radius = extended[0, :, :, 3]
    assert np.array_equal(radius, extended[1, :, :, 3]), "the same for every map"
    # Cell centres at -5/6 ... 5/6 of the half side: the four middle cells nearest, the corners furthest.
    assert np.isclose(radius[2, 2], math.hypot(1 / 6, 1 / 6)) and np.isclose(
        radius[0, 0], math.hypot(5 / 6, 5 / 6)
    )
    for oriented in latent_prior.eight_orientations(radius[None, :, :, None]):
        assert np.allclose(oriented[..., 0], radius), "unchanged by quarter turns and flips"


def test_unet_halves_only_even_sides():
    assert latent_prior.level_sides(PriorConfig(map_side=28)) == [28, 14, 7]
    assert latent_prior.level_sides(PriorConfig(map_side=7)) == [7, 7, 7]
    assert latent_prior.level_sides(TINY) == [4, 2, 2]


RELOAD_CHECK = """
import sys
import keras
import numpy as np
import cilia_cvae.latent_prior  # registers the custom layers; nothing else is imported

folder = sys.argv[1]
denoiser = keras.models.load_model(f"{folder}/prior_denoiser.keras", safe_mode=True)
with np.load(f"{folder}/check.npz") as check:
    outputs = denoiser([check["noisy"], check["levels"], check["labels"]]).numpy()
    print("identical" if np.array_equal(outputs, check["expected"]) else "different")
"""

# Three steps through training.py's own step functions on two mirrored logical CPUs. Plain SGD:
# Adam's per-variable update makes the mirrored graph take twice as long to trace on 2 cores.
DISTRIBUTED_STEPS = """
import json
import sys

import keras
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

from cilia_cvae import latent_prior, training
from cilia_cvae.latent_prior import PriorConfig

config = PriorConfig.from_json(json.loads(sys.argv[1]))
with strategy.scope():  # the optimizer's step counter must be a mirrored variable too
    optimizer = keras.optimizers.SGD(0.05)
prior = latent_prior.build_latent_prior(config, seed=1, strategy=strategy, optimizer=optimizer)
train_step, _ = training.make_step_functions(prior, strategy)
rng = np.random.default_rng(0)
latents = rng.standard_normal((24, *config.map_shape)).astype("float32")
labels = rng.integers(0, 2, 24).astype("int32")
batches = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((latents, labels)).batch(8))
before = [weight.numpy() for weight in prior.ema_denoiser.weights]
for batch in batches:
    train_step(batch)
tracker = prior.trackers["prior_loss"]
copies = prior.denoiser.weights[0].value.values
moved = [not np.array_equal(old, weight.numpy()) for old, weight in zip(before, prior.ema_denoiser.weights)]
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "loss": float(tracker.result()),
    "examples": float(tracker.count.numpy()),
    "steps": int(prior.optimizer.iterations.numpy()),
    "average_moved": any(moved),
    "copies_agree": bool(np.array_equal(copies[0].numpy(), copies[1].numpy())),
}))
"""


@pytest.fixture(scope="module", autouse=True)
def fresh_processes(tmp_path_factory):
    """The two checks that need a process of their own, started before the first test and
    collected by their tests: a safe-mode reload of a saved denoiser, the mirrored train step."""
    folder = tmp_path_factory.mktemp("latent_prior")
    denoiser = randomised_denoiser()
    rng = np.random.default_rng(1)
    inputs = {
        "noisy": rng.standard_normal((6, *TINY.map_shape)).astype("float32"),
        "levels": rng.uniform(size=(6, 1)).astype("float32"),
        "labels": np.array([0, 1, 2, 0, 1, 2], "int32"),  # both classes and the null class
    }
    expected = denoiser([inputs["noisy"], inputs["levels"], inputs["labels"]]).numpy()
    assert np.abs(expected).max() > 0.1, "a denoiser predicting 0 would prove nothing"
    denoiser.save(folder / "prior_denoiser.keras")
    np.savez(folder / "check.npz", expected=expected, **inputs)
    processes = {
        "reload": start_python(RELOAD_CHECK, folder),
        "distributed": start_python(DISTRIBUTED_STEPS, json.dumps(SMALL.to_json())),
    }
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


def finished(process):
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def test_denoiser_reloads_identically_in_a_fresh_process_in_safe_mode(fresh_processes):
    returncode, stdout, stderr = finished(fresh_processes["reload"])
    assert returncode == 0 and "identical" in stdout, stderr[-3000:]


@pytest.fixture(scope="module")
def trained_prior():
    """150 Adam steps on the two toy classes; the loss of every step."""
    latents, labels = toy_latents(64, seed=0)
    prior = latent_prior.build_latent_prior(SMALL, learning_rate=3e-3, seed=3)
    train_step = tf.function(prior.train_step)
    dataset = tf.data.Dataset.from_tensor_slices((latents, labels)).shuffle(128, seed=0).repeat().batch(32)
    step_losses = []
    for batch in dataset.take(150):
        prior.trackers["prior_loss"].reset_state()
        step_losses.append(float(train_step(batch)["prior_loss"]))
    return prior, np.array(step_losses)


def test_a_prior_for_variations_trains_only_on_the_noise_levels_they_use():
    # --prior_max_noise_level=0.4: every level a training step draws lies at or under 0.4 of the
    # schedule, spread over that range, and validation draws from the same range.
    prior = latent_prior.build_latent_prior(dataclasses.replace(SMALL, max_noise_level=0.4), seed=1)
    seen = []

    def recording_denoiser(inputs, training=False):
        seen.append(np.asarray(inputs[1]).ravel())
        return tf.zeros_like(inputs[0])

    prior.denoiser = recording_denoiser
    latents, labels = toy_latents(64, seed=0)
    for step in range(3):
        prior.per_example_losses(latents, labels, tf.constant([step, 1]), training=True)
    prior.test_step((latents, labels))
    levels = np.concatenate(seen)
    assert len(levels) == 4 * len(latents), "three training batches and one validation batch"
    assert levels.max() <= 0.4 and levels.min() >= 0 and levels.max() > 0.35, (levels.min(), levels.max())
    assert latent_prior.PriorConfig.from_json(prior.prior_config.to_json()).max_noise_level == 0.4


def test_training_reduces_the_loss_and_validation_is_repeatable(trained_prior):
    prior, step_losses = trained_prior
    assert np.all(np.isfinite(step_losses))
    # A fresh denoiser predicts 0, a loss of about 1 on standardised maps; the floor of this toy
    # problem is near 0.1 (the maps' own noise), which 150 steps are far from reaching.
    assert step_losses[0] == pytest.approx(1.0, abs=0.15)
    assert step_losses[-20:].mean() < 0.7 * step_losses[0], step_losses[[0, 4, -20, -1]]
    latents, labels = toy_latents(16, seed=1)
    validation = []
    for _ in range(2):
        prior.trackers["prior_loss"].reset_state()
        validation.append(float(tf.function(prior.test_step)((latents, labels))["prior_loss"]))
    assert validation[0] == validation[1] and validation[0] < 0.8 * step_losses[0]


def test_guided_samples_take_the_sign_of_their_class_and_edits_move_towards_theirs(trained_prior):
    prior, _ = trained_prior
    labels = np.repeat([0, 1], 8)
    noise = np.random.default_rng(2).standard_normal((16, *SMALL.map_shape)).astype("float32")
    maps = latent_prior.sample(prior.ema_denoiser, labels, noise, steps=10, guidance=2.0)
    means = maps.mean(axis=(1, 2, 3))
    assert np.all(means[:8] > 0.5) and np.all(means[8:] < -0.5), means
    # Counterfactuals: each map edited into the other class ends nearer that class than the same map,
    # from the same noise, edited under its own class. Compared pairwise, not against a fixed level:
    # how far the toy prior (150 steps old) carries an edit depends on the threads' summation order
    # in training, which differs between processors (on one, class-1 maps edited into class 0 stopped
    # near -0.45 where others crossed zero), while the direction holds on every one.
    source, source_labels = toy_latents(8, seed=3)

    def edited_means(target_labels):
        return latent_prior.edit(
            prior.ema_denoiser, source, target_labels, strength=0.9, steps=10, guidance=2.0, seed=4
        ).mean(axis=(1, 2, 3))

    moved = edited_means(1 - source_labels) - edited_means(source_labels)
    assert np.all(moved[:8] < -0.3) and np.all(moved[8:] > 0.3), moved


def conditional_ddim_by_hand(denoiser, labels, noise, steps):
    """DDIM with v-prediction, the conditional model alone, written from the papers' formulas."""
    offset = latent_prior.SCHEDULE_OFFSET
    noisy = noise.astype("float64")
    levels = np.linspace(1.0, 0.0, steps + 1)
    for level, next_level in zip(levels[:-1], levels[1:]):
        alpha, sigma = (
            function(math.pi / 2 * (level + offset) / (1 + offset)) for function in (math.cos, math.sin)
        )
        velocity = denoiser(
            [noisy.astype("float32"), np.full((len(noisy), 1), level, "float32"), labels]
        ).numpy()
        clean, noise_estimate = alpha * noisy - sigma * velocity, sigma * noisy + alpha * velocity
        angle = math.pi / 2 * (next_level + offset) / (1 + offset)
        noisy = math.cos(angle) * clean + math.sin(angle) * noise_estimate
    return clean


def test_guidance_one_is_the_conditional_model_alone():
    denoiser = randomised_denoiser()
    labels = np.array([0, 1, 0, 1], "int32")
    noise = np.random.default_rng(5).standard_normal((4, *TINY.map_shape)).astype("float32")
    guided = latent_prior.sample(denoiser, labels, noise, steps=6, guidance=2.0)
    plain = latent_prior.sample(denoiser, labels, noise, steps=6, guidance=1.0)
    assert np.abs(guided - plain).max() > 1e-2, "guidance 2 must differ from guidance 1"
    np.testing.assert_allclose(plain, conditional_ddim_by_hand(denoiser, labels, noise, 6), atol=1e-4)
    # With a poisoned null class, guidance 1 must stay finite: its unconditional half is never run.
    embedding = denoiser.get_layer("class_embedding")
    table = embedding.get_weights()[0]
    table[TINY.null_class] = np.nan
    embedding.set_weights([table])
    assert np.all(np.isfinite(latent_prior.sample(denoiser, labels, noise, steps=6, guidance=1.0)))
    assert np.all(np.isnan(latent_prior.sample(denoiser, labels, noise, steps=6, guidance=2.0)))


def test_sampling_is_deterministic_and_batch_independent():
    denoiser = randomised_denoiser(seed=6)
    labels = np.array([0, 1, 2, 0, 1], "int32")  # 2: the null class, an unconditional sample
    rng = np.random.default_rng(7)
    noise, other_noise = rng.standard_normal((2, 5, *TINY.map_shape)).astype("float32")
    first = latent_prior.sample(denoiser, labels, noise, steps=5, guidance=1.5)
    assert first.shape == (5, *TINY.map_shape) and first.dtype == np.float32
    assert np.array_equal(first, latent_prior.sample(denoiser, labels, noise, steps=5, guidance=1.5))
    assert not np.allclose(first, latent_prior.sample(denoiser, labels, other_noise, steps=5, guidance=1.5))
    in_batches_of_two = latent_prior.sample(denoiser, labels, noise, steps=5, guidance=1.5, batch_size=2)
    np.testing.assert_allclose(in_batches_of_two, first, atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        latent_prior.sample(denoiser, np.array([3]), noise[:1], steps=5)
    with pytest.raises(ValueError, match="labels"):
        latent_prior.sample(denoiser, labels[:4], noise, steps=5)


def test_edit_strength_zero_keeps_the_input_and_strength_one_forgets_it():
    denoiser = randomised_denoiser(seed=8)
    rng = np.random.default_rng(9)
    latents, noise = rng.standard_normal((2, 4, *TINY.map_shape)).astype("float32")
    targets = np.array([1, 0, 1, 0], "int32")
    options = {"steps": 8, "guidance": 2.0, "noise": noise}
    assert np.array_equal(latent_prior.edit(denoiser, latents, targets, strength=0.0, **options), latents)
    sampled = latent_prior.sample(denoiser, targets, noise, steps=8, guidance=2.0)
    assert np.array_equal(latent_prior.edit(denoiser, latents, targets, strength=1.0, **options), sampled)
    halfway = latent_prior.edit(denoiser, latents, targets, strength=0.5, **options)
    assert not np.allclose(halfway, latents, atol=1e-2) and not np.allclose(halfway, sampled, atol=1e-2)
    with pytest.raises(ValueError, match="strength"):
        latent_prior.edit(denoiser, latents, targets, strength=1.5, **options)


def test_eight_orientations_are_the_eight_distinct_dihedral_transforms():
    images = np.random.default_rng(10).uniform(size=(2, 5, 5, 1)).astype("float32")
    oriented = latent_prior.eight_orientations(images)
    assert oriented.shape == (16, 5, 5, 1)
    first_image = oriented[0::2]  # orientation-major: image 0 of every orientation
    assert np.array_equal(first_image[0], images[0])
    assert len({view.tobytes() for view in first_image}) == 8
    # The group closes: the transpose, a dihedral transform not made directly, is among them,
    # and so is the second image's upside-down mirror.
    assert any(np.array_equal(view, images[0].transpose(1, 0, 2)) for view in first_image)
    assert any(np.array_equal(view, images[1][::-1]) for view in oriented[1::2])
    with pytest.raises(ValueError, match="square"):
        latent_prior.eight_orientations(images[:, :, :4])


def test_standardisation_measures_and_round_trips_the_cvae_latents():
    rng = np.random.default_rng(11)
    vectors = (3.0 + 0.5 * rng.standard_normal((40, TINY.map_side**2 * TINY.latent_channels))).astype(
        "float32"
    )
    shift, scale = latent_prior.measure_standardisation(vectors)
    assert shift == pytest.approx(3.0, abs=0.02) and scale == pytest.approx(0.5, abs=0.02)
    config = PriorConfig(**{**TINY.to_json(), "latent_shift": shift, "latent_scale": scale})
    maps = latent_prior.from_model_latents(vectors, config)
    assert maps.shape == (40, *TINY.map_shape)
    assert abs(maps.mean()) < 1e-4 and maps.std() == pytest.approx(1.0, abs=1e-4)
    # Row-major, as the decoder's Reshape reads a flattened latent.
    assert maps[0, 0, 1, 0] == pytest.approx((vectors[0, TINY.latent_channels] - shift) / scale)
    np.testing.assert_allclose(latent_prior.to_model_latents(maps, config), vectors, atol=1e-5)
    with pytest.raises(ValueError, match="spread"):
        latent_prior.measure_standardisation(np.ones((3, 4)))


def test_train_step_runs_on_two_mirrored_cpu_devices(fresh_processes):
    returncode, stdout, stderr = finished(fresh_processes["distributed"])
    assert returncode == 0, stderr[-3000:]
    facts = json.loads(stdout.strip().splitlines()[-1])
    assert facts["replicas"] == 2 and facts["steps"] == 3
    assert math.isfinite(facts["loss"]) and 0 < facts["loss"] < 10
    # Every example of both replicas counted once: the tracker is summed across replicas.
    assert facts["examples"] == 24
    assert facts["average_moved"] and facts["copies_agree"]
