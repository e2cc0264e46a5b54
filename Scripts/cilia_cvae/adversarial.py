"""The adversarial patch loss of the first stage (ADVERSARIAL_WEIGHT): sharper edges than a pixel loss draws.

A Gaussian likelihood is minimised by the mean of what the latent leaves open, so a decoder trained
on it alone draws soft edges and no grain. Latent diffusion's first stage (Rombach et al. 2022,
after VQGAN, Esser et al. 2021) adds a discriminator that judges small patches, real crop against
reconstruction: the decoder is then pulled toward patches that look real, not toward their mean.
Here, as there:

- the discriminator is a small fully convolutional network whose every output judges one patch of
  about two doublets (38 px at 224; one more stride per doubling of the side), with spectral
  normalisation on every convolution, which keeps its gradients tame on a small data set;
- hinge losses; the decoder's adversarial term starts after a warm-up (ADVERSARIAL_START_EPOCH),
  once reconstructions are good enough for their patches to be judged on detail, not layout;
- its weight is adapted at every step to the reconstruction loss's gradient at the decoder's last
  layer (VQGAN's lambda): the adversarial pull is ADVERSARIAL_WEIGHT times as strong there as the
  pull of the pixels, whatever the scale of the reconstruction loss.

The discriminator and its optimizer live in the CVAE model, so they travel in its checkpoint and a
killed run resumes with them; they are not saved with the encoder and decoder (inference never
needs them).
"""

import math

import keras
from keras import layers, ops

# Adam as VQGAN trains its discriminator: a short memory of the gradient's direction (beta_1 0.5).
DISCRIMINATOR_BETAS = (0.5, 0.9)
BASE_CHANNELS = 16
# VQGAN's bounds on the adaptive weight: a vanishing adversarial gradient must not blow it up.
ADAPTIVE_WEIGHT_EPSILON = 1e-4
ADAPTIVE_WEIGHT_MAXIMUM = 1e4


def downsampling_levels(image_size):
    """Three stride-2 steps at 224 and below (a 38 px patch), one more per doubling of the side."""
    return 3 + max(0, int(round(math.log2(max(image_size, 224) / 224))))


def build_patch_discriminator(image_size, base_channels=BASE_CHANNELS):
    """images (n, S, S, 1) in [0, 1] -> one logit per patch (n, S / 2^levels, S / 2^levels, 1)."""
    images = keras.Input((image_size, image_size, 1), name="images")
    x = layers.Rescaling(2.0, offset=-1.0, name="to_signed")(images)
    for level in range(downsampling_levels(image_size)):
        width = base_channels * 2 ** min(level, 3)
        # No bias: a fused convolution + bias + leaky ReLU breaks TensorFlow's graph rewriter under the
        # persistent tape of the adaptive weight (an error line at every start, though harmless).
        convolution = layers.Conv2D(
            width, 4, strides=2, padding="same", use_bias=False, name=f"down{level + 1}_conv"
        )
        x = layers.SpectralNormalization(convolution, name=f"down{level + 1}")(x)
        x = layers.LeakyReLU(0.2, name=f"down{level + 1}_leaky_relu")(x)
    logits = layers.SpectralNormalization(
        layers.Conv2D(1, 3, padding="same", dtype="float32", name="patch_logits_conv"), name="patch_logits"
    )(x)
    return keras.Model(images, logits, name="patch_discriminator")


def discriminator_optimizer(learning_rate):
    return keras.optimizers.Adam(learning_rate, beta_1=DISCRIMINATOR_BETAS[0], beta_2=DISCRIMINATOR_BETAS[1])


def per_example_mean(logits):
    return ops.mean(logits, axis=(1, 2, 3))


def discriminator_hinge_losses(real_logits, fake_logits):
    """Per example: the hinge loss of the discriminator on a real crop and on a reconstruction."""
    return per_example_mean(ops.relu(1.0 - real_logits)) + per_example_mean(ops.relu(1.0 + fake_logits))


def generator_hinge_losses(fake_logits):
    """Per example: the decoder's adversarial loss, lower when its patches are judged real."""
    return -per_example_mean(fake_logits)


def adaptive_weight(reconstruction_gradient, adversarial_gradient, weight):
    """VQGAN's lambda: the ratio of the two gradients' norms at the last layer, times `weight`."""
    ratio = ops.sqrt(ops.sum(ops.square(reconstruction_gradient))) / (
        ops.sqrt(ops.sum(ops.square(adversarial_gradient))) + ADAPTIVE_WEIGHT_EPSILON
    )
    return ops.stop_gradient(ops.clip(ratio, 0.0, ADAPTIVE_WEIGHT_MAXIMUM) * weight)
