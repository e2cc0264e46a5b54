"""Training machinery shared by cvae_training_224x224.py and cvae_training_448x448.py.

One epoch loop serves every strategy: the default one on a CPU or one GPU,
MirroredStrategy when several GPUs are visible, MultiWorkerMirroredStrategy when TF_CONFIG
names a cluster. The loop calls the model's own `train_step`/`test_step` through
`strategy.run`, because Keras 3's `fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585); the same loop everywhere means the path tested on a CPU is the
path a cluster runs. For the same reason the Keras callbacks are replaced by the few lines
below (checkpoint, CSV row, best weights, early stopping, TensorBoard).

The run folder is `MODELS_DIR/<S>x<S>/`:
    checkpoints/            every finished epoch (weights, optimizer, epoch, best so far) and run_settings.json
    best_epoch_<N>.npz      weights of the best validation epoch so far
    training_history.csv    a row per finished epoch, rewritten atomically
    logs/                   TensorBoard scalars and a sample grid per epoch
    samples_epoch_<N>.png   sample grids every few epochs
and, when training ends, cvae_encoder.keras, cvae_decoder.keras, loss_plot.png and
cvae_parameters.json (written last: its presence marks a finished run), with the latents in
`LATENT_TENSORS_DIR/<S>x<S>/`.

A run killed at any moment resumes from its last checkpoint: history rows after that
checkpoint's epoch are dropped (they will be recomputed), so no epoch is repeated or lost.
Only the chief writes; other workers checkpoint into a temporary folder, because saving a
distributed checkpoint needs every worker to take part.
"""

import csv
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tqdm import tqdm

from cilia_cvae import data, models
from cilia_cvae.config import UserError, check_choice, jsonable
from cilia_cvae.files import atomic_path, move_aside, write_json_atomic, write_png_atomic, write_csv_atomic
from cilia_cvae.preprocessing import size_folder_name

LOSS_TERMS = ("loss", "reconstruction_loss", "kl_loss", "squared_error")
SAMPLE_GRID_COLUMNS = 8
# Settings that may change between a killed run and its resumption without changing what was
# trained so far (more or fewer epochs continue the same run).
SETTINGS_FREE_TO_CHANGE = ("FRESH", "CONTINUE_FINISHED", "SAMPLE_EVERY", "EPOCHS", "MAX_MINUTES")


class TrainingDiverged(SystemExit):
    """A NaN or infinite loss: one line on stderr and exit code 1; the last good checkpoint stays."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# --------------------------------------------------------------------------- devices and strategy

def choose_strategy():
    """TF_CONFIG -> several workers; several GPUs -> mirrored; otherwise the default strategy."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def use_gpu_speedups():
    """mixed_float16 and XLA on a GPU only: on a CPU XLA makes training 2.5-4x slower and
    float16 brings nothing. The loss, the last layer and mean/log-variance stay float32."""
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    if on_gpu:
        keras.mixed_precision.set_global_policy("mixed_float16")
    return on_gpu


def is_chief(strategy):
    return strategy.extended.should_checkpoint


def wait_for_all_workers(strategy):
    """A barrier: a tiny all-reduce that every worker must reach (nothing to wait for on one worker)."""
    if strategy.num_replicas_in_sync > 1:
        strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)


def any_worker(strategy, flag):
    """True if the flag is set on any worker: a decision every worker must take together (each has
    its own clock, and a worker that stopped alone would leave the others waiting in a collective)."""
    if strategy.num_replicas_in_sync == 1:
        return flag
    per_replica = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return float(strategy.reduce(tf.distribute.ReduceOp.MAX, per_replica, axis=None)) > 0


# --------------------------------------------------------------------------- model and data

