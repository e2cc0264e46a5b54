"""The specimen's stain and the microscope: stain density -> an 8-bit micrograph.

`apply_microscope` runs, each setting drawn per image and the same way for every class:
1. stain: uneven uptake across the section (a slow multiplicative field), clumpy texture at
   two scales whose strength follows the region (phantom_drawing's texture layer: little in
   the resin, most in the axoneme's centre and the cytoplasm) and drifts across the crop,
   patches, and grain at the pixel scale of the scan;
2. focus: a blur that itself varies across the crop;
3. exposure: absorption, an underfocus fringe, uneven illumination, shot noise;
4. print: background and darkest grey levels, gamma, and JPEG in half of the images.
"""

import io
import math

import numpy as np
from PIL import Image
from scipy import ndimage

from cilia_cvae.phantom_anatomy import DENSITY

ABSORPTION = 1.8  # transmitted intensity is exp(-ABSORPTION * density)


def upsampled_noise(rng, shape, cell_size):
    """Smooth random field with blobs about `cell_size` pixels across, unit standard deviation.

    Drawn on a coarse grid and enlarged with bicubic interpolation: as smooth as a Gaussian
    filter of white noise, at a fraction of the cost.
    """
    rows, columns = (max(2, math.ceil(side / cell_size) + 1) for side in shape)
    coarse = Image.fromarray(rng.standard_normal((rows, columns), dtype=np.float32), mode="F")
    smooth = np.asarray(coarse.resize((shape[1], shape[0]), Image.Resampling.BICUBIC), dtype=np.float32)
    return smooth / (smooth[::3, ::3].std() + 1e-6)


def blur(array, sigma):
    """Gaussian blur of `sigma` pixels; wide ones on a reduced copy, which they cannot tell apart.

    A blur of 4 px or more removes everything a 2x reduction loses, so it runs at a half or a
    quarter of the size (a third of the rendering time otherwise went to wide blurs).
    """
    factor = 1 if sigma < 4.0 else (2 if sigma < 8.0 else 4)
    if factor == 1:
        return ndimage.gaussian_filter(array, sigma, truncate=3.0)
    height, width = array.shape
    small = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F").reduce(factor)
    small = ndimage.gaussian_filter(np.asarray(small), sigma / factor, truncate=3.0)
    enlarged = Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(enlarged, dtype=np.float32)


def grain(rng, shape, sigma):
    """White noise blurred by `sigma` pixels, unit standard deviation: grain a few pixels across."""
    # Uniform noise costs a third of normal noise, and blurred it is as good as Gaussian.
    field = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32) - 0.5, sigma, truncate=3.0)
    return field / (field[::2, ::2].std() + 1e-6)


def stain(rng, density, texture, pixels_per_nm):
    """Stain is taken up unevenly, clumps where there is material to hold it, and is grainy.

    `texture` (from the drawing) says how much clumpy texture each region takes. Scales: grains
    of a pixel or two, clumps of 3-6 nm, clouds of 9-18 nm, patches of 20-60 nm, and an uptake
    that drifts over 100-250 nm.
    """
    shape = density.shape
    drift = upsampled_noise(rng, shape, max(6.0, rng.uniform(100.0, 250.0) * pixels_per_nm))
    uptake = 1.0 + rng.uniform(0.05, 0.2) * drift
    clumps = np.maximum(upsampled_noise(rng, shape, max(1.5, rng.uniform(3.0, 6.0) * pixels_per_nm)), -0.35)
    clouds = np.maximum(upsampled_noise(rng, shape, max(2.5, rng.uniform(9.0, 18.0) * pixels_per_nm)), -0.5)
    patches = upsampled_noise(rng, shape, max(4.0, rng.uniform(20.0, 60.0) * pixels_per_nm))
    grains = grain(rng, shape, rng.uniform(0.5, 1.4))
    # The texture's strength itself changes across the crop: stain is never stationary.
    local = texture * np.maximum(
        1.0 + rng.uniform(0.3, 0.8) * upsampled_noise(rng, shape, max(shape) / 3.0), 0.0
    )
    structured = local * (
        rng.uniform(0.06, 0.15) * clumps + rng.uniform(0.04, 0.1) * clouds + rng.uniform(0.01, 0.06) * grains
    )
    # Patches of stain lie mostly on material; the resin around the cells stays smoother.
    texture_sum = (
        structured
        + rng.uniform(0.02, 0.08) * patches * (0.4 + 0.6 * np.minimum(texture, 1.0))
        + rng.uniform(0.015, 0.1) * grains
    )
    # Protein-dense structures take up stain unevenly too: their walls come out grainy.
    stained = density * uptake + 0.02 + texture_sum * (0.6 + density)
    # Texture never bleaches material below a third of its density: no holes paler than the resin.
    return np.maximum(stained, 0.35 * density)


def defocus(rng, density, pixels_per_nm):
    """Blur of 1.0-2.3 nm that itself varies across the crop (focus, tilt, section thickness)."""
    sigma = rng.uniform(0.8, 2.3) * pixels_per_nm
    sharp = blur(density, sigma)
    soft = blur(density, sigma * rng.uniform(1.15, 1.7))
    weight = 1.0 / (1.0 + np.exp(-2.0 * upsampled_noise(rng, density.shape, max(density.shape) / 2.0)))
    return sharp + (soft - sharp) * weight, sigma


def expose(rng, density, sigma):
    """Electrons through the section: absorption, a faint defocus fringe, uneven illumination, shot noise."""
    shape = density.shape
    intensity = np.exp(-ABSORPTION * density * rng.uniform(0.85, 1.15))
    # Underfocus leaves a pale fringe beside dense edges (the membrane, walls).
    intensity += rng.uniform(0.0, 0.25) * (intensity - blur(intensity, 3.0 * sigma))
    intensity *= 1.0 + rng.uniform(0.02, 0.07) * upsampled_noise(
        rng, shape, max(shape) / rng.uniform(2.0, 5.0)
    )
    dose = rng.uniform(22.0, 300.0)
    noise = grain(rng, shape, rng.uniform(0.5, 1.3))
    return intensity + noise * np.sqrt(np.maximum(intensity, 0.0) / dose)


def print_levels(rng, intensity):
    """Intensity -> grey levels: exposure, contrast (sometimes washed out) and gamma of the print."""
    darkest = math.exp(-ABSORPTION * DENSITY["tubule_wall"])
    normalised = np.clip((intensity - darkest) / (1.0 - darkest), 0.0, None)
    background_level = rng.uniform(180.0, 234.0)
    dense_level = 18.0 + 120.0 * rng.random() ** 2
    values = dense_level + (background_level - dense_level) * normalised ** rng.uniform(0.75, 1.3)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def apply_microscope(rng, density, texture, pixels_per_nm):
    density = stain(rng, density, texture, pixels_per_nm)
    density, sigma = defocus(rng, density, pixels_per_nm)
    pixels = print_levels(rng, expose(rng, density, sigma))
    if rng.random() < 0.5:
        # Many archives were saved as JPEG (the real crops are): its blocks and ringing are part of the look.
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=int(rng.integers(50, 95)))
        pixels = np.asarray(Image.open(buffer).convert("L"))
    return pixels
