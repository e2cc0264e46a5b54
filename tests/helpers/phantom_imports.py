"""Import what the phantom generator needs, in a fresh process; print whether TensorFlow or Keras came too.

Run as `python tests/helpers/phantom_imports.py` with Scripts/ on PYTHONPATH: making phantoms must not
pay TensorFlow's start-up.
"""

import sys

import tqdm  # noqa: F401

import cilia_cvae.config  # noqa: F401
import cilia_cvae.files  # noqa: F401
import cilia_cvae.phantoms  # noqa: F401

print("tensorflow" in sys.modules or "keras" in sys.modules)
