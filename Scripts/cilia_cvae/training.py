"""Training shared by cvae_training_224x224.py and cvae_training_448x448.py: the story of one run.

    train(settings, facts)
        session = start_or_resume(...)      the run folder, the model, the data, the last checkpoint
        for each epoch still to train:
            reason_to_stop(...)             early stopping, or the time budget
            train_one_epoch(...)            the model's own train_step on every replica
            check_finite(...)               a NaN loss stops the run; the last good checkpoint stays
            validate(...)                   the held-out images, un-augmented
            keep_best(...)                  the best full negative ELBO so far, and its weights
            record_epoch(...)               the checkpoint, the history row, TensorBoard, a sample grid
        finish(...)                         the best epoch's encoder, decoder and latents, then the parameters

One epoch loop serves every strategy: the default one on a CPU or one GPU, MirroredStrategy
when several GPUs are visible, MultiWorkerMirroredStrategy when TF_CONFIG names a cluster.
The loop calls the model's own `train_step`/`test_step` through `strategy.run`, because
Keras 3's `fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585); the same
loop everywhere means the path tested on a CPU is the path a cluster runs. For the same
reason the Keras callbacks are replaced by the few functions below.

A run killed at any moment resumes from its last checkpoint: history rows after that
checkpoint's epoch are dropped (they will be recomputed), so no epoch is repeated or lost.
Only the chief writes; other workers checkpoint into a temporary folder, because saving a
distributed checkpoint needs every worker to take part. The rules that decide whether a run
may resume are in runs.py; the file names in layout.py.

Why one file: the epoch loop, its checkpoints, the kill-and-resume record and the replicas'
strategy share one run's state; the settings checks live in training_settings.py, the run
records in runs.py.
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
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tqdm import tqdm

from cilia_cvae import adversarial, data, figures, grain, locks, models, runs
from cilia_cvae.config import UserError, jsonable
from cilia_cvae.files import atomic_path, sha256_of_file, write_csv_atomic, write_json_atomic
from cilia_cvae.layout import RunLayout
from cilia_cvae.model_config import ModelConfig
from cilia_cvae.training_settings import check_settings

LOSS_TERMS = ("loss", "reconstruction_loss", "kl_loss", "squared_error")
SAMPLE_GRID_COLUMNS = 8
# The grain model is measured on at most this many train-split crops (their residuals' spectrum and
# strength settle well before; 1,000 at 224 take about 10 s).
GRAIN_IMAGES = 1000


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


def build_cvae(
    strategy,
    model_config,
    *,
    learning_rate,
    seed=None,
    sample_posterior=True,
    optimizer=None,
    adversarial_weight=0.0,
):
    """Encoder, decoder and the CVAE around them, with its optimizer built, under the strategy's scope.

    The optimizer is Adam(learning_rate) unless one is given (the distribution tests use plain
    SGD, whose update is linear in the gradient, so round-off cannot be amplified by Adam's
    normalisation of near-zero gradients).
    """
    with strategy.scope():
        encoder, decoder = models.build_encoder_and_decoder(model_config)
        model = models.CVAE(
            encoder,
            decoder,
            reconstruction=model_config.reconstruction,
            sample_posterior=sample_posterior,
            seed=seed,
            structural_weight=model_config.structural_weight,
            adversarial_weight=adversarial_weight,
        )
        model.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate))
        # Build the optimizers' slots now, inside the scope, rather than lazily inside a replica.
        model.optimizer.build(model.generator_variables)
        if model.discriminator is not None:
            model.discriminator_optimizer = adversarial.discriminator_optimizer(learning_rate)
            model.discriminator_optimizer.build(model.discriminator.trainable_weights)
    return model


def distributed_training_data(
    strategy, paths, labels, *, num_classes, image_size, batch_size, seed, augment, class_balanced
):
    """An iterator of distributed batches (every input pipeline reads its own files) and the steps per epoch."""

    def dataset_for_pipeline(context):
        return data.training_dataset(
            paths,
            labels,
            num_classes,
            image_size,
            context.get_per_replica_batch_size(batch_size),
            seed + context.input_pipeline_id,
            augment,
            class_balanced,
            context.input_pipeline_id,
            context.num_input_pipelines,
        )

    steps_per_epoch = max(1, math.ceil(len(paths) / batch_size))
    return iter(strategy.distribute_datasets_from_function(dataset_for_pipeline)), steps_per_epoch


def distributed_evaluation_data(strategy, paths, labels, *, num_classes, image_size, batch_size):
    """Every image once, un-augmented, padded so each pipeline runs the same number of steps."""
    # One input pipeline per worker, feeding that worker's local replicas in turn.
    replicas_per_pipeline = 1 if strategy.num_replicas_in_sync == 1 else len(strategy.extended.worker_devices)
    pipelines = strategy.num_replicas_in_sync // replicas_per_pipeline
    per_replica_batch = batch_size // strategy.num_replicas_in_sync

    def dataset_for_pipeline(context):
        return data.evaluation_dataset(
            paths,
            labels,
            num_classes,
            image_size,
            per_replica_batch,
            context.input_pipeline_id,
            context.num_input_pipelines,
            replicas_per_pipeline,
        )

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


def kl_weight_for_epoch(epoch, kl_warmup_epochs, kl_weight=1.0):
    """Linear KL warm-up: the weight reaches kl_weight at epoch kl_warmup_epochs (epochs counted from 1)."""
    return kl_weight if kl_warmup_epochs <= 0 else kl_weight * min(1.0, epoch / kl_warmup_epochs)


# --------------------------------------------------------------------------- history and fixed sample inputs


def read_history(path):
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [
            {key: int(value) if key == "epoch" else float(value) for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]


def write_history(path, rows):
    # Every column any row has, in the order they first appear: a run resumed by a newer
    # version may add one.
    write_csv_atomic(path, rows, fieldnames=list(dict.fromkeys(name for row in rows for name in row)))


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


# --------------------------------------------------------------------------- starting or resuming a run


@dataclass
class Session:
    """Everything one run in progress needs, built once by start_or_resume."""

    settings: dict
    facts: dict
    strategy: object
    chief: bool
    on_gpu: bool
    layout: RunLayout
    model_config: ModelConfig
    model: object = None
    train_step: object = None
    test_step: object = None
    all_images: tuple = ()  # (paths, labels) of the whole train split: what the latents are computed from
    training_images: tuple = ()
    validation_images: tuple = ()
    validation_batches: object = None
    validation_steps: int = 0
    training_batches: object = None
    steps_per_epoch: int = 0
    state: dict = field(default_factory=dict)  # travels in the checkpoint with the weights
    manager: object = None
    checkpoint_dir: Path = None
    history: list = field(default_factory=list)
    sample_inputs: tuple = ()
    references: tuple = ()
    summary_writer: object = None
    slowest_epoch_seconds: float = 0.0

    @property
    def epochs_done(self):
        return int(self.state["epochs_done"])

    @property
    def has_validation(self):
        return len(self.validation_images[0]) > 0


def start_strategy(settings, facts):
    """The strategy, the run folder accepted (or refused) by the chief, and the model's configuration."""
    model_config = check_settings(settings, len(facts["class_names"]))
    # The strategy first: a multi-worker strategy must be created before anything starts TensorFlow.
    strategy = choose_strategy()
    on_gpu = use_gpu_speedups()  # before any model is built: it sets the global precision policy
    keras.utils.set_random_seed(settings["SEED"])
    if settings["BATCH_SIZE"] % strategy.num_replicas_in_sync:
        raise UserError(
            f"--batch_size={settings['BATCH_SIZE']} must be a multiple of the "
            f"{strategy.num_replicas_in_sync} replicas in sync"
        )
    chief = is_chief(strategy)
    layout = RunLayout(settings["MODELS_DIR"], settings["LATENT_TENSORS_DIR"], settings["IMAGE_SIZE"])
    if chief:
        # One training per run folder: a second one started into it is refused, naming the first.
        for folder in (layout.directory, layout.latent_directory):
            locks.hold_folder_lock(folder)
        runs.prepare_run(layout, settings, facts["fingerprint"])
    # The other workers look for a checkpoint to resume from only once the chief has refused,
    # moved aside or accepted what the run folder holds.
    wait_for_all_workers(strategy)
    return Session(
        settings=settings,
        facts=facts,
        strategy=strategy,
        chief=chief,
        on_gpu=on_gpu,
        layout=layout,
        model_config=model_config,
    )


