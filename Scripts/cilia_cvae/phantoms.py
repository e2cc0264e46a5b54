"""Synthetic TEM crops of cilia cross sections: the generator's public face.

A phantom is made in three steps, each in a module of its own:
1. phantom_anatomy.sample_cilium lays out the axoneme in nanometres, varying like a specimen
   (membrane, nine doublets with their arms and spokes, nexin links, the central pair with its
   sheath and cloudy matrix); then the class's defect changes that structure, and nothing else.
2. phantom_drawing.compose_section paints that layout, with neighbouring cilia, microvilli and
   cytoplasm, as stain density through an affine view that rotates, stretches (oblique cut),
   mirrors and scales it into the crop, plus a layer saying where the stain's texture goes.
3. phantom_microscope.apply_microscope turns density into an 8-bit micrograph: uneven,
   region-dependent stain texture, blur, absorption, shot noise, contrast, gamma, JPEG.

Every random choice comes from one generator seeded by (seed, class name, image number),
so any image can be rendered again alone, in any order, in any process. The camera and
specimen settings are drawn the same way for every class, so a model can only tell the
classes apart by their anatomy.
"""

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from cilia_cvae.files import atomic_path, sha256_of_file
from cilia_cvae.phantom_anatomy import (  # noqa: F401  (the names tests and scripts use)
    CLASS_PROPORTIONS,
    DENSITY,
    INNER_ARM_PATH,
    OUTER_ARM_PATH,
    Cilium,
    Doublet,
    sample_cilium,
    sample_normal_cilium,
)
from cilia_cvae.phantom_drawing import compose_section, draw_density, make_view, sample_crop_size  # noqa: F401
from cilia_cvae.phantom_microscope import apply_microscope  # noqa: F401


def class_names(scheme):
    return list(CLASS_PROPORTIONS[scheme])


def class_counts(num_images, scheme):
    """Split `num_images` over the scheme's classes by its proportions (largest remainder)."""
    proportions = CLASS_PROPORTIONS[scheme]
    exact = {name: num_images * share for name, share in proportions.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(proportions, key=lambda name: (counts[name] - exact[name], -proportions[name]))
    for name in by_remainder[: num_images - sum(counts.values())]:
        counts[name] += 1
    # Small datasets (tests, quick trials) still get every class: the largest gives way.
    for name in proportions:
        if counts[name] == 0:
            counts[max(counts, key=counts.get)] -= 1
            counts[name] = 1
    return counts


def phantom_rng(seed, class_name, number):
    """The one random generator of image `number` of a class: independent of every other image."""
    class_key = zlib.crc32(class_name.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([seed, class_key, number]))


def plan_phantom(seed, scheme, class_name, number):
    """The first draws of image `number`: its cilium and crop size (cheap; tests use it alone).

    Returns the random generator too, positioned where rendering continues.
    """
    rng = phantom_rng(seed, class_name, number)
    cilium = sample_cilium(rng, scheme, class_name)
    width, height = sample_crop_size(rng)
    return rng, cilium, width, height


def render_phantom(seed, scheme, class_name, number):
    """Image `number` of a class: an 8-bit grayscale array, and the cilium it shows."""
    rng, cilium, width, height = plan_phantom(seed, scheme, class_name, number)
    density, texture, pixels_per_nm = compose_section(rng, cilium, width, height)
    return apply_microscope(rng, density, texture, pixels_per_nm), cilium


# ----------------------------------------------------------------------------------------
# 4. Files
# ----------------------------------------------------------------------------------------


def phantom_relative_path(class_name, number):
    return f"{class_name}/{class_name}_{number:04d}.png"


def write_phantom(task):
    """Render one phantom and write it atomically (runs in a worker process).

    Returns the file's path relative to the folder, its SHA-256, width and height.
    """
    directory, seed, scheme, class_name, number = task
    pixels, _ = render_phantom(seed, scheme, class_name, number)
    relative_path = phantom_relative_path(class_name, number)
    path = Path(directory) / relative_path
    # Fast deflate: noisy micrographs barely compress anyway, and the default level would
    # take a third of the time per image for 10% smaller files.
    with atomic_path(path) as temporary_path:
        Image.fromarray(pixels, mode="L").save(temporary_path, format="PNG", compress_level=1)
    return relative_path, sha256_of_file(path), pixels.shape[1], pixels.shape[0]
