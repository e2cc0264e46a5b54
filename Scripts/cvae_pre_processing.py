"""Preprocess raw TEM crops of cilia cross sections for CVAE training.

Reads   RAW_IMAGES_DIR/<Class>/<image>  (one folder per class; PNG, JPEG, TIFF, BMP, GIF;
        8- or 16-bit; grayscale, RGB, palette or CMYK). The raw folder is only read.
Writes  PROCESSED_IMAGES_DIR/<S>x<S>/{train,test}/<Class>/<stem>.png  (8-bit grayscale, S x S)
        PROCESSED_IMAGES_DIR/<S>x<S>/manifest.csv       one row per file found, with its outcome
        PROCESSED_IMAGES_DIR/<S>x<S>/preprocessing.json  the facts later stages read
        PROCESSED_IMAGES_DIR/raw_image_statistics.csv    raw size statistics (the original six columns)

Example:
    python Scripts/cvae_pre_processing.py --image_size=448 --resize_mode=pad

Expected run time: about 30 s for 5,210 images of ~520 px on 2 cores.
"""

import time

from cilia_cvae import config
from cilia_cvae.config import UserError, check_choice, check_range, configure
from cilia_cvae.images import RESIZE_MODES
from cilia_cvae.layout import SPLITS
from cilia_cvae.preprocessing import check_image_size, preprocess

IMAGE_SIZE = 224  # side of the square images the model trains on (the 448 script needs 448)
RESIZE_MODE = "squash"  # "squash" stretches to a square as the original did; "pad" keeps the aspect ratio
TEST_FRACTION = 0.2  # share of each class held out as the test split, never seen in training
SEED = 123  # fixes the train/test split; the same seed gives the same split on every re-run
STRETCH_16BIT = (
    False  # stretch 16-bit images between their 0.1 and 99.9 percentiles (cameras filling 12-14 bits)
)
WORKERS = 0  # processes decoding images in parallel; 0 uses every core
RAW_IMAGES_DIR = config.RAW_IMAGES_DIR  # one folder per class; only ever read
PROCESSED_IMAGES_DIR = config.PROCESSED_IMAGES_DIR  # where the square images and the manifest go

settings = configure(globals())

check_choice("RESIZE_MODE", RESIZE_MODE, RESIZE_MODES)
check_image_size(IMAGE_SIZE)
check_range("WORKERS", WORKERS, 0, why="0 uses every core")
check_range("SEED", SEED, 0)
if not 0.0 < TEST_FRACTION < 1.0:
    raise UserError(f"--test_fraction must lie between 0 and 1, not {TEST_FRACTION}")

started = time.perf_counter()
summary = preprocess(
    raw_images_dir=RAW_IMAGES_DIR,
    processed_images_dir=PROCESSED_IMAGES_DIR,
    image_size=IMAGE_SIZE,
    resize_mode=RESIZE_MODE,
    test_fraction=TEST_FRACTION,
    seed=SEED,
    stretch_percentiles=(0.1, 99.9) if STRETCH_16BIT else None,
    workers=WORKERS,
)
elapsed = time.perf_counter() - started

# The summary: what went where, and what was left out and why (the manifest has every file).
facts = summary["facts"]
print(f"\n{'class':<24}{'train':>8}{'test':>8}")
for class_name in facts["class_names"]:
    print(
        f"{class_name:<24}{facts['counts']['train'][class_name]:>8}{facts['counts']['test'][class_name]:>8}"
    )
print(f"{'total':<24}{sum(facts['counts']['train'].values()):>8}{sum(facts['counts']['test'].values()):>8}")
left_out = {outcome: count for outcome, count in facts["outcomes"].items() if outcome not in SPLITS}
for outcome, count in sorted(left_out.items()):
    print(f"{outcome}: {count} file(s)")
for row in summary["manifest_rows"]:
    if row["outcome"] not in SPLITS:
        print(f"  {row['outcome']}: {row['source_path']}: {row['reason']}")
processed_count = sum(facts["outcomes"].get(split, 0) for split in SPLITS)
print(f"\n{processed_count} images at {IMAGE_SIZE}x{IMAGE_SIZE} ({RESIZE_MODE}) in {summary['output_dir']}")
print(
    f"manifest: {summary['output_dir'] / 'manifest.csv'}; {elapsed:.1f} s, {processed_count / elapsed:.0f} images/s"
)
