"""What makes a training run the same run: the rules for starting, resuming, continuing or refusing it.

A run is its settings and its data, not its folders: a project moved or copied elsewhere
resumes there, while other images preprocessed into the same folder are refused (the data
are compared by the preprocessing stage's fingerprint). The settings a run started with are
kept in `checkpoints/run_settings.json`; a second start with other settings is refused in
one line unless `--fresh=True` moves the earlier run aside (nothing is deleted).
"""

import json
import os

import tensorflow as tf

from cilia_cvae import locks
from cilia_cvae.config import UserError, jsonable
from cilia_cvae.files import move_aside, write_json_atomic
from cilia_cvae.layout import ProcessedLayout
from cilia_cvae.model_config import reconstruction_loss_kind

# Settings that may change between a killed run and its resumption without changing what was
# trained so far (more or fewer epochs continue the same run).
# The class filter is trained beside the prior (class_filter.py): it shapes neither the CVAE nor the prior.
SETTINGS_FREE_TO_CHANGE = (
    "FRESH",
    "CONTINUE_FINISHED",
    "SAMPLE_EVERY",
    "EPOCHS",
    "MAX_MINUTES",
    "CLASS_FILTER_EPOCHS",
)
# What a run started before a setting existed ran with.
SETTINGS_ADDED_LATER = {"RECONSTRUCTION_LOSS": "auto", "STRUCTURAL_WEIGHT": 0.0, "KL_WEIGHT": 1.0}
# Where a run's files live is not what the run is.
RUN_LOCATIONS = ("PROCESSED_IMAGES_DIR", "MODELS_DIR", "LATENT_TENSORS_DIR")


def resolved_settings(settings):
    """Settings with "auto" replaced by what it stands for, so that spelling out a default is no change."""
    settings = {**SETTINGS_ADDED_LATER, **settings}
    architecture = settings.get("ARCHITECTURE", "default")
    return dict(
        settings,
        RECONSTRUCTION_LOSS=reconstruction_loss_kind(architecture, settings["RECONSTRUCTION_LOSS"]),
        STRUCTURAL_WEIGHT=float(settings["STRUCTURAL_WEIGHT"]),
        KL_WEIGHT=float(settings["KL_WEIGHT"]),
    )


def comparable_settings(settings, data_fingerprint):
    """What must not change within one run: the settings that shape it and the data it learns."""
    kept = {
        name: value
        for name, value in jsonable(settings).items()
        if name not in SETTINGS_FREE_TO_CHANGE and name not in RUN_LOCATIONS and not name.startswith("PRIOR_")
    }
    return resolved_settings(dict(kept, DATA_FINGERPRINT=data_fingerprint))


def changed_settings(recorded, comparable, settings):
    """The names, as the user types them, of what differs from the run's recorded settings."""
    recorded = resolved_settings(recorded)
    current = dict(comparable)
    if "DATA_FINGERPRINT" not in recorded:
        # Recorded before fingerprints were: its data folder stands for its data, as it did then.
        del current["DATA_FINGERPRINT"]
        current["PROCESSED_IMAGES_DIR"] = jsonable(settings)["PROCESSED_IMAGES_DIR"]
    recorded = {
        name: value for name, value in recorded.items() if name not in ("MODELS_DIR", "LATENT_TENSORS_DIR")
    }
    changed = sorted(name for name in set(recorded) | set(current) if recorded.get(name) != current.get(name))
    return ", ".join(
        "the preprocessed images (another data fingerprint)"
        if name == "DATA_FINGERPRINT"
        else f"--{name.lower()}"
        for name in changed
    )


def fingerprint_before_settings_counted(settings):
    """The fingerprint a run started before the data fingerprint covered the resize mode and size would
    have recorded of these processed images, when they were made with the defaults (squash, no
    stretch) that nearly every such run used; None otherwise. Such a run resumes on them."""
    try:
        facts = json.loads(
            ProcessedLayout(settings["PROCESSED_IMAGES_DIR"], settings["IMAGE_SIZE"]).facts.read_text(
                encoding="utf-8"
            )
        )
    except (OSError, ValueError):
        return None
    if facts.get("resize_mode") != "squash" or facts.get("stretch_percentiles"):
        return None
    return facts.get("pixels_fingerprint")


def _recorded_changes(layout, comparable, settings):
    recorded = json.loads(layout.run_settings.read_text(encoding="utf-8"))
    legacy = fingerprint_before_settings_counted(settings)
    if legacy is not None and recorded.get("DATA_FINGERPRINT") == legacy:
        recorded["DATA_FINGERPRINT"] = comparable["DATA_FINGERPRINT"]
    return changed_settings(recorded, comparable, settings)


