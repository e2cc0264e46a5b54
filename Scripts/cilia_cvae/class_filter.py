"""The class filter: a small classifier over latent maps, trained in the second stage beside the prior.

    train(maps, labels, crop_of_map, paths, settings, parameters, layout)   after the prior is saved
    train_if_missing(settings, facts, parameters, layout)                   a finished prior without one
    load(generator, layout)                                                  at inference, checked
    accepted(scores, label, threshold)                                       which drawn maps pass

A variation keeps a real crop's layout, but the prior may still redraw it as another class (a
doublet's arm dropped, the central pair moved). Inference with --class_filter=True scores every
drawn latent map with this classifier and keeps drawing until each class has its count of maps
the filter calls that class, so the images a detection model is given are of the class they are
labelled with.

It learns from the same latent maps as the prior, the train split's crops in their eight
orientations, and is measured on the crops the CVAE held out of the train split for choosing its
epoch (all eight orientations of a crop on one side). It never reads the test split, nor the
evaluation's judge: a filter that had seen either would make the evaluation's class fidelity a
measure of itself. The record under "class_filter" in cvae_parameters.json holds its validation
accuracy, the prior whose standardised maps it reads, and its file's sha256.
"""

import hashlib
import json

import keras
import numpy as np

from cilia_cvae import data, latent_prior
from cilia_cvae.config import UserError
from cilia_cvae.files import atomic_path, sha256_of_file, write_json_atomic

# Written beside the generated images: per class, the candidates drawn and accepted.
ACCEPTANCE_FILE = "class_filter_acceptance.json"
FILTER_BATCH_SIZE = 128
FILTER_LEARNING_RATE = 1e-3
# Noise added to the training maps (in the prior's standardised units): the prior's denoised maps
# are near the encoder's means, not on them.
FILTER_INPUT_NOISE = 0.1


def build_filter(map_shape, num_classes, seed=0):
    """Three convolutions over the latent map, pooled, to class logits: a few tens of thousands of weights."""
    keras.utils.set_random_seed(seed)
    maps = keras.Input(map_shape, name="latent_map")
    x = keras.layers.GaussianNoise(FILTER_INPUT_NOISE, seed=seed)(maps)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2, seed=seed)(x)
    logits = keras.layers.Dense(num_classes, name="class_logits")(x)
    return keras.Model(maps, logits, name="class_filter")


def crops_sha256(paths):
    """A hash of the crops' file names (class folder and name): what the filter was trained on."""
    names = sorted("/".join(str(path).replace("\\", "/").split("/")[-2:]) for path in paths)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def validation_crops(paths, labels, settings):
    """The crops the CVAE held out of the train split (the same seed and fraction), as a mask over paths."""
    held_out = data.hold_out_validation(
        np.asarray(paths), np.asarray(labels), settings["VALIDATION_FRACTION"], settings["SEED"]
    )[2]
    held_out = set(np.asarray(held_out).tolist())
    return np.array([path in held_out for path in np.asarray(paths).tolist()])


def per_class_accuracy(model, maps, labels, num_classes):
    predicted = predict_scores(model, maps).argmax(axis=1)
    return {
        label: float(np.mean(predicted[labels == label] == label))
        for label in range(num_classes)
        if (labels == label).any()
    }


def predict_scores(model, maps):
    """Class probabilities (n, classes) of standardised latent maps."""
    if len(maps) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    logits = model.predict(np.asarray(maps, np.float32), batch_size=512, verbose=0)
    return keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))