def split_images(session):
    """The train split's images, and the validation images held out of it."""
    settings, image_size = session.settings, session.model_config.image_size
    all_paths, all_labels = data.list_training_images(
        settings["PROCESSED_IMAGES_DIR"], image_size, session.facts["class_names"]
    )
    training_paths, training_labels, validation_paths, validation_labels = data.hold_out_validation(
        all_paths, all_labels, settings["VALIDATION_FRACTION"], settings["SEED"], session.facts["class_names"]
    )
    session.all_images = (all_paths, all_labels)
    session.training_images = (training_paths, training_labels)
    session.validation_images = (validation_paths, validation_labels)
    print(
        f"{len(training_paths)} training and {len(validation_paths)} validation images of "
        f"{session.model_config.num_classes} classes at {image_size}x{image_size}; "
        f"{session.strategy.num_replicas_in_sync} replica(s)"
    )


def restore_checkpoint(session):
    """The epoch counter and best-so-far travel in the same checkpoint as the weights, so they can
    never disagree with the weights they describe; resume from the latest one there is."""
    session.state = {
        "epochs_done": tf.Variable(0, dtype=tf.int64),
        "best_value": tf.Variable(np.inf, dtype=tf.float64),
        "best_epoch": tf.Variable(0, dtype=tf.int64),
        "epochs_without_improvement": tf.Variable(0, dtype=tf.int64),
        # The history rows up to the checkpoint's epoch, as JSON: the checkpoint and its rows
        # become durable in one write, so a kill between two writes cannot rewrite a row.
        "history_json": tf.Variable("", dtype=tf.string),
    }
    layout = session.layout
    # The discriminator's weights are the model's; its optimizer is named too, so both resume.
    discriminator = (
        {"discriminator_optimizer": session.model.discriminator_optimizer}
        if session.model.discriminator is not None
        else {}
    )
    checkpoint = tf.train.Checkpoint(
        model=session.model, optimizer=session.model.optimizer, **discriminator, **session.state
    )
    session.checkpoint_dir = (
        layout.checkpoints if session.chief else Path(tempfile.mkdtemp(prefix="cvae_worker_checkpoint_"))
    )
    session.manager = tf.train.CheckpointManager(checkpoint, str(session.checkpoint_dir), max_to_keep=2)
    latest_checkpoint = tf.train.latest_checkpoint(str(layout.checkpoints))
    if latest_checkpoint:
        checkpoint.restore(latest_checkpoint).expect_partial()
        print(f"resuming after epoch {session.epochs_done} from {layout.checkpoints}")
    if session.chief:
        session.history = checkpointed_history(session)
        if session.history:
            write_history(layout.history, session.history)
        runs.remove_other_best_weights(layout, int(session.state["best_epoch"]))


