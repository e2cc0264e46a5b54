"""The generation manifest: one row per generated image saying how it was made, kept whole.

Each PNG also carries its own row (tEXt key MANIFEST_ROW_KEY), so a run killed between writing an
image and its row, a row cut short by a full disk, or a deleted manifest is repaired from the images
(reconcile_with_disk); a request's images are found again by their stream index (images_of_request),
so the same command again writes only what is missing, and no file name is ever given twice.
"""

import contextlib
import csv
import io
import json
import os
import re
import shutil
from datetime import datetime

from PIL import Image

from cilia_cvae.config import UserError
from cilia_cvae.files import FILE_MODE, write_csv_atomic

# New columns go at the end: a manifest written before them keeps its columns where they were.
MANIFEST_COLUMNS = [
    "file",
    "class",
    "sampling",
    "temperature",
    "seed",
    "source_latent_index",
    "aspect_ratio",
    "model_fingerprint",
    "image_size",
    "guidance",
    "sampling_steps",
    "edit_strength",
    "counterfactual_source",
    "grain",
    "stream_index",
    "source_orientation",
    "second_source",
    "second_source_orientation",
    "mix_weight",
    "filter_threshold",
    "filter_score",
]


# The tEXt key under which each generated PNG carries its own manifest row.
MANIFEST_ROW_KEY = "cilia_cvae_manifest_row"
FILE_NUMBER_PATTERN = re.compile(r"^Synthetic_.+_(\d+)\.png$")


# The columns that differ between the images of one request; the others say what was asked for.
PER_IMAGE_COLUMNS = (
    "file",
    "source_latent_index",
    "aspect_ratio",
    "counterfactual_source",
    "stream_index",
    "source_orientation",
    "second_source",
    "second_source_orientation",
    "filter_score",
)
# A manifest row names an image of its own class folder; anything else in the file is damage.
MANIFEST_FILE_PATTERN = re.compile(r"^(?P<class_name>[^/]+)/Synthetic_(?P=class_name)_(?P<number>\d+)\.png$")
# The columns of the first manifests: a row of at least these can be read without its header.
OLDEST_MANIFEST_COLUMNS = 9
HEADER_NAME_PATTERN = re.compile(r"^[a-z_]+$")


def next_file_number(generated_layout, class_name, manifest_rows=()):
    """One past the highest number a Synthetic_<Class>_<N>.png there or a manifest row of the class has
    held, so that nothing is overwritten and no name is given twice (a deleted image keeps its row)."""
    folder = generated_layout.class_folder(class_name)
    names = [path.name for path in folder.glob(f"Synthetic_{glob_escape(class_name)}_*.png")]
    names += [row["file"].split("/", 1)[1] for row in manifest_rows if row["class"] == class_name]
    numbers = [int(match.group(1)) for name in names if (match := FILE_NUMBER_PATTERN.match(name))]
    return max(numbers, default=0) + 1


def glob_escape(text):
    return re.sub(r"([*?\[])", r"[\1]", text)


def parse_manifest_line(raw):
    """The fields of one manifest line, or None for bytes that are not a line of text."""
    try:
        text = raw.decode("utf-8")
        return next(csv.reader([text.rstrip("\r")]), [])
    except (UnicodeDecodeError, csv.Error):
        return None


def manifest_row(fields, header):
    """A line's row when it names an image of its class; without a valid header, the columns are taken
    in order (every manifest's columns begin with the first manifest's)."""
    if fields is None:
        return None
    columns = header or MANIFEST_COLUMNS[: len(fields)]
    if len(fields) != len(columns) or len(fields) < OLDEST_MANIFEST_COLUMNS:
        return None
    row = dict(zip(columns, fields))
    match = MANIFEST_FILE_PATTERN.match(row["file"])
    return row if match and row["class"] == match["class_name"] else None


def read_manifest(manifest_path):
    """(the manifest's valid rows, how many of its lines are damaged, whether it must be written again).

    Damage is a last row cut short (a disk that filled up, a kill), bytes that are not text, a row that
    names no image of its class (a row glued to a partial one, junk); a header without the newest columns
    is rewritten too. A header of other columns (another program's file) is refused in one line."""
    if not manifest_path.exists():
        return [], 0, False
    lines = manifest_path.read_bytes().split(b"\n")
    damaged = int(bool(lines.pop().strip()))  # what follows the last newline: a row cut short
    if not lines:
        return [], damaged, bool(damaged)
    header = parse_manifest_line(lines[0])
    if header and header != MANIFEST_COLUMNS[: len(header)] and all(map(HEADER_NAME_PATTERN.match, header)):
        raise UserError(
            f"{manifest_path} has other columns than this version writes; move it aside and run again"
        )
    if not header or header != MANIFEST_COLUMNS[: len(header)] or "file" not in header:
        header, damaged = None, damaged + 1
    rows = []
    for line in lines[1:]:
        if not line.strip():
            continue
        row = manifest_row(parse_manifest_line(line), header)
        if row is None:
            damaged += 1
        else:
            rows.append(row)
    return rows, damaged, bool(damaged) or header != MANIFEST_COLUMNS