def build_cvae(strategy, architecture, image_size, num_classes, latent_dim, learning_rate,
               base_channels=12, max_channels=128, seed=None, sample_posterior=True, optimizer=None, map_side=0,
               reconstruction="auto", structural_weight=0.0):
    """Encoder, decoder and the CVAE around them, with its optimizer built, under the strategy's scope.

    The optimizer is Adam(learning_rate) unless one is given (the distribution tests use plain
    SGD, whose update is linear in the gradient, so round-off cannot be amplified by Adam's
    normalisation of near-zero gradients).
    """
    check_choice("ARCHITECTURE", architecture, models.ARCHITECTURES)
    with strategy.scope():
        encoder, decoder = models.build_encoder_and_decoder(
            architecture, image_size, num_classes, latent_dim, base_channels, max_channels, map_side)
        model = models.CVAE(encoder, decoder, reconstruction=models.reconstruction_loss_kind(architecture, reconstruction),
                            sample_posterior=sample_posterior, seed=seed, structural_weight=structural_weight)
        model.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate))
        # Build the optimizer's slots now, inside the scope, rather than lazily inside a replica.
        model.optimizer.build(model.trainable_variables)
    return model


def distributed_training_data(strategy, paths, labels, num_classes, image_size, batch_size, seed, augment, class_balanced):
    """An iterator of distributed batches (every input pipeline reads its own files) and the steps per epoch."""
    def dataset_for_pipeline(context):
        return data.training_dataset(
            paths, labels, num_classes, image_size, context.get_per_replica_batch_size(batch_size),
            seed + context.input_pipeline_id, augment, class_balanced,
            context.input_pipeline_id, context.num_input_pipelines)

    steps_per_epoch = max(1, math.ceil(len(paths) / batch_size))
    return iter(strategy.distribute_datasets_from_function(dataset_for_pipeline)), steps_per_epoch


def distributed_evaluation_data(strategy, paths, labels, num_classes, image_size, batch_size):
    """Every image once, un-augmented, padded so each pipeline runs the same number of steps."""
    # One input pipeline per worker, feeding that worker's local replicas in turn.
    replicas_per_pipeline = 1 if strategy.num_replicas_in_sync == 1 else len(strategy.extended.worker_devices)
    pipelines = strategy.num_replicas_in_sync // replicas_per_pipeline
    per_replica_batch = batch_size // strategy.num_replicas_in_sync

    def dataset_for_pipeline(context):
        return data.evaluation_dataset(
            paths, labels, num_classes, image_size, per_replica_batch,
            context.input_pipeline_id, context.num_input_pipelines, replicas_per_pipeline)

    length = data.padded_length(len(paths), per_replica_batch, pipelines, replicas_per_pipeline)
    steps = length // (per_replica_batch * replicas_per_pipeline)
    return strategy.distribute_datasets_from_function(dataset_for_pipeline), steps


def make_step_functions(model, strategy, jit_compile=False):
    """Compiled train and test steps: each runs the model's step on every replica."""
    replica_train_step = tf.function(model.train_step, jit_compile=jit_compile)
    replica_test_step = tf.function(model.test_step, jit_compile=jit_compile)

    @tf.function
    def train_step(batch):
        strategy.run(replica_train_step, args=(batch,))

    @tf.function
    def test_step(batch):
        strategy.run(replica_test_step, args=(batch,))

    return train_step, test_step


def tracker_results(model):
    # Read in cross-replica context: the trackers' sums and counts are added over all replicas
    # (and workers), so these are exact means over every example of the epoch.
    return {name: float(tracker.result()) for name, tracker in model.trackers.items()}


def kl_weight_for_epoch(epoch, kl_warmup_epochs):
    """Linear KL warm-up: the weight reaches 1 at epoch kl_warmup_epochs (epochs counted from 1)."""
    return 1.0 if kl_warmup_epochs <= 0 else min(1.0, epoch / kl_warmup_epochs)


# --------------------------------------------------------------------------- the run folder

# What a run started before a setting existed ran with.
SETTINGS_ADDED_LATER = {"RECONSTRUCTION_LOSS": "auto", "STRUCTURAL_WEIGHT": 0.0}


def resolved_settings(settings):
    """Settings with "auto" replaced by what it stands for, so that spelling out a default is no change."""
    settings = {**SETTINGS_ADDED_LATER, **settings}
    architecture = settings.get("ARCHITECTURE", "default")
    return dict(settings, RECONSTRUCTION_LOSS=models.reconstruction_loss_kind(architecture, settings["RECONSTRUCTION_LOSS"]),
                STRUCTURAL_WEIGHT=float(settings["STRUCTURAL_WEIGHT"]))


