"""The tf.data input pipeline: processed PNGs -> batches of (images, one-hot labels, weights).

Images are decoded in parallel once, cached in memory as uint8 (a quarter of float32: 4,000
images at 448 take 0.8 GB), shuffled, augmented on whole batches and prefetched, so the
model never waits for the disk or the PNG decoder.

Every element carries an example weight: 1 for a real image, 0 for the padding that gives
each input pipeline the same number of validation batches (a replica that ran out of data
would otherwise stall a multi-worker run). Losses are weighted means, so padding changes nothing.

Only the train split is read here; the validation images are held out of it. The test split
belongs to the evaluation stage and is never opened by training.
"""

import contextlib
import math
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

from cilia_cvae.config import UserError
from cilia_cvae.images import first_unreadable
from cilia_cvae.layout import ProcessedLayout

AUTOTUNE = tf.data.AUTOTUNE


def list_training_images(processed_images_dir, image_size, class_names):
    """Paths (sorted per class) and integer labels of the processed train split, in label order."""
    layout = ProcessedLayout(Path(processed_images_dir), image_size)
    split_dir = layout.split("train")
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        class_paths = layout.images("train", class_name)
        paths += [str(path) for path in class_paths]
        labels += [label] * len(class_paths)
    if not paths:
        raise UserError(f"no training images in {split_dir}; run python Scripts/cvae_pre_processing.py again")
    return np.array(paths), np.array(labels, dtype=np.int32)


def hold_out_validation(paths, labels, validation_fraction, seed, class_names=None):
    """Split the train split into training and validation images, stratified by class, fixed seed.

    A small collection still trains: when the fraction would give a class no validation image,
    every class with two or more images lends one (or its share), and a class with a single
    image keeps it for training and has no validation images of its own (said on the console)."""
    if validation_fraction == 0:
        return paths, labels, paths[:0], labels[:0]
    counts = np.bincount(labels)
    try:
        training_paths, validation_paths, training_labels, validation_labels = train_test_split(
            paths, labels, test_size=validation_fraction, stratify=labels, random_state=seed
        )
        if set(np.unique(validation_labels)) >= set(np.flatnonzero(counts >= 2)):
            return training_paths, training_labels, validation_paths, validation_labels
    except ValueError:
        pass  # fewer validation images than classes, or a class of one image: chosen per class below
    return hold_out_per_class(paths, labels, validation_fraction, seed, class_names)


def hold_out_per_class(paths, labels, validation_fraction, seed, class_names=None):
    """At least one validation image from each class that has two or more, none from a class of one."""
    rng = np.random.default_rng(seed)
    validation = np.zeros(len(paths), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            name = class_names[label] if class_names else label
            print(
                f"note: class {name} has a single training image; it trains without validation images of its own"
            )
            continue
        count = min(len(members) - 1, max(1, round(len(members) * validation_fraction)))
        validation[rng.choice(members, count, replace=False)] = True
    return paths[~validation], labels[~validation], paths[validation], labels[validation]


@contextlib.contextmanager
def naming_damaged_images(paths):
    """TensorFlow's PNG decoder names no file when one is damaged: find the file and say which."""
    try:
        yield
    except tf.errors.InvalidArgumentError:
        damaged = first_unreadable(paths)
        if damaged is None:
            raise
        path, error = damaged
        raise UserError(
            f"{path} is damaged ({error}); run python Scripts/cvae_pre_processing.py again to "
            f"write the processed images anew"
        ) from None


def decode_png(path, image_size):
    image = tf.io.decode_png(tf.io.read_file(path), channels=1)
    image.set_shape((image_size, image_size, 1))
    return image


def _to_model_inputs(images, labels, num_classes):
    images = tf.cast(images, tf.float32) / 255.0
    return images, tf.one_hot(labels, num_classes), tf.ones(tf.shape(labels), tf.float32)


def _decoded_and_cached(paths, labels, image_size):
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    dataset = dataset.map(
        lambda path, label: (decode_png(path, image_size), label), num_parallel_calls=AUTOTUNE
    )
    return dataset.cache()


def augmentation(seed):
    """Label-preserving changes: any rotation and both flips (the phantoms and real cilia
    come in either handedness and at any angle). Reflection fills the rotated corners with
    texture like the background rather than with black."""
    return keras.Sequential(
        [
            keras.layers.RandomRotation(0.5, fill_mode="reflect", seed=seed),
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed + 1),
        ],
        name="augmentation",
    )


