"""The grain a decoder averages away, measured on the training split and drawn back onto its images.

A Gaussian-likelihood decoder predicts the mean of what a latent leaves open, and the stain's grain
and the exact course of an edge cannot be predicted, so every decoded image is smoother than the
crops it learnt from. What is missing is measurable: the residual between training crops and their
reconstructions. Its fine-scale part is recorded after training as

- its power spectrum, radially averaged (how the grain is correlated: its size, not only strength);
- how its strength depends on the local grey level (TEM grain is not uniform: dense stain and the
  pale background differ);
- how its strength varies from crop to crop (sections differ: one crop is grainy, the next soft),
  as quantiles of each crop's strength over the typical one;

and at inference, noise with that spectrum, scaled by the strength at each pixel's grey level and by a
factor drawn for the image from those quantiles, is added to decoded images (inference's GRAIN). Only scales finer than LONGEST_WAVELENGTH_SHARE of the
image side count as grain: a coarser residual is layout the decoder got wrong (a faint arm, a
shifted doublet), and drawing it at random would add blobs, not texture.

Only numpy: the model is a small JSON file, read without executing anything.
"""

import math

import numpy as np

VERSION = 2
# Residual wavelengths longer than this share of the image side are layout, not grain: 1/28 is
# 8 px at 224, under half a doublet's width (measured at 224: the texture statistics are the same
# with 16 px, and a shorter limit leaves the images with less fine grain than the real ones).
LONGEST_WAVELENGTH_SHARE = 1 / 28
# Pixel-scale grain counts at any size: on small images (under 84 px) the limit is this many pixels.
SHORTEST_LONGEST_WAVELENGTH = 3.0
FREQUENCY_BINS = 40  # radial bins of the power spectrum, from 0 to the corner of the spectrum
GREY_BINS = 16  # bins of the reconstruction's grey level for the strength curve
MINIMUM_PIXELS_PER_BIN = 500  # a grey bin with fewer pixels takes its neighbours' strength
FACTOR_QUANTILES = 21  # quantiles (0, 5, ..., 100%) of the crops' grain strength over its root mean square
# The random stream of grain noise: per (seed, class, image number), so an image's grain does not
# depend on the batch it was drawn in or on the other classes of the run.
STREAM = 2_000_003


def _frequency_radius(side):
    frequencies = np.fft.fftfreq(side)
    return np.hypot(frequencies[:, None], frequencies[None, :])


def _frequency_edges():
    return np.linspace(0.0, math.sqrt(0.5) + 1e-9, FREQUENCY_BINS + 1)


def longest_wavelength(side):
    """The longest wavelength, in pixels, that counts as grain on images of this side."""
    return max(LONGEST_WAVELENGTH_SHARE * side, SHORTEST_LONGEST_WAVELENGTH)


def fine_scale_part(residuals):
    """The residuals (n, S, S) without their scales longer than the grain's longest wavelength."""
    side = residuals.shape[1]
    keep = _frequency_radius(side) >= 1.0 / longest_wavelength(side)
    return np.real(np.fft.ifft2(np.fft.fft2(residuals) * keep))