# Where a run's files live is not what the run is: a project moved or copied elsewhere resumes
# there. The data are compared by the preprocessing stage's fingerprint instead of their folder,
# so other images preprocessed into the same folder are refused rather than trained on silently.
RUN_LOCATIONS = ("PROCESSED_IMAGES_DIR", "MODELS_DIR", "LATENT_TENSORS_DIR")


def comparable_settings(settings, data_fingerprint):
    """What must not change within one run: the settings that shape it and the data it learns."""
    kept = {name: value for name, value in jsonable(settings).items()
            if name not in SETTINGS_FREE_TO_CHANGE and name not in RUN_LOCATIONS}
    return resolved_settings(dict(kept, DATA_FINGERPRINT=data_fingerprint))


def changed_settings(recorded, comparable, settings):
    """The names, as the user types them, of what differs from the run's recorded settings."""
    recorded = resolved_settings(recorded)
    current = dict(comparable)
    if "DATA_FINGERPRINT" not in recorded:
        # Recorded before fingerprints were: its data folder stands for its data, as it did then.
        del current["DATA_FINGERPRINT"]
        current["PROCESSED_IMAGES_DIR"] = jsonable(settings)["PROCESSED_IMAGES_DIR"]
    recorded = {name: value for name, value in recorded.items() if name not in ("MODELS_DIR", "LATENT_TENSORS_DIR")}
    changed = sorted(name for name in set(recorded) | set(current) if recorded.get(name) != current.get(name))
    return ", ".join("the preprocessed images (another data fingerprint)" if name == "DATA_FINGERPRINT"
                     else f"--{name.lower()}" for name in changed)


class RunFolder:
    """Paths of one training run and the rules for starting, resuming or refusing it."""

    def __init__(self, models_dir, latent_tensors_dir, image_size):
        self.directory = Path(models_dir) / size_folder_name(image_size)
        self.latent_directory = Path(latent_tensors_dir) / size_folder_name(image_size)
        self.checkpoints = self.directory / "checkpoints"
        self.run_settings = self.checkpoints / "run_settings.json"
        self.history = self.directory / "training_history.csv"
        self.parameters = self.directory / "cvae_parameters.json"
        self.encoder = self.directory / "cvae_encoder.keras"
        self.decoder = self.directory / "cvae_decoder.keras"
        self.loss_plot = self.directory / "loss_plot.png"
        self.logs = self.directory / "logs"

    def best_weights(self, epoch):
        return self.directory / f"best_epoch_{epoch}.npz"

    def samples(self, epoch):
        return self.directory / f"samples_epoch_{epoch}.png"

    def remove_other_best_weights(self, best_epoch):
        """Keep only the best epoch's weights the checkpoint records (a kill may leave a newer one)."""
        for path in self.directory.glob("best_epoch_*.npz"):
            if path != self.best_weights(best_epoch):
                path.unlink()

    def continued_parameters(self):
        return self.checkpoints / "continued_from_parameters.json"

    def prepare(self, settings, data_fingerprint, fresh, continue_finished=False):
        """Refuse a finished run or one with other settings unless fresh; fresh moves it aside;
        continue_finished reopens a finished run with the same settings.

        What is left afterwards is either nothing or an unfinished run with the same settings.
        """
        comparable = comparable_settings(settings, data_fingerprint)
        occupied = [folder for folder in (self.directory, self.latent_directory) if folder.exists() and any(folder.iterdir())]
        if continue_finished and not fresh and self.parameters.exists():
            self.reopen(settings, comparable)
        reason = None
        if self.parameters.exists():
            reason = f"a finished run is in {self.directory}"
        elif occupied and not self.run_settings.exists():
            reason = f"{occupied[0]} already holds files that are not a resumable run"
        elif self.run_settings.exists():
            changed = changed_settings(json.loads(self.run_settings.read_text(encoding="utf-8")), comparable, settings)
            if changed:
                reason = f"the unfinished run in {self.directory} used other settings ({changed})"
        if reason and not fresh:
            raise UserError(f"{reason}; pass --fresh=True to move it aside (nothing is deleted) and start again")
        if reason or (fresh and occupied):
            for folder in occupied:
                print(f"moved the earlier run aside: {folder} -> {move_aside(folder)}")
        if not self.run_settings.exists():
            write_json_atomic(self.run_settings, comparable)

    def reopen(self, settings, comparable):
        """Make a finished run unfinished again, so it resumes from its last checkpoint.

        Its parameters move beside the checkpoints (their training time is added to the new
        total); its models and latents stay usable until the run finishes again and replaces them.
        """
        if not self.run_settings.exists() or not tf.train.latest_checkpoint(str(self.checkpoints)):
            raise UserError(f"the finished run in {self.directory} kept no checkpoint to continue from; "
                            f"pass --fresh=True to start again")
        changed = changed_settings(json.loads(self.run_settings.read_text(encoding="utf-8")), comparable, settings)
        if changed:
            raise UserError(f"the finished run in {self.directory} used other settings ({changed}); "
                            f"continue it with its own or pass --fresh=True to start again")
        epochs_done = json.loads(self.parameters.read_text(encoding="utf-8"))["epochs_done"]
        if epochs_done >= settings["EPOCHS"]:
            raise UserError(f"the finished run in {self.directory} already trained {epochs_done} epochs; "
                            f"raise --epochs above {epochs_done} to continue it")
        os.replace(self.parameters, self.continued_parameters())
        print(f"continuing the finished run in {self.directory} after epoch {epochs_done}")


