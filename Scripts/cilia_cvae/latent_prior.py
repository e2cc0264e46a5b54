"""The second stage: a class-conditional diffusion prior over the CVAE's latent maps.

The CVAE of models.py is, in practice, an excellent autoencoder whose prior is wrong: its
latent maps (28 x 28 x 4 at 224) decode into sharp cilia, but N(0, I) draws decode into
texture and the training latents can only be copied. So, as Rombach et al. (2022) do with
their KL-f8 first stage, a small denoising U-Net learns the distribution of the latent maps
themselves, one class at a time:

    latents = encoder(every orientation of every training crop)     eight_orientations
    shift, scale = measure_standardisation(latents)                 Rombach's scale factor
    prior = build_latent_prior(PriorConfig(..., latent_shift=shift, latent_scale=scale))
    strategy.run(prior.train_step, ((latents - shift) / scale, labels))
    maps = sample(prior.ema_denoiser, labels, noise, steps=20, guidance=2)   deterministic DDIM
    images = decoder([to_model_latents(maps, prior_config), one_hot(labels)])

Training (`LatentPrior.train_step`) noises a standardised latent map x0 to a random level t
of a cosine schedule, x_t = alpha(t) x0 + sigma(t) noise, and teaches the network to predict
v = alpha noise - sigma x0 (Salimans and Ho 2022; noise prediction is selectable). A share
of the steps sees the null class instead of the true one, so the same network also learns
the unconditional distribution: classifier-free guidance (Ho and Salimans 2022) then
extrapolates from the unconditional prediction towards the conditional one, trading
diversity (guidance 1) for class fidelity (guidance above 1). An exponential moving average
of the weights is what samples.

Sampling (`sample`) is DDIM with eta 0 (Song et al. 2021): a deterministic walk from pure
noise at t = 1 to a clean map, so the same noise always gives the same map. Counterfactuals
(`edit`) are SDEdit (Meng et al. 2022): a crop's latent is noised only part-way, to t =
strength, then walked back under another class; the coarse layout of the cilium survives
and the class-specific detail is redrawn.

The denoiser is a functional model of registered layers only, saved as one `.keras` file and
loadable in safe mode once this module is imported:

    denoiser([noisy maps (n, side, side, C), noise levels t (n, 1), class indices (n,)]) -> (n, side, side, C)

where class index num_classes is the null class (no label).

Why one file: the network, its noise schedule, its loss and its sampler must agree on one
schedule and one prediction convention (v or noise); apart, they could drift without a test noticing.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from cilia_cvae.models import SERIALIZATION_PACKAGE, FiLM, _group_count
from cilia_cvae.training_settings import LOSS_WEIGHTINGS, PREDICTIONS

# Min-SNR-gamma (Hang et al. 2023): the loss of a noise level is weighted as if the clean map's
# error were weighted by min(SNR, gamma). Nearly clean maps (huge SNR) are easy and teach little
# about the layout of a cilium; capping their weight lets the steps that decide it learn faster.
MIN_SNR_GAMMA = 5.0
# The improved-DDPM offset (Nichol and Dhariwal 2021): at t = 0 the map still carries a little
# noise (sigma 0.0125), so the network is never asked about an infinitely clean input.
SCHEDULE_OFFSET = 0.008
# v-prediction runs the schedule to t = 1, pure noise (zero terminal SNR, Lin et al. 2024), so
# sampling starts from exactly the distribution it was trained on. Noise prediction cannot:
# it recovers x0 = (x - sigma noise) / alpha, so its schedule stops where this much signal
# remains (keras-io's ddim.py stops at the same signal rate).
NOISE_PREDICTION_FINAL_SIGNAL_RATE = 0.02
# Sinusoidal noise-level embedding: angular frequencies from 1 to this many radians per unit of t,
# the transformer's embedding of 1000 t. The slowest turns by 1 radian over t in [0, 1], so its
# sine and cosine are monotonic there and never confuse a clean map with pure noise (a whole
# cycle, as 2 pi would be, gives t = 0 and t = 1 the same features).
EMBEDDING_MAX_FREQUENCY = 1000.0
# Samples per call of the denoiser while sampling (twice as many pass with guidance).
SAMPLING_BATCH_SIZE = 256


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, kw_only=True)
class PriorConfig:
    """The latent maps a prior models, its network's size, its training and the latents' standardisation."""

    map_side: int = 28  # side of the CVAE's latent map (ModelConfig.map_side)
    latent_channels: int = 4  # numbers per cell of that map (ModelConfig.latent_map_channels)
    num_classes: int = 5  # class index num_classes is the null class of classifier-free guidance
    width: int = 32  # channels of the U-Net at the map's own resolution
    channel_multipliers: tuple = (1, 2, 2)  # width of each level, in units of width; a level per halving
    blocks_per_level: int = 2  # residual blocks per level, on the way down and on the way up
    attention: bool = True  # self-attention at the lowest level (7 x 7 at 28: cheap)
    attention_side: int = (
        0  # also self-attention after every residual block of the levels whose side is at most this (0: none)
    )
    position_channel: bool = (
        False  # give the network each cell's distance from the map's centre as one more input channel
    )
    label_dropout: float = 0.1  # share of training examples shown the null class instead of theirs
    max_noise_level: float = 1.0  # the highest noise level trained, a share of the schedule: 1 all of it (full draws); below 1 only edits up to that strength
    prediction: str = "v"  # what the network predicts: "v" (alpha noise - sigma x0) or "noise"
    loss_weighting: str = "uniform"  # "min_snr" (min-SNR-5 weights per noise level) or "uniform"
    ema_decay: float = 0.999  # decay of the moving average of the weights that samples
    latent_shift: float = 0.0  # mean of the training latents (standardised = (latent - shift) / scale)
    latent_scale: float = 1.0  # their standard deviation: Rombach's scale factor

    def __post_init__(self):
        # JSON gives the multipliers back as a list; a frozen config holds a tuple.
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        if not isinstance(self.position_channel, bool):
            raise ValueError(f"prior position_channel must be True or False, not {self.position_channel!r}")
        for name in ("map_side", "latent_channels", "num_classes", "width", "blocks_per_level"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"prior {name} must be a whole number of at least 1, not {value!r}")
        if not isinstance(self.attention_side, int) or self.attention_side < 0:
            raise ValueError(
                f"prior attention_side must be a whole number of at least 0, not {self.attention_side!r}"
            )
        multipliers = self.channel_multipliers
        if not multipliers or not all(isinstance(value, int) and value >= 1 for value in multipliers):
            raise ValueError(
                f"prior channel_multipliers must be whole numbers of at least 1, not {multipliers}"
            )
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prior prediction must be one of {PREDICTIONS}, not {self.prediction!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"prior loss_weighting must be one of {LOSS_WEIGHTINGS}, not {self.loss_weighting!r}"
            )
        if not 0 <= self.label_dropout < 1:  # also refuses nan
            raise ValueError(f"prior label_dropout must be at least 0 and below 1, not {self.label_dropout}")
        if not 0 < self.max_noise_level <= 1:  # also refuses nan
            raise ValueError(
                f"prior max_noise_level must be above 0 and at most 1, not {self.max_noise_level}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"prior ema_decay must be at least 0 and below 1, not {self.ema_decay}")
        if not math.isfinite(self.latent_shift):
            raise ValueError(f"prior latent_shift must be a finite number, not {self.latent_shift}")
        if not (math.isfinite(self.latent_scale) and self.latent_scale > 0):
            raise ValueError(f"prior latent_scale must be a positive finite number, not {self.latent_scale}")

    @property
    def null_class(self):
        return self.num_classes

    @property
    def map_shape(self):
        return (self.map_side, self.map_side, self.latent_channels)

    def to_json(self):
        return {**dataclasses.asdict(self), "channel_multipliers": list(self.channel_multipliers)}

    @classmethod
    def from_json(cls, values):
        return cls(**values)


# --------------------------------------------------------------------------- noise schedule


def schedule_end(prediction="v"):
    """The noise level sampling starts from: 1 (pure noise) for v, short of it for noise prediction."""
    if prediction == "v":
        return 1.0
    return 1.0 - (1.0 + SCHEDULE_OFFSET) * math.asin(NOISE_PREDICTION_FINAL_SIGNAL_RATE) / (math.pi / 2)


def signal_and_noise_rates(noise_levels):
    """alpha(t) = cos(pi/2 (t + s) / (1 + s)) and sigma(t) = sin of the same angle (alpha^2 + sigma^2 = 1).

    Written with the complementary angle so that t = 1 gives alpha 0 and sigma 1 exactly in
    float32: an edit at strength 1 then keeps nothing of its input, bit for bit.
    """
    complementary_angle = (1.0 - noise_levels) / (1.0 + SCHEDULE_OFFSET) * (math.pi / 2)
    return ops.sin(complementary_angle), ops.cos(complementary_angle)


def velocity(clean, noise, alpha, sigma):
    """The v-prediction target: the rate of change of x_t along the schedule's circle."""
    return alpha * noise - sigma * clean


