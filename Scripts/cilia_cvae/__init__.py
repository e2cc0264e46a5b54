"""Shared code of the Cilia CVAE scripts (a module per concern).

Importing the package first, as every script does, keeps TensorFlow's start-up notices out of a
user's terminal: they read like failures but ask for nothing.
"""

import importlib.abc
import importlib.util
import os
import subprocess
import sys

# TensorFlow's C++ core hides its INFO lines (the CPU-instructions notice); its warnings and errors
# still show. A user's own value wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# Measured with TensorFlow 2.21.0 on a machine without a GPU, what TF_CPP_MIN_LOG_LEVEL cannot hide
# (TensorFlow prints it before it reads the level):
# - tensorflow-cpu (requirements.txt), on a processor with AVX-512: absl's banner and "oneDNN custom
#   operations are on", twice, while TensorFlow loads (only TF_ENABLE_ONEDNN_OPTS=0 would hide them,
#   and that changes the arithmetic);
# - the GPU build (the README's GPU install), besides: "Could not find cuda drivers" while it loads,
#   and "failed call to cuInit" when it first lists its devices, which with no driver asks for nothing.
# This program copies stdin to stderr line by line without them.
STARTUP_FILTER_PROGRAM = r"""
import re, sys
startup_notice = re.compile(rb"I\d{4} |WARNING: All log messages before absl::InitializeLog\(\) is called")
no_driver_seen = False
for line in sys.stdin.buffer:
    no_driver_seen = no_driver_seen or b"Could not find cuda drivers on your machine" in line
    if startup_notice.match(line) or (no_driver_seen and b"failed call to cuInit" in line):
        continue
    sys.stderr.buffer.write(line)
    sys.stderr.buffer.flush()
"""


def run_with_startup_notices_filtered(action):
    """Run action() with the process's stderr (file descriptor 2, which C++ code writes to) passed
    through STARTUP_FILTER_PROGRAM; every other line, a crash's last words included, still shows."""
    sys.stderr.flush()
    try:
        original_stderr = os.dup(2)
    except OSError:  # no usable stderr: there is nothing to keep quiet
        return action()
    read_end, write_end = os.pipe()
    try:
        # A separate process, so that what it has read is still written if this one dies in C++
        # (an abort while TensorFlow loads, e.g. on a processor it was not built for).
        startup_filter = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", STARTUP_FILTER_PROGRAM], stdin=read_end, stderr=original_stderr
        )
    except OSError:
        for descriptor in (read_end, write_end, original_stderr):
            os.close(descriptor)
        return action()
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        return action()
    finally:
        sys.stderr.flush()
        os.dup2(original_stderr, 2)
        os.close(original_stderr)
        try:
            startup_filter.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # a process started meanwhile holds the pipe; the filter ends with it


class QuietTensorFlowLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with its start-up notices filtered, device discovery included."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader

        def import_and_find_devices():
            self.loader.exec_module(module)
            # Listing the devices is where the GPU build tries CUDA; it leaves every device setting open.
            module.config.list_physical_devices()

        run_with_startup_notices_filtered(import_and_find_devices)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds TensorFlow the usual way on its first import (keras's included) and hands back a quiet
    loader: the scripts import TensorFlow late, after their settings are checked, wherever they need it."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = QuietTensorFlowLoader(spec.loader)
        return spec


# At level 0 the user asked for every notice, so TensorFlow is imported untouched.
if os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() != "0" and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, QuietTensorFlowFinder())