# --------------------------------------------------------------------------- history and pictures

def read_history(path):
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{key: int(value) if key == "epoch" else float(value) for key, value in row.items()}
                for row in csv.DictReader(handle)]


def write_history(path, rows):
    write_csv_atomic(path, rows, fieldnames=list(rows[0]))


def fixed_sample_inputs(num_classes, latent_dim, seed, columns=SAMPLE_GRID_COLUMNS):
    """The same prior draws for every class and every epoch, so grids show progress, not noise."""
    noise = np.random.default_rng(seed).standard_normal((columns, latent_dim)).astype(np.float32)
    latents = np.tile(noise, (num_classes, 1))
    labels = np.repeat(np.eye(num_classes, dtype=np.float32), columns, axis=0)
    return latents, labels


def reference_images(paths, labels, num_classes, image_size):
    """The first image of each class (black where a class has none) with one-hot labels:
    its reconstruction in every grid shows whether fine detail is being learnt."""
    images = np.zeros((num_classes, image_size, image_size, 1), np.float32)
    for label in range(num_classes):
        if np.any(labels == label):
            path = paths[np.flatnonzero(labels == label)[0]]
            images[label] = data.decode_png(path, image_size).numpy().astype(np.float32) / 255.0
    return images, np.eye(num_classes, dtype=np.float32)


def sample_grid(model, latents, labels, references, num_classes, posterior_draws=False):
    """A uint8 mosaic, one row per class: a reference image, its reconstruction, then the
    decoded fixed prior draws, or, with posterior_draws (a latent map, whose prior draws are
    texture, not cilia), draws around the reference's latent with the same fixed noise."""
    # Direct calls, not predict: predict would run on every replica and, in a multi-worker
    # run, wait for workers that never call it (only the chief draws samples).
    reference, reference_labels = references
    z_mean, z_log_var = model.encoder([reference, reference_labels], training=False)
    reconstructions = model.decoder([z_mean.numpy(), reference_labels], training=False).numpy()
    if posterior_draws:
        columns = len(latents) // num_classes
        latents = (np.repeat(z_mean.numpy(), columns, axis=0)
                   + np.repeat(np.exp(0.5 * z_log_var.numpy()), columns, axis=0) * latents)
    samples = model.decoder([latents, labels], training=False).numpy()
    size = reference.shape[1]
    rows = samples.reshape(num_classes, -1, size, size)
    rows = np.concatenate([reference[:, None, :, :, 0], reconstructions[:, None, :, :, 0], rows], axis=1)
    grid = rows.transpose(0, 2, 1, 3).reshape(num_classes * size, -1)
    return np.clip(grid * 255.0 + 0.5, 0, 255).astype(np.uint8)


