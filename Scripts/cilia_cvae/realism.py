"""Image statistics that tell a TEM crop's look, measured the same way on real crops and phantoms.

Each statistic is a number per image that does not depend on the crop's pixel size (crops run
from 139 to 912 px across), so a real crop can be placed within the phantoms' distribution of it:
a real crop far outside (below the 5th or above the 95th percentile) names what the phantoms
get wrong. They follow what a TEM reader looks at:

- grey levels: the 5th, 50th and 95th percentiles (exposure, contrast, a washed-out print);
- texture: the slope of the radially averaged power spectrum (how detail falls off with scale),
  the share of the image's variation at the finest scale (grain), and the spread of local
  contrast (flat fills against patchy stain);
- the membrane: its thickness and the pale gap between it and the doublets, both relative to the
  cilium's diameter, read from profiles along rays out of the cilium's centre.

Only numpy and scipy: the phantom generator's side of the project never imports TensorFlow.
"""

import math

import numpy as np
from PIL import Image
from scipy import ndimage

# Texture and the membrane are measured on the crop resized so its short side has this many
# pixels: every crop then spans a cilium of about the same number of pixels.
WORKING_SIDE = 256
RAY_COUNT = 120
# The power spectrum's slope is fitted between these spatial frequencies (cycles per pixel at
# the working size): structures from about 4 to 32 px, the doublets down to the tubule walls.
SPECTRUM_BAND = (1 / 32, 1 / 4)

STATISTICS = {
    "grey_p05": "5th percentile of the grey levels (0-255): the darkest structures",
    "grey_p50": "median grey level",
    "grey_p95": "95th percentile: the background",
    "spectrum_slope": "slope of log power against log frequency, 4-32 px at 256 px",
    "fine_grain_share": "share of the variation left after a 1-px blur at full size: grain",
    "local_contrast_spread": "interquartile range of 7x7 local contrast, over the global range",
    "membrane_thickness": "membrane's dark line across, over the cilium's diameter",
    "membrane_gap": "pale band from the membrane to the doublets, over the diameter",
}


def grey_array(path_or_image):
    """An image file (any mode) or array as float grey levels 0-255."""
    if isinstance(path_or_image, np.ndarray):
        return path_or_image.astype(np.float64)
    with Image.open(path_or_image) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def at_working_size(grey):
    height, width = grey.shape
    scale = WORKING_SIDE / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(grey.astype(np.float32), mode="F").resize(size, Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.float64)