def start_or_resume(settings, facts):
    """A run ready for its next epoch: a new one, or a killed or continued one from its checkpoint."""
    session = start_strategy(settings, facts)
    split_images(session)
    model_config, strategy = session.model_config, session.strategy
    sizes = {
        "num_classes": model_config.num_classes,
        "image_size": model_config.image_size,
        "batch_size": settings["BATCH_SIZE"],
    }
    session.model = build_cvae(
        strategy,
        model_config,
        learning_rate=settings["LEARNING_RATE"],
        seed=settings["SEED"],
        adversarial_weight=settings.get("ADVERSARIAL_WEIGHT", 0.0),
    )
    session.train_step, session.test_step = make_step_functions(
        session.model, strategy, jit_compile=session.on_gpu
    )
    if session.has_validation:
        session.validation_batches, session.validation_steps = distributed_evaluation_data(
            strategy, *session.validation_images, **sizes
        )
    restore_checkpoint(session)
    # A resumed run continues with a new shuffle, not the first epochs' order again.
    session.training_batches, session.steps_per_epoch = distributed_training_data(
        strategy,
        *session.training_images,
        **sizes,
        seed=settings["SEED"] + session.epochs_done,
        augment=settings["AUGMENT"],
        class_balanced=settings["CLASS_BALANCED"],
    )
    session.sample_inputs = fixed_sample_inputs(
        model_config.num_classes, model_config.latent_length, settings["SEED"]
    )
    shown = session.validation_images if session.has_validation else session.training_images
    session.references = reference_images(*shown, model_config.num_classes, model_config.image_size)
    session.summary_writer = (
        tf.summary.create_file_writer(str(session.layout.logs)) if session.chief else None
    )
    return session


