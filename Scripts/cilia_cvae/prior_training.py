"""The second training stage: a class-conditional latent diffusion prior for a finished CVAE run.

    train_prior(settings, facts, parameters)
        skip_reason(...)                  PRIOR_EPOCHS 0, a latent vector, several workers, or already trained
        start_prior(...)                  the run's encoder, the latent means of every training crop
                                          in all eight orientations, their standardisation, the prior
                                          and its last checkpoint (a killed stage resumes there)
        for each prior epoch still to train:
            train_prior_epoch(...)        the prior's own train_step on every replica
            record_prior_epoch(...)       the checkpoint, the history row, a sample grid every few epochs
        finish_prior(...)                 latent_prior.keras (the moving-average weights), then its
                                          record under "latent_prior" in cvae_parameters.json
        class_filter.train(...)           the class filter, a small classifier of the train split's
                                          crops (class_filter.py); a finished prior without one gets
                                          one when run again

The CVAE stays the image model: the prior learns where in its latent space the cilia of each
class lie, so that inference can draw new latent maps instead of re-drawing stored ones
(latent_prior.py has the network, the schedule and the sampler). A cross section has no
preferred orientation and both hands occur, so each crop is encoded in its four quarter turns
and their mirror images: eight exact, equally real examples per crop.

The prior's settings are its own: they never make the CVAE's run "another run", and a
change of them starts the prior again (its earlier checkpoints are moved aside, not deleted).
Under several workers (TF_CONFIG) the stage is skipped with a note: run it afterwards on one
host with --continue_finished=True.
"""

import hashlib
import json
import math
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from cilia_cvae import class_filter, data, generation, latent_prior, runs, training
from cilia_cvae.config import jsonable
from cilia_cvae.files import atomic_path, move_aside, sha256_of_file, write_json_atomic
from cilia_cvae.layout import RunLayout
from cilia_cvae.model_config import ModelConfig

# Settings of the prior stage; the ones that shape what it learns must match to resume it.
PRIOR_SETTINGS_FREE_TO_CHANGE = ("PRIOR_EPOCHS", "PRIOR_SAMPLE_EVERY")
# Shaping settings added after priors had been trained without them, with the value those had.
PRIOR_SETTINGS_ADDED_LATER = {
    "PRIOR_ATTENTION_SIDE": 0,
    "PRIOR_LEARNING_RATE_SCHEDULE": "constant",
    "PRIOR_CLASS_BALANCED": False,
    "PRIOR_POSITION_CHANNEL": False,
    "PRIOR_MAX_NOISE_LEVEL": 1.0,
}
SAMPLE_GRID_COLUMNS = 6
SAMPLE_GRID_STEPS, SAMPLE_GRID_GUIDANCE = 20, 2.0
CRASH_AFTER_PRIOR_CHECKPOINT_VARIABLE = "CILIA_CVAE_CRASH_AFTER_PRIOR_CHECKPOINT"  # tests only


def prior_settings(settings):
    return {name: value for name, value in jsonable(settings).items() if name.startswith("PRIOR_")}


def identity(settings, run_fingerprint):
    """What must not change within one prior training: its shaping settings and the CVAE it models."""
    kept = {
        name: value
        for name, value in prior_settings(settings).items()
        if name not in PRIOR_SETTINGS_FREE_TO_CHANGE
    }
    return dict(kept, RUN_FINGERPRINT=run_fingerprint)


def same_identity(recorded, wanted):
    """Whether a recorded identity is the wanted one; a record older than a setting trained with
    that setting's default, so a prior trained before the setting existed still resumes."""
    if not recorded:
        return False
    return {**PRIOR_SETTINGS_ADDED_LATER, **recorded} == {**PRIOR_SETTINGS_ADDED_LATER, **wanted}


