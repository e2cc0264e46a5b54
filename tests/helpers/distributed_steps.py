"""A few SGD steps of a tiny CVAE under several strategies; the weights saved for comparison.

Run as `python tests/helpers/distributed_steps.py <mode> <processed_dir> <output.npz>` with
Scripts/ on PYTHONPATH. Mode "local": one device, two mirrored logical CPUs, and the GPU's
mixed-precision recipe on the CPU; mode "workers": one of the MultiWorkerMirroredStrategy
workers named by TF_CONFIG (the chief writes the output).
"""

import json
import sys

import keras
import numpy as np
import tensorflow as tf

mode, processed_dir, output = sys.argv[1:4]
if mode == "workers":
    strategies = {
        "workers": tf.distribute.MultiWorkerMirroredStrategy()
    }  # from TF_CONFIG, before TensorFlow starts
else:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategies = {
        "one_device": tf.distribute.OneDeviceStrategy("/cpu:0"),
        "mirrored": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    }

from cilia_cvae import data, training  # noqa: E402  (after the strategies: TensorFlow must not start first)
from cilia_cvae.model_config import ModelConfig  # noqa: E402

class_names = json.load(open(f"{processed_dir}/32x32/preprocessing.json"))["class_names"]
paths, labels = data.list_training_images(processed_dir, 32, class_names)
model_config = ModelConfig(
    image_size=32,
    num_classes=len(class_names),
    latent_dim=8,
    base_channels=4,
    max_channels=8,
    latent_map_stride=0,
)
sizes = {"num_classes": len(class_names), "image_size": 32, "batch_size": 8}
weights = {}
for name, strategy in strategies.items():
    keras.utils.set_random_seed(7)
    # The default architecture has no BatchNorm or Dropout; the sampling noise is switched off.
    model = training.build_cvae(
        strategy,
        model_config,
        learning_rate=1e-3,
        seed=7,
        sample_posterior=False,
        optimizer=keras.optimizers.SGD(1e-5),
    )
    train_step, _ = training.make_step_functions(model, strategy)
    # Un-shuffled, un-augmented batches: the same 8 images per step whatever the number of replicas.
    batches, steps = training.distributed_evaluation_data(strategy, paths[:48], labels[:48], **sizes)
    initial = np.concatenate([weight.ravel() for weight in model.get_weights()])
    for _ in range(2):
        for batch in batches:
            train_step(batch)
    final = np.concatenate([weight.ravel() for weight in model.get_weights()])
    if training.is_chief(strategy):
        weights[name] = final
        weights[name + "_change"] = np.abs(final - initial).max(keepdims=True)
if mode != "workers":
    # The GPU recipe (mixed_float16 with loss scaling) on the CPU: it must train and stay finite.
    # XLA is left out: compiling takes longer on 2 cores than everything else here.
    keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = strategies["one_device"]
    model = training.build_cvae(strategy, model_config, learning_rate=1e-3, seed=7)
    train_step, _ = training.make_step_functions(model, strategy)
    batches, steps = training.distributed_evaluation_data(strategy, paths[:48], labels[:48], **sizes)
    for batch in batches:
        train_step(batch)
    weights["mixed_precision_loss"] = np.array([training.tracker_results(model)["loss"]])
    weights["mixed_precision_loss_scaled"] = np.array(
        [isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)]
    )
    weights["mixed_precision_output_float32"] = np.array([model.decoder.outputs[0].dtype == "float32"])
if weights:
    np.savez(output, **weights)