def training_dataset(
    paths,
    labels,
    num_classes,
    image_size,
    batch_size,
    seed,
    augment,
    class_balanced,
    pipeline_index=0,
    pipeline_count=1,
):
    """An endless stream of full, shuffled (optionally class-balanced and augmented) batches.

    Endless and full because an epoch is a fixed number of steps: every step then has the same
    shape (no retracing) and every replica the same amount of work. With several input
    pipelines (workers) each one reads its own share of the files.
    """
    paths, labels = paths[pipeline_index::pipeline_count], labels[pipeline_index::pipeline_count]
    if class_balanced:
        # One cached, shuffled, endless stream per class, drawn from with equal probability, so
        # a rare class is seen as often as Normal (its images repeat more, under augmentation).
        streams = [
            _decoded_and_cached(paths[labels == label], labels[labels == label], image_size)
            .shuffle(int(np.sum(labels == label)), seed=seed + label)
            .repeat()
            for label in np.unique(labels)
        ]
        dataset = tf.data.Dataset.sample_from_datasets(streams, seed=seed)
    else:
        dataset = _decoded_and_cached(paths, labels, image_size).shuffle(len(paths), seed=seed).repeat()
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if augment:
        augmenter = augmentation(seed)
        dataset = dataset.map(
            lambda images, labels: (augmenter(images, training=True), labels), num_parallel_calls=AUTOTUNE
        )
    dataset = dataset.map(
        lambda images, labels: _to_model_inputs(images, labels, num_classes), num_parallel_calls=AUTOTUNE
    )
    return dataset.prefetch(AUTOTUNE)


def padded_length(example_count, batch_size, pipeline_count, replicas_per_pipeline=1):
    """Examples per input pipeline once padded: the same whole number of steps for every pipeline."""
    step = batch_size * replicas_per_pipeline
    return max(1, math.ceil(example_count / pipeline_count / step)) * step


def evaluation_dataset(
    paths,
    labels,
    num_classes,
    image_size,
    batch_size,
    pipeline_index=0,
    pipeline_count=1,
    replicas_per_pipeline=1,
):
    """Every image once, in order, un-augmented: this pipeline's share, padded with weight-0 copies."""
    length = padded_length(len(paths), batch_size, pipeline_count, replicas_per_pipeline)
    share = np.arange(pipeline_index, len(paths), pipeline_count)
    # The padding repeats the first image with weight 0: decoded, but counting for nothing.
    indices = np.concatenate([share, np.zeros(length - len(share), np.int64)])
    weights = (np.arange(length) < len(share)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((paths[indices], labels[indices], weights))
    dataset = dataset.map(
        lambda path, label, weight: (
            tf.cast(decode_png(path, image_size), tf.float32) / 255.0,
            tf.one_hot(label, num_classes),
            weight,
        ),
        num_parallel_calls=AUTOTUNE,
    )
    return dataset.cache().batch(batch_size).prefetch(AUTOTUNE)


def images_in_order(paths, labels, num_classes, image_size, batch_size):
    """Every image once, in the given order, un-augmented: what the latents are computed from."""
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    dataset = dataset.map(
        lambda path, label: (
            tf.cast(decode_png(path, image_size), tf.float32) / 255.0,
            tf.one_hot(label, num_classes),
        ),
        num_parallel_calls=AUTOTUNE,
    )
    return dataset.batch(batch_size).prefetch(AUTOTUNE)
