"""One run at a time per output folder: an advisory lock that a killed process releases by itself.

Each stage that writes into a per-size folder holds `.<S>x<S>.lock` beside it for the whole run
(beside, not inside, because a fresh training run moves its folder aside). The lock is an
`fcntl.flock` on that file: the kernel drops it when the process ends, however it ends, so a
stale lock file from a killed run never blocks anyone; the file only names the last holder.
"""

import contextlib
import fcntl
import os
import shlex
import sys
from pathlib import Path

from cilia_cvae.config import UserError


def lock_path(folder):
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def folder_lock(folder):
    """Hold the lock of `folder` while the block runs; a UserError naming the holder if another run has it."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(
                f"{folder} is being written by {holder}; wait for it to finish (or stop it), then run again"
            ) from None
        command = shlex.join([Path(sys.executable).name, *sys.argv])
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({command})\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def hold_folder_lock(folder):
    """Take the lock of `folder` until this process ends (for scripts whose whole run writes there)."""
    stack = contextlib.ExitStack()
    stack.enter_context(folder_lock(folder))
    _held.append(stack)


# Locks held for the life of the process: kept referenced so that their files stay open.
_held = []
