"""Shared code of the Cilia CVAE scripts (a module per concern)."""

import os

# TensorFlow's C++ start-up chatter (oneDNN notices, "no CUDA drivers") would bury a script's
# own messages; warnings and errors still show. Set before any module imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
