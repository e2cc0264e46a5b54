"""Do generated images keep TEM's look? Their realism statistics placed among the real test images.

A Gaussian-likelihood decoder averages away what it cannot predict (grain, the exact position of
an edge), so a blurred image can be true to its class and still be rejected at a glance. Two
measures say how far generated images are from the real ones' look, both without TensorFlow:

- each statistic of realism.py (grey levels, spectrum slope, fine grain, local contrast, membrane),
  measured on every generated image and placed among the same statistic of the real test images:
  the median of those percentiles, and whether it falls inside the real 5-95th band (a generated
  set whose median sits at the 1st percentile is, typically, less grainy than 99% of real crops);
- the ratio of generated to real radially averaged power at the finest scales (wavelengths of 2-4
  pixels at the images' own size), where blur shows first: 1 is real, 0.1 a tenth of the grain.
"""

import math

import numpy as np

from cilia_cvae import realism

# Realism statistics are measured on at most this many images per class of each side (about 70 ms
# an image at 224 px): 60 per class places a median within a percentile point or two.
IMAGES_PER_CLASS = 60
BAND = (5.0, 95.0)
# The texture statistics: the ones a blur moves (the grey levels and membrane are layout, not look).
TEXTURE_STATISTICS = ("spectrum_slope", "fine_grain_share", "local_contrast_spread")
# Spatial frequencies, in cycles per pixel, of the finest scales (wavelengths of 2-4 px) and of the
# octaves reported beside them, coarsest first.
FINEST_BAND = (0.25, 0.5)
OCTAVES = ((1 / 32, 1 / 16), (1 / 16, 1 / 8), (1 / 8, 1 / 4), (1 / 4, 1 / 2))


def sample_per_class(paths, labels, count, seed):
    """At most `count` paths of each label, drawn with the seed (the same every run)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        indices = np.flatnonzero(labels == label)
        chosen.extend(sorted(rng.choice(indices, size=min(count, indices.size), replace=False)))
    return [paths[index] for index in chosen]


def measure_all(paths):
    """realism.measure of every path, as a dict of arrays by statistic."""
    measured = [realism.measure(path) for path in paths]
    return {name: np.array([row[name] for row in measured]) for name in realism.STATISTICS}


def radial_power(grey):
    """Mean power per spatial-frequency bin (cycles per pixel) of the crop's centred square, windowed."""
    side = min(grey.shape)
    top, left = (grey.shape[0] - side) // 2, (grey.shape[1] - side) // 2
    square = grey[top : top + side, left : left + side]
    window = np.outer(np.hanning(side), np.hanning(side))
    power = np.abs(np.fft.fft2((square - square.mean()) * window)) ** 2
    frequencies = np.fft.fftfreq(side)
    radius = np.hypot(frequencies[:, None], frequencies[None, :])
    return radius, power


def band_power(paths, bands):
    """Each band's mean power over the images (their own size, per pixel)."""
    totals = np.zeros(len(bands))
    for path in paths:
        radius, power = radial_power(realism.grey_array(path))
        for index, (low, high) in enumerate(bands):
            inside = (radius >= low) & (radius < high)
            totals[index] += power[inside].mean() / radius.size
    return totals / max(len(paths), 1)


def statistics_against_real(generated, real):
    """Per statistic: the generated images' median percentile among the real ones, and the band."""
    rows = {}
    for name in realism.STATISTICS:
        real_values = real[name][np.isfinite(real[name])]
        percentiles = [realism.percentile_within(value, real_values) for value in generated[name]]
        percentiles = np.array([value for value in percentiles if math.isfinite(value)])
        if real_values.size < 2 or percentiles.size == 0:
            rows[name] = {"measured": False}
            continue
        median = float(np.median(percentiles))
        rows[name] = {
            "measured": True,
            "median_percentile": median,
            "in_band": bool(BAND[0] <= median <= BAND[1]),
            "generated_median": float(np.nanmedian(generated[name])),
            "real_median": float(np.median(real_values)),
            "real_band": [float(value) for value in np.percentile(real_values, BAND)],
            "generated_measured": int(percentiles.size),
        }
    return rows


def texture_report(generated_paths, generated_labels, real_paths, real_labels, seed=0):
    """The look of generated images against the real test images: the report's "texture" entry."""
    generated = sample_per_class(generated_paths, np.asarray(generated_labels), IMAGES_PER_CLASS, seed)
    real = sample_per_class(real_paths, np.asarray(real_labels), IMAGES_PER_CLASS, seed)
    statistics = statistics_against_real(measure_all(generated), measure_all(real))
    measured = [name for name, row in statistics.items() if row["measured"]]
    generated_power, real_power = band_power(generated, OCTAVES), band_power(real, OCTAVES)
    finest = band_power(generated, [FINEST_BAND])[0] / max(band_power(real, [FINEST_BAND])[0], 1e-12)
    return {
        "statistics": statistics,
        "statistics_in_band": sum(statistics[name]["in_band"] for name in measured),
        "statistics_measured": len(measured),
        "texture_statistics_in_band": sum(
            statistics[name]["in_band"] for name in TEXTURE_STATISTICS if name in measured
        ),
        "texture_statistics_measured": sum(name in measured for name in TEXTURE_STATISTICS),
        "finest_scale_power_ratio": float(finest),
        "power_ratio_per_octave": {
            f"{1 / high:.0f}-{1 / low:.0f} px": float(generated_power[index] / max(real_power[index], 1e-12))
            for index, (low, high) in enumerate(OCTAVES)
        },
        "images": {"generated": len(generated), "real_test": len(real)},
    }


def markdown_lines(texture):
    """The report's section on texture: one row per statistic, then the power ratios."""
    lines = [
        "## Texture: do the images keep TEM's look?",
        "",
        f"Each realism statistic of {texture['images']['generated']} generated images placed among "
        f"{texture['images']['real_test']} real test images: the generated images' median percentile "
        f"(inside {BAND[0]:.0f}-{BAND[1]:.0f} is inside the real spread). "
        f"**{texture['statistics_in_band']} of {texture['statistics_measured']}** statistics in the band "
        f"({texture['texture_statistics_in_band']} of {texture['texture_statistics_measured']} texture ones); "
        f"finest-scale power (2-4 px) generated / real: **{texture['finest_scale_power_ratio']:.2f}**.",
        "",
        "| statistic | median percentile | in band | generated median | real median (5-95th) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in texture["statistics"].items():
        if not row["measured"]:
            lines.append(f"| {name} | not measured | | | |")
            continue
        low, high = row["real_band"]
        lines.append(
            f"| {name} | {row['median_percentile']:.0f} | {'yes' if row['in_band'] else 'no'} "
            f"| {row['generated_median']:.3g} | {row['real_median']:.3g} ({low:.3g} - {high:.3g}) |"
        )
    octaves = ", ".join(f"{band}: {ratio:.2f}" for band, ratio in texture["power_ratio_per_octave"].items())
    lines += ["", f"Power generated / real per octave of wavelength: {octaves}.", ""]
    return lines