def save_sample_figure(path, grid, class_names, epoch, posterior_draws=False):
    from matplotlib import pyplot
    row_height = grid.shape[0] / len(class_names)
    figure, axis = pyplot.subplots(figsize=(grid.shape[1] / row_height * 1.6 + 2.0, len(class_names) * 1.6 + 0.8))
    axis.imshow(grid, cmap="gray", vmin=0, vmax=255)
    axis.set_yticks([(row + 0.5) * row_height for row in range(len(class_names))], class_names)
    axis.set_xticks([(column + 0.5) * row_height for column in range(2)], ["real", "reconstructed"])
    drawn = "draws around its latent" if posterior_draws else "prior samples (same noise in every row)"
    axis.set_title(f"after epoch {epoch}: a real image, its reconstruction, then {drawn}")
    figure.tight_layout()
    with atomic_path(path) as temporary_path:
        figure.savefig(temporary_path, format="png", dpi=100)
    pyplot.close(figure)


def save_loss_plot(path, history):
    from matplotlib import pyplot
    epochs = [row["epoch"] for row in history]
    figure, axes = pyplot.subplots(1, len(LOSS_TERMS), figsize=(4.2 * len(LOSS_TERMS), 3.6))
    for axis, term in zip(axes, LOSS_TERMS):
        axis.plot(epochs, [row[term] for row in history], label="training")
        if f"val_{term}" in history[0]:
            axis.plot(epochs, [row[f"val_{term}"] for row in history], label="validation")
        axis.set_title(term.replace("_", " "))
        axis.set_xlabel("epoch")
        axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary_path:
        figure.savefig(temporary_path, format="png", dpi=100)
    pyplot.close(figure)


# --------------------------------------------------------------------------- the whole run

def check_settings(settings):
    """Refuse values no run can use, naming the setting, before anything is built or written."""
    for name in ("EPOCHS", "BATCH_SIZE", "LATENT_DIM", "LATENT_MAP_CHANNELS", "SAMPLE_EVERY", "BASE_CHANNELS", "MAX_CHANNELS"):
        if settings[name] < 1:
            raise UserError(f"--{name.lower()} must be at least 1, not {settings[name]}")
    for name in ("KL_WARMUP_EPOCHS", "EARLY_STOPPING_PATIENCE", "MAX_MINUTES", "STRUCTURAL_WEIGHT"):
        if not settings[name] >= 0:  # also refuses nan
            raise UserError(f"--{name.lower()} must be 0 or more, not {settings[name]}")
    if not 0 <= settings["VALIDATION_FRACTION"] < 1:
        raise UserError(f"--validation_fraction must be at least 0 and below 1, not {settings['VALIDATION_FRACTION']}")
    if not settings["LEARNING_RATE"] > 0:
        raise UserError(f"--learning_rate must be positive, not {settings['LEARNING_RATE']}")
    check_choice("ARCHITECTURE", settings["ARCHITECTURE"], models.ARCHITECTURES)
    check_choice("RECONSTRUCTION_LOSS", settings["RECONSTRUCTION_LOSS"], models.RECONSTRUCTION_LOSSES)
    try:
        models.check_sizes(settings["ARCHITECTURE"], settings["IMAGE_SIZE"], settings["LATENT_MAP_STRIDE"])
    except ValueError as error:
        raise UserError(str(error)) from None