def loss_weights(alpha, sigma, prediction="v", weighting="min_snr", gamma=MIN_SNR_GAMMA):
    """Per-example weights of the prediction's squared error: min(SNR, gamma) on the clean map's error.

    The v error is the clean map's error times (SNR + 1), the noise error times SNR, so the
    weights divide those factors out again. At t = 0 (SNR of about 6,400) they are small but finite.
    """
    if weighting == "uniform":
        return ops.ones_like(alpha)
    signal_to_noise = ops.square(alpha) / ops.maximum(ops.square(sigma), 1e-12)
    capped = ops.minimum(signal_to_noise, gamma)
    return (
        capped / (signal_to_noise + 1.0)
        if prediction == "v"
        else capped / ops.maximum(signal_to_noise, 1e-12)
    )


def clean_and_noise_from_prediction(noisy, prediction, alpha, sigma, kind="v"):
    """The clean map x0 and the noise that, by the network's prediction, make up x_t."""
    if kind == "v":
        return alpha * noisy - sigma * prediction, sigma * noisy + alpha * prediction
    return (noisy - sigma * prediction) / alpha, prediction


# --------------------------------------------------------------------------- the denoising U-Net


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class SinusoidalEmbedding(layers.Layer):
    """Noise levels (n, 1) as sines and cosines of geometrically spaced frequencies (n, dimension)."""

    def __init__(self, dimension, max_frequency=EMBEDDING_MAX_FREQUENCY, **kwargs):
        super().__init__(**kwargs)
        if dimension < 2 or dimension % 2:
            raise ValueError(
                f"the noise-level embedding needs an even dimension of at least 2, not {dimension}"
            )
        self.dimension = dimension
        self.max_frequency = max_frequency

    def call(self, noise_levels):
        frequencies = ops.exp(ops.linspace(0.0, math.log(self.max_frequency), self.dimension // 2))
        angles = ops.cast(noise_levels, "float32") * frequencies
        return ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.dimension)

    def get_config(self):
        return {**super().get_config(), "dimension": self.dimension, "max_frequency": self.max_frequency}


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class RadiusChannel(layers.Layer):
    """Maps (n, side, side, C) with one more channel: each cell's distance from the map's centre,
    1 at the middle of an edge.

    A crop is centred on its cilium, so where a doublet, an arm or the central pair belongs is
    a matter of distance from the centre; a convolution can only infer that from the padding
    at the borders, several layers deep. The distance, unlike x and y, is the same in all eight
    orientations the prior learns from.
    """

    def call(self, maps):
        side = maps.shape[1]
        coordinates = (ops.arange(side, dtype="float32") + 0.5) / side * 2.0 - 1.0
        radius = ops.sqrt(coordinates[:, None] ** 2 + coordinates[None, :] ** 2)
        radius = ops.broadcast_to(radius[None, :, :, None], (ops.shape(maps)[0], side, side, 1))
        return ops.concatenate([maps, ops.cast(radius, maps.dtype)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + 1)


def _residual_block(x, condition, channels, name):
    """GroupNorm, swish, conv, then GroupNorm modulated by the noise level and class (FiLM), swish, conv."""
    shortcut = x if x.shape[-1] == channels else layers.Conv2D(channels, 1, name=f"{name}_shortcut")(x)
    x = layers.GroupNormalization(groups=_group_count(x.shape[-1]), name=f"{name}_a_norm")(x)
    x = layers.Activation("swish", name=f"{name}_a_swish")(x)
    x = layers.Conv2D(channels, 3, padding="same", name=f"{name}_conv_a")(x)
    x = layers.GroupNormalization(groups=_group_count(channels), name=f"{name}_b_norm")(x)
    # Scale and shift after normalisation, as the improved DDPM U-Net does: the noise level
    # decides how much of the input to trust, the class what to draw.
    x = FiLM(channels, name=f"{name}_film")([x, condition])
    x = layers.Activation("swish", name=f"{name}_b_swish")(x)
    x = layers.Conv2D(channels, 3, padding="same", name=f"{name}_conv_b")(x)
    return layers.Add(name=f"{name}_add")([shortcut, x])


def _attention_block(x, name):
    """Self-attention over every cell of a map, so distant doublets can agree with each other."""
    side, channels = x.shape[1], x.shape[-1]
    attended = layers.GroupNormalization(groups=_group_count(channels), name=f"{name}_norm")(x)
    attended = layers.Reshape((side * side, channels), name=f"{name}_to_sequence")(attended)
    heads = max(1, channels // 32)
    attended = layers.MultiHeadAttention(heads, channels // heads, name=f"{name}_attention")(
        attended, attended
    )
    attended = layers.Reshape((side, side, channels), name=f"{name}_to_map")(attended)
    return layers.Add(name=f"{name}_add")([x, attended])


def _condition(noise_levels, class_indices, prior_config):
    """One vector per example that says how noisy its map is and which class it should become."""
    dimension = 4 * prior_config.width
    embedded_level = SinusoidalEmbedding(prior_config.width, name="noise_level_embedding")(noise_levels)
    embedded_level = layers.Dense(dimension, activation="swish", name="noise_level_dense_a")(embedded_level)
    embedded_level = layers.Dense(dimension, name="noise_level_dense_b")(embedded_level)
    # One more row than there are classes: the null class of classifier-free guidance. Rows of
    # unit scale (as the improved DDPM U-Net's embedding starts), not Keras's default +-0.05:
    # the class must be as audible as the noise level from the first step, or the zero-
    # initialised FiLM projections that read it hardly learn from it.
    embedded_class = layers.Embedding(
        prior_config.num_classes + 1,
        dimension,
        embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
        name="class_embedding",
    )(class_indices)
    condition = layers.Add(name="condition")([embedded_level, embedded_class])
    return layers.Activation("swish", name="condition_swish")(condition)


def level_sides(prior_config):
    """The map's side at each level: halved between levels while it is even and at least 4 (28, 14, 7;
    4, 2); a level that cannot halve keeps the side, so its weights are the same at every map size."""
    sides = [prior_config.map_side]
    for _ in prior_config.channel_multipliers[1:]:
        side = sides[-1]
        sides.append(side // 2 if side % 2 == 0 and side >= 4 else side)
    return sides


def build_denoiser(prior_config, name="denoiser"):
    """The U-Net: residual blocks at each level, skip connections, attention at the lowest map
    (and after each block of the levels no wider than attention_side)."""
    noisy_maps = keras.Input(prior_config.map_shape, name="noisy_latents")
    noise_levels = keras.Input((1,), name="noise_levels")
    class_indices = keras.Input((), dtype="int32", name="class_indices")
    condition = _condition(noise_levels, class_indices, prior_config)
    widths = [prior_config.width * multiplier for multiplier in prior_config.channel_multipliers]
    sides = level_sides(prior_config)

    x = RadiusChannel(name="radius_channel")(noisy_maps) if prior_config.position_channel else noisy_maps
    x = layers.Conv2D(prior_config.width, 3, padding="same", name="stem")(x)
    skips = []
    for level, channels in enumerate(widths):
        if level and sides[level] < sides[level - 1]:
            x = layers.AveragePooling2D(2, name=f"down{level}_pool")(x)
        for block in range(prior_config.blocks_per_level):
            x = _residual_block(x, condition, channels, f"down{level}_block{block}")
            if sides[level] <= prior_config.attention_side:
                x = _attention_block(x, f"down{level}_block{block}_attention")
            skips.append(x)
    x = _residual_block(x, condition, widths[-1], "middle_block_a")
    if prior_config.attention:
        x = _attention_block(x, "middle")
    x = _residual_block(x, condition, widths[-1], "middle_block_b")
    for level in reversed(range(len(widths))):
        for block in range(prior_config.blocks_per_level):
            x = layers.Concatenate(name=f"up{level}_block{block}_skip")([x, skips.pop()])
            x = _residual_block(x, condition, widths[level], f"up{level}_block{block}")
            if sides[level] <= prior_config.attention_side:
                x = _attention_block(x, f"up{level}_block{block}_attention")
        if level and sides[level] < sides[level - 1]:
            x = layers.UpSampling2D(2, interpolation="nearest", name=f"up{level}_upsample")(x)

    x = layers.GroupNormalization(groups=_group_count(x.shape[-1]), name="head_norm")(x)
    x = layers.Activation("swish", name="head_swish")(x)
    # A zero-initialised last convolution (as in keras-io's ddim.py): a fresh network predicts
    # 0, a loss of about 1 on standardised latents, and training starts from a calm place.
    outputs = layers.Conv2D(
        prior_config.latent_channels,
        3,
        padding="same",
        kernel_initializer="zeros",
        dtype="float32",
        name="head",
    )(x)
    return keras.Model([noisy_maps, noise_levels, class_indices], outputs, name=name)


def null_class_of(denoiser):
    """The null class index a denoiser was built with (its class embedding's last row)."""
    return denoiser.get_layer("class_embedding").input_dim - 1


# --------------------------------------------------------------------------- training


class LatentPrior(keras.Model):
    """Trains a denoiser on standardised latent maps and keeps a moving average of its weights.

    Each data element is (standardised latents, class indices) or (..., example weights), where
    weights are 1 for real examples and 0 for padding. Latents may be maps (n, side, side, C)
    or the flattened vectors the CVAE stores. Noise is drawn statelessly from the seed, the
    replica and the optimizer's step, so every replica draws its own and a resumed run draws
    what an uninterrupted one would have. The loss is averaged over the replica's batch and
    divided by the replicas in sync: the summed gradients equal one device's on the whole batch.
    """

    def __init__(self, prior_config, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.prior_config = prior_config
        self.seed = int(seed)
        self.denoiser = build_denoiser(prior_config)
        self.ema_denoiser = build_denoiser(prior_config, name="ema_denoiser")
        self.ema_denoiser.set_weights(self.denoiser.get_weights())
        self.ema_denoiser.trainable = False
        self.trackers = {"prior_loss": keras.metrics.Mean(name="prior_loss")}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=False):
        return self.denoiser(inputs, training=training)

    def _unpack(self, data):
        latents, labels, *weights = data
        latents = ops.reshape(ops.cast(latents, "float32"), (-1, *self.prior_config.map_shape))
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
        weights = ops.cast(weights[0], "float32") if weights else ops.ones_like(labels, dtype="float32")
        return latents, labels, weights

    def _replica_seed(self, stream):
        context = tf.distribute.get_replica_context()
        replica = context.replica_id_in_sync_group if context else 0
        return tf.random.experimental.stateless_fold_in(tf.constant([self.seed, stream], tf.int64), replica)

    def per_example_losses(self, latents, labels, seed, label_dropout=0.0, training=False):
        """Mean squared error of the network's prediction of v (or noise) at a random noise level,
        and the weight each example's error carries in training (loss_weights)."""
        level_seed, noise_seed, dropout_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        count = ops.shape(latents)[0]
        # Levels above max_noise_level are never drawn: a prior for variations up to that strength
        # spends all its steps on the levels they use (the top of the schedule is the global layout,
        # which a variation keeps from its crop).
        end = schedule_end(self.prior_config.prediction) * self.prior_config.max_noise_level
        noise_levels = tf.random.stateless_uniform((count, 1), level_seed) * end
        noise = tf.random.stateless_normal(ops.shape(latents), noise_seed)
        if label_dropout:
            dropped = tf.random.stateless_uniform((count,), dropout_seed) < label_dropout
            labels = ops.where(dropped, self.prior_config.null_class, labels)
        alpha, sigma = signal_and_noise_rates(noise_levels[:, :, None, None])
        noisy = alpha * latents + sigma * noise
        prediction = self.denoiser([noisy, noise_levels, labels], training=training)
        target = velocity(latents, noise, alpha, sigma) if self.prior_config.prediction == "v" else noise
        weights = loss_weights(alpha, sigma, self.prior_config.prediction, self.prior_config.loss_weighting)
        return ops.mean(ops.square(prediction - target), axis=(1, 2, 3)), ops.reshape(weights, (-1,))

    def _update_trackers(self, losses, weights):
        self.trackers["prior_loss"].update_state(losses, sample_weight=weights)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, data):
        latents, labels, weights = self._unpack(data)
        seed = tf.random.experimental.stateless_fold_in(self._replica_seed(0), self.optimizer.iterations)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            losses, level_weights = self.per_example_losses(
                latents, labels, seed, label_dropout=self.prior_config.label_dropout, training=True
            )
            # The history reports the plain error, comparable between weightings; the
            # gradient follows the weighted one.
            batch_loss = ops.sum(losses * level_weights * weights) / ops.maximum(ops.sum(weights), 1.0)
            scaled_loss = self.optimizer.scale_loss(batch_loss / replicas)
        gradients = tape.gradient(scaled_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        self._update_moving_average()
        return self._update_trackers(losses, weights)

    def test_step(self, data):
        # The same noise for every validation batch: epochs are compared on equal terms. No
        # label dropout: the conditional model is the one that samples.
        latents, labels, weights = self._unpack(data)
        losses, _ = self.per_example_losses(latents, labels, self._replica_seed(1))
        return self._update_trackers(losses, weights)

    def _update_moving_average(self):
        # The decay warms up as TensorFlow's ExponentialMovingAverage does with num_updates, so
        # the average is not dominated by the random initial weights in a short training.
        steps = ops.cast(self.optimizer.iterations, "float32")
        decay = ops.minimum(self.prior_config.ema_decay, (1.0 + steps) / (10.0 + steps))
        pairs = [
            (average.value, weight.value)
            for average, weight in zip(self.ema_denoiser.weights, self.denoiser.weights)
        ]

        def move_towards(average, weight, decay):
            return average.assign(decay * average + (1.0 - decay) * weight)

        def update(distribution, pairs, decay):
            # Every replica holds the same weights after the step; each device's copy of the
            # average is updated from its own copy of the weights, as the optimizer does.
            for average, weight in pairs:
                distribution.extended.update(average, move_towards, args=(weight, decay), group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            update, tf.distribute.get_strategy(), pairs, decay
        )


def build_latent_prior(prior_config, *, learning_rate=2e-4, seed=0, strategy=None, optimizer=None):
    """A LatentPrior with its optimizer (Adam unless one is given) built under the strategy's scope.

    A given optimizer must have been created under the same scope: its step counter, which
    seeds the noise and warms up the moving average, is then one mirrored variable rather
    than a counter every replica increments.
    """
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        prior = LatentPrior(prior_config, seed=seed)
        prior.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate))
        # The optimizer's slots now, inside the scope, rather than lazily inside a replica.
        prior.optimizer.build(prior.trainable_variables)
    return prior


# --------------------------------------------------------------------------- sampling and editing


@functools.lru_cache(maxsize=16)
def _denoising_step(denoiser, prediction_kind, guided):
    """One compiled DDIM step for this denoiser: the clean map it predicts and the next, less noisy, map."""
    null_class = null_class_of(denoiser)

    @tf.function(reduce_retracing=True)
    def step(noisy, labels, noise_level, next_noise_level, guidance):
        count = tf.shape(noisy)[0]
        levels = tf.fill((count, 1), noise_level)
        if guided:
            # The conditional and the unconditional half in one call: one pass over the weights.
            both = denoiser(
                [
                    tf.concat([noisy, noisy], 0),
                    tf.concat([levels, levels], 0),
                    tf.concat([labels, tf.fill((count,), null_class)], 0),
                ],
                training=False,
            )
            conditional, unconditional = tf.split(both, 2)
            prediction = unconditional + guidance * (conditional - unconditional)
        else:
            prediction = denoiser([noisy, levels, labels], training=False)
        alpha, sigma = signal_and_noise_rates(noise_level)
        clean, noise = clean_and_noise_from_prediction(noisy, prediction, alpha, sigma, prediction_kind)
        next_alpha, next_sigma = signal_and_noise_rates(next_noise_level)
        return clean, next_alpha * clean + next_sigma * noise

    return step


def _check_sampling_request(denoiser, labels, count, steps, guidance):
    """Refuse, in one line, what no sampler can do; the labels as int32 class indices."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampling needs a whole number of steps of at least 1, not {steps!r}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance must be a finite number of at least 0, not {guidance}")
    labels, null_class = np.asarray(labels), null_class_of(denoiser)
    if labels.shape != (count,) or np.any((labels < 0) | (labels > null_class)):
        raise ValueError(
            f"labels must be {count} class indices, one per map, from 0 to {null_class} (the null class)"
        )
    return labels.astype(np.int32)


def _denoise(denoiser, noisy, labels, *, start, steps, guidance, prediction, batch_size):
    """Deterministic DDIM (eta 0) from noise level `start` down to 0 in `steps` equal steps."""
    step = _denoising_step(denoiser, prediction, guidance != 1)
    levels = [start * (1.0 - index / steps) for index in range(steps + 1)]
    results = []
    for first in range(0, len(noisy), batch_size):
        maps = tf.constant(noisy[first : first + batch_size], tf.float32)
        chunk_labels = tf.constant(labels[first : first + batch_size], tf.int32)
        for level, next_level in zip(levels[:-1], levels[1:]):
            clean, maps = step(
                maps,
                chunk_labels,
                tf.constant(level, tf.float32),
                tf.constant(next_level, tf.float32),
                tf.constant(guidance, tf.float32),
            )
        # The last step's clean estimate, not the map at t = 0, which keeps the schedule's last trace of noise.
        results.append(clean.numpy())
    return np.concatenate(results) if results else np.zeros((0, *denoiser.output_shape[1:]), np.float32)


def sample(
    denoiser, labels, noise, *, steps=20, guidance=1.0, prediction="v", batch_size=SAMPLING_BATCH_SIZE
):
    """Standardised latent maps of the given classes, from this noise (n, side, side, C), by DDIM.

    guidance 1 is the conditional model alone (its unconditional half is never computed);
    above 1, classifier-free guidance: unconditional + guidance (conditional - unconditional).
    """
    noise = np.asarray(noise, np.float32)
    labels = _check_sampling_request(denoiser, labels, len(noise), steps, guidance)
    return _denoise(
        denoiser,
        noise,
        labels,
        start=schedule_end(prediction),
        steps=steps,
        guidance=guidance,
        prediction=prediction,
        batch_size=batch_size,
    )


def edit(
    denoiser,
    latents,
    target_labels,
    *,
    strength,
    steps=20,
    guidance=1.0,
    noise=None,
    seed=0,
    prediction="v",
    batch_size=SAMPLING_BATCH_SIZE,
):
    """SDEdit: standardised latent maps noised to t = strength (x strength of the schedule) and
    denoised under the target classes, in ceil(strength x steps) DDIM steps.

    Strength 0 returns the latents unchanged; strength 1 forgets them and equals `sample` from
    the same noise (bit for bit with v-prediction; noise prediction keeps 2% of signal at its end).
    The noise is drawn from the seed unless given.
    """
    latents = np.asarray(latents, np.float32)
    target_labels = _check_sampling_request(denoiser, target_labels, len(latents), steps, guidance)
    if not 0 <= strength <= 1:
        raise ValueError(f"edit strength must be between 0 and 1, not {strength}")
    if strength == 0:
        return latents.copy()
    if noise is None:
        noise = np.random.default_rng(seed).standard_normal(latents.shape).astype(np.float32)
    start = strength * schedule_end(prediction)
    alpha, sigma = (np.float32(rate) for rate in signal_and_noise_rates(np.float32(start)))
    noisy = alpha * latents + sigma * np.asarray(noise, np.float32)
    return _denoise(
        denoiser,
        noisy,
        target_labels,
        start=start,
        steps=math.ceil(strength * steps),
        guidance=guidance,
        prediction=prediction,
        batch_size=batch_size,
    )


# --------------------------------------------------------------------------- the data it learns from


def eight_orientations(images):
    """The eight dihedral transforms of an (n, S, S, channels) batch, stacked orientation by orientation
    into (8 n, S, S, channels): the quarter turns 0, 1, 2, 3, then the same turns of the mirrored images.

    A cilium has no preferred orientation in a section, so each is as real as the crop itself.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"eight_orientations needs square images (n, S, S, channels), not {images.shape}")
    mirrored = images[:, :, ::-1]
    return np.concatenate(
        [np.rot90(batch, turns, axes=(1, 2)) for batch in (images, mirrored) for turns in range(4)]
    )


def measure_standardisation(latent_maps):
    """The shift and scale that give the training latents mean 0 and standard deviation 1 over all values."""
    values = np.asarray(latent_maps, np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("the latents to standardise must be a non-empty array of finite numbers")
    shift, scale = float(values.mean()), float(values.std())
    if scale <= 0:
        raise ValueError("the latents have no spread (every value is the same): there is nothing to model")
    return shift, scale


def from_model_latents(latents, prior_config):
    """The CVAE's latents (flattened vectors or maps) as the standardised maps the prior works on."""
    maps = np.asarray(latents, np.float32).reshape(-1, *prior_config.map_shape)
    return ((maps - prior_config.latent_shift) / prior_config.latent_scale).astype(np.float32)


def to_model_latents(standardised_maps, prior_config):
    """Standardised maps back to the flattened latent vectors the CVAE's decoder reads."""
    maps = np.asarray(standardised_maps, np.float32) * prior_config.latent_scale + prior_config.latent_shift
    return maps.reshape(len(maps), -1).astype(np.float32)