def skip_reason(settings, parameters, layout):
    """Why this run's prior is not trained now, or None when it is."""
    model_config = ModelConfig.from_parameters(parameters)
    if settings["PRIOR_EPOCHS"] <= 0:
        return "no latent prior trained (--prior_epochs=0)"
    if not model_config.map_side:
        return "no latent prior: it models latent maps, and this run's latent is a vector"
    if os.environ.get("TF_CONFIG"):
        return (
            "no latent prior trained across several workers: train it on one host afterwards "
            "with --continue_finished=True"
        )
    recorded = parameters.get("latent_prior") or {}
    if (
        same_identity(recorded.get("identity"), identity(settings, parameters["run_fingerprint"]))
        and recorded.get("epochs_done", 0) >= settings["PRIOR_EPOCHS"]
        and layout.latent_prior.exists()
    ):
        if sha256_of_file(layout.latent_prior) == recorded.get("sha256"):
            return f"the latent prior of this run is trained ({recorded['epochs_done']} epochs)"
        # Damaged or replaced: written again from the prior's last checkpoint (trained again without one).
        print(
            f"{layout.latent_prior} is not the file its training recorded (damaged or replaced): "
            f"writing it again from the prior's checkpoints in {layout.prior_checkpoints}"
        )
    return None


def config_hash(prior_config_json):
    """The sha256 of a prior's configuration, its standardisation (latent_shift, latent_scale) included:
    recorded beside it, so that an edit of cvae_parameters.json cannot change what the prior's maps mean."""
    return hashlib.sha256(json.dumps(prior_config_json, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- the latents it learns


def encode_in_eight_orientations(encoder, paths, labels, model_config, batch_size):
    """Latent means (as maps) of every image in its eight orientations, with their labels."""
    shape = (model_config.map_side, model_config.map_side, model_config.latent_map_channels)
    encode = tf.function(lambda images, one_hot: encoder([images, one_hot], training=False)[0])
    maps, map_labels = [], []
    batches = data.images_in_order(
        paths, labels, model_config.num_classes, model_config.image_size, batch_size
    )
    for images, one_hot in tqdm(batches, desc="encoding 8 orientations", disable=not sys.stdout.isatty()):
        oriented = latent_prior.eight_orientations(images.numpy())
        oriented_labels = np.tile(one_hot.numpy(), (8, 1))
        for start in range(0, len(oriented), batch_size):
            chunk = slice(start, start + batch_size)
            maps.append(encode(oriented[chunk], oriented_labels[chunk]).numpy().reshape(-1, *shape))
        map_labels.append(np.tile(np.argmax(one_hot.numpy(), axis=1), 8))
    return np.concatenate(maps).astype(np.float32), np.concatenate(map_labels).astype(np.int32)


def encode_training_crops(settings, facts, model_config, layout):
    """The latent means of every train-split crop in its eight orientations, their labels and the
    crops' paths: what the prior learns from (never the test split)."""
    encoder = generation.load_encoder(layout)
    paths, labels = data.list_training_images(
        settings["PROCESSED_IMAGES_DIR"], model_config.image_size, facts["class_names"]
    )
    with data.naming_damaged_images(paths):
        maps, map_labels = encode_in_eight_orientations(
            encoder, paths, labels, model_config, settings["BATCH_SIZE"]
        )
    return maps, map_labels, paths


def prior_config_for(settings, model_config, shift, scale):
    return latent_prior.PriorConfig(
        map_side=model_config.map_side,
        latent_channels=model_config.latent_map_channels,
        num_classes=model_config.num_classes,
        width=settings["PRIOR_WIDTH"],
        attention_side=settings["PRIOR_ATTENTION_SIDE"],
        position_channel=settings["PRIOR_POSITION_CHANNEL"],
        label_dropout=settings["PRIOR_LABEL_DROPOUT"],
        max_noise_level=settings["PRIOR_MAX_NOISE_LEVEL"],
        prediction=settings["PRIOR_PREDICTION"],
        loss_weighting=settings["PRIOR_LOSS_WEIGHTING"],
        latent_shift=shift,
        latent_scale=scale,
    )


def epoch_order(labels, batch_size, seed, class_balanced=False):
    """The map indices one epoch visits, a whole number of batches of them.

    Shuffled, each map once; or class-balanced: as many draws, each class equally likely and a
    map drawn with replacement within its class, so a rare class's maps recur within an epoch
    (under fresh noise each time) as often as it takes to match Normal's share.
    """
    generator = np.random.default_rng(seed)
    steps = max(1, len(labels) // batch_size)
    if not class_balanced:
        return generator.permutation(len(labels))[: steps * batch_size], steps
    classes, counts = np.unique(labels, return_counts=True)
    share_of_class = dict(zip(classes.tolist(), (1.0 / (len(classes) * counts)).tolist()))
    probabilities = np.array([share_of_class[label] for label in labels.tolist()])
    return generator.choice(
        len(labels), size=steps * batch_size, p=probabilities / probabilities.sum()
    ), steps


def batches_for_epoch(strategy, maps, labels, batch_size, seed, class_balanced=False):
    """One epoch of batches (epoch_order), distributed over the replicas."""
    order, steps = epoch_order(labels, batch_size, seed, class_balanced)

    def generate():
        for step in range(steps):
            chosen = np.sort(order[step * batch_size : (step + 1) * batch_size])
            yield maps[chosen], labels[chosen]

    signature = (
        tf.TensorSpec((None, *maps.shape[1:]), tf.float32),
        tf.TensorSpec((None,), tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(2)
    return iter(strategy.experimental_distribute_dataset(dataset)), steps


# --------------------------------------------------------------------------- starting or resuming


def learning_rate_schedule(settings, map_count):
    """The prior's step size: a number, or a schedule of the optimizer's step over PRIOR_EPOCHS.

    The cosine follows the step counter the checkpoint keeps, so a resumed run goes on along
    the same curve; without warm-up, as the constant rate trains stably from the first step.
    """
    rate = settings["PRIOR_LEARNING_RATE"]
    if settings["PRIOR_LEARNING_RATE_SCHEDULE"] == "constant":
        return rate
    total_steps = settings["PRIOR_EPOCHS"] * max(1, map_count // settings["PRIOR_BATCH_SIZE"])
    return keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(1, total_steps), alpha=0.0)


def start_prior(strategy, settings, facts, parameters, layout):
    """The prior ready for its next epoch, with its data, checkpoint manager and history so far."""
    model_config = ModelConfig.from_parameters(parameters)
    wanted = identity(settings, parameters["run_fingerprint"])
    if layout.prior_settings.exists():
        recorded = json.loads(layout.prior_settings.read_text(encoding="utf-8"))
        if not same_identity(recorded, wanted):
            print(
                f"the latent prior's settings changed: its earlier training moved to {move_aside(layout.prior_checkpoints)}"
            )
    layout.prior_checkpoints.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.prior_settings, wanted)

    maps, map_labels, paths = encode_training_crops(settings, facts, model_config, layout)
    shift, scale = latent_prior.measure_standardisation(maps)
    prior_config = prior_config_for(settings, model_config, shift, scale)
    standardised = ((maps - shift) / scale).astype(np.float32)
    print(
        f"latent prior over {len(standardised)} latent maps {prior_config.map_shape} "
        f"({len(paths)} crops x 8 orientations), standardised by shift {shift:.4f}, scale {scale:.4f}"
    )
    prior = latent_prior.build_latent_prior(
        prior_config,
        learning_rate=learning_rate_schedule(settings, len(standardised)),
        seed=settings["SEED"],
        strategy=strategy,
    )
    state = {"epochs_done": tf.Variable(0, dtype=tf.int64), "history_json": tf.Variable("", dtype=tf.string)}
    checkpoint = tf.train.Checkpoint(prior=prior, optimizer=prior.optimizer, **state)
    manager = tf.train.CheckpointManager(checkpoint, str(layout.prior_checkpoints), max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).expect_partial()
        print(
            f"resuming the latent prior after epoch {int(state['epochs_done'])} from {layout.prior_checkpoints}"
        )
    history = json.loads(state["history_json"].numpy().decode("utf-8") or "[]")
    return {
        "prior": prior,
        "prior_config": prior_config,
        "model_config": model_config,
        "maps": standardised,
        "labels": map_labels,
        "state": state,
        "manager": manager,
        "history": history,
        "train_step": training.make_step_functions(prior, strategy)[0],
    }


# --------------------------------------------------------------------------- one epoch


def train_prior_epoch(strategy, stage, settings, epoch):
    prior = stage["prior"]
    prior.reset_metrics()
    batches, steps = batches_for_epoch(
        strategy,
        stage["maps"],
        stage["labels"],
        settings["PRIOR_BATCH_SIZE"],
        settings["SEED"] + epoch,
        settings["PRIOR_CLASS_BALANCED"],
    )
    started = time.time()
    for _ in tqdm(
        range(steps), desc=f"prior epoch {epoch}/{settings['PRIOR_EPOCHS']}", disable=not sys.stdout.isatty()
    ):
        stage["train_step"](next(batches))
    row = {"epoch": epoch, **training.tracker_results(prior), "seconds": round(time.time() - started, 2)}
    if not np.isfinite(row["prior_loss"]):
        kept = (
            f"the last good checkpoint (epoch {epoch - 1}) stays in" if epoch > 1 else "no epoch finished in"
        )
        raise training.TrainingDiverged(
            f"the latent prior's loss became {row['prior_loss']} in epoch {epoch}; {kept} the prior's "
            f"checkpoints; lower --prior_learning_rate and run again with --continue_finished=True"
        )
    row["latents_per_second"] = round(steps * settings["PRIOR_BATCH_SIZE"] / max(row["seconds"], 1e-9), 1)
    # The step size the epoch ended with: the schedule's course is in the history beside the loss.
    row["learning_rate"] = float(prior.optimizer.learning_rate)
    return row


def sample_grid(stage, decoder, num_classes, seed):
    """Decoded prior draws: a row per class, the same starting noise in every row. A prior trained
    short of pure noise cannot draw from it: it redraws the same training maps, noised to its
    highest level, under each class instead."""
    prior_config = stage["prior_config"]
    noise = np.random.default_rng(seed).standard_normal((SAMPLE_GRID_COLUMNS, *prior_config.map_shape))
    noise = np.tile(noise.astype(np.float32), (num_classes, 1, 1, 1))
    labels = np.repeat(np.arange(num_classes), SAMPLE_GRID_COLUMNS)
    denoising = {
        "steps": SAMPLE_GRID_STEPS,
        "guidance": SAMPLE_GRID_GUIDANCE,
        "prediction": prior_config.prediction,
    }
    denoiser = stage["prior"].ema_denoiser
    if prior_config.max_noise_level < 1:
        spacing = max(1, len(stage["maps"]) // SAMPLE_GRID_COLUMNS)
        sources = np.tile(stage["maps"][::spacing][:SAMPLE_GRID_COLUMNS], (num_classes, 1, 1, 1))
        maps = latent_prior.edit(
            denoiser, sources, labels, strength=prior_config.max_noise_level, noise=noise, **denoising
        )
    else:
        maps = latent_prior.sample(denoiser, labels, noise, **denoising)
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    images = decoder([latent_prior.to_model_latents(maps, prior_config), one_hot], training=False).numpy()
    return mosaic(images[..., 0], num_classes)


def mosaic(images, rows):
    """(rows x columns, S, S) images in [0, 1], row after row, as one uint8 picture of that many rows."""
    columns = len(images) // rows
    side = images.shape[1]
    by_row = np.asarray(images).reshape(rows, columns, side, side)
    picture = np.concatenate([np.concatenate(list(row), axis=1) for row in by_row], axis=0)
    return (picture * 255).round().clip(0, 255).astype(np.uint8)


def save_sample_figure(path, grid, class_names, epoch, max_noise_level=1.0):
    """The prior's sample grid with its rows named by class."""
    import matplotlib.pyplot as plt

    row_height = grid.shape[0] / len(class_names)
    figure, axis = plt.subplots(figsize=(SAMPLE_GRID_COLUMNS * 1.6 + 2.0, len(class_names) * 1.6 + 0.8))
    axis.imshow(grid, cmap="gray", vmin=0, vmax=255)
    axis.set_yticks([(row + 0.5) * row_height for row in range(len(class_names))], class_names)
    axis.set_xticks([])
    start = "the same noise" if max_noise_level == 1 else f"the same crops noised to {max_noise_level:g}"
    # An edit from level s takes ceil(s x steps) of the sampler's steps (latent_prior.edit).
    steps = math.ceil(max_noise_level * SAMPLE_GRID_STEPS)
    axis.set_title(
        f"latent prior after epoch {epoch}: {start} in every row, "
        f"{steps} DDIM steps, guidance {SAMPLE_GRID_GUIDANCE:g}"
    )
    figure.tight_layout()
    with atomic_path(path) as temporary_path:
        figure.savefig(temporary_path, format="png", dpi=100)
    plt.close(figure)


def record_prior_epoch(stage, settings, facts, layout, decoder, row):
    """Checkpoint (with the history in it, so both become durable at once), then the CSV and pictures."""
    stage["history"].append(row)
    stage["state"]["epochs_done"].assign(row["epoch"])
    stage["state"]["history_json"].assign(json.dumps(stage["history"]))
    stage["manager"].save(checkpoint_number=row["epoch"])
    if os.environ.get(CRASH_AFTER_PRIOR_CHECKPOINT_VARIABLE) == str(row["epoch"]):
        os._exit(137)
    training.write_history(layout.prior_history, stage["history"])
    every = settings["PRIOR_SAMPLE_EVERY"]
    if (every > 0 and row["epoch"] % every == 0) or row["epoch"] == settings["PRIOR_EPOCHS"]:
        grid = sample_grid(stage, decoder, len(facts["class_names"]), settings["SEED"])
        save_sample_figure(
            layout.prior_samples(row["epoch"]),
            grid,
            facts["class_names"],
            row["epoch"],
            stage["prior_config"].max_noise_level,
        )
    print(
        f"prior epoch {row['epoch']}: loss {row['prior_loss']:.4f}, "
        f"{row['latents_per_second']:.0f} latents/s, {row['seconds']:.0f} s"
    )


# --------------------------------------------------------------------------- the whole stage


def finish_prior(stage, settings, layout, parameters, seconds):
    with atomic_path(layout.latent_prior) as temporary_path:
        stage["prior"].ema_denoiser.save(temporary_path)
    history = stage["history"]
    parameters = dict(
        parameters,
        latent_prior={
            "prior_config": stage["prior_config"].to_json(),
            "prior_config_sha256": config_hash(stage["prior_config"].to_json()),
            "settings": prior_settings(settings),
            "identity": identity(settings, parameters["run_fingerprint"]),
            "epochs_done": int(history[-1]["epoch"]),
            "final_loss": history[-1]["prior_loss"],
            "training_latents": int(len(stage["maps"])),
            "training_seconds": round(seconds, 1),
            "parameters": int(stage["prior"].denoiser.count_params()),
            "sha256": sha256_of_file(layout.latent_prior),
            "run_fingerprint": parameters["run_fingerprint"],
        },
    )
    write_json_atomic(layout.parameters, parameters)
    print(f"saved the latent prior of epoch {history[-1]['epoch']} as {layout.latent_prior}")
    return parameters


def train_prior(settings, facts, parameters, strategy=None):
    """Train (or resume, or skip) the latent prior of the finished run `parameters` describes."""
    layout = RunLayout(settings["MODELS_DIR"], settings["LATENT_TENSORS_DIR"], settings["IMAGE_SIZE"])
    # The prior-only stage writes the run's folder too: one at a time (a no-op after the CVAE's stage).
    runs.lock_run(layout, settings, facts)
    reason = skip_reason(settings, parameters, layout)
    if reason:
        print(reason)
        # A trained prior without its class filter (or with a stale one) gets one.
        return class_filter.train_if_missing(settings, facts, parameters, layout)
    from cilia_cvae.generation import load_saved_model

    started = time.time()
    strategy = strategy or training.choose_strategy()
    stage = start_prior(strategy, settings, facts, parameters, layout)
    decoder = load_saved_model(
        layout.decoder, "it is damaged or not this project's: copy it again or train again with --fresh=True"
    )
    first_epoch = int(stage["state"]["epochs_done"]) + 1
    for epoch in range(first_epoch, settings["PRIOR_EPOCHS"] + 1):
        row = train_prior_epoch(strategy, stage, settings, epoch)
        record_prior_epoch(stage, settings, facts, layout, decoder, row)
    earlier = sum(row["seconds"] for row in stage["history"][: first_epoch - 1])
    parameters = finish_prior(stage, settings, layout, parameters, time.time() - started + earlier)
    return class_filter.train(settings, facts, parameters, layout)
