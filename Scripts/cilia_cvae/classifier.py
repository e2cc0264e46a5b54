"""A small CNN classifier of cilia cross sections: the judge of generated images, and the
detection-model stand-in of the usefulness experiment.

The same architecture serves three purposes: the domain classifier of cvae_evaluate.py (its
penultimate layer is the feature space of FID, KID, precision/recall and memorisation), the
classifiers trained on real versus real + synthetic data, and the phantom separability check.
It never takes part in CVAE training, so the generator cannot be tuned against its own judge.
"""

from pathlib import Path

import keras
import numpy as np
from keras import layers

from cilia_cvae.files import atomic_path, write_json_atomic

FEATURE_LAYER_NAME = "features"
FEATURE_LAYER_WIDTH = 128  # values in the feature layer, the space of FID, KID and the k-NN measures


def build_classifier(image_size, class_count, width=16, steps=None, learning_rate=2e-3):
    """Five convolution stages, global pooling, a 128-value feature layer and the class scores.

    One convolution per stage keeps it cheap on a CPU (about 70 M multiply-adds at 128 px), which
    the usefulness experiment needs: it trains dozens of these. Batch norm uses momentum 0.9
    and the learning rate decays on a cosine: with Keras' default momentum (0.99) and a constant
    rate, such a network scored 98% on its training images and 41-45% on test images here,
    because the running statistics lagged behind the weights.
    """
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    # A cross section has no preferred orientation and both hands occur: flips are free examples
    # (quarter turns are added to the training arrays by train_classifier).
    x = layers.RandomFlip("horizontal_and_vertical")(x)
    for stage in range(5):
        x = layers.Conv2D(width * min(2**stage, 8), 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    features = layers.Dense(FEATURE_LAYER_WIDTH, activation="relu", name=FEATURE_LAYER_NAME)(x)
    x = layers.Dropout(0.3)(features)
    outputs = layers.Dense(class_count, activation="softmax", name="class_scores")(x)
    model = keras.Model(inputs, outputs, name="cilia_classifier")
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps) if steps else learning_rate
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def train_classifier(images, labels, class_count, epochs, seed, batch_size=32, validation=None, verbose=0):
    """Train a fresh classifier on uint8 images in all four quarter turns; class weights keep
    rare classes from being ignored."""
    keras.utils.set_random_seed(seed)
    images = np.concatenate([np.rot90(images, turns, axes=(1, 2)) for turns in range(4)])
    labels = np.tile(labels, 4)
    steps = epochs * int(np.ceil(len(labels) / batch_size))
    model = build_classifier(images.shape[1], class_count, steps=steps)
    counts = np.bincount(labels, minlength=class_count).astype(np.float64)
    weights = {
        label: (len(labels) / (class_count * count)) if count else 0.0 for label, count in enumerate(counts)
    }
    model.fit(
        images[..., None],
        labels,
        epochs=epochs,
        batch_size=batch_size,
        class_weight=weights,
        shuffle=True,
        verbose=verbose,
        validation_data=None if validation is None else (validation[0][..., None], validation[1]),
    )
    return model


def predict(model, images, batch_size=128):
    """(class scores, features) for uint8 images, in inference mode (no augmentation)."""
    feature_model = keras.Model(model.input, [model.output, model.get_layer(FEATURE_LAYER_NAME).output])
    # Called batch by batch rather than through Keras' predict: its compiled step is traced anew for
    # every feature model and every batch shape, which made TensorFlow warn about retracing, and it is
    # no faster here.
    batches = [
        feature_model(images[start : start + batch_size, ..., None], training=False)
        for start in range(0, len(images), batch_size)
    ]
    if not batches:
        return np.zeros((0, model.output.shape[-1]), np.float32), np.zeros((0, FEATURE_LAYER_WIDTH))
    scores = np.concatenate([keras.ops.convert_to_numpy(batch_scores) for batch_scores, _ in batches])
    features = np.concatenate([keras.ops.convert_to_numpy(batch_features) for _, batch_features in batches])
    return scores, features.astype(np.float64)


def cached_domain_classifier(cache_dir, fingerprint, train_images, train_labels, class_count, epochs, seed):
    """Load the domain classifier trained on this exact training split, or train and cache it.

    The cache key is the processed split's fingerprint plus the classifier's settings, so a
    change of data (or of size, epochs, seed) trains a new judge instead of reusing a stale one.
    """
    key = f"{train_images.shape[1]}px_{epochs}epochs_seed{seed}_{fingerprint[:16]}"
    model_path = Path(cache_dir) / f"domain_classifier_{key}.keras"
    if model_path.is_file():
        try:
            return keras.models.load_model(model_path, safe_mode=True), True
        except (
            Exception
        ) as error:  # Keras raises several kinds (ValueError, OSError, zip errors) for one fault
            # A cache: a damaged (or foreign) file is trained again and replaced, not a dead end.
            print(
                f"the cached judge {model_path} cannot be loaded ({type(error).__name__}): training it again"
            )
    model = train_classifier(train_images, train_labels, class_count, epochs, seed, verbose=2)
    with atomic_path(model_path) as temporary:
        model.save(temporary)
    write_json_atomic(
        model_path.with_suffix(".json"),
        {
            "fingerprint": fingerprint,
            "epochs": epochs,
            "seed": seed,
            "image_size": int(train_images.shape[1]),
        },
    )
    return model, False