def train(settings, facts):
    """Train (or resume) the CVAE described by a training script's settings; write every output."""
    started = time.time()
    check_settings(settings)
    image_size = settings["IMAGE_SIZE"]
    class_names = facts["class_names"]
    num_classes = len(class_names)
    if num_classes < 1:
        raise UserError("the preprocessed data holds no classes; run python Scripts/cvae_pre_processing.py again")
    # The strategy first: a multi-worker strategy must be created before anything starts TensorFlow.
    strategy = choose_strategy()
    on_gpu = use_gpu_speedups()
    keras.utils.set_random_seed(settings["SEED"])
    if settings["BATCH_SIZE"] % strategy.num_replicas_in_sync:
        raise UserError(f"--batch_size={settings['BATCH_SIZE']} must be a multiple of the "
                        f"{strategy.num_replicas_in_sync} replicas in sync")
    chief = is_chief(strategy)
    run = RunFolder(settings["MODELS_DIR"], settings["LATENT_TENSORS_DIR"], image_size)
    if chief:
        run.prepare(settings, facts["fingerprint"], settings["FRESH"], settings["CONTINUE_FINISHED"])
    # The other workers look for a checkpoint to resume from only once the chief has refused,
    # moved aside or accepted what the run folder holds.
    wait_for_all_workers(strategy)

    all_paths, all_labels = data.list_training_images(settings["PROCESSED_IMAGES_DIR"], image_size, class_names)
    training_paths, training_labels, validation_paths, validation_labels = data.hold_out_validation(
        all_paths, all_labels, settings["VALIDATION_FRACTION"], settings["SEED"])
    print(f"{len(training_paths)} training and {len(validation_paths)} validation images of {num_classes} classes "
          f"at {image_size}x{image_size}; {strategy.num_replicas_in_sync} replica(s)")

    # The original architecture always has a latent vector; ours a latent map unless the stride is 0.
    map_stride = settings["LATENT_MAP_STRIDE"] if settings["ARCHITECTURE"] == "default" else 0
    map_side = models.latent_map_side(image_size, map_stride)
    latent_dim = models.latent_length(image_size, settings["LATENT_DIM"], map_stride, settings["LATENT_MAP_CHANNELS"])
    model = build_cvae(strategy, settings["ARCHITECTURE"], image_size, num_classes, latent_dim,
                       settings["LEARNING_RATE"], settings["BASE_CHANNELS"], settings["MAX_CHANNELS"], settings["SEED"],
                       map_side=map_side, reconstruction=settings["RECONSTRUCTION_LOSS"],
                       structural_weight=settings["STRUCTURAL_WEIGHT"])
    train_step, test_step = make_step_functions(model, strategy, jit_compile=on_gpu)
    has_validation = len(validation_paths) > 0
    if has_validation:
        validation_batches, validation_steps = distributed_evaluation_data(
            strategy, validation_paths, validation_labels, num_classes, image_size, settings["BATCH_SIZE"])

    # Everything a resumed run needs besides the weights travels in the same checkpoint, so
    # the epoch counter and the best-so-far can never disagree with the weights they describe.
    state = {
        "epochs_done": tf.Variable(0, dtype=tf.int64),
        "best_value": tf.Variable(np.inf, dtype=tf.float64),
        "best_epoch": tf.Variable(0, dtype=tf.int64),
        "epochs_without_improvement": tf.Variable(0, dtype=tf.int64),
    }
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, **state)
    checkpoint_dir = run.checkpoints if chief else Path(tempfile.mkdtemp(prefix="cvae_worker_checkpoint_"))
    manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=2)
    latest_checkpoint = tf.train.latest_checkpoint(str(run.checkpoints))
    if latest_checkpoint:
        checkpoint.restore(latest_checkpoint).expect_partial()
        print(f"resuming after epoch {int(state['epochs_done'])} from {run.checkpoints}")
    epochs_done = int(state["epochs_done"])
    # Rows of epochs after the checkpoint's are recomputed, so they are dropped, not repeated.
    history = [row for row in read_history(run.history) if row["epoch"] <= epochs_done] if chief else []
    if chief:
        run.remove_other_best_weights(int(state["best_epoch"]))
    # A resumed run continues with a new shuffle, not the first epochs' order again.
    training_batches, steps_per_epoch = distributed_training_data(
        strategy, training_paths, training_labels, num_classes, image_size, settings["BATCH_SIZE"],
        settings["SEED"] + epochs_done, settings["AUGMENT"], settings["CLASS_BALANCED"])

    sample_latents, sample_labels = fixed_sample_inputs(num_classes, latent_dim, settings["SEED"])
    references = reference_images(*((validation_paths, validation_labels) if has_validation else (training_paths, training_labels)),
                                  num_classes, image_size)
    summary_writer = tf.summary.create_file_writer(str(run.logs)) if chief else None
    patience = settings["EARLY_STOPPING_PATIENCE"]

    def stopped_early():
        return (patience > 0 and int(state["epochs_without_improvement"]) >= patience
                and int(state["epochs_done"]) > settings["KL_WARMUP_EPOCHS"])

    # A time budget stops before an epoch that would overrun it, judged by the slowest epoch so far
    # (training, validation, checkpoint and pictures); every run does at least one epoch, so a
    # budget too small still leaves a model. A killed run, resumed, gets the budget afresh; a run
    # the budget ended is finished like any other.
    budget_seconds = settings["MAX_MINUTES"] * 60
    slowest_epoch_seconds = 0.0
    out_of_time = False

    for epoch in range(epochs_done + 1, settings["EPOCHS"] + 1):
        if stopped_early():
            break
        if budget_seconds and epoch > epochs_done + 1 and any_worker(
                strategy, time.time() - started + slowest_epoch_seconds > budget_seconds):
            out_of_time = True
            break
        epoch_started = time.time()
        model.kl_weight.assign(kl_weight_for_epoch(epoch, settings["KL_WARMUP_EPOCHS"]))
        model.reset_metrics()
        for _ in tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{settings['EPOCHS']}", disable=not chief or not sys.stdout.isatty(),
                      leave=False, file=sys.stdout, mininterval=5):
            train_step(next(training_batches))
        row = {"epoch": epoch, **tracker_results(model)}
        if not all(math.isfinite(row[term]) for term in LOSS_TERMS):
            kept = f"the last good checkpoint (epoch {epoch - 1}) is kept in {run.checkpoints}" if epoch > 1 else "no epoch finished"
            raise TrainingDiverged(f"the training loss became {row['loss']} in epoch {epoch}; {kept}; "
                                   f"lower --learning_rate and start again with --fresh=True")
        if has_validation:
            model.reset_metrics()
            validation_iterator = iter(validation_batches)
            for _ in range(validation_steps):
                test_step(next(validation_iterator))
            row.update({f"val_{name}": value for name, value in tracker_results(model).items()})
        row["kl_weight"] = float(model.kl_weight.numpy())
        row["seconds"] = round(time.time() - epoch_started, 2)
        # Checkpoints are chosen on the full negative ELBO (reconstruction + KL at weight 1):
        # unlike the loss it does not change meaning while the KL weight warms up.
        prefix = "val_" if has_validation else ""
        monitored = row[f"{prefix}reconstruction_loss"] + row[f"{prefix}kl_loss"]
        improved = math.isfinite(monitored) and monitored < float(state["best_value"])
        if improved:
            state["best_value"].assign(monitored)
            state["best_epoch"].assign(epoch)
            state["epochs_without_improvement"].assign(0)
            if chief:
                with atomic_path(run.best_weights(epoch)) as temporary_path:
                    np.savez(temporary_path, *model.get_weights())
        else:
            state["epochs_without_improvement"].assign_add(1)
        state["epochs_done"].assign(epoch)
        history.append(row)
        if chief:
            write_history(run.history, history)
        manager.save(checkpoint_number=epoch)
        if chief:
            run.remove_other_best_weights(int(state["best_epoch"]))
            report_epoch(run, model, row, summary_writer, sample_latents, sample_labels, references, class_names,
                         sample_png=(epoch % settings["SAMPLE_EVERY"] == 0 or epoch == settings["EPOCHS"]),
                         posterior_draws=map_side > 0)
        slowest_epoch_seconds = max(slowest_epoch_seconds, time.time() - epoch_started)
    if not chief:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return None
    if stopped_early():
        print(f"stopped early: no improvement for {patience} epochs")
    if out_of_time:
        print(f"stopped after epoch {int(state['epochs_done'])}: another epoch would pass --max_minutes={settings['MAX_MINUTES']}")
    return finish(run, model, settings, facts, history, int(state["best_epoch"]), all_paths, all_labels,
                  strategy, time.time() - started)


