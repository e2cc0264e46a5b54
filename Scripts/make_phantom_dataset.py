"""Write synthetic TEM crops of cilia cross sections: the pipeline's built-in data.

The real dataset is private, so this script draws realistic phantoms instead: a thin stained
bilayer membrane on an irregular outline, nine doublets (a dense A tubule, a C-shaped B) with
faint, fuzzy outer and inner dynein arms, smeared radial spokes, nexin links and a dense central
pair with its sheath, seen through a simulated microscope (stain grain and patches, focus that
varies across the crop, shot noise, contrast, oblique cuts, neighbours and cut cytoplasm), one
folder per class, with each defect drawn as a change of anatomy. check_phantom_realism.py
measures how close they come to real crops; check_phantom_separability.py that the classes
differ only in anatomy.

Reads   nothing (REAL_SAMPLES_DIR only for the optional preview grid)
Writes  RAW_IMAGES_DIR/<Class>/<Class>_<NNNN>.png   8-bit grayscale crops, ~520 px, one folder per class
        RAW_IMAGES_DIR/.phantom_dataset.json         marker: the settings, counts and a SHA-256 per file
        PREVIEW_PNG                                  optional grid of examples per class beside real crops

`Raw Input Images` is the user's data. This script writes only into a folder that holds no
images, or (with --overwrite_phantoms=True) one that holds nothing but phantoms it wrote
itself, as its marker proves; anything else is refused with exit code 2 and left untouched.
The same settings give byte-identical files, whatever the number of workers.

Example:
    python Scripts/make_phantom_dataset.py --raw_images_dir=/tmp/phantoms --num_images=200 --seed=1

Expected run time: ~4.3 CPU-minutes for the default 5,210 images (~1.0 GB): 2 min 9 s measured on
a nearly idle 2-core machine, about twice that on the slower machine kind or beside other jobs
(docs/phantoms.md).
"""

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from cilia_cvae import config, phantoms
from cilia_cvae.config import UserError, check_choice, configure
from cilia_cvae.files import atomic_path, sha256_of_file, write_json_atomic

NUM_IMAGES = 5210  # phantoms to write, split over the classes in realistic proportions (Normal the largest)
SEED = 1  # the same seed and settings give byte-identical images
CLASS_SCHEME = "five"  # "five": Normal, Disarranged, ODA, IDA, CP; "ten": the finer ten-class scheme
WORKERS = 0  # processes rendering in parallel; 0 uses every core
RAW_IMAGES_DIR = (
    config.RAW_IMAGES_DIR
)  # where the class folders go: must hold no images, or only our phantoms
OVERWRITE_PHANTOMS = False  # replace the phantoms this script wrote there earlier (never any other file)
PREVIEW_PNG = ""  # if set, also save a grid of examples per class, real crops beside, to this path
REAL_SAMPLES_DIR = config.REPOSITORY_ROOT.parent / "shared" / "real-tem-samples"  # real crops for the preview

settings = configure(globals())

check_choice("CLASS_SCHEME", CLASS_SCHEME, list(phantoms.CLASS_PROPORTIONS))
class_names = phantoms.class_names(CLASS_SCHEME)
if NUM_IMAGES < len(class_names):
    raise UserError(f"--num_images must be at least {len(class_names)} (one per class), not {NUM_IMAGES}")
if SEED < 0:
    raise UserError(f"--seed must be zero or a positive integer, not {SEED}")
if WORKERS < 0:
    raise UserError(f"--workers must be 0 (every core) or a positive number of processes, not {WORKERS}")
MARKER_NAME = ".phantom_dataset.json"
marker_path = RAW_IMAGES_DIR / MARKER_NAME
counts = phantoms.class_counts(NUM_IMAGES, CLASS_SCHEME)
tasks = [
    (str(RAW_IMAGES_DIR), SEED, CLASS_SCHEME, class_name, number)
    for class_name in class_names
    for number in range(1, counts[class_name] + 1)
]


def marker_content(file_hashes, complete):
    """Everything in the marker follows from the settings, so identical runs give identical folders."""
    return {
        "written_by": "Scripts/make_phantom_dataset.py",
        "settings": {"NUM_IMAGES": NUM_IMAGES, "SEED": SEED, "CLASS_SCHEME": CLASS_SCHEME},
        "class_counts": counts,
        "complete": complete,
        "files": file_hashes,
    }


def is_hidden(relative_path):
    return any(part.startswith(".") for part in relative_path.parts)