# --------------------------------------------------------------------------- one epoch


def stopped_early(session):
    patience = session.settings["EARLY_STOPPING_PATIENCE"]
    return (
        patience > 0
        and int(session.state["epochs_without_improvement"]) >= patience
        and session.epochs_done > session.settings["KL_WARMUP_EPOCHS"]
    )


def out_of_time(session, epoch, first_epoch, started):
    """A time budget stops before an epoch that would overrun it, judged by the slowest epoch so far
    (training, validation, checkpoint and pictures). Every run does at least one epoch, so a budget
    too small still leaves a model; a killed run, resumed, gets the budget afresh."""
    budget_seconds = session.settings["MAX_MINUTES"] * 60
    if not budget_seconds or epoch == first_epoch:
        return False
    return any_worker(
        session.strategy, time.time() - started + session.slowest_epoch_seconds > budget_seconds
    )


def adversarial_epoch(settings, epoch):
    """Whether the patch discriminator's loss trains the decoder in this epoch (after its warm-up)."""
    return settings.get("ADVERSARIAL_WEIGHT", 0.0) > 0 and epoch >= settings.get("ADVERSARIAL_START_EPOCH", 1)


def train_one_epoch(session, epoch):
    """The training losses of one epoch: its mean over every example, on every replica."""
    model = session.model
    if adversarial_epoch(session.settings, epoch) != model.adversarial_active:
        # The step changes shape (a discriminator joins it): traced again, once.
        model.adversarial_active = adversarial_epoch(session.settings, epoch)
        session.train_step, session.test_step = make_step_functions(
            model, session.strategy, jit_compile=session.on_gpu
        )
    model.kl_weight.assign(
        kl_weight_for_epoch(epoch, session.settings["KL_WARMUP_EPOCHS"], session.settings["KL_WEIGHT"])
    )
    model.reset_metrics()
    progress = tqdm(
        range(session.steps_per_epoch),
        desc=f"epoch {epoch}/{session.settings['EPOCHS']}",
        disable=not session.chief or not sys.stdout.isatty(),
        leave=False,
        file=sys.stdout,
        mininterval=5,
    )
    for _ in progress:
        session.train_step(next(session.training_batches))
    return {"epoch": epoch, **tracker_results(model)}


def check_finite(session, row, epoch):
    if not all(math.isfinite(row[term]) for term in LOSS_TERMS):
        kept = (
            f"the last good checkpoint (epoch {epoch - 1}) is kept in {session.layout.checkpoints}"
            if epoch > 1
            else "no epoch finished"
        )
        raise TrainingDiverged(
            f"the training loss became {row['loss']} in epoch {epoch}; {kept}; "
            f"lower --learning_rate and start again with --fresh=True"
        )


def validate(session):
    """The validation losses (val_<term>), or nothing when no images are held out."""
    if not session.has_validation:
        return {}
    session.model.reset_metrics()
    validation_iterator = iter(session.validation_batches)
    for _ in range(session.validation_steps):
        session.test_step(next(validation_iterator))
    # The adversarial terms are training's alone: a validation step computes none of them.
    return {
        f"val_{name}": value for name, value in tracker_results(session.model).items() if name in LOSS_TERMS
    }