def spectrum_slope(working):
    """Least-squares slope of the radially averaged log power spectrum over SPECTRUM_BAND."""
    square = working[:WORKING_SIDE, :WORKING_SIDE]
    window = np.outer(np.hanning(square.shape[0]), np.hanning(square.shape[1]))
    power = np.abs(np.fft.fftshift(np.fft.fft2((square - square.mean()) * window))) ** 2
    rows, columns = np.indices(power.shape)
    radius = np.hypot(rows - power.shape[0] // 2, columns - power.shape[1] // 2) / square.shape[0]
    bins = np.geomspace(*SPECTRUM_BAND, 13)
    index = np.digitize(radius.ravel(), bins)
    frequencies, powers = [], []
    for band in range(1, len(bins)):
        inside = index == band
        if inside.any():
            frequencies.append(math.sqrt(bins[band - 1] * bins[band]))
            powers.append(power.ravel()[inside].mean())
    slope, _ = np.polyfit(np.log(frequencies), np.log(np.asarray(powers) + 1e-12), 1)
    return float(slope)


def fine_grain_share(grey):
    """How much of the crop's variation is pixel-scale grain (at its own size, where grain lives)."""
    smooth = ndimage.gaussian_filter(grey, 1.0)
    return float(np.std(grey - smooth) / (np.std(grey) + 1e-9))


def local_contrast_spread(working, grey_range):
    mean = ndimage.uniform_filter(working, 7)
    mean_of_squares = ndimage.uniform_filter(working**2, 7)
    local = np.sqrt(np.maximum(mean_of_squares - mean**2, 0.0)) / grey_range
    low, high = np.percentile(local, [25, 75])
    return float(high - low)


def cilium_mask(smooth):
    """The cilium: the filled dark region (Otsu threshold) nearest the crop's centre."""
    values = smooth.ravel()
    histogram, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    weights = np.cumsum(histogram)
    means = np.cumsum(histogram * centres)
    total_weight, total_mean = weights[-1], means[-1]
    between = (total_mean * weights / total_weight - means) ** 2 / (
        weights * (total_weight - weights) / total_weight + 1e-9
    )
    dark = ndimage.binary_opening(smooth < centres[np.argmax(between)], iterations=2)
    filled = ndimage.binary_fill_holes(ndimage.binary_closing(dark, iterations=3))
    labels, count = ndimage.label(filled)
    if count == 0:
        return None
    rows, columns = np.indices(smooth.shape)
    centre = np.array(smooth.shape) / 2
    best, best_score = None, -np.inf
    for label in range(1, count + 1):
        region = labels == label
        area = region.sum()
        distance = np.hypot(rows[region].mean() - centre[0], columns[region].mean() - centre[1])
        score = area / (1.0 + distance / min(smooth.shape))
        if score > best_score:
            best, best_score = region, score
    return best


def membrane_measures(working):
    """Median over rays of the membrane's thickness and its gap to the doublets, over the diameter."""
    smooth = ndimage.gaussian_filter(working, 1.0)
    mask = cilium_mask(ndimage.gaussian_filter(working, 2.5))
    if mask is None or mask.sum() < 0.05 * mask.size:
        return math.nan, math.nan
    diameter = 2.0 * math.sqrt(mask.sum() / math.pi)
    rows, columns = np.nonzero(mask)
    centre = np.array([rows.mean(), columns.mean()])
    radii = np.arange(0.0, 0.75 * diameter, 0.5)
    thicknesses, gaps = [], []
    for angle in np.linspace(0.0, 2 * math.pi, RAY_COUNT, endpoint=False):
        points = centre[:, None] + np.outer([math.sin(angle), math.cos(angle)], radii)
        inside = ndimage.map_coordinates(mask.astype(np.float64), points, order=0, cval=0.0) > 0.5
        profile = ndimage.map_coordinates(smooth, points, order=1, mode="nearest")
        measured = ray_measures(profile, inside, diameter)
        if measured is not None:
            thicknesses.append(measured[0])
            gaps.append(measured[1])
    if len(thicknesses) < RAY_COUNT // 4:
        return math.nan, math.nan
    return float(np.median(thicknesses)), float(np.median(gaps))


def ray_measures(profile, inside, diameter):
    """One ray (samples every 0.5 px outward): the membrane's width at half depth, then the gap."""
    step = 0.5
    if not inside.any() or inside[-1]:
        return None
    edge = int(np.nonzero(inside)[0].max())
    near = lambda fraction: max(1, int(fraction * diameter / step))  # noqa: E731
    low, high = max(0, edge - near(0.06)), min(len(profile), edge + near(0.02))
    membrane = low + int(np.argmin(profile[low:high]))
    outside = profile[min(len(profile) - 1, membrane + near(0.03)) : membrane + near(0.08)]
    pale_band = profile[max(0, membrane - near(0.14)) : max(1, membrane - near(0.01))]
    if outside.size == 0 or pale_band.size == 0:
        return None
    darkest, pale = profile[membrane], pale_band.max()
    outer_half, inner_half = (darkest + np.median(outside)) / 2, (darkest + pale) / 2
    if pale - darkest < 4.0:  # no membrane to speak of on this ray
        return None
    outer = membrane
    while outer + 1 < len(profile) and profile[outer + 1] < outer_half:
        outer += 1
    inner = membrane
    while inner - 1 > 0 and profile[inner - 1] < inner_half:
        inner -= 1
    # Inward from the membrane's inner face: pale matrix until the doublets darken it again.
    doublet = inner - 1
    limit = max(0, inner - near(0.3))
    while doublet > limit and profile[doublet] >= inner_half:
        doublet -= 1
    if doublet <= limit:
        return None
    return (outer - inner + 1) * step / diameter, (inner - doublet) * step / diameter


def measure(path_or_image):
    """Every statistic of STATISTICS for one crop, as a dict of floats (NaN where unmeasurable)."""
    grey = grey_array(path_or_image)
    p05, p50, p95 = np.percentile(grey, [5, 50, 95])
    working = at_working_size(grey)
    thickness, gap = membrane_measures(working)
    return {
        "grey_p05": float(p05),
        "grey_p50": float(p50),
        "grey_p95": float(p95),
        "spectrum_slope": spectrum_slope(working),
        "fine_grain_share": fine_grain_share(grey),
        "local_contrast_spread": local_contrast_spread(working, max(p95 - p05, 1.0)),
        "membrane_thickness": thickness,
        "membrane_gap": gap,
    }


def percentile_within(value, distribution):
    """Where `value` falls in `distribution`, 0-100 (ties counted half), NaN if either is unmeasured."""
    distribution = np.asarray([v for v in distribution if math.isfinite(v)])
    if not math.isfinite(value) or distribution.size == 0:
        return math.nan
    below = np.sum(distribution < value) + 0.5 * np.sum(distribution == value)
    return float(100.0 * below / distribution.size)
