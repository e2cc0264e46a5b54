"""Reload a finished tiny run in a fresh process and prove the round trip; prints "identical".

Run as `python tests/helpers/reload_check.py <model_dir> <latent_dir> <processed_dir>` with
Scripts/ on PYTHONPATH. Loading needs no custom_objects: importing the package registers the layers.
"""

import json
import sys

import keras
import numpy as np
import tensorflow as tf

import cilia_cvae.models  # noqa: F401  (registers the custom layers)
from cilia_cvae import data, training
from cilia_cvae.model_config import ModelConfig

model_dir, latent_dir, processed_dir = sys.argv[1:4]
parameters = json.load(open(f"{model_dir}/cvae_parameters.json"))
encoder = keras.models.load_model(f"{model_dir}/cvae_encoder.keras")
decoder = keras.models.load_model(f"{model_dir}/cvae_decoder.keras")
class_names, settings = parameters["class_names"], parameters["settings"]

# The encoder reproduces the latents the training process saved, image for image.
paths, labels = data.list_training_images(processed_dir, parameters["image_size"], class_names)
z_mean, _ = training.encode_training_images(
    encoder, paths, labels, num_classes=len(class_names), image_size=parameters["image_size"], batch_size=8
)
for label, name in enumerate(class_names):
    assert np.array_equal(z_mean[labels == label], np.load(f"{latent_dir}/z_mean_{name}.npy")), name

# The configuration read back from the parameters is the one the settings describe.
model_config = ModelConfig.from_parameters(parameters)
assert model_config == ModelConfig.from_settings(settings, num_classes=len(class_names)), model_config
assert (
    model_config.latent_length == parameters["latent_dim"]
    and model_config.map_side == parameters["latent_map_side"]
)

# The decoder equals a model rebuilt from that configuration with the best epoch's weights.
rebuilt = training.build_cvae(tf.distribute.get_strategy(), model_config, learning_rate=1e-3)
with np.load(f"{model_dir}/best_epoch_{parameters['best_epoch']}.npz") as saved:
    rebuilt.set_weights([saved[f"arr_{index}"] for index in range(len(saved.files))])
latents = np.random.default_rng(1).standard_normal((6, parameters["latent_dim"])).astype("float32")
one_hot = np.eye(len(class_names), dtype="float32")[[0, 1, 2, 0, 1, 2]]
assert np.array_equal(decoder([latents, one_hot]).numpy(), rebuilt.decoder([latents, one_hot]).numpy())
print("identical")