def keep_best(session, row, epoch):
    """Checkpoints are chosen on the full negative ELBO (reconstruction + KL at weight 1): unlike the
    loss it does not change meaning while the KL weight warms up."""
    state, prefix = session.state, "val_" if session.has_validation else ""
    monitored = row[f"{prefix}reconstruction_loss"] + row[f"{prefix}kl_loss"]
    settings = session.settings
    # With the adversarial loss, only epochs it trained count: the ELBO prefers the blur it removes.
    eligible = not adversarial_epoch(settings, settings["EPOCHS"]) or adversarial_epoch(settings, epoch)
    if eligible and math.isfinite(monitored) and monitored < float(state["best_value"]):
        state["best_value"].assign(monitored)
        state["best_epoch"].assign(epoch)
        state["epochs_without_improvement"].assign(0)
        if session.chief:
            with atomic_path(session.layout.best_weights(epoch)) as temporary_path:
                np.savez(temporary_path, *session.model.get_weights())
    else:
        state["epochs_without_improvement"].assign_add(1)


# Tests set this to an epoch number to kill the run right after that epoch's checkpoint, before
# anything else of the epoch is written: the instant a real kill is least likely to hit by timing.
CRASH_AFTER_CHECKPOINT_VARIABLE = "CILIA_CVAE_CRASH_AFTER_CHECKPOINT"


def crash_for_test(epoch):
    if os.environ.get(CRASH_AFTER_CHECKPOINT_VARIABLE) == str(epoch):
        os._exit(137)


def checkpointed_history(session):
    """The history rows of the restored checkpoint's epochs, exactly as they were first recorded.

    Rows after the checkpoint's epoch are recomputed, so they are dropped, not repeated. A
    checkpoint written before rows travelled with it takes its rows from the history file."""
    recorded = session.state["history_json"].numpy().decode("utf-8")
    if recorded:
        return json.loads(recorded)
    return [row for row in read_history(session.layout.history) if row["epoch"] <= session.epochs_done]


def record_epoch(session, row, epoch):
    """The checkpoint with the epoch's history row in it, then (chief only) the history file, the
    console line, TensorBoard and a sample grid."""
    session.state["epochs_done"].assign(epoch)
    session.history.append(row)
    session.state["history_json"].assign(json.dumps(session.history))
    session.manager.save(checkpoint_number=epoch)
    crash_for_test(epoch)
    if session.chief:
        write_history(session.layout.history, session.history)
        runs.remove_other_best_weights(session.layout, int(session.state["best_epoch"]))
        report_epoch(session, row)


def _plugin_metadata(plugin_name):
    # tf.summary.scalar and tf.summary.image need the tensorboard package; these raw summaries
    # need only TensorFlow and are read by TensorBoard the same way.
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin_name
    return metadata.SerializeToString()


def report_epoch(session, row):
    epoch = int(row["epoch"])
    shown = "  ".join(f"{name} {value:.5g}" for name, value in row.items() if name != "epoch")
    print(f"epoch {epoch}: {shown}", flush=True)
    # A latent map's prior draws are texture, not cilia, so its grid shows draws around each reference.
    posterior_draws = session.model_config.map_side > 0
    class_names = session.facts["class_names"]
    grid = figures.sample_grid(
        session.model,
        *session.sample_inputs,
        session.references,
        len(class_names),
        posterior_draws=posterior_draws,
    )
    with session.summary_writer.as_default(step=epoch):
        for name, value in row.items():
            if name != "epoch":
                tf.summary.write(name, tf.constant(value, tf.float32), metadata=_plugin_metadata("scalars"))
        # The images plugin's layout: width, height, then the encoded images.
        encoded = tf.io.encode_png(grid[:, :, None])
        tf.summary.write(
            "samples",
            tf.stack([tf.as_string(grid.shape[1]), tf.as_string(grid.shape[0]), encoded]),
            metadata=_plugin_metadata("images"),
        )
    session.summary_writer.flush()
    if epoch % session.settings["SAMPLE_EVERY"] == 0 or epoch == session.settings["EPOCHS"]:
        figures.save_sample_figure(session.layout.samples(epoch), grid, class_names, epoch, posterior_draws)