def prepare_run(layout, settings, data_fingerprint):
    """Refuse a finished run or one with other settings unless --fresh; --fresh moves it aside;
    --continue_finished reopens a finished run with the same settings.

    What is left afterwards is either nothing or an unfinished run with the same settings.
    """
    fresh = settings["FRESH"]
    comparable = comparable_settings(settings, data_fingerprint)
    occupied = [
        folder
        for folder in (layout.directory, layout.latent_directory)
        if folder.exists() and any(folder.iterdir())
    ]
    if settings.get("CONTINUE_FINISHED") and not fresh and layout.parameters.exists():
        reopen_finished_run(layout, settings, comparable)
    reason = None
    if layout.parameters.exists():
        reason = f"a finished run is in {layout.directory}"
    elif occupied and not layout.run_settings.exists():
        reason = f"{occupied[0]} already holds files that are not a resumable run"
    elif layout.run_settings.exists():
        changed = _recorded_changes(layout, comparable, settings)
        if changed:
            reason = f"the unfinished run in {layout.directory} used other settings ({changed})"
    if reason and not fresh:
        raise UserError(f"{reason}; pass --fresh=True to move it aside (nothing is deleted) and start again")
    if reason or (fresh and occupied):
        for folder in occupied:
            print(f"moved the earlier run aside: {folder} -> {move_aside(folder)}")
    if not layout.run_settings.exists():
        write_json_atomic(layout.run_settings, comparable)


def finished_run_to_keep(layout, settings, data_fingerprint):
    """A finished run whose CVAE is kept as it is while its latent prior is trained: its parameters, else None.

    Two cases: --continue_finished on a run whose CVAE trained its --epochs already, and the
    same command again after a kill during the prior stage (the CVAE had finished; the prior
    had started but not). The prior's settings (PRIOR_*) never count as the CVAE's.
    """
    if settings["FRESH"] or not layout.parameters.exists():
        return None
    parameters = json.loads(layout.parameters.read_text(encoding="utf-8"))
    # The second stage has work: a prior to train, or a trained prior's class filter to (re)train.
    filter_only = settings.get("CLASS_FILTER_EPOCHS", 0) > 0 and "latent_prior" in parameters
    if settings.get("PRIOR_EPOCHS", 0) <= 0 and not filter_only:
        return None
    interrupted_prior = layout.prior_settings.exists() and "latent_prior" not in parameters
    continued = settings.get("CONTINUE_FINISHED") and parameters["epochs_done"] >= settings["EPOCHS"]
    if not (interrupted_prior or continued):
        return None
    changed = _recorded_changes(layout, comparable_settings(settings, data_fingerprint), settings)
    if changed:
        raise UserError(
            f"the finished run in {layout.directory} used other settings ({changed}); "
            f"continue it with its own or pass --fresh=True to start again"
        )
    done = parameters["epochs_done"]
    print(
        f"the CVAE in {layout.directory} is finished ({done} epochs): training its second stage only (latent prior, class filter)"
    )
    return parameters


def reopen_finished_run(layout, settings, comparable):
    """Make a finished run unfinished again, so it resumes from its last checkpoint.

    Its parameters move beside the checkpoints (their training time is added to the new
    total); its models and latents stay usable until the run finishes again and replaces them.
    """
    if not layout.run_settings.exists() or not tf.train.latest_checkpoint(str(layout.checkpoints)):
        raise UserError(
            f"the finished run in {layout.directory} kept no checkpoint to continue from; "
            f"pass --fresh=True to start again"
        )
    changed = _recorded_changes(layout, comparable, settings)
    if changed:
        raise UserError(
            f"the finished run in {layout.directory} used other settings ({changed}); "
            f"continue it with its own or pass --fresh=True to start again"
        )
    epochs_done = json.loads(layout.parameters.read_text(encoding="utf-8"))["epochs_done"]
    if epochs_done >= settings["EPOCHS"]:
        raise UserError(
            f"the finished run in {layout.directory} already trained {epochs_done} epochs; "
            f"raise --epochs above {epochs_done} to continue it"
        )
    os.replace(layout.parameters, layout.continued_parameters)
    print(f"continuing the finished run in {layout.directory} after epoch {epochs_done}")


def earlier_training_seconds(layout):
    """The training time of a continued run before its continuation (0 for a run never continued)."""
    if not layout.continued_parameters.exists():
        return 0.0
    return json.loads(layout.continued_parameters.read_text(encoding="utf-8"))["training_seconds"]


def remove_other_best_weights(layout, best_epoch):
    """Keep only the best epoch's weights the checkpoint records (a kill may leave a newer one)."""
    for path in layout.all_best_weights():
        if path != layout.best_weights(best_epoch):
            path.unlink()


def lock_run(layout, settings, facts):
    """Hold, until the process ends, the run's folders (written, the prior-only stage included) and the
    processed images (read for the whole run, so that preprocessing into them is refused meanwhile).
    Under several workers the chief locks the run's folders once its strategy says it is the chief.

    The facts were read before TensorFlow loaded, seconds before the lock: a preprocessing that
    replaced the images in between is caught here, by their fingerprint."""
    processed = ProcessedLayout(settings["PROCESSED_IMAGES_DIR"], settings["IMAGE_SIZE"])
    locks.hold_folder_lock(processed.directory, shared=True)
    try:
        now = json.loads(processed.facts.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        now = None
    if now != facts["fingerprint"]:
        raise UserError(
            f"the processed images in {processed.directory} were replaced while this training started "
            f"(a preprocessing ran meanwhile); run the training again"
        )
    if not os.environ.get("TF_CONFIG"):
        for folder in (layout.directory, layout.latent_directory):
            locks.hold_folder_lock(folder)
