"""One run at a time per output folder: an advisory lock that a killed process releases by itself.

Each stage that writes into a per-size folder holds `.<S>x<S>.lock` beside it for the whole run
(beside, not inside, because a fresh training run moves its folder aside). The lock is an
`fcntl.flock` on that file: the kernel drops it when the process ends, however it ends, so a
stale lock file from a killed run never blocks anyone; the file only names the last holder.

A stage that reads another stage's folder for its whole run (training reads the processed
images) holds the same lock shared: readers do not block each other, but a writer is refused
while one reads, and a reader while one writes. Each reader adds its line to the file, so that a
refused writer can name it.
"""

import contextlib
import fcntl
import os
import re
import shlex
import sys
from pathlib import Path

from cilia_cvae.config import UserError

READER_PREFIX = "reading: "


def lock_path(folder):
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _command_line():
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    return f"process {os.getpid()} ({command})"


def _is_running(line):
    match = re.search(r"process (\d+) ", line)
    if not match:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return True


def _refusal(folder, handle):
    """Who holds the lock: the readers still running, else the writer the file names."""
    handle.seek(0)
    lines = [line.strip() for line in handle.read().splitlines() if line.strip()]
    readers = [line[len(READER_PREFIX) :] for line in lines if line.startswith(READER_PREFIX)]
    readers = [line for line in readers if _is_running(line)]
    if readers:
        return UserError(
            f"{folder} is being read by {'; '.join(readers)}; wait for it to finish (or stop it), then run again"
        )
    writer = next((line for line in lines if not line.startswith(READER_PREFIX)), "another process")
    return UserError(
        f"{folder} is being written by {writer}; wait for it to finish (or stop it), then run again"
    )


@contextlib.contextmanager
def folder_lock(folder, shared=False):
    """Hold the lock of `folder` while the block runs (shared: to read it); a UserError naming the
    holder if another run has it. A lock this process holds already is not taken twice."""
    path = lock_path(Path(folder).absolute())
    if path in _held_paths:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refusal(folder, handle) from None
        if shared:
            handle.write(f"{READER_PREFIX}{_command_line()}\n")
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{_command_line()}\n")
        handle.flush()
        _held_paths.add(path)
        try:
            yield
        finally:
            _held_paths.discard(path)
            fcntl.flock(handle, fcntl.LOCK_UN)


def hold_folder_lock(folder, shared=False):
    """Take the lock of `folder` until this process ends (for scripts whose whole run writes there,
    or, shared, reads there)."""
    stack = contextlib.ExitStack()
    stack.enter_context(folder_lock(folder, shared=shared))
    _held.append(stack)


# Locks held for the life of the process: kept referenced so that their files stay open.
_held = []
# The lock files this process holds, so that a stage taking a lock its script took already goes on.
_held_paths = set()
