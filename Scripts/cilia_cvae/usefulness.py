"""Does synthetic data help a detection model? The pure parts of the experiment behind the project's purpose.

At each fraction of the real training data, a classifier (the detection-model stand-in) is
trained on real images only, on real + synthetic, and on synthetic only, and tested on the
real test split: macro-F1 and per-class recall, over several seeds.

The generator used at a fraction is trained on that same fraction only: a generator trained
on all the data would leak the held-back real images into the "small data" experiment. The
experiment's script runs the training and inference scripts for it; this module only decides
which images, which settings and how the classifiers' results are scored and summarised.
"""

import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, recall_score

from cilia_cvae.model_config import reconstruction_loss_kind

# Settings of the evaluated model that the fraction's generator copies; the rest are per fraction
# (the epochs and the KL warm-up are stretched, see generator_schedule).
COPIED_TRAINING_SETTINGS = (
    "ARCHITECTURE",
    "LATENT_DIM",
    "LATENT_MAP_STRIDE",
    "LATENT_MAP_CHANNELS",
    "BASE_CHANNELS",
    "MAX_CHANNELS",
    "BATCH_SIZE",
    "LEARNING_RATE",
    "VALIDATION_FRACTION",
    "CLASS_BALANCED",
    "AUGMENT",
    "RECONSTRUCTION_LOSS",
    "STRUCTURAL_WEIGHT",
    "KL_WEIGHT",
)
VARIANTS = ("real_only", "real_plus_synthetic", "synthetic_only")


def parse_fractions(text):
    """The shares of the real training data in a comma-separated text; None unless each is in (0, 1]."""
    try:
        fractions = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        return None
    return fractions if fractions and all(0 < fraction <= 1 for fraction in fractions) else None


def stratified_subset(labels, fraction, seed):
    """Indices of a class-stratified share of the training images; at least 2 of each class."""
    rng = np.random.default_rng([seed, int(fraction * 1000)])
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(len(members), max(2, int(round(fraction * len(members)))))
        chosen.extend(rng.choice(members, count, replace=False))
    return np.sort(np.array(chosen))


def subset_fingerprint(fingerprint, subset, seed):
    """The data fingerprint a fraction's copy of the training images is recorded under."""
    return f"{fingerprint[:16]}-subset-{len(subset)}-seed{seed}"


def is_default_choice(model_settings, name):
    """True for a setting that is "auto", what "auto" stands for on that architecture, no structural term or the plain KL weight.

    Leaving such a setting out of a generator's arguments keeps the generators trained before
    the setting existed valid, and makes spelling out the default no change.
    """
    if name == "STRUCTURAL_WEIGHT":
        return float(model_settings[name]) == 0.0
    if name == "KL_WEIGHT":
        return float(model_settings[name]) == 1.0
    if name != "RECONSTRUCTION_LOSS":
        return model_settings[name] == "auto"
    architecture = model_settings.get("ARCHITECTURE", "default")
    chosen = reconstruction_loss_kind(architecture, model_settings[name])
    return chosen == reconstruction_loss_kind(architecture)


def generator_schedule(model_settings, fraction, full_data_epochs):
    """Epochs and KL warm-up for a generator trained on a fraction of the data.

    Counted in epochs, a generator on 10% of the images would take a tenth of the steps of one
    on all of them: its samples are then the blobs of an early epoch, which teach a classifier
    the wrong anatomy. So both the epochs and the KL warm-up are stretched by 1 / fraction:
    every generator takes as many steps.
    """
    epochs = max(1, int(round(full_data_epochs / fraction)))
    warmup = int(round(model_settings.get("KL_WARMUP_EPOCHS", 0) / fraction))
    return epochs, min(warmup, epochs)


def generator_training_arguments(model_settings, *, image_size, fraction, full_data_epochs, seed):
    """(training script arguments, epochs, KL warm-up epochs) of the generator of one fraction and seed."""
    epochs, warmup = generator_schedule(model_settings, fraction, full_data_epochs)
    copied = [
        f"--{name.lower()}={model_settings[name]}"
        for name in COPIED_TRAINING_SETTINGS
        if name in model_settings and not is_default_choice(model_settings, name)
    ]
    arguments = [
        f"--image_size={image_size}",
        *copied,
        f"--epochs={epochs}",
        f"--kl_warmup_epochs={warmup}",
        f"--sample_every={max(1, epochs // 5)}",
        f"--seed={seed}",
    ]
    return arguments, epochs, warmup


# How the evaluated images were drawn, read from their manifest; each fraction's generator draws
# its synthetic images the same way. Older manifests lack the diffusion columns.
SAMPLING_COLUMNS = (
    "sampling",
    "temperature",
    "guidance",
    "sampling_steps",
    "grain",
    "edit_strength",
    "mix_weight",
    "filter_threshold",
)
# The latent prior's settings a fraction's prior copies from the evaluated model's (its epochs
# are stretched like the CVAE's, so that every prior takes as many steps).
COPIED_PRIOR_SETTINGS = (
    "PRIOR_BATCH_SIZE",
    "PRIOR_LEARNING_RATE",
    "PRIOR_LEARNING_RATE_SCHEDULE",
    "PRIOR_CLASS_BALANCED",
    "PRIOR_WIDTH",
    "PRIOR_ATTENTION_SIDE",
    "PRIOR_POSITION_CHANNEL",
    "PRIOR_LABEL_DROPOUT",
    "PRIOR_MAX_NOISE_LEVEL",
    "PRIOR_PREDICTION",
    "PRIOR_LOSS_WEIGHTING",
)


