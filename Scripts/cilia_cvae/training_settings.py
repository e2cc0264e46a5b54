"""The training scripts' settings, checked before TensorFlow loads.

TensorFlow takes 5-15 seconds to import on 2 cores; a mistyped value should be answered in
under a second, and before a CVAE trains for hours only for its prior's settings to be refused.
So every check that needs nothing but the settings and the preprocessing record lives here,
in a module that imports no TensorFlow; training.py and prior_training.py use the same checks.
"""

import math

from cilia_cvae.config import UserError, check_choice
from cilia_cvae.model_config import ModelConfig

PREDICTIONS = ("v", "noise")  # what the latent prior's network predicts
LOSS_WEIGHTINGS = ("min_snr", "uniform")  # how the prior's loss weighs each noise level
LEARNING_RATE_SCHEDULES = ("constant", "cosine")  # how the prior's step size changes over its epochs


def check_settings(settings, num_classes):
    """Refuse values no run can use, naming the setting, before anything is built or written;
    return the model the settings describe."""
    for name in (
        "EPOCHS",
        "BATCH_SIZE",
        "LATENT_DIM",
        "LATENT_MAP_CHANNELS",
        "SAMPLE_EVERY",
        "BASE_CHANNELS",
        "MAX_CHANNELS",
    ):
        if settings[name] < 1:
            raise UserError(f"--{name.lower()} must be at least 1, not {settings[name]}")
    for name in (
        "KL_WARMUP_EPOCHS",
        "EARLY_STOPPING_PATIENCE",
        "MAX_MINUTES",
        "STRUCTURAL_WEIGHT",
    ):
        if not settings[name] >= 0:  # also refuses nan
            raise UserError(f"--{name.lower()} must be 0 or more, not {settings[name]}")
    # Settings dicts written before the adversarial loss existed (usefulness generators) lack these.
    adversarial_weight = settings.get("ADVERSARIAL_WEIGHT", 0.0)
    if not (adversarial_weight >= 0 and math.isfinite(adversarial_weight)):
        raise UserError(
            f"--adversarial_weight must be 0 or a positive finite number, not {adversarial_weight}"
        )
    if settings.get("ADVERSARIAL_START_EPOCH", 1) < 1:
        raise UserError(
            f"--adversarial_start_epoch must be at least 1, not {settings['ADVERSARIAL_START_EPOCH']}"
        )
    if not 0 <= settings["VALIDATION_FRACTION"] < 1:
        raise UserError(
            f"--validation_fraction must be at least 0 and below 1, not {settings['VALIDATION_FRACTION']}"
        )
    if not (settings["KL_WEIGHT"] > 0 and math.isfinite(settings["KL_WEIGHT"])):
        raise UserError(f"--kl_weight must be a positive number, not {settings['KL_WEIGHT']}")
    if not settings["LEARNING_RATE"] > 0:
        raise UserError(f"--learning_rate must be positive, not {settings['LEARNING_RATE']}")
    if settings["SEED"] < 0:
        raise UserError(f"--seed must be 0 or more, not {settings['SEED']}")
    if num_classes < 1:
        raise UserError(
            "the preprocessed data holds no classes; run python Scripts/cvae_pre_processing.py again"
        )
    try:
        return ModelConfig.from_settings(settings, num_classes=num_classes)
    except ValueError as error:
        raise UserError(str(error)) from None


def check_prior_settings(settings):
    """Refuse prior settings no run can use, before the CVAE trains for hours first."""
    for name, lowest in (
        ("PRIOR_EPOCHS", 0),
        ("PRIOR_BATCH_SIZE", 1),
        ("PRIOR_WIDTH", 1),
        ("PRIOR_ATTENTION_SIDE", 0),
        ("PRIOR_SAMPLE_EVERY", 0),
        ("CLASS_FILTER_EPOCHS", 0),
    ):
        if settings[name] < lowest:
            raise UserError(f"--{name.lower()} must be at least {lowest}, not {settings[name]}")
    if not settings["PRIOR_LEARNING_RATE"] > 0:
        raise UserError(f"--prior_learning_rate must be positive, not {settings['PRIOR_LEARNING_RATE']}")
    if not 0 <= settings["PRIOR_LABEL_DROPOUT"] < 1:
        raise UserError(
            f"--prior_label_dropout must be at least 0 and below 1, not {settings['PRIOR_LABEL_DROPOUT']}"
        )
    if not 0 < settings["PRIOR_MAX_NOISE_LEVEL"] <= 1:
        raise UserError(
            f"--prior_max_noise_level must be above 0 and at most 1, not {settings['PRIOR_MAX_NOISE_LEVEL']}"
        )
    check_choice("PRIOR_PREDICTION", settings["PRIOR_PREDICTION"], list(PREDICTIONS))
    check_choice("PRIOR_LOSS_WEIGHTING", settings["PRIOR_LOSS_WEIGHTING"], list(LOSS_WEIGHTINGS))
    check_choice(
        "PRIOR_LEARNING_RATE_SCHEDULE",
        settings["PRIOR_LEARNING_RATE_SCHEDULE"],
        list(LEARNING_RATE_SCHEDULES),
    )