# --------------------------------------------------------------------------- the whole run


def train(settings, facts):
    """Train (or resume) the CVAE described by a training script's settings; write every output."""
    layout = RunLayout(settings["MODELS_DIR"], settings["LATENT_TENSORS_DIR"], settings["IMAGE_SIZE"])
    runs.lock_run(layout, settings, facts)
    kept = runs.finished_run_to_keep(layout, settings, facts["fingerprint"])
    if kept is not None:
        return kept
    started = time.time()
    session = start_or_resume(settings, facts)
    first_epoch = session.epochs_done + 1
    stopped_for_time = False
    with data.naming_damaged_images(session.all_images[0]):
        for epoch in range(first_epoch, settings["EPOCHS"] + 1):
            if stopped_early(session):
                break
            if out_of_time(session, epoch, first_epoch, started):
                stopped_for_time = True
                break
            epoch_started = time.time()
            row = train_one_epoch(session, epoch)
            check_finite(session, row, epoch)
            row.update(validate(session))
            row["kl_weight"] = float(session.model.kl_weight.numpy())
            row["seconds"] = round(time.time() - epoch_started, 2)
            keep_best(session, row, epoch)
            record_epoch(session, row, epoch)
            session.slowest_epoch_seconds = max(session.slowest_epoch_seconds, time.time() - epoch_started)
    if not session.chief:
        shutil.rmtree(session.checkpoint_dir, ignore_errors=True)
        return None
    if stopped_early(session):
        print(f"stopped early: no improvement for {settings['EARLY_STOPPING_PATIENCE']} epochs")
    if stopped_for_time:
        print(
            f"stopped after epoch {session.epochs_done}: another epoch would pass "
            f"--max_minutes={settings['MAX_MINUTES']}"
        )
    return finish(session, time.time() - started)


# --------------------------------------------------------------------------- saving the finished run


def encode_training_images(encoder, paths, labels, *, num_classes, image_size, batch_size):
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

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pandas": pandas.__version__,
        "matplotlib": matplotlib.__version__,
        "scikit-learn": sklearn.__version__,
    }


def save_models_and_latents(session, best_epoch):
    """The best epoch's encoder and decoder, and the latents of every train-split image under them;
    returns the run fingerprint that ties them together."""
    model, layout = session.model, session.layout
    if best_epoch > 0:
        with np.load(layout.best_weights(best_epoch), allow_pickle=False) as saved:
            model.set_weights([saved[f"arr_{index}"] for index in range(len(saved.files))])
    for network, path in ((model.encoder, layout.encoder), (model.decoder, layout.decoder)):
        with atomic_path(path) as temporary_path:
            network.save(temporary_path)
    all_paths, all_labels = session.all_images
    z_mean, z_log_var = encode_training_images(
        model.encoder,
        all_paths,
        all_labels,
        num_classes=session.model_config.num_classes,
        image_size=session.model_config.image_size,
        batch_size=session.settings["BATCH_SIZE"],
    )
    hashes = {}
    for label, class_name in enumerate(session.facts["class_names"]):
        for name, values in (("z_mean", z_mean), ("z_log_var", z_log_var)):
            path = layout.latent(name, class_name)
            with atomic_path(path) as temporary_path:
                np.save(temporary_path, values[all_labels == label], allow_pickle=False)
            hashes[path.name] = sha256_of_file(path)
    hashes[layout.encoder.name] = sha256_of_file(layout.encoder)  # the prior stage encodes with it
    # The decoder's hash names the run: inference refuses latents or a decoder of another run.
    run_fingerprint = sha256_of_file(layout.decoder)[:16]
    write_json_atomic(layout.latent_record, {"run_fingerprint": run_fingerprint, "sha256": hashes})
    return run_fingerprint


