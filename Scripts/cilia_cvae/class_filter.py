"""The class filter: a small classifier of the train split's crops, trained in the second stage.

    train(settings, facts, parameters, layout)             after the prior is saved
    train_if_missing(settings, facts, parameters, layout)  a finished prior without a current one
    load(generator, layout, training_command)              at inference, checked
    scores_of(screen, images)                              the class probabilities of decoded images

A variation keeps a real crop's layout, but the prior may still redraw it as another class (a
doublet leaves the ring, the central pair goes). Inference with --class_filter=True scores every
drawn image with this classifier and keeps drawing until each class has its count of images the
filter gives their class with at least the threshold's probability, so the images a detection
model is given are of the class they are labelled with.

It classifies decoded images, not latent maps. A classifier of latent maps was built first and
measured: the encoder is class-conditional, so a map carries the label it was encoded under, and
a filter trained on the prior's own maps read that label (99.7% on held-out crops, and it passed
every variation the guided prior drew, 6.5% of which the judge called another class); trained on
maps encoded under a random class instead, it reached 46.7% on held-out crops, about what always
answering Normal scores. A crop's anatomy is in its pixels.

It learns from the train split's crops alone (the project's small CNN, at FILTER_IMAGE_SIZE, in its
four quarter turns and flips) and is measured on the crops the CVAE held out of the train split for
choosing its epoch. It never reads the test split, nor the evaluation's judge (a separate network,
trained at its own size and seed): a filter that had seen either would make the evaluation's class
fidelity a measure of itself. The record under "class_filter" in cvae_parameters.json holds its
accuracy on the held-out crops, the crops it learnt from (a hash of their names) and its file's sha256.
"""

import hashlib
import json

import numpy as np
from PIL import Image

from cilia_cvae import data
from cilia_cvae.config import UserError
from cilia_cvae.files import atomic_path, sha256_of_file, write_json_atomic
from cilia_cvae.images import load_images

# The filter's input side: the usefulness classifiers' size, half the judge's.
FILTER_IMAGE_SIZE = 64
# Its initialisation and shuffling, apart from the CVAE's seed and the judge's.
FILTER_SEED_OFFSET = 7
# Written beside the generated images: per class, the candidates drawn and accepted.
ACCEPTANCE_FILE = "class_filter_acceptance.json"


def crops_sha256(paths):
    """A hash of the crops' file names (class folder and name): what the filter was trained on."""
    names = sorted("/".join(str(path).replace("\\", "/").split("/")[-2:]) for path in paths)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def held_out_mask(paths, labels, settings):
    """The crops the CVAE held out of the train split (its seed and fraction), as a mask over paths."""
    held_out = data.hold_out_validation(
        np.asarray(paths), np.asarray(labels), settings["VALIDATION_FRACTION"], settings["SEED"]
    )[2]
    held_out = set(np.asarray(held_out).tolist())
    return np.array([path in held_out for path in np.asarray(paths).tolist()])


