"""A stand-in for the training or the inference script (by the name it is copied to), recording each call.

Copied beside a copy of cvae_usefulness.py as cvae_training_224x224.py and cvae_inference.py, it lets a
test drive the experiment's resume rules without training anything. Each call appends
{"script", "behaviour", "checkpoint", "arguments"} as a JSON line to the file named by STAND_IN_CALLS; "checkpoint"
is the text of the training checkpoint found when the call began (None when there was none).

STAND_IN_TRAINING chooses what the training stand-in does:
    finish  write cvae_parameters.json, as a finished training run leaves it
    kill    write a checkpoint, then interrupt the script that started it, as Ctrl-C would
    refuse  print a one-line error and exit with code 2, as a refused run does
The inference stand-in writes grey images of a different shade per class.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

script = Path(sys.argv[0]).stem
arguments = dict(argument[2:].split("=", 1) for argument in sys.argv[1:])
size_name = f"{arguments['image_size']}x{arguments['image_size']}"
behaviour = os.environ["STAND_IN_TRAINING"] if script.startswith("cvae_training") else "generate"
model_dir = Path(arguments["models_dir"]) / size_name
checkpoint = model_dir / "checkpoints" / "epoch.weights.h5"
with open(os.environ["STAND_IN_CALLS"], "a", encoding="utf-8") as calls:
    found = checkpoint.read_text(encoding="utf-8") if checkpoint.is_file() else None
    record = {"script": script, "behaviour": behaviour, "checkpoint": found, "arguments": sys.argv[1:]}
    calls.write(json.dumps(record) + "\n")

if behaviour == "finish":
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "cvae_parameters.json").write_text("{}", encoding="utf-8")
elif behaviour == "kill":
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text("epochs 1-3", encoding="utf-8")
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(120)  # the interrupted script ends this process
elif behaviour == "refuse":
    print("error: the stand-in refuses this run", file=sys.stderr)
    sys.exit(2)
else:
    facts_path = Path(arguments["processed_images_dir"]) / size_name / "preprocessing.json"
    class_names = json.loads(facts_path.read_text(encoding="utf-8"))["class_names"]
    size = int(arguments["image_size"])
    for label, class_name in enumerate(class_names):
        folder = Path(arguments["generated_images_dir"]) / size_name / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(int(arguments["images_per_class"])):
            shade = np.full((size, size), 60 + 120 * label, dtype=np.uint8)
            Image.fromarray(shade).save(folder / f"Synthetic_{class_name}_{index:05d}.png")