def fit_grain_model(encoder, decoder, paths, labels, *, num_classes, image_size, batch_size, run_fingerprint):
    """What the decoder averages away: residuals of train-split crops against their reconstructions
    (the posterior mean decoded), as grain.py's model; the file names the run it was measured on."""
    chosen = np.random.default_rng(0).permutation(len(paths))[:GRAIN_IMAGES]
    chosen.sort()

    # A named function, not a lambda: autograph cannot read a lambda's source and warns on stderr.
    @tf.function
    def reconstruct(images, one_hot):
        return decoder([encoder([images, one_hot], training=False)[0], one_hot], training=False)

    accumulator = grain.GrainAccumulator(image_size)
    batches = data.images_in_order(
        np.asarray(paths)[chosen], np.asarray(labels)[chosen], num_classes, image_size, batch_size
    )
    for images, one_hot in batches:
        accumulator.add(images.numpy()[..., 0], reconstruct(images, one_hot).numpy()[..., 0])
    return accumulator.model({"run_fingerprint": run_fingerprint, "fitted_on": "train split"})


def save_grain_model(session, run_fingerprint):
    model = session.model
    grain_model = fit_grain_model(
        model.encoder,
        model.decoder,
        *session.all_images,
        num_classes=session.model_config.num_classes,
        image_size=session.model_config.image_size,
        batch_size=session.settings["BATCH_SIZE"],
        run_fingerprint=run_fingerprint,
    )
    write_json_atomic(session.layout.grain_model, grain_model)
    return grain_model


def run_parameters(session, best_epoch, seconds):
    """What cvae_parameters.json records: every setting, the model, the data and the outcome."""
    settings, facts, history, model_config = (
        session.settings,
        session.facts,
        session.history,
        session.model_config,
    )
    best_row = next(row for row in history if row["epoch"] == best_epoch) if best_epoch else history[-1]
    return {
        "settings": jsonable(settings),
        "model": model_config.to_json(),
        "architecture": model_config.architecture,
        "reconstruction_loss": model_config.reconstruction,
        "structural_weight": settings["STRUCTURAL_WEIGHT"],
        "class_names": facts["class_names"],
        "image_size": model_config.image_size,
        "resize_mode": facts["resize_mode"],
        "latent_dim": model_config.latent_length,
        "latent_map_side": model_config.map_side,
        "epochs_done": int(history[-1]["epoch"]),
        "best_epoch": best_epoch,
        "final_losses": {"best_epoch": best_row, "last_epoch": history[-1]},
        "training_images": int(len(session.all_images[0])),
        "latents": "z_mean_<Class>.npy / z_log_var_<Class>.npy: every train-split image of the class "
        "(validation images included), un-augmented, in file-name order",
        "data_fingerprint": facts["fingerprint"],
        "encoder_parameters": int(session.model.encoder.count_params()),
        "decoder_parameters": int(session.model.decoder.count_params()),
        "replicas": session.strategy.num_replicas_in_sync,
        # A continued run's time counts from its first epoch, not from the continuation.
        "training_seconds": round(seconds + runs.earlier_training_seconds(session.layout), 1),
        "library_versions": library_versions(),
    }


def finish(session, seconds):
    """Save the models, the latents and the loss plot, then the parameters, whose presence marks a finished run."""
    best_epoch = int(session.state["best_epoch"])
    run_fingerprint = save_models_and_latents(session, best_epoch)
    grain_model = save_grain_model(session, run_fingerprint)
    figures.save_loss_plot(session.layout.loss_plot, session.history, LOSS_TERMS)
    parameters = dict(
        run_parameters(session, best_epoch, seconds),
        run_fingerprint=run_fingerprint,
        grain_model={
            "file": session.layout.grain_model.name,
            "sha256": sha256_of_file(session.layout.grain_model),
            "grain_std": grain_model["grain_std"],
            "residual_std": grain_model["residual_std"],
        },
    )
    write_json_atomic(session.layout.parameters, parameters)
    session.layout.continued_parameters.unlink(missing_ok=True)
    print(
        f"saved the encoder and decoder of epoch {best_epoch} in {session.layout.directory} "
        f"and the latents in {session.layout.latent_directory}"
    )
    return parameters