# 1. Make sure nothing but our own earlier phantoms can be touched.
existing = (
    sorted(path for path in RAW_IMAGES_DIR.rglob("*") if path.is_file()) if RAW_IMAGES_DIR.is_dir() else []
)
visible = [path for path in existing if not is_hidden(path.relative_to(RAW_IMAGES_DIR))]
if visible or marker_path.exists():
    if not OVERWRITE_PHANTOMS:
        raise UserError(
            f"{RAW_IMAGES_DIR} already holds {len(visible)} file(s); phantoms go only into a folder without images: "
            "choose another --raw_images_dir, or pass --overwrite_phantoms=True to replace phantoms this script wrote there"
        )
    try:
        earlier_files = json.loads(marker_path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{RAW_IMAGES_DIR} holds files but no readable {MARKER_NAME}, so they may be real data; "
            "nothing was changed: choose an empty --raw_images_dir"
        ) from None
    ours = []
    for path in existing:
        relative = path.relative_to(RAW_IMAGES_DIR)
        key = relative.as_posix()
        # Leftovers of a killed run: a temporary file beside one of the phantoms it was writing.
        leftover = (
            path.name.startswith(".")
            and ".partial" in path.name
            and relative.parent.as_posix() in {Path(name).parent.as_posix() for name in earlier_files}
        )
        if path == marker_path or leftover:
            ours.append(path)
        elif key in earlier_files and (
            earlier_files[key] is None or earlier_files[key] == sha256_of_file(path)
        ):
            ours.append(path)
        elif not is_hidden(relative):
            raise UserError(
                f"{path} is not a phantom this script wrote (unknown or changed since), so nothing was changed: "
                "move your own images elsewhere or choose an empty --raw_images_dir"
            )
    for path in ours:
        path.unlink()
    for folder in sorted({path.parent for path in ours if path.parent != RAW_IMAGES_DIR}):
        if not any(folder.iterdir()):
            folder.rmdir()
    print(f"replaced {len(ours)} phantom file(s) written earlier in {RAW_IMAGES_DIR}")

# 2. Claim the folder first: a run killed half way leaves a marker naming every file it may have
# written, so a later --overwrite_phantoms=True run can still recognise them as phantoms.
RAW_IMAGES_DIR.mkdir(parents=True, exist_ok=True)
planned = {phantoms.phantom_relative_path(task[3], task[4]): None for task in tasks}
write_json_atomic(marker_path, marker_content(planned, complete=False))

# 3. Render in parallel. Each image has its own random generator, seeded by (seed, class,
# number), so the files do not depend on the number of workers or the order they finish.
worker_count = WORKERS or os.cpu_count() or 1
print(
    f"writing {NUM_IMAGES} phantoms ({CLASS_SCHEME} classes) to {RAW_IMAGES_DIR} with {worker_count} worker(s)"
)
started = time.perf_counter()
results = []
with tqdm(total=len(tasks), unit="image", smoothing=0.05) as progress:
    if worker_count == 1:
        for task in tasks:
            results.append(phantoms.write_phantom(task))
            progress.update()
    else:
        # "fork" starts workers without re-running this script (spawn would run it again).
        context = multiprocessing.get_context(
            "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        )
        with ProcessPoolExecutor(max_workers=worker_count, mp_context=context) as executor:
            for result in executor.map(phantoms.write_phantom, tasks, chunksize=4):
                results.append(result)
                progress.update()
elapsed = time.perf_counter() - started
write_json_atomic(
    marker_path, marker_content({path: digest for path, digest, _, _ in results}, complete=True)
)

# 4. What was written.
widths = [width for _, _, width, _ in results]
heights = [height for _, _, _, height in results]
print(f"\n{'class':<20}{'images':>8}{'share':>8}")
for class_name in class_names:
    print(f"{class_name:<20}{counts[class_name]:>8}{counts[class_name] / NUM_IMAGES:>8.1%}")
mean_width, mean_height = sum(widths) / len(widths), sum(heights) / len(heights)
print(f"crop size: mean {mean_width:.0f} x {mean_height:.0f} px (real crops: 524.6 x 508.5)")
print(
    f"{len(results)} phantoms in {RAW_IMAGES_DIR} in {elapsed:.1f} s ({len(results) / elapsed:.0f} images/s)"
)

# 5. Optional preview: a few phantoms per class, real crops beside, to judge them by eye.
if PREVIEW_PNG:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns = 4
    real_paths = (
        sorted(REAL_SAMPLES_DIR.glob("*.jpg")) + sorted(REAL_SAMPLES_DIR.glob("*.png"))
        if REAL_SAMPLES_DIR.is_dir()
        else []
    )
    rows = [
        (
            name,
            [
                RAW_IMAGES_DIR / phantoms.phantom_relative_path(name, n)
                for n in range(1, min(columns, counts[name]) + 1)
            ],
        )
        for name in class_names
    ]
    if real_paths:
        rows.append(("real (Normal)", real_paths[:columns]))
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.4 * columns, 2.4 * len(rows)), squeeze=False)
    for row, (title, paths) in enumerate(rows):
        for column in range(columns):
            axis = axes[row][column]
            axis.set_axis_off()
            if column < len(paths):
                image = Image.open(paths[column]).convert("L")
                axis.imshow(image, cmap="gray", vmin=0, vmax=255)
                axis.set_title(f"{title}  {image.width}x{image.height}", fontsize=8)
    figure.tight_layout()
    with atomic_path(Path(PREVIEW_PNG)) as temporary_path:
        figure.savefig(temporary_path, dpi=80, format="png")
    print(f"preview: {PREVIEW_PNG}")
