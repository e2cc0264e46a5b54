"""From a raw folder of class sub-folders to square grayscale PNGs split into train and test.

The raw folder is the user's data: it is only ever read. Every file found gets one row in
the manifest, with its outcome (train, test, duplicate, conflict, rejected) and the reason,
so nothing is silently skipped. The output for one size is built in a temporary folder and
swapped into place at the end, so a killed run leaves the previous output intact.
"""

import hashlib
import itertools
import json
import os
import shutil
import signal
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cilia_cvae.config import UserError
from cilia_cvae.files import FOLDER_MODE, write_csv_atomic, write_json_atomic
from cilia_cvae.images import UnreadableImage, make_square, read_grayscale
from cilia_cvae.layout import FACTS_FILE_NAME, MANIFEST_FILE_NAME, SPLITS, ProcessedLayout, size_folder_name
from cilia_cvae.locks import folder_lock

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif"}
SYSTEM_FILE_NAMES = {"thumbs.db", "desktop.ini", "icon\r"}
STATISTICS_COLUMNS = [
    "width_mean",
    "width_std",
    "height_mean",
    "height_std",
    "aspect_ratio_mean",
    "aspect_ratio_std",
]
MANIFEST_COLUMNS = [
    "source_path",
    "class",
    "outcome",
    "reason",
    "content_hash",
    "width",
    "height",
    "format",
    "mode",
    "bit_depth",
    "processed_path",
]


# Larger images than this would need gigabytes per image in the model; no microscope crop needs it.
LARGEST_IMAGE_SIZE = 4096
# A crop of a cross section is roughly square (the real samples: 1.04 +- 0.12); one longer than 4:1
# either way is a strip, a scale bar or a whole micrograph, and would be squashed beyond recognition.
LARGEST_ASPECT_RATIO = 4.0
# The normal distribution's standard deviation is 1.4826 times its median absolute deviation.
MAD_TO_STANDARD_DEVIATION = 1.4826


def check_image_size(image_size):
    """The sizes preprocessing can make: a multiple of 8 (the models halve it 3 times), 16 to 4096."""
    if image_size < 16 or image_size % 8 or image_size > LARGEST_IMAGE_SIZE:
        raise UserError(
            f"--image_size must be a multiple of 8 between 16 and {LARGEST_IMAGE_SIZE} (the models "
            f"halve it 3 times), not {image_size}"
        )


def read_processed_facts(processed_images_dir, image_size):
    """The facts preprocessing recorded for one size; a UserError when that size was never made."""
    check_image_size(image_size)
    facts_path = ProcessedLayout(Path(processed_images_dir), image_size).facts
    if not facts_path.is_file():
        raise UserError(
            f"no preprocessed images at {size_folder_name(image_size)} in {processed_images_dir}; "
            f"run python Scripts/cvae_pre_processing.py --image_size={image_size} first"
        )
    return json.loads(facts_path.read_text(encoding="utf-8"))


def raw_entries(raw_images_dir):
    """Every entry under the raw folder that is not a plain folder, in name order. A class folder that
    is a symbolic link is followed (a collection is often assembled from links); links inside a class
    folder are listed, not followed, so a link loop cannot make the walk endless."""
    entries = []
    for top in sorted(raw_images_dir.iterdir()):
        if top.is_dir():
            entries += [path for path in top.rglob("*") if path.is_symlink() or not path.is_dir()]
        else:
            entries.append(top)
    return sorted(entries)