def embedded_row(path, class_name):
    """The manifest row a generated PNG carries; a placeholder for an image without one; None when the
    file cannot be read (damaged, a dangling link)."""
    name = f"{class_name}/{path.name}"
    try:
        with Image.open(path) as image:
            stored = getattr(image, "text", {}).get(MANIFEST_ROW_KEY)
        row = json.loads(stored) if stored else None
    except (OSError, SyntaxError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("file") != name:
        row = {"file": name, "class": class_name, "sampling": "unknown"}
    return row


def refuse_links(generated_layout, class_names):
    """Generation writes only inside its folder: a manifest or class folder that is a symbolic link
    would be written through to wherever it points, so it is refused."""
    for path in (generated_layout.manifest, *map(generated_layout.class_folder, class_names)):
        if path.is_symlink():
            kind = "file" if path == generated_layout.manifest else "folder"
            raise UserError(
                f"{path} is a symbolic link, and generation writes only inside {generated_layout.directory}; "
                f"replace the link with a real {kind}, then run again"
            )


def rewrite_manifest(manifest_path, rows, damaged):
    """Write the manifest anew, atomically; a damaged one is kept beside it first (nothing is deleted)."""
    if damaged:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        kept = manifest_path.with_name(f"{manifest_path.name}.damaged-{stamp}")
        shutil.copyfile(manifest_path, kept)
        print(f"the damaged manifest is kept as {kept}")
    write_csv_atomic(
        manifest_path, [{name: row.get(name) for name in MANIFEST_COLUMNS} for row in rows], MANIFEST_COLUMNS
    )


def reconcile_with_disk(generated_layout, class_names):
    """Before a run: refuse links, remove the hidden partial files a killed run left, repair a damaged
    manifest and give each image without a row the row it carries itself. Returns the manifest's rows."""
    refuse_links(generated_layout, class_names)
    manifest_path = generated_layout.manifest
    rows, damaged, rewrite = read_manifest(manifest_path)
    known = {row["file"] for row in rows}
    recovered, unreadable = [], []
    for class_name in class_names:
        for leftover in generated_layout.class_folder(class_name).glob(".*.partial*"):
            leftover.unlink(missing_ok=True)
        for path in generated_layout.images(class_name):
            if f"{class_name}/{path.name}" not in known:
                row = embedded_row(path, class_name)
                (unreadable if row is None else recovered).append(row or f"{class_name}/{path.name}")
    if rewrite or recovered:
        rewrite_manifest(manifest_path, rows + recovered, damaged)
    if damaged:
        print(
            f"repaired {manifest_path}: {damaged} damaged line(s) left out, {len(rows)} row(s) kept, "
            f"{len(recovered)} row(s) recovered from the images' embedded rows"
        )
    elif recovered:
        print(
            f"recorded {len(recovered)} image(s) an interrupted run wrote without manifest rows in {manifest_path}"
        )
    if unreadable:
        print(
            f"note: {len(unreadable)} image(s) in {generated_layout.directory} cannot be read and have no "
            f"manifest row, left as they are: {', '.join(unreadable[:3])}{' ...' if len(unreadable) > 3 else ''}"
        )
    return rows + recovered


def upgrade_manifest_header(manifest_path):
    """Give a manifest written before the newest columns existed those columns (empty for its rows),
    so that rows appended now line up with the header; another header is refused in one line."""
    rows, damaged, rewrite = read_manifest(manifest_path)
    if rewrite:
        rewrite_manifest(manifest_path, rows, damaged)


@contextlib.contextmanager
def manifest_appender(manifest_path):
    """A function appending whole rows to the manifest: each call's rows go to the file in one write,
    and a write the disk cannot finish is cut back, so no reader sees part of a row."""
    descriptor = os.open(manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)

    def append(rows, header=False):
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n", restval="", extrasaction="ignore"
        )
        if header:
            writer.writeheader()
        writer.writerows(rows)
        remaining = memoryview(buffer.getvalue().encode("utf-8"))
        size = os.fstat(descriptor).st_size
        try:
            while remaining:
                remaining = remaining[os.write(descriptor, remaining) :]
        except OSError as error:
            os.ftruncate(descriptor, size)
            raise OSError(error.errno, error.strerror, str(manifest_path)) from None

    try:
        if os.fstat(descriptor).st_size == 0:
            append([], header=True)
        yield append
    finally:
        os.close(descriptor)


def append_manifest_rows(manifest_path, rows):
    upgrade_manifest_header(manifest_path)
    with manifest_appender(manifest_path) as append:
        append(rows)


def stream_key(row):
    """What makes two images draws of one stream: their class, how and by which model they were made
    (every column but the per-image ones) and, for counterfactuals, the class of the source crops."""
    shared = tuple(
        "" if row.get(name) is None else str(row.get(name))
        for name in MANIFEST_COLUMNS
        if name not in PER_IMAGE_COLUMNS
    )
    return (*shared, str(row.get("counterfactual_source") or "").split("/")[0])


def images_of_request(manifest_rows, template, count):
    """{stream index: file} of the manifest's images of the request `template` describes, below `count`."""
    key, found = stream_key(template), {}
    for row in manifest_rows:
        try:
            index = int(row.get("stream_index"))
        except (TypeError, ValueError):
            continue  # a row written before stream indices were recorded, or recovered without its own
        if 0 <= index < count and stream_key(row) == key:
            found.setdefault(index, row["file"])
    return found