def train(settings, facts, parameters, layout):
    """Train the filter on the train split's crops less the held-out ones, measure it on those, save
    and record it."""
    from cilia_cvae import classifier  # Keras: loaded with the second stage only

    epochs = settings["CLASS_FILTER_EPOCHS"]
    if epochs <= 0:
        return parameters
    paths, labels = data.list_training_images(
        settings["PROCESSED_IMAGES_DIR"], settings["IMAGE_SIZE"], facts["class_names"]
    )
    held_out = held_out_mask(paths, labels, settings)
    images = load_images(paths, FILTER_IMAGE_SIZE)
    print(
        f"class filter: {int((~held_out).sum())} training crops at {FILTER_IMAGE_SIZE} px, "
        f"{int(held_out.sum())} held out, {epochs} epochs"
    )
    model = classifier.train_classifier(
        images[~held_out],
        labels[~held_out],
        len(facts["class_names"]),
        epochs,
        settings["SEED"] + FILTER_SEED_OFFSET,
    )
    predicted = classifier.predict(model, images[held_out])[0].argmax(axis=1) if held_out.any() else None
    with atomic_path(layout.class_filter) as temporary_path:
        model.save(temporary_path)
    record = {
        "epochs": epochs,
        "image_size": FILTER_IMAGE_SIZE,
        "validation_accuracy": None if predicted is None else float(np.mean(predicted == labels[held_out])),
        "validation_accuracy_per_class": {
            name: float(np.mean(predicted[labels[held_out] == label] == label))
            for label, name in enumerate(facts["class_names"])
            if predicted is not None and (labels[held_out] == label).any()
        },
        "training_crops": int((~held_out).sum()),
        "validation_crops": int(held_out.sum()),
        # The train split's crops it learnt from (the held-out ones among them): never the test split's.
        "crops_sha256": crops_sha256(paths),
        "sha256": sha256_of_file(layout.class_filter),
    }
    parameters = dict(parameters, class_filter=record)
    write_json_atomic(layout.parameters, parameters)
    shown = "none held out" if predicted is None else f"{record['validation_accuracy']:.1%}"
    print(f"saved the class filter as {layout.class_filter}: accuracy on the held-out training crops {shown}")
    return parameters


def is_current(parameters, layout):
    """Whether the run's filter is an image filter and the file its record names."""
    record = parameters.get("class_filter") or {}
    return bool(
        record.get("image_size")
        and layout.class_filter.is_file()
        and sha256_of_file(layout.class_filter) == record.get("sha256")
    )


def train_if_missing(settings, facts, parameters, layout):
    """A run whose prior is trained but whose filter is missing, damaged or of latent maps gets one."""
    if (
        settings["CLASS_FILTER_EPOCHS"] <= 0
        or not parameters.get("latent_prior")
        or is_current(parameters, layout)
    ):
        return parameters
    return train(settings, facts, parameters, layout)


def load(generator, layout, training_command):
    """The run's class filter, checked against its record."""
    parameters = generator["parameters"]
    remedy = f"train it with {training_command} --continue_finished=True --class_filter_epochs=5"
    if not parameters.get("class_filter") or not layout.class_filter.is_file():
        raise UserError(
            f"this run has no class filter ({layout.class_filter}); {remedy}, or pass --class_filter=False"
        )
    if not is_current(parameters, layout):
        raise UserError(
            f"{layout.class_filter} is not the filter this run recorded (its sha256 differs from "
            f"{layout.parameters}, or it classifies latent maps); {remedy}"
        )
    from cilia_cvae.generation import load_saved_model

    model = load_saved_model(layout.class_filter, f"it is damaged: {remedy}")
    return {"model": model, "record": parameters["class_filter"]}


def scores_of(screen, images):
    """Class probabilities (n, classes) of decoded uint8 images, resized as the filter's training crops were."""
    from cilia_cvae.classifier import predict

    size = screen["record"]["image_size"]
    resized = np.stack(
        [
            np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
            for image in np.asarray(images)
        ]
    )
    return predict(screen["model"], resized)[0]


def summary_line(class_name, acceptance):
    """One line per class: how many drawn images passed; a class the bound starved says so."""
    accepted, drawn = acceptance["accepted"], acceptance["drawn"]
    share = accepted / drawn if drawn else 0.0
    if accepted < acceptance["asked_for"]:
        return (
            f"{class_name}: only {accepted} of the {acceptance['asked_for']} images asked for passed the "
            f"class filter within {acceptance['bound']} draws ({share:.0%} accepted); raise "
            f"--class_filter_max_draws or lower --class_filter_threshold for more"
        )
    return f"{class_name}: {accepted} of {drawn} drawn images passed the class filter ({share:.0%})"


def write_acceptance(path, acceptance):
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    write_json_atomic(path, {**earlier, **acceptance})