def find_raw_files(raw_images_dir):
    """List (relative path, class or None, reason to skip or None) for every file under the raw folder."""
    raw_images_dir = Path(raw_images_dir)
    if not raw_images_dir.is_dir():
        raise UserError(
            f"raw image folder {raw_images_dir} does not exist; create it with one sub-folder per class, "
            f"or run python Scripts/make_phantom_dataset.py for built-in phantom data"
        )
    found = []
    for path in raw_entries(raw_images_dir):
        relative = path.relative_to(raw_images_dir)
        parts = relative.parts
        if any(part.startswith(".") for part in parts) or path.name.lower() in SYSTEM_FILE_NAMES:
            found.append((relative, parts[0] if len(parts) > 1 else None, "hidden or operating-system file"))
        elif len(parts) == 1:
            found.append(
                (
                    relative,
                    None,
                    "file directly in the raw folder; put images in a folder named after their class",
                )
            )
        elif len(parts) > 2:
            found.append(
                (
                    relative,
                    parts[0],
                    f"inside a sub-folder of class {parts[0]}; only files directly in a class folder are used",
                )
            )
        elif path.is_symlink() and path.is_dir():
            found.append(
                (
                    relative,
                    parts[0],
                    f"a symbolic link to a folder inside class {parts[0]}; only files "
                    f"directly in a class folder are used",
                )
            )
        elif path.is_symlink() and not path.exists():
            found.append((relative, parts[0], "broken link"))
        elif not path.is_file():
            found.append(
                (relative, parts[0], "not a regular file (a named pipe, socket or device); not read")
            )
        else:
            found.append((relative, parts[0], None))
    return found


