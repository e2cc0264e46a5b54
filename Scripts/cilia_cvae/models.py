"""The two CVAE architectures and the model that trains them.

"original" is a faithful Keras 3 port of the first implementation: a small convolutional stem, a giant
Flatten -> Dense, BatchNorm and Dropout on dense layers, and a sum-of-squared-errors loss.
It is kept so that every comparison can run it side by side with ours.

"default" is fully convolutional and residual, normalised with GroupNorm (per image, so it
behaves the same in training and inference and under any number of replicas). The label
conditions the encoder as extra input channels and the decoder through FiLM at every scale.
The decoder's variance is calibrated per image (sigma-VAE), which balances reconstruction
against KL without a hand-tuned weight, and the KL term is warmed up (training.py). The
latent is a vector, or a map at 1/8 (or 1/16...) of the image side, flattened (the default).

Encoder and decoder are separate functional models, saved as `cvae_encoder.keras` and
`cvae_decoder.keras`. Every custom layer is registered here, so `keras.models.load_model`
finds them once this module is imported, without custom_objects and in safe mode.

    encoder([images (n, S, S, 1) in [0, 1], one-hot labels (n, K)]) -> [z_mean, z_log_var]  (n, latent_dim) each
    decoder([z (n, latent_dim), one-hot labels (n, K)])            -> images (n, S, S, 1) in [0, 1]
"""

import math

import keras
import tensorflow as tf
from keras import layers, ops

from cilia_cvae import adversarial
from cilia_cvae.model_config import smallest_map_size

SERIALIZATION_PACKAGE = "cilia_cvae"

# The calibrated variance may not shrink below this many grey levels (out of 1), so that a
# nearly perfect reconstruction of an easy image cannot dominate the gradient of a batch.
MINIMUM_DECODER_SIGMA = 1.0 / 255.0
# Structural similarity as Wang et al. (2004) defined it: an 11-pixel Gaussian window of sigma
# 1.5 (a doublet is ~20 px across at 224, a dynein arm ~6 px; at 448 the window covers half as
# much of them) and their constants for images in [0, 1].
SSIM_WINDOW, SSIM_SIGMA, SSIM_C1, SSIM_C2 = 11, 1.5, 0.01**2, 0.03**2
# 1 - SSIM may not shrink below this, for the same reason as the variance floor.
MINIMUM_STRUCTURAL_DISSIMILARITY = 1e-3


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class LabelChannels(layers.Layer):
    """Append the one-hot label to an image as constant channels, one per class."""

    def call(self, inputs):
        images, labels = inputs
        height, width = ops.shape(images)[1], ops.shape(images)[2]
        planes = ops.broadcast_to(
            labels[:, None, None, :], (ops.shape(images)[0], height, width, ops.shape(labels)[-1])
        )
        return ops.concatenate([images, ops.cast(planes, images.dtype)], axis=-1)

    def compute_output_shape(self, input_shapes):
        image_shape, label_shape = input_shapes
        return (*image_shape[:-1], image_shape[-1] + label_shape[-1])


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class FiLM(layers.Layer):
    """Feature-wise linear modulation: scale and shift every channel by an amount learnt per class.

    The scale starts at exactly 1 and the shift at 0 (zero-initialised projection), so a fresh
    block behaves as if unconditioned and the label's influence is learnt, not imposed.
    """

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.projection = layers.Dense(2 * channels, kernel_initializer="zeros", name="projection")

    def build(self, input_shapes):
        self.projection.build(input_shapes[1])

    def call(self, inputs):
        features, labels = inputs
        scale_and_shift = ops.cast(self.projection(labels), features.dtype)
        scale, shift = ops.split(scale_and_shift[:, None, None, :], 2, axis=-1)
        return features * (1.0 + scale) + shift

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