def sampling_of(manifest_path):
    """{column: value} of how the evaluated images were drawn (their manifest's first row);
    posterior sampling when there is no manifest."""
    path = Path(manifest_path)
    if not path.is_file():
        return {"sampling": "posterior"}
    with open(path, newline="", encoding="utf-8") as manifest:
        first = next(csv.DictReader(manifest), None) or {}
    return {name: first[name] for name in SAMPLING_COLUMNS if first.get(name)} or {"sampling": "posterior"}


def inference_arguments(sampling):
    """The inference script's arguments that draw as the evaluated images were drawn.

    A counterfactual set (sampling "counterfactual") is drawn by the prior from its own noise
    instead: a fraction has no counterfactual request to repeat, and its prior is what is tested.
    """
    kind = sampling.get("sampling", "posterior")
    kind = "diffusion" if kind == "counterfactual" else kind
    arguments = [f"--sampling={kind}"]
    if sampling.get("temperature"):
        arguments.append(f"--temperature={sampling['temperature']}")
    if kind in ("diffusion", "variation"):
        arguments += [
            f"--{name}={sampling[name]}" for name in ("guidance", "sampling_steps") if sampling.get(name)
        ]
    if kind == "variation":
        # The fraction's own training crops, redrawn by its own prior at the evaluated strength and mixing.
        arguments.append(f"--variation_strength={sampling.get('edit_strength', 0.5)}")
        if sampling.get("mix_weight"):
            arguments.append(f"--variation_mix={sampling['mix_weight']}")
    if sampling.get("filter_threshold") and kind in ("diffusion", "variation"):
        # Filtered images are drawn through the fraction's own class filter, at the same threshold.
        arguments += ["--class_filter=True", f"--class_filter_threshold={sampling['filter_threshold']}"]
    # Grain is drawn only when asked for; images drawn with it are repeated with it.
    if sampling.get("grain") == "True":
        arguments.append("--grain=True")
    return arguments


def prior_training_arguments(prior_record, fraction, full_data_epochs=0):
    """The second-stage arguments that train a fraction's latent prior like the evaluated model's,
    its epochs (the evaluated prior's, or `full_data_epochs` when given) stretched by 1 / fraction, so
    that it takes as many steps; None when the evaluated model has no prior."""
    if not prior_record:
        return None
    recorded = prior_record.get("settings", {})
    epochs = max(1, int(round((full_data_epochs or prior_record["epochs_done"]) / fraction)))
    return [
        "--continue_finished=True",
        f"--prior_epochs={epochs}",
        f"--prior_sample_every={max(1, epochs // 3)}",
        *(f"--{name.lower()}={recorded[name]}" for name in COPIED_PRIOR_SETTINGS if name in recorded),
    ]


def scores(model, images, labels, class_count):
    from cilia_cvae.classifier import predict  # Keras: loaded only by the scripts that classify

    predicted = predict(model, images)[0].argmax(axis=1)
    return {
        "macro_f1": float(
            f1_score(labels, predicted, average="macro", labels=range(class_count), zero_division=0)
        ),
        "recall_per_class": recall_score(
            labels, predicted, average=None, labels=range(class_count), zero_division=0
        ).tolist(),
    }


def combine_repeats(repeats):
    """One variant's result from its classifier repeats' scores: their mean, and each repeat's macro-F1."""
    return {
        "macro_f1": float(np.mean([result["macro_f1"] for result in repeats])),
        "macro_f1_per_repeat": [result["macro_f1"] for result in repeats],
        "recall_per_class": np.mean([result["recall_per_class"] for result in repeats], axis=0).tolist(),
    }


def summarise_fraction(runs, class_names, classifier_repeats):
    """Means, spreads and per-class recalls over the runs (seeds) of one fraction, the runs beside them."""
    # Paired by seed (same real images, same generator): the spread of the means hides this.
    gains = [run["real_plus_synthetic"]["macro_f1"] - run["real_only"]["macro_f1"] for run in runs]
    summary = {"runs": runs, "classifier_repeats": classifier_repeats, "gain_per_seed": gains}
    for name in VARIANTS:
        values = np.array([run[name]["macro_f1"] for run in runs])
        summary[f"{name}_f1"] = float(values.mean())
        summary[f"{name}_f1_std"] = float(values.std())
        recalls = np.array([run[name]["recall_per_class"] for run in runs]).mean(axis=0)
        summary[f"{name}_recall_per_class"] = dict(zip(class_names, recalls.tolist()))
    return summary