def _process_one(task):
    """Worker: decode, hash and resize one raw file; stage its PNG under its content hash."""
    raw_path, staging_dir, image_size, resize_mode, stretch_percentiles = task
    try:
        if Path(raw_path).stat().st_size == 0:
            return {"reason": "empty file (0 bytes)"}
        pixels, facts = read_grayscale(raw_path, stretch_percentiles)
    except UnreadableImage as error:
        return {"reason": str(error)}
    except OSError as error:
        return {"reason": f"cannot be read ({error.strerror or error})"}
    aspect_ratio = facts["width"] / facts["height"]
    if not 1 / LARGEST_ASPECT_RATIO <= aspect_ratio <= LARGEST_ASPECT_RATIO:
        return {
            **facts,
            "reason": f"{facts['width']}x{facts['height']} px is longer than {LARGEST_ASPECT_RATIO:g}:1; "
            f"not a crop of one cross section",
        }
    digest = hashlib.sha256()
    digest.update(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    content_hash = digest.hexdigest()
    staged_path = Path(staging_dir) / f"{content_hash}.png"
    if not staged_path.exists():
        square = make_square(pixels, image_size, resize_mode)
        temporary = staged_path.with_name(f".{content_hash}.{os.getpid()}.png")
        square.save(temporary, format="PNG", compress_level=3)
        os.replace(temporary, staged_path)
    return {"content_hash": content_hash, **facts}


def _split_key(seed, relative_path):
    """A stable pseudo-random rank per file: the same split on every re-run, whatever the file order."""
    return hashlib.sha256(f"{seed}:{relative_path.as_posix()}".encode()).hexdigest()


def assign_splits(kept_by_class, test_fraction, seed):
    """Stratified split: per class, round(n * fraction) test images, at least one of each split when n >= 2."""
    split_of = {}
    for relatives in kept_by_class.values():
        ranked = sorted(relatives, key=lambda relative: _split_key(seed, relative))
        count = len(ranked)
        test_count = int(round(count * test_fraction))
        if count >= 2:
            test_count = min(max(test_count, 1), count - 1)
        else:
            test_count = 0
        for position, relative in enumerate(ranked):
            split_of[relative] = "test" if position < test_count else "train"
    return split_of


def output_names(kept_by_class):
    """PNG name per kept file: its stem, or <stem>_<ext> when another file of the class has the same stem."""
    names = {}
    for relatives in kept_by_class.values():
        taken = set()
        for relative in sorted(relatives):
            stem, extension = relative.stem, relative.suffix.lower().lstrip(".")
            candidate = f"{stem}.png"
            if candidate.lower() in taken:
                candidate = f"{stem}_{extension}.png"
            counter = 2
            while candidate.lower() in taken:
                candidate = f"{stem}_{extension}_{counter}.png"
                counter += 1
            taken.add(candidate.lower())
            names[relative] = candidate
    return names


def robust_centre_and_spread(values):
    """The median and 1.4826 x the median absolute deviation: for normal data the mean and standard
    deviation, but one outlier among many cannot move them."""
    centre = float(np.median(values))
    return centre, MAD_TO_STANDARD_DEVIATION * float(np.median(np.abs(values - centre)))


def raw_statistics(rows):
    """The original six columns of the raw image sizes (aspect ratio = width / height), robust: each
    "mean" is the median and each "std" the spread robust_centre_and_spread gives, so that one odd
    image cannot move the aspect ratios generation draws."""
    widths = np.array([row["width"] for row in rows], dtype=np.float64)
    heights = np.array([row["height"] for row in rows], dtype=np.float64)
    statistics = {}
    for name, values in (("width", widths), ("height", heights), ("aspect_ratio", widths / heights)):
        statistics[f"{name}_mean"], statistics[f"{name}_std"] = robust_centre_and_spread(values)
    return statistics


def manifest_rows_and_candidates(raw_images_dir):
    """A manifest row for every file found, and the image files that may be used; refuse a raw folder
    with images in fewer than two class folders."""
    found = find_raw_files(raw_images_dir)
    rows = {}
    for relative, class_name, reason in found:
        rows[relative] = {
            "source_path": relative.as_posix(),
            "class": class_name or "",
            "outcome": "rejected" if reason else "",
            "reason": reason or "",
        }
    candidates = [relative for relative, _, reason in found if reason is None]
    if not candidates:
        raise UserError(
            f"no images in class sub-folders of {raw_images_dir}; put one folder per class there "
            f"(e.g. Normal/, ODA/), or run python Scripts/make_phantom_dataset.py for built-in phantom data"
        )
    candidate_classes = sorted({rows[relative]["class"] for relative in candidates})
    if len(candidate_classes) < 2:
        raise UserError(
            f"images found in one class folder only ({candidate_classes[0]}) in {raw_images_dir}; a conditional "
            f"model needs at least two class folders with images"
        )
    return [relative for relative, _, _ in found], rows, candidates


def end_with_parent(parent_pid):
    """In a pool worker: ask Linux to end this process when its parent dies, so a killed stage leaves
    no worker blocked on a queue nobody reads (elsewhere the workers end when their pipe closes). A
    parent killed before the worker got this far is not seen by Linux: the worker checks itself."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def stage_images(
    candidates, rows, *, raw_images_dir, staging_dir, image_size, resize_mode, stretch_percentiles, workers
):
    """Read, square and resize every candidate on every core into staging_dir, named by content hash."""
    tasks = [
        (raw_images_dir / relative, staging_dir, image_size, resize_mode, stretch_percentiles)
        for relative in candidates
    ]
    worker_count = workers or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(
        max_workers=worker_count, initializer=end_with_parent, initargs=(os.getpid(),)
    ) as executor:
        results = executor.map(
            _process_one, tasks, chunksize=max(1, min(32, len(tasks) // (4 * worker_count)))
        )
        for relative, result in tqdm(
            zip(candidates, results), total=len(tasks), desc="preprocessing", unit="image", mininterval=1.0
        ):
            rows[relative].update(result)
            if "content_hash" not in result:
                rows[relative]["outcome"] = "rejected"


def keep_distinct_images(candidates, rows, raw_images_dir):
    """The readable images per class, each kept once: a duplicate within a class is kept once, an image
    labelled with two classes is left out of both; refuse fewer than two classes left."""
    readable = [relative for relative in candidates if rows[relative]["outcome"] != "rejected"]
    classes_by_hash = defaultdict(set)
    first_by_hash = {}
    for relative in readable:
        content_hash = rows[relative]["content_hash"]
        classes_by_hash[content_hash].add(rows[relative]["class"])
        first_by_hash.setdefault(content_hash, relative)
    kept_by_class = defaultdict(list)
    for relative in readable:
        row = rows[relative]
        classes = classes_by_hash[row["content_hash"]]
        if len(classes) > 1:
            others = ", ".join(sorted(classes - {row["class"]}))
            row.update(
                outcome="conflict",
                reason=f"the same image is also labelled {others}; left out of every class",
            )
        elif first_by_hash[row["content_hash"]] != relative:
            row.update(
                outcome="duplicate",
                reason=f"same pixels as {first_by_hash[row['content_hash']].as_posix()}, kept once",
            )
        else:
            kept_by_class[row["class"]].append(relative)
    if len(kept_by_class) < 2:
        only = ", ".join(sorted(kept_by_class)) or "none"
        left_out = Counter(
            row["outcome"] for row in rows.values() if row["outcome"] in ("rejected", "duplicate", "conflict")
        )
        raise UserError(
            f"usable images found in {len(kept_by_class)} class(es) ({only}) in {raw_images_dir}, but a conditional "
            f"model needs at least two class folders with images (files left out: {dict(left_out) or 'none'})"
        )
    return kept_by_class


def copy_into_splits(work_dir, staging_dir, rows, split_of, names):
    """Copy each kept image into split/class/name; return the data fingerprint (every path and hash)."""
    fingerprint = hashlib.sha256()
    for relative in sorted(split_of, key=lambda item: (rows[item]["class"], names[item])):
        row = rows[relative]
        split = split_of[relative]
        target = work_dir / split / row["class"] / names[relative]
        shutil.copyfile(staging_dir / f"{row['content_hash']}.png", target)
        row.update(outcome=split, processed_path=f"{split}/{row['class']}/{names[relative]}")
        fingerprint.update(f"{row['processed_path']}:{row['content_hash']}\n".encode())
    return fingerprint.hexdigest()


def data_fingerprint(pixels_fingerprint, image_size, recorded):
    """The data fingerprint: which raw images went where (copy_into_splits) and how they were made
    square, since the same images padded instead of squashed, or at another size, are other data."""
    made = {name: recorded[name] for name in ("resize_mode", "stretch_percentiles")}
    made = json.dumps(dict(made, image_size=image_size), sort_keys=True)
    return hashlib.sha256(f"{made}\n{pixels_fingerprint}".encode()).hexdigest()


def preprocess(
    *,
    raw_images_dir,
    processed_images_dir,
    image_size,
    resize_mode,
    test_fraction,
    seed,
    stretch_percentiles=None,
    workers=0,
):
    """Run the whole stage; return the summary dictionary that the script prints."""
    raw_images_dir = Path(raw_images_dir)
    layout = ProcessedLayout(Path(processed_images_dir), image_size)
    found, rows, candidates = manifest_rows_and_candidates(raw_images_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    with folder_lock(layout.directory):
        remove_leftovers_of_killed_runs(layout)
        return build_processed_folder(
            layout,
            raw_images_dir,
            found,
            rows,
            candidates,
            resize_mode=resize_mode,
            test_fraction=test_fraction,
            seed=seed,
            stretch_percentiles=stretch_percentiles,
            workers=workers,
        )


def remove_leftovers_of_killed_runs(layout):
    """The hidden work folders a killed run left beside the output (no other run is writing: we hold the lock)."""
    for pattern in (f".{layout.directory.name}.partial-*", f".{layout.directory.name}.old-*"):
        for leftover in layout.root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def processed_facts(layout, raw_images_dir, class_names, counts, pixels_fingerprint, manifest_rows, recorded):
    """What preprocessing.json tells the next stages, in its established key order (newer keys last)."""
    return {
        "image_size": layout.image_size,
        "resize_mode": recorded["resize_mode"],
        "class_names": class_names,
        "counts": counts,
        "fingerprint": data_fingerprint(pixels_fingerprint, layout.image_size, recorded),
        "test_fraction": recorded["test_fraction"],
        "seed": recorded["seed"],
        "stretch_percentiles": recorded["stretch_percentiles"],
        "raw_images_dir": str(raw_images_dir),
        "outcomes": dict(Counter(row["outcome"] for row in manifest_rows)),
        # Which raw images went where, alone: what a run started before the fingerprint covered more recorded.
        "pixels_fingerprint": pixels_fingerprint,
    }


def split_counts(rows, split_of, class_names):
    """{split: {class: images}} of the kept images."""
    counts = Counter((split, rows[relative]["class"]) for relative, split in split_of.items())
    return {split: {name: counts[split, name] for name in class_names} for split in SPLITS}


def record_processed(
    work_dir, layout, raw_images_dir, rows, found, split_of, class_names, pixels_fingerprint, settings
):
    """The records beside the processed images: the manifest of every raw image found, the facts later
    stages read (classes, counts, fingerprint, the settings), and the raw statistics inference restores."""
    manifest_rows = [rows[relative] for relative in found]
    write_csv_atomic(work_dir / MANIFEST_FILE_NAME, manifest_rows, MANIFEST_COLUMNS)
    facts = processed_facts(
        layout,
        raw_images_dir,
        class_names,
        split_counts(rows, split_of, class_names),
        pixels_fingerprint,
        manifest_rows,
        settings,
    )
    write_json_atomic(work_dir / FACTS_FILE_NAME, facts)
    statistics = raw_statistics([rows[relative] for relative in split_of])
    write_csv_atomic(layout.raw_statistics, [statistics], STATISTICS_COLUMNS)
    return manifest_rows, facts


def build_processed_folder(
    layout,
    raw_images_dir,
    found,
    rows,
    candidates,
    *,
    resize_mode,
    test_fraction,
    seed,
    stretch_percentiles,
    workers,
):
    """Process every candidate into a hidden folder, then swap it in place of the previous output."""
    # Built in a hidden folder beside the final one, then swapped in: a killed run leaves the old output;
    # mkdtemp makes a folder only its owner may open, and the output gets the usual permissions.
    work_dir = Path(tempfile.mkdtemp(prefix=f".{layout.directory.name}.partial-", dir=layout.root))
    os.chmod(work_dir, FOLDER_MODE)
    try:
        staging_dir = work_dir / "staging"
        staging_dir.mkdir()
        stage_images(
            candidates,
            rows,
            raw_images_dir=raw_images_dir,
            staging_dir=staging_dir,
            image_size=layout.image_size,
            resize_mode=resize_mode,
            stretch_percentiles=stretch_percentiles,
            workers=workers,
        )
        kept_by_class = keep_distinct_images(candidates, rows, raw_images_dir)
        class_names = sorted(kept_by_class)
        split_of = assign_splits(kept_by_class, test_fraction, seed)
        for split, class_name in itertools.product(SPLITS, class_names):
            (work_dir / split / class_name).mkdir(parents=True, exist_ok=True)
        pixels_fingerprint = copy_into_splits(
            work_dir, staging_dir, rows, split_of, output_names(kept_by_class)
        )
        shutil.rmtree(staging_dir)
        settings = {
            "resize_mode": resize_mode,
            "test_fraction": test_fraction,
            "seed": seed,
            "stretch_percentiles": list(stretch_percentiles) if stretch_percentiles else None,
        }
        manifest_rows, facts = record_processed(
            work_dir, layout, raw_images_dir, rows, found, split_of, class_names, pixels_fingerprint, settings
        )
        _swap_into_place(work_dir, layout.directory)
    finally:
        if work_dir.exists():
            shutil.rmtree(work_dir, ignore_errors=True)
    return {"output_dir": layout.directory, "facts": facts, "manifest_rows": manifest_rows}


def _swap_into_place(new_dir, final_dir):
    """Replace the previous output for this size with the new one in two renames."""
    old_dir = None
    if final_dir.exists():
        old_dir = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old_dir)
    os.replace(new_dir, final_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)
