"""Run every stage of the pipeline at demo scale on the built-in phantom data (`make demo`).

Reads   RAW_IMAGES_DIR (fills it with phantoms only when it holds no images; your own data is used as it is)
Writes  what each stage writes: Processed Input Images, Models, Latent Space Tensors, Generated Images

Each stage runs as its own script, exactly as a user would run it, and a stage whose output
already exists is not run again, so a second `make demo` reuses what the first one made.

Example:
    python Scripts/demo.py --phantom_images=1000
"""

import subprocess
import sys
import time
from pathlib import Path

from cilia_cvae import config
from cilia_cvae.config import configure

PHANTOM_IMAGES = 1500  # phantoms written when the raw folder holds no images (the full set is 5,210)
IMAGE_SIZE = 224  # resolution of the demo run
RAW_IMAGES_DIR = config.RAW_IMAGES_DIR  # your data, or the phantoms written here when it is empty
PROCESSED_IMAGES_DIR = config.PROCESSED_IMAGES_DIR  # preprocessing output
MODELS_DIR = config.MODELS_DIR  # trained models
LATENT_TENSORS_DIR = config.LATENT_TENSORS_DIR  # training latents
GENERATED_IMAGES_DIR = config.GENERATED_IMAGES_DIR  # synthetic images and figures

settings = configure(globals())
SCRIPTS_DIR = Path(__file__).resolve().parent
size_name = f"{IMAGE_SIZE}x{IMAGE_SIZE}"


def run_stage(title, script_name, *arguments):
    """Run one pipeline script in a subprocess with its progress visible; stop the demo if it fails."""
    script_path = SCRIPTS_DIR / f"{script_name}.py"
    if not script_path.exists():
        print(f"\n== {title}: not yet: {script_name}.py lands in a later issue")
        return False
    print(f"\n== {title}: python Scripts/{script_name}.py {' '.join(arguments)}", flush=True)
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, str(script_path), *arguments])
    if finished.returncode != 0:
        sys.exit(f"demo stopped: {script_name}.py failed with exit code {finished.returncode}")
    print(f"== {title}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return True


def holds_images(folder):
    return folder.is_dir() and any(path.is_file() and not path.name.startswith(".") for path in folder.rglob("*"))


demo_started = time.perf_counter()
folders = [f"--raw_images_dir={RAW_IMAGES_DIR}", f"--processed_images_dir={PROCESSED_IMAGES_DIR}"]

if holds_images(RAW_IMAGES_DIR):
    print(f"== data: using the images already in {RAW_IMAGES_DIR}")
else:
    run_stage("phantom data", "make_phantom_dataset", f"--raw_images_dir={RAW_IMAGES_DIR}",
              f"--num_images={PHANTOM_IMAGES}")

if (PROCESSED_IMAGES_DIR / size_name / "preprocessing.json").is_file():
    print(f"\n== preprocessing: reusing {PROCESSED_IMAGES_DIR / size_name}")
else:
    run_stage("preprocessing", "cvae_pre_processing", *folders, f"--image_size={IMAGE_SIZE}")

run_stage("training", f"cvae_training_{size_name}")
run_stage("generation", "cvae_inference")
run_stage("evaluation", "cvae_evaluate")

print(f"\nDemo finished in {time.perf_counter() - demo_started:.0f} s. Outputs:")
for label, folder in (("raw images", RAW_IMAGES_DIR), ("processed images", PROCESSED_IMAGES_DIR / size_name),
                      ("models", MODELS_DIR / size_name), ("latent tensors", LATENT_TENSORS_DIR / size_name),
                      ("generated images", GENERATED_IMAGES_DIR / size_name)):
    state = "" if folder.exists() else "  (not made yet)"
    print(f"  {label:<18} {folder}{state}")