def train(maps, labels, crop_of_map, paths, settings, parameters, layout):
    """Train the filter on the maps of the training crops, measure it on the held-out crops', save and record it."""
    epochs = settings["CLASS_FILTER_EPOCHS"]
    if epochs <= 0:
        return parameters
    crop_labels = np.zeros(len(paths), np.int32)
    crop_labels[crop_of_map] = labels
    held_out = validation_crops(paths, crop_labels, settings)[crop_of_map]
    num_classes = len(parameters["class_names"])
    model = build_filter(maps.shape[1:], num_classes, settings["SEED"])
    model.compile(
        optimizer=keras.optimizers.Adam(FILTER_LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    order = np.random.default_rng(settings["SEED"]).permutation(np.flatnonzero(~held_out))
    print(
        f"class filter: {len(order)} latent maps of training crops, {int(held_out.sum())} held out, {epochs} epochs"
    )
    model.fit(
        maps[order], labels[order], batch_size=FILTER_BATCH_SIZE, epochs=epochs, shuffle=True, verbose=2
    )
    accuracy = per_class_accuracy(model, maps[held_out], labels[held_out], num_classes)
    overall = (
        float(np.mean(predict_scores(model, maps[held_out]).argmax(axis=1) == labels[held_out]))
        if held_out.any()
        else None
    )
    with atomic_path(layout.class_filter) as temporary_path:
        model.save(temporary_path)
    record = {
        "epochs": epochs,
        "validation_accuracy": overall,
        "validation_accuracy_per_class": {
            parameters["class_names"][label]: value for label, value in accuracy.items()
        },
        "training_maps": int(len(order)),
        "validation_maps": int(held_out.sum()),
        # The train split's crops it learnt from (the validation crops among them): never the test split's.
        "crops_sha256": crops_sha256(paths),
        "prior_sha256": parameters["latent_prior"]["sha256"],
        "sha256": sha256_of_file(layout.class_filter),
    }
    parameters = dict(parameters, class_filter=record)
    write_json_atomic(layout.parameters, parameters)
    shown = "none held out" if overall is None else f"{overall:.1%}"
    print(f"saved the class filter as {layout.class_filter}: accuracy on the held-out training crops {shown}")
    return parameters


def is_current(parameters, layout):
    """Whether the run's filter was trained for its current prior and is the file its record names."""
    record, prior = parameters.get("class_filter") or {}, parameters.get("latent_prior") or {}
    return bool(
        record
        and prior
        and record.get("prior_sha256") == prior.get("sha256")
        and layout.class_filter.is_file()
        and sha256_of_file(layout.class_filter) == record.get("sha256")
    )


def train_if_missing(settings, facts, parameters, layout, encode):
    """A run whose prior is trained but whose filter is missing, stale or damaged gets one, from maps
    encoded again (`encode`, the prior stage's own encoding) with the prior's recorded standardisation."""
    if (
        settings["CLASS_FILTER_EPOCHS"] <= 0
        or not parameters.get("latent_prior")
        or is_current(parameters, layout)
    ):
        return parameters
    prior_config = latent_prior.PriorConfig.from_json(parameters["latent_prior"]["prior_config"])
    maps, labels, crop_of_map, paths = encode()
    standardised = ((maps - prior_config.latent_shift) / prior_config.latent_scale).astype(np.float32)
    return train(standardised, labels, crop_of_map, paths, settings, parameters, layout)


def load(generator, layout, training_command):
    """The run's class filter, checked against its record and the prior it was trained for."""
    parameters = generator["parameters"]
    if not parameters.get("class_filter") or not layout.class_filter.is_file():
        raise UserError(
            f"this run has no class filter ({layout.class_filter}); train it with {training_command} "
            f"--continue_finished=True --class_filter_epochs=5, or pass --class_filter=False"
        )
    if not is_current(parameters, layout):
        raise UserError(
            f"{layout.class_filter} is not the filter trained for this run's latent prior (its sha256 or its "
            f"prior's differs from {layout.parameters}); train it again with {training_command} "
            f"--continue_finished=True --class_filter_epochs=5"
        )
    from cilia_cvae.generation import load_saved_model

    model = load_saved_model(layout.class_filter, f"it is damaged: train it again with {training_command}")
    return {"model": model, "record": parameters["class_filter"]}


def scores_of(filter_model, standardised_maps):
    return predict_scores(filter_model["model"], standardised_maps)


def accepted(scores, label, threshold):
    """Which maps the filter calls the requested class: its probability at least the threshold."""
    return scores[:, label] >= threshold


def summary_line(class_name, accepted_count, drawn, wanted, bound):
    """One line per class: how many drawn maps passed; a class starved by the bound says so."""
    share = accepted_count / drawn if drawn else 0.0
    if accepted_count < wanted:
        return (
            f"{class_name}: only {accepted_count} of the {wanted} images asked for passed the class filter "
            f"within {bound} draws ({share:.0%} accepted); raise --class_filter_max_draws or lower "
            f"--class_filter_threshold for more"
        )
    return f"{class_name}: {accepted_count} of {drawn} drawn maps passed the class filter ({share:.0%})"


def write_acceptance(path, acceptance):
    write_json_atomic(path, acceptance)


def read_acceptance(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
