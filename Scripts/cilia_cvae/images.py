"""Reading any raw TEM image as 8-bit grayscale, and making it square.

Research groups' folders hold every format a microscope or a slide scanner writes: 8- and
16-bit grayscale, RGB exports, palette GIFs, CMYK TIFFs from publishing tools, JPEGs rotated
by an EXIF tag. Everything goes through `read_grayscale`, which either returns the image as a
2-D uint8 array or raises `UnreadableImage` with the reason the manifest will show.
`list_images` and `load_images` read the processed folders back for the classifiers, without
TensorFlow, so that a script can read its images before it decides it needs a network.
"""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cilia_cvae.layout import is_visible

MINIMUM_SIDE = 16
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
RESIZE_MODES = ("squash", "pad")

# Pillow by default decodes what it can of a truncated file and fills the rest with black;
# a half-black image would then train the model. Refuse truncated files instead.
Image.LOAD_TRUNCATED_IMAGES = False


class UnreadableImage(Exception):
    """The file cannot become a training image; the message is the manifest's reason."""


def _sixteen_bit_to_eight(pixels, stretch_percentiles):
    """Map 16-bit intensities to 0..255 from the full 16-bit range, or by percentiles.

    Pillow's convert("L") clips I;16 values above 255 to white, which turns almost every
    16-bit micrograph into a white sheet; dividing by 257 maps 0..65535 onto 0..255 exactly.
    Cameras that fill only 12-14 bits look dark that way, hence the percentile option.
    """
    pixels = pixels.astype(np.float64)
    if stretch_percentiles:
        low, high = np.percentile(pixels, stretch_percentiles)
        if high <= low:
            high = low + 1.0
        scaled = (pixels - low) * (255.0 / (high - low))
    else:
        scaled = pixels / 257.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _flatten_alpha(image):
    """Composite a transparent image over white: TEM backgrounds are light, black would be a hard frame."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("L")


def to_grayscale_array(image, stretch_percentiles=None):
    """Convert an opened, oriented Pillow image of any supported mode to a uint8 2-D array."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image)
        if mode == "I" and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise UnreadableImage(f"32-bit integer image with values outside 0..65535 ({mode})")
        return _sixteen_bit_to_eight(pixels, stretch_percentiles)
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        low, high = np.percentile(pixels, stretch_percentiles or (0.0, 100.0))
        scaled = (pixels - low) * (255.0 / max(high - low, 1e-12))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if mode in ("LA", "RGBA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        return np.asarray(_flatten_alpha(image))
    if mode in ("L", "1", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        converted = image.convert("RGB") if mode in ("CMYK", "YCbCr", "LAB", "HSV") else image
        return np.asarray(converted.convert("L"))
    raise UnreadableImage(f"unsupported image mode {mode}")


def bit_depth(image):
    return 16 if image.mode in SIXTEEN_BIT_MODES else 32 if image.mode == "F" else 8


def read_grayscale(path, stretch_percentiles=None):
    """Return (pixels as a uint8 2-D array, facts about the file) or raise UnreadableImage.

    The first frame of an animated GIF or multi-page TIFF is used; the EXIF orientation is
    applied so that a rotated phone or scanner export is seen the right way up.
    """
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is a fact about the file, not something to print.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                file_format = image.format
                image.load()
                facts = {"format": file_format, "mode": image.mode, "bit_depth": bit_depth(image)}
                oriented = ImageOps.exif_transpose(image)
                pixels = to_grayscale_array(oriented, stretch_percentiles)
    except UnreadableImage:
        raise
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image file Pillow can read") from None
    except PermissionError:
        raise UnreadableImage(
            "permission denied: this user may not read the file (check its permissions)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage("image larger than Pillow's safety limit (a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise UnreadableImage(f"damaged or truncated image file ({error})") from None
    height, width = pixels.shape
    facts.update(width=width, height=height)
    if min(width, height) < MINIMUM_SIDE:
        raise UnreadableImage(f"image only {width}x{height} px; at least {MINIMUM_SIDE} px a side is needed")
    return pixels, facts


def make_square(pixels, size, resize_mode):
    """Resize a 2-D uint8 array to size x size.

    "squash" stretches to a square as the original pipeline did (the aspect ratio is lost).
    "pad" keeps the aspect ratio: the short side is extended by mirroring the image's own
    edge, so the model never learns a hard border or a flat band that real crops lack.
    """
    if resize_mode == "pad":
        height, width = pixels.shape
        side = max(height, width)
        extra_rows, extra_columns = side - height, side - width
        pixels = np.pad(
            pixels,
            (
                (extra_rows // 2, extra_rows - extra_rows // 2),
                (extra_columns // 2, extra_columns - extra_columns // 2),
            ),
            mode="symmetric",
        )
    elif resize_mode != "squash":
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, not {resize_mode!r}")
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)


# --------------------------------------------------------------------------- folders of processed images


def list_images(folder, class_names, limit_per_class=None):
    """(paths, labels) of the PNGs in folder/<Class>/ for each class, in name order."""
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        # Hidden files are the temporary names of writes in progress (or of a killed run), never images.
        class_paths = sorted(path for path in (Path(folder) / class_name).glob("*.png") if is_visible(path))[
            :limit_per_class
        ]
        paths.extend(class_paths)
        labels.extend([label] * len(class_paths))
    return paths, np.array(labels, dtype=np.int64)


def load_images(paths, size):
    """Grayscale images as a uint8 array (n, size, size), squashed to a square when they are not."""
    images = np.empty((len(paths), size, size), dtype=np.uint8)
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            image = image.convert("L")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            images[index] = np.asarray(image)
    return images


def first_unreadable(paths):
    """(path, error) of the first file Pillow cannot read in full, or None: what a decoder that names
    no file (TensorFlow's, or a batch load) failed on."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError) as error:
            return path, error
    return None