def _plugin_metadata(plugin_name):
    # tf.summary.scalar and tf.summary.image need the tensorboard package; these raw summaries
    # need only TensorFlow and are read by TensorBoard the same way.
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin_name
    return metadata.SerializeToString()


def report_epoch(run, model, row, summary_writer, sample_latents, sample_labels, references, class_names, sample_png,
                 posterior_draws=False):
    epoch = int(row["epoch"])
    shown = "  ".join(f"{name} {value:.5g}" for name, value in row.items() if name != "epoch")
    print(f"epoch {epoch}: {shown}", flush=True)
    grid = sample_grid(model, sample_latents, sample_labels, references, len(class_names), posterior_draws)
    with summary_writer.as_default(step=epoch):
        for name, value in row.items():
            if name != "epoch":
                tf.summary.write(name, tf.constant(value, tf.float32), metadata=_plugin_metadata("scalars"))
        # The images plugin's layout: width, height, then the encoded images.
        encoded = tf.io.encode_png(grid[:, :, None])
        tf.summary.write("samples", tf.stack([tf.as_string(grid.shape[1]), tf.as_string(grid.shape[0]), encoded]),
                         metadata=_plugin_metadata("images"))
    summary_writer.flush()
    if sample_png:
        save_sample_figure(run.samples(epoch), grid, class_names, epoch, posterior_draws)