class GrainAccumulator:
    """Collects a residual's spectrum and strength per grey level, batch by batch (the train split
    need not fit in memory)."""

    def __init__(self, side):
        self.side = side
        self.power = np.zeros((side, side))
        self.images = 0
        self.residual_square_sum = 0.0
        self.pixels = 0
        self.grey_edges = np.linspace(0.0, 1.0, GREY_BINS + 1)
        self.counts = np.zeros(GREY_BINS)
        self.sums = np.zeros(GREY_BINS)
        self.square_sums = np.zeros(GREY_BINS)
        self.image_strengths = []

    def add(self, images, reconstructions):
        """images and reconstructions (n, S, S) in [0, 1]."""
        images, reconstructions = np.asarray(images, np.float64), np.asarray(reconstructions, np.float64)
        residuals = images - reconstructions
        self.residual_square_sum += float(
            np.sum((residuals - residuals.mean(axis=(1, 2), keepdims=True)) ** 2)
        )
        self.pixels += residuals.size
        grain = fine_scale_part(residuals)
        self.image_strengths.extend(np.std(grain, axis=(1, 2)).tolist())
        self.power += np.sum(np.abs(np.fft.fft2(grain)) ** 2, axis=0) / (self.side * self.side)
        self.images += len(images)
        bins = np.clip(np.digitize(reconstructions, self.grey_edges) - 1, 0, GREY_BINS - 1)
        self.counts += np.bincount(bins.ravel(), minlength=GREY_BINS)
        self.sums += np.bincount(bins.ravel(), weights=grain.ravel(), minlength=GREY_BINS)
        self.square_sums += np.bincount(bins.ravel(), weights=(grain**2).ravel(), minlength=GREY_BINS)

    def model(self, fitted_on):
        """The grain model as a JSON-able dict."""
        if self.images == 0:
            raise ValueError("a grain model needs at least one image")
        radius = _frequency_radius(self.side)
        edges = _frequency_edges()
        index = np.clip(np.digitize(radius, edges) - 1, 0, FREQUENCY_BINS - 1)
        power = self.power / self.images
        profile = np.bincount(index.ravel(), weights=power.ravel(), minlength=FREQUENCY_BINS) / np.maximum(
            np.bincount(index.ravel(), minlength=FREQUENCY_BINS), 1
        )
        means = self.sums / np.maximum(self.counts, 1)
        deviations = np.sqrt(np.maximum(self.square_sums / np.maximum(self.counts, 1) - means**2, 0.0))
        reliable = self.counts >= MINIMUM_PIXELS_PER_BIN
        centres = (self.grey_edges[:-1] + self.grey_edges[1:]) / 2
        if reliable.any():
            # Grey levels the reconstructions rarely reach borrow the nearest measured strength.
            deviations = np.interp(centres, centres[reliable], deviations[reliable])
        overall = math.sqrt(max(float(np.sum(self.square_sums) / max(np.sum(self.counts), 1)), 0.0))
        # Over the root mean square, so that drawing the factors keeps the average power measured.
        strengths = np.asarray(self.image_strengths)
        factors = np.quantile(strengths, np.linspace(0, 1, FACTOR_QUANTILES)) / max(
            math.sqrt(float(np.mean(strengths**2))), 1e-12
        )
        return {
            "version": VERSION,
            "image_size": self.side,
            "longest_wavelength_px": longest_wavelength(self.side),
            "frequency_edges": [float(value) for value in edges],
            "power_profile": [float(value) for value in profile],
            "grey_centres": [float(value) for value in centres],
            "strength_by_grey": [float(value) for value in deviations],
            "pixels_by_grey": [int(value) for value in self.counts],
            "strength_factor_quantiles": [float(value) for value in factors],
            "grain_std": overall,
            "residual_std": math.sqrt(self.residual_square_sum / max(self.pixels, 1)),
            "images": int(self.images),
            **fitted_on,
        }


def check_model(model, image_size):
    """A loaded grain model's shape, or ValueError naming what is wrong."""
    expected = {
        "power_profile": FREQUENCY_BINS,
        "frequency_edges": FREQUENCY_BINS + 1,
        "grey_centres": GREY_BINS,
        "strength_by_grey": GREY_BINS,
        "strength_factor_quantiles": FACTOR_QUANTILES,
    }
    if not isinstance(model, dict) or model.get("version") != VERSION:
        raise ValueError("it is not a grain model of this version")
    for name, length in expected.items():
        values = model.get(name)
        if not isinstance(values, list) or len(values) != length:
            raise ValueError(f"its {name} is not {length} numbers")
        if not all(isinstance(value, int | float) and math.isfinite(value) for value in values):
            raise ValueError(f"its {name} holds a value that is not a finite number")
    if model.get("image_size") != image_size:
        raise ValueError(f"it was measured at {model.get('image_size')} px, not {image_size}")
    if (
        min(model["power_profile"]) < 0
        or min(model["strength_by_grey"] + model["strength_factor_quantiles"]) < 0
    ):
        raise ValueError("it holds a negative power or strength")


def _spectral_amplitude(model, side):
    edges = np.asarray(model["frequency_edges"])
    index = np.clip(np.digitize(_frequency_radius(side), edges) - 1, 0, len(edges) - 2)
    return np.sqrt(np.asarray(model["power_profile"])[index])


def unit_grain(model, side, rng):
    """One field of grain with the model's spectrum, scaled to a standard deviation of 1."""
    white = rng.standard_normal((side, side))
    field = np.real(np.fft.ifft2(np.fft.fft2(white) * _spectral_amplitude(model, side)))
    return field / max(float(field.std()), 1e-12)


def add_grain(images, model, rngs):
    """Decoded images (n, S, S) uint8 with grain drawn onto them, one random generator per image."""
    pixels = np.asarray(images, np.float64) / 255.0
    side = pixels.shape[1]
    centres, strengths = np.asarray(model["grey_centres"]), np.asarray(model["strength_by_grey"])
    factors = np.asarray(model["strength_factor_quantiles"])
    out = np.empty_like(pixels)
    for index, (image, rng) in enumerate(zip(pixels, rngs)):
        # This crop's grain: a typical one's strength times a factor drawn from the crops' own spread.
        factor = np.interp(rng.uniform(), np.linspace(0, 1, len(factors)), factors)
        strength = factor * np.interp(image, centres, strengths)
        out[index] = image + strength * unit_grain(model, side, rng)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def image_rngs(seed, label, numbers):
    """The random generator of each image's grain, from the run's seed, the class and its number."""
    return [np.random.default_rng([seed, label, STREAM, int(number)]) for number in numbers]