def _group_count(channels):
    # Groups of about 8 channels (at most 32 groups, as GroupNorm's authors use), and a count
    # that divides the channels, as the layer requires.
    return math.gcd(channels, min(32, max(1, channels // 8)))


def _normalise_and_activate(x, name):
    x = layers.GroupNormalization(groups=_group_count(x.shape[-1]), name=f"{name}_norm")(x)
    return layers.Activation("swish", name=f"{name}_swish")(x)


def _residual_block(x, labels, name):
    """Pre-activation residual block (GroupNorm, swish, conv, twice); FiLM conditions it when labels are given."""
    channels = x.shape[-1]
    shortcut = x
    x = _normalise_and_activate(x, f"{name}_a")
    x = layers.Conv2D(channels, 3, padding="same", name=f"{name}_conv_a")(x)
    x = layers.GroupNormalization(groups=_group_count(channels), name=f"{name}_b_norm")(x)
    if labels is not None:
        x = FiLM(channels, name=f"{name}_film")([x, labels])
    x = layers.Activation("swish", name=f"{name}_b_swish")(x)
    x = layers.Conv2D(channels, 3, padding="same", name=f"{name}_conv_b")(x)
    return layers.Add(name=f"{name}_add")([shortcut, x])


# Design, chosen by measurement on a 2-core CPU (docs/results.md, how fast): the full-resolution
# image is read by a strided 4x4 convolution and drawn by a transposed 4x4 convolution, so no
# layer convolves at full resolution; a residual block at half resolution (where a 6-px dynein
# arm is 3 px) gives the decoder its drawing capacity, and the other residual blocks sit at the
# smallest map, where they are cheap. The original, by contrast, spends most of its time in
# wide convolutions at half and quarter resolution and in a 51-million-weight Dense layer.
#
# The latent, chosen by the quality comparison (docs/results.md, docs/evaluation_224.json): a vector
# latent, decoded through a Dense layer, drew only the membrane and a grey ring where the nine
# doublets should be, because one code for the whole image must say where every doublet is. A
# latent map at 1/8 of the image side (28 x 28 x 4 at 224) lets each cell describe its own
# patch, and the same model draws doublets, dynein arms and the central pair.


def _levels_to(image_size, side):
    """How many stride-2 steps after the stem lead from image_size / 2 down to a map of this side."""
    return int(round(math.log2(image_size // 2 // side)))


def build_default_encoder(model_config):
    image_size, num_classes, latent_dim = (
        model_config.image_size,
        model_config.num_classes,
        model_config.latent_length,
    )
    channels = model_config.channels
    side = model_config.map_side
    if side:
        # A spatial latent stops the encoder at that resolution.
        channels = channels[: _levels_to(image_size, side) + 1]
    images = keras.Input((image_size, image_size, 1), name="images")
    labels = keras.Input((num_classes,), name="labels")
    x = LabelChannels(name="label_channels")([images, labels])
    x = layers.Conv2D(channels[0], 4, strides=2, padding="same", name="stem")(x)
    for level, width in enumerate(channels[1:], start=1):
        # No normalisation at half resolution: it costs more time there than it brings.
        x = (
            _normalise_and_activate(x, f"down{level}")
            if level > 1
            else layers.Activation("swish", name="stem_swish")(x)
        )
        x = layers.Conv2D(width, 3, strides=2, padding="same", name=f"down{level}_conv")(x)
    x = _residual_block(x, labels=None, name="encoder_block")
    x = _normalise_and_activate(x, "head")
    if side:
        # Each latent number describes one region of the image, which the convolutional decoder
        # can draw locally, instead of one global code the decoder must map onto positions.
        map_channels = latent_dim // (side * side)
        z_mean = layers.Flatten(dtype="float32", name="z_mean")(
            layers.Conv2D(map_channels, 1, dtype="float32", name="z_mean_map")(x)
        )
        z_log_var = layers.Flatten(dtype="float32", name="z_log_var")(
            layers.Conv2D(map_channels, 1, dtype="float32", name="z_log_var_map")(x)
        )
        return keras.Model([images, labels], [z_mean, z_log_var], name="encoder")
    x = layers.Flatten(name="flatten")(x)
    x = layers.Concatenate(name="with_label")([x, labels])
    z_mean = layers.Dense(latent_dim, dtype="float32", name="z_mean")(x)
    z_log_var = layers.Dense(latent_dim, dtype="float32", name="z_log_var")(x)
    return keras.Model([images, labels], [z_mean, z_log_var], name="encoder")


def build_default_decoder(model_config):
    image_size, num_classes, latent_dim = (
        model_config.image_size,
        model_config.num_classes,
        model_config.latent_length,
    )
    channels = model_config.channels
    side = map_side = model_config.map_side
    if side:
        channels = channels[: _levels_to(image_size, side) + 1]
    else:
        side = smallest_map_size(image_size)
    channels = channels[::-1]
    latents = keras.Input((latent_dim,), name="z")
    labels = keras.Input((num_classes,), name="labels")
    if map_side:
        x = layers.Reshape((side, side, latent_dim // (side * side)), name="to_map")(latents)
        x = LabelChannels(name="label_channels")([x, labels])
        x = layers.Conv2D(channels[0], 3, padding="same", name="project")(x)
    else:
        x = layers.Concatenate(name="with_label")([latents, labels])
        x = layers.Dense(side * side * channels[0], name="project")(x)
        x = layers.Reshape((side, side, channels[0]), name="to_map")(x)
    x = _residual_block(x, labels, name="decoder_block_smallest")
    for level, width in enumerate(channels[1:], start=1):
        x = layers.UpSampling2D(2, interpolation="nearest", name=f"up{level}")(x)
        x = layers.Conv2D(width, 3, padding="same", name=f"up{level}_conv")(x)
        # The label modulates every scale, cheaply (a scale and shift per channel).
        x = FiLM(width, name=f"up{level}_film")([x, labels])
        x = layers.Activation("swish", name=f"up{level}_swish")(x)
    x = _residual_block(x, labels, name="decoder_block_half_resolution")
    x = layers.Activation("swish", name="head_swish")(x)
    outputs = layers.Conv2DTranspose(
        1, 4, strides=2, padding="same", activation="sigmoid", dtype="float32", name="image"
    )(x)
    return keras.Model([latents, labels], outputs, name="decoder")


def _original_encoder_pools(image_size):
    # At 224 each of the three convolutions is followed by pooling (28 x 28 x 128 into the
    # Dense: its 51 M weights). The 448 model kept a 112 x 112 x 128 map (its first Dense
    # holds 0.8 billion weights), i.e. its first convolution ran without pooling.
    return (True, True, True) if image_size < 448 else (False, True, True)


def build_original_encoder(model_config):
    image_size, num_classes, latent_dim = (
        model_config.image_size,
        model_config.num_classes,
        model_config.latent_length,
    )
    images = keras.Input((image_size, image_size, 1), name="images")
    labels = keras.Input((num_classes,), name="labels")
    x = images
    for filters, pool in zip((32, 64, 128), _original_encoder_pools(image_size)):
        x = layers.Conv2D(filters, 3, activation="relu", padding="same")(x)
        if pool:
            x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Concatenate()([x, labels])
    for units in (512, 256):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.BatchNormalization()(x)
        x = layers.Dropout(0.3)(x)
    z_mean = layers.Dense(latent_dim, dtype="float32", name="z_mean")(x)
    z_log_var = layers.Dense(latent_dim, dtype="float32", name="z_log_var")(x)
    return keras.Model([images, labels], [z_mean, z_log_var], name="encoder")


def build_original_decoder(model_config):
    image_size, num_classes, latent_dim = (
        model_config.image_size,
        model_config.num_classes,
        model_config.latent_length,
    )
    side = image_size // 8
    latents = keras.Input((latent_dim,), name="z")
    labels = keras.Input((num_classes,), name="labels")
    x = layers.Concatenate()([latents, labels])
    for units in (256, 512):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.BatchNormalization()(x)
        x = layers.Dropout(0.3)(x)
    x = layers.Dense(side * side * 64, activation="relu")(x)
    x = layers.Reshape((side, side, 64))(x)
    for filters in (64, 32, 16):
        x = layers.Conv2D(filters, 3, activation="relu", padding="same")(x)
        x = layers.UpSampling2D(2)(x)
    outputs = layers.Conv2D(1, 3, activation="sigmoid", padding="same", dtype="float32", name="image")(x)
    return keras.Model([latents, labels], outputs, name="decoder")


def build_encoder_and_decoder(model_config):
    """The encoder and decoder a model configuration describes."""
    if model_config.architecture == "original":
        return build_original_encoder(model_config), build_original_decoder(model_config)
    return build_default_encoder(model_config), build_default_decoder(model_config)


def structural_similarity(images, reconstructions):
    """Mean SSIM of each image with its reconstruction (one number per image, 1 for identical)."""
    offsets = ops.arange(SSIM_WINDOW, dtype="float32") - (SSIM_WINDOW - 1) / 2
    profile = ops.exp(-ops.square(offsets) / (2 * SSIM_SIGMA**2))
    profile = profile / ops.sum(profile)
    channels = images.shape[-1]
    window = ops.tile(
        ops.reshape(ops.outer(profile, profile), (SSIM_WINDOW, SSIM_WINDOW, 1, 1)), (1, 1, channels, 1)
    )

    def local_mean(values):
        return ops.depthwise_conv(values, window, padding="valid")

    mean_x, mean_y = local_mean(images), local_mean(reconstructions)
    variance_x = local_mean(ops.square(images)) - ops.square(mean_x)
    variance_y = local_mean(ops.square(reconstructions)) - ops.square(mean_y)
    covariance = local_mean(images * reconstructions) - mean_x * mean_y
    similarity = (
        (2 * mean_x * mean_y + SSIM_C1)
        * (2 * covariance + SSIM_C2)
        / ((ops.square(mean_x) + ops.square(mean_y) + SSIM_C1) * (variance_x + variance_y + SSIM_C2))
    )
    return ops.mean(similarity, axis=(1, 2, 3))


class CVAE(keras.Model):
    """Conditional VAE: trains an encoder and a decoder together; a tracker per loss term.

    Each data element is (images, one-hot labels, example weights). Weights are 1 for real
    examples and 0 for the padding that evens out validation shards across replicas, so the
    reported means are exact whatever the number of replicas.

    The loss is computed per example and averaged over the replica's batch, then divided by
    the number of replicas in sync: the optimizer sums gradients across replicas, so the
    update equals that of one device seeing the whole batch.
    """

    def __init__(
        self,
        encoder,
        decoder,
        reconstruction="calibrated_gaussian",
        sample_posterior=True,
        seed=None,
        structural_weight=0.0,
        adversarial_weight=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if reconstruction not in ("calibrated_gaussian", "sum_squared_error"):
            raise ValueError(f"unknown reconstruction loss {reconstruction!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.reconstruction = reconstruction
        self.structural_weight = float(structural_weight)
        # Without sampling noise the update is a deterministic function of the batch, which is
        # what the distributed-equivalence tests need; training always samples.
        self.sample_posterior = sample_posterior
        self.seed_generator = keras.random.SeedGenerator(seed)
        # The KL weight is a variable so that warm-up can change it between epochs without retracing.
        self.kl_weight = self.add_weight(shape=(), initializer="ones", trainable=False, name="kl_weight")
        self.pixel_count = math.prod(decoder.output_shape[1:])
        tracked = ["loss", "reconstruction_loss", "kl_loss", "squared_error"]
        # The adversarial patch loss (adversarial.py): its discriminator and optimizer belong to the
        # model, so they travel in its checkpoint. Off (weight 0), the model is exactly as before.
        self.adversarial_weight = float(adversarial_weight)
        self.discriminator = self.discriminator_optimizer = None
        # Switched on between epochs after the warm-up (training.py retraces the step then).
        self.adversarial_active = False
        if self.adversarial_weight > 0:
            self.discriminator = adversarial.build_patch_discriminator(decoder.output_shape[1])
            tracked += ["adversarial_loss", "discriminator_loss", "adversarial_weight"]
        self.trackers = {name: keras.metrics.Mean(name=name) for name in tracked}

    @property
    def metrics(self):
        return list(self.trackers.values())

    @property
    def generator_variables(self):
        """What the CVAE's optimizer trains: the encoder and decoder, never the discriminator."""
        return self.encoder.trainable_weights + self.decoder.trainable_weights

    def call(self, inputs, training=False):
        images, labels = inputs
        z_mean, z_log_var = self.encoder([images, labels], training=training)
        return self.decoder([self.sample(z_mean, z_log_var), labels], training=training)

    def sample(self, z_mean, z_log_var):
        if not self.sample_posterior:
            return z_mean
        noise = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * noise

    def per_example_losses(self, images, labels, training, with_reconstructions=False):
        z_mean, z_log_var = self.encoder([images, labels], training=training)
        reconstructions = self.decoder([self.sample(z_mean, z_log_var), labels], training=training)
        squared_error = ops.sum(ops.square(ops.cast(images, "float32") - reconstructions), axis=(1, 2, 3))
        if self.reconstruction == "sum_squared_error":
            reconstruction_loss = squared_error
        else:
            # Gaussian negative log-likelihood with the variance that maximises it for this
            # image (sigma^2 = its mean squared error, floored), constants dropped: D/2 log sigma^2.
            mean_squared_error = ops.maximum(squared_error / self.pixel_count, MINIMUM_DECODER_SIGMA**2)
            reconstruction_loss = 0.5 * self.pixel_count * ops.log(mean_squared_error)
        if self.structural_weight:
            # Pixel errors barely register a missing 6-px dynein arm; local structure (mean,
            # contrast, correlation in an 11-px window) does. The term is calibrated like the
            # Gaussian, D/2 log(1 - SSIM): its pull does not fade as reconstructions improve,
            # and a weight of 1 gives structure as much say as the pixel values.
            dissimilarity = 1.0 - structural_similarity(ops.cast(images, "float32"), reconstructions)
            reconstruction_loss = (
                reconstruction_loss
                + self.structural_weight
                * 0.5
                * self.pixel_count
                * ops.log(ops.maximum(dissimilarity, MINIMUM_STRUCTURAL_DISSIMILARITY))
            )
        kl_loss = -0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=1)
        loss = reconstruction_loss + self.kl_weight * kl_loss
        losses = {
            "loss": loss,
            "reconstruction_loss": reconstruction_loss,
            "kl_loss": kl_loss,
            "squared_error": squared_error,
        }
        return (losses, reconstructions) if with_reconstructions else losses

    def _update_trackers(self, losses, weights):
        # Terms a step does not compute (the adversarial ones before the warm-up ends, and in
        # validation) keep their trackers untouched.
        for name, tracker in self.trackers.items():
            if name in losses:
                tracker.update_state(losses[name], sample_weight=weights)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, data):
        images, labels, weights = data
        if self.adversarial_active:
            return self._adversarial_train_step(images, labels, weights)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            losses = self.per_example_losses(images, labels, training=True)
            batch_loss = _weighted_mean(losses["loss"], weights)
            scaled_loss = self.optimizer.scale_loss(batch_loss / replicas)
        variables = self.generator_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return self._update_trackers(losses, weights)

    def _adversarial_train_step(self, images, labels, weights):
        """One step of the CVAE with the patch discriminator's hinge loss, then one of the discriminator."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        images = ops.cast(images, "float32")
        last_kernel = self.decoder.layers[-1].trainable_weights[0]
        with tf.GradientTape(persistent=True) as tape:
            losses, reconstructions = self.per_example_losses(
                images, labels, training=True, with_reconstructions=True
            )
            adversarial_losses = adversarial.generator_hinge_losses(
                self.discriminator(reconstructions, training=False)
            )
            adversarial_mean = _weighted_mean(adversarial_losses, weights)
            reconstruction_mean = _weighted_mean(losses["reconstruction_loss"], weights)
            with tape.stop_recording():
                weight = adversarial.adaptive_weight(
                    tape.gradient(reconstruction_mean, last_kernel),
                    tape.gradient(adversarial_mean, last_kernel),
                    self.adversarial_weight,
                )
            batch_loss = _weighted_mean(losses["loss"], weights) + weight * adversarial_mean
            scaled_loss = self.optimizer.scale_loss(batch_loss / replicas)
        variables = self.generator_variables
        gradients = tape.gradient(scaled_loss, variables)
        del tape
        self.optimizer.apply_gradients(zip(gradients, variables))
        with tf.GradientTape() as discriminator_tape:
            discriminator_losses = adversarial.discriminator_hinge_losses(
                self.discriminator(images, training=True),
                self.discriminator(ops.stop_gradient(reconstructions), training=True),
            )
            scaled_discriminator_loss = self.discriminator_optimizer.scale_loss(
                _weighted_mean(discriminator_losses, weights) / replicas
            )
        discriminator_variables = self.discriminator.trainable_weights
        self.discriminator_optimizer.apply_gradients(
            zip(
                discriminator_tape.gradient(scaled_discriminator_loss, discriminator_variables),
                discriminator_variables,
            )
        )
        losses.update(
            adversarial_loss=adversarial_losses,
            discriminator_loss=discriminator_losses,
            adversarial_weight=ops.ones_like(adversarial_losses) * weight,
        )
        return self._update_trackers(losses, weights)

    def test_step(self, data):
        images, labels, weights = data
        return self._update_trackers(self.per_example_losses(images, labels, training=False), weights)


def _weighted_mean(values, weights):
    """The mean over a replica's real examples (padding has weight 0)."""
    return ops.sum(values * weights) / ops.maximum(ops.sum(weights), 1.0)