def encode_training_images(encoder, paths, labels, num_classes, image_size, batch_size):
    """z_mean and z_log_var of every image of the train split, un-augmented, in file order."""
    encode = tf.function(lambda images, one_hot: encoder([images, one_hot], training=False))
    means, log_variances = [], []
    for images, one_hot in data.images_in_order(paths, labels, num_classes, image_size, batch_size):
        z_mean, z_log_var = encode(images, one_hot)
        means.append(z_mean.numpy())
        log_variances.append(z_log_var.numpy())
    return np.concatenate(means).astype(np.float32), np.concatenate(log_variances).astype(np.float32)


def library_versions():
    import matplotlib
    import pandas
    import PIL
    import sklearn
    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "pandas": pandas.__version__,
            "matplotlib": matplotlib.__version__, "scikit-learn": sklearn.__version__}


def finish(run, model, settings, facts, history, best_epoch, all_paths, all_labels, strategy, seconds):
    """Save the best epoch's encoder and decoder, the latents, the loss plot, then the parameters."""
    if best_epoch > 0:
        with np.load(run.best_weights(best_epoch), allow_pickle=False) as saved:
            model.set_weights([saved[f"arr_{index}"] for index in range(len(saved.files))])
    for network, path in ((model.encoder, run.encoder), (model.decoder, run.decoder)):
        with atomic_path(path) as temporary_path:
            network.save(temporary_path)
    class_names = facts["class_names"]
    z_mean, z_log_var = encode_training_images(model.encoder, all_paths, all_labels, len(class_names),
                                               settings["IMAGE_SIZE"], settings["BATCH_SIZE"])
    for label, class_name in enumerate(class_names):
        for name, values in (("z_mean", z_mean), ("z_log_var", z_log_var)):
            with atomic_path(run.latent_directory / f"{name}_{class_name}.npy") as temporary_path:
                np.save(temporary_path, values[all_labels == label], allow_pickle=False)
    save_loss_plot(run.loss_plot, history)
    # A continued run's time counts from its first epoch, not from the continuation.
    continued = run.continued_parameters()
    earlier_seconds = json.loads(continued.read_text(encoding="utf-8"))["training_seconds"] if continued.exists() else 0.0
    best_row = next(row for row in history if row["epoch"] == best_epoch) if best_epoch else history[-1]
    parameters = {
        "settings": jsonable(settings),
        "architecture": settings["ARCHITECTURE"],
        "reconstruction_loss": models.reconstruction_loss_kind(settings["ARCHITECTURE"], settings["RECONSTRUCTION_LOSS"]),
        "structural_weight": settings["STRUCTURAL_WEIGHT"],
        "class_names": class_names,
        "image_size": settings["IMAGE_SIZE"],
        "resize_mode": facts["resize_mode"],
        "latent_dim": int(model.decoder.inputs[0].shape[-1]),
        "latent_map_side": models.latent_map_side(settings["IMAGE_SIZE"], settings["LATENT_MAP_STRIDE"])
        if settings["ARCHITECTURE"] == "default" else 0,
        "epochs_done": int(history[-1]["epoch"]),
        "best_epoch": best_epoch,
        "final_losses": {"best_epoch": best_row, "last_epoch": history[-1]},
        "training_images": int(len(all_paths)),
        "latents": "z_mean_<Class>.npy / z_log_var_<Class>.npy: every train-split image of the class "
                   "(validation images included), un-augmented, in file-name order",
        "data_fingerprint": facts["fingerprint"],
        "encoder_parameters": int(model.encoder.count_params()),
        "decoder_parameters": int(model.decoder.count_params()),
        "replicas": strategy.num_replicas_in_sync,
        "training_seconds": round(seconds + earlier_seconds, 1),
        "library_versions": library_versions(),
    }
    write_json_atomic(run.parameters, parameters)
    continued.unlink(missing_ok=True)
    print(f"saved the encoder and decoder of epoch {best_epoch} in {run.directory} and the latents in {run.latent_directory}")
    return parameters
