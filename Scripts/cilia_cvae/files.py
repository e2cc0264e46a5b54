"""Atomic writes and small file helpers shared by every stage.

A stage killed half way must never leave a half-written file that a later stage would read,
so every output is written under a temporary name in the same folder, then renamed.
"""

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

# mkstemp creates files readable by their owner only; outputs should get the usual
# permissions (0666 less the umask), like any file a program writes with open().
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
# mkdtemp's folders, likewise: 0777 less the umask, like any folder mkdir makes.
FOLDER_MODE = 0o777 & ~_UMASK


def describe_size(count):
    """A byte count as people read it: 1.4 kB, 12.0 MB, 3.2 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count:,.0f} bytes"


@contextlib.contextmanager
def atomic_path(final_path):
    """Yield a temporary path beside `final_path`; rename it into place if the block succeeds."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(
        prefix=f".{final_path.stem}.", suffix=f".partial{final_path.suffix}", dir=final_path.parent
    )
    os.close(handle)
    temporary_path = Path(temporary_name)
    try:
        yield temporary_path
        if temporary_path.is_file():
            os.chmod(temporary_path, FILE_MODE)
        os.replace(temporary_path, final_path)
    except OSError as error:
        if error.errno == errno.ENOSPC and not error.filename:
            # A full disk met while writing names no file; the one-line message should name where.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final_path)) from None
        raise
    finally:
        temporary_path.unlink(missing_ok=True)


def write_bytes_atomic(path, data):
    with atomic_path(path) as temporary_path:
        temporary_path.write_bytes(data)


def write_text_atomic(path, text):
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, data):
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv_atomic(path, rows, fieldnames):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_png_atomic(path, image, compress_level=6, text=None):
    """Save a Pillow image as PNG under a temporary name, then rename it into place.

    Level 1 encodes several times faster than Pillow's default 6; noisy micrographs shrink
    little at any level, so bulk writers (phantoms, generated images) use it. `text` (a dict)
    goes into the file's tEXt chunks."""
    from PIL import PngImagePlugin

    buffer = io.BytesIO()
    information = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        information.add_text(key, value)
    image.save(buffer, format="PNG", compress_level=compress_level, pnginfo=information)
    write_bytes_atomic(path, buffer.getvalue())


def sha256_of_file(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def move_aside(path):
    """Move a folder to `<name>_<timestamp>` beside it instead of deleting it; return the new path."""
    path = Path(path)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    destination = path.with_name(f"{path.name}_{stamp}")
    counter = 1
    while destination.exists():
        counter += 1
        destination = path.with_name(f"{path.name}_{stamp}_{counter}")
    shutil.move(str(path), str(destination))
    return destination
