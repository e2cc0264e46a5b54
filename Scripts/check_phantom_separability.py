"""Judge the phantoms' realism by separability: learnable from anatomy, not from image statistics.

Two numbers on the same phantoms (five classes, split 80/20, stratified):
1. a small CNN trained on 80% of them at 128 px classifies the other 20%: accuracy, which
   should be at least 95% (each class's defining structure is visible at that size);
2. a logistic regression on image statistics alone (mean, standard deviation, width, height)
   classifies the same 20%: balanced accuracy, which should stay under 40% (chance is 20%),
   so that no class can be told from the others by brightness, contrast or size.

Reads   PHANTOMS_DIR (phantoms written by make_phantom_dataset.py; it writes them there first
        when the folder holds none with these settings)
Writes  nothing else; prints both numbers, per-class recall and the confusion matrix

Example:
    python Scripts/check_phantom_separability.py

Expected run time: 7 minutes of CPU on 2 cores (13 min wall measured on a machine shared with
other jobs), of which ~1 minute writes the 1,000 phantoms.
"""

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cilia_cvae import phantoms
from cilia_cvae.config import UserError, configure

NUM_IMAGES = 1000  # phantoms to judge, in the generator's default class proportions
PHANTOM_SEED = 2  # seed of the phantoms (a different one from the default data set's)
SPLIT_SEED = 0  # fixes the 80/20 split and the CNN's initial weights
IMAGE_SIZE = 128  # the CNN sees the crops squashed to this square size
EPOCHS = 12  # CNN training epochs, each over the 800 training images in all four quarter turns
CNN_WIDTH = 16  # filters in the CNN's first stage, doubling over its five stages up to 8 times this
PHANTOMS_DIR = (
    Path(tempfile.gettempdir()) / "cilia_phantom_separability"
)  # where the phantoms are, or are written

settings = configure(globals())

SCHEME = "five"
MARKER_NAME = ".phantom_dataset.json"
class_names = phantoms.class_names(SCHEME)

# 1. The phantoms: reuse the folder when it holds exactly these, else (re)write them with the
# generator itself, which also refuses to touch a folder holding anything but its own phantoms.
marker_path = PHANTOMS_DIR / MARKER_NAME
marker = json.loads(marker_path.read_text(encoding="utf-8")) if marker_path.is_file() else {}
wanted = {"NUM_IMAGES": NUM_IMAGES, "SEED": PHANTOM_SEED, "CLASS_SCHEME": SCHEME}
if marker.get("settings") != wanted or not marker.get("complete"):
    generator = Path(__file__).resolve().parent / "make_phantom_dataset.py"
    finished = subprocess.run(
        [
            sys.executable,
            str(generator),
            f"--raw_images_dir={PHANTOMS_DIR}",
            f"--num_images={NUM_IMAGES}",
            f"--seed={PHANTOM_SEED}",
            f"--class_scheme={SCHEME}",
            "--overwrite_phantoms=True",
        ]
    )
    if finished.returncode != 0:
        raise UserError(
            f"could not write phantoms into {PHANTOMS_DIR} (see above); choose another --phantoms_dir"
        )

# 2. Load: the statistics come from the crops as written, the CNN input is squashed to a square.
started = time.perf_counter()
images, statistics, labels = [], [], []
for label, class_name in enumerate(class_names):
    for path in sorted((PHANTOMS_DIR / class_name).glob("*.png")):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
            squashed = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        images.append(np.asarray(squashed))
        statistics.append([pixels.mean(), pixels.std(), pixels.shape[1], pixels.shape[0]])
        labels.append(label)
images, statistics, labels = np.stack(images), np.array(statistics), np.array(labels)
indices = np.arange(len(labels))
train, test = train_test_split(indices, test_size=0.2, stratify=labels, random_state=SPLIT_SEED)
print(f"{len(labels)} phantoms: {len(train)} to train, {len(test)} to test")

# 3. Image statistics alone. Balanced class weights give the rare classes every chance to show
# a cue, so a low score means there is none to find.
statistics_model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
statistics_model.fit(statistics[train], labels[train])
statistics_balanced_accuracy = balanced_accuracy_score(
    labels[test], statistics_model.predict(statistics[test])
)

# 4. Anatomy: a small CNN, imported only now because TensorFlow takes seconds to load. Each
# image is standardised to zero mean and unit variance first, so the CNN too can only use
# the structure inside the image, not its brightness or contrast.
import keras  # noqa: E402
from keras import layers  # noqa: E402


def standardised(batch):
    batch = batch.astype(np.float32)
    mean = batch.mean(axis=(1, 2), keepdims=True)
    return ((batch - mean) / (batch.std(axis=(1, 2), keepdims=True) + 1e-6))[..., None]


keras.utils.set_random_seed(SPLIT_SEED)
inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
# A cross section has no preferred orientation, and both hands occur: flips are free examples.
x = layers.RandomFlip("horizontal_and_vertical")(inputs)
for stage in range(5):
    x = layers.Conv2D(CNN_WIDTH * min(2**stage, 8), 3, padding="same", use_bias=False)(x)
    # Batch statistics that track recent weights closely (momentum 0.9, not 0.99), with the
    # learning rate decaying to zero below, so inference sees the statistics training used.
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D()(x)
x = layers.GlobalAveragePooling2D()(x)
x = layers.Dropout(0.3)(x)
model = keras.Model(inputs, layers.Dense(len(class_names), activation="softmax")(x))
# Quarter turns multiply the 800 training images by four; they are exact, unlike arbitrary
# rotations, whose interpolation smooths the noise the test images keep.
turned = np.concatenate([np.rot90(images[train], quarter, axes=(1, 2)) for quarter in range(4)])
steps = EPOCHS * math.ceil(len(turned) / 32)
model.compile(
    optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
counts = np.bincount(labels[train], minlength=len(class_names))
class_weights = {label: len(train) / (len(class_names) * count) for label, count in enumerate(counts)}
# The test split is shown after each epoch for the record only: nothing is chosen by it.
model.fit(
    standardised(turned),
    np.tile(labels[train], 4),
    epochs=EPOCHS,
    batch_size=32,
    class_weight=class_weights,
    shuffle=True,
    verbose=2,
    validation_data=(standardised(images[test]), labels[test]),
)
predicted = model.predict(standardised(images[test]), verbose=0).argmax(axis=1)
cnn_accuracy = float(np.mean(predicted == labels[test]))
cnn_balanced_accuracy = balanced_accuracy_score(labels[test], predicted)

# 5. The verdict.
matrix = confusion_matrix(labels[test], predicted, labels=range(len(class_names)))
print("\nCNN confusion matrix on the test split (rows: true class, columns: predicted):")
print(f"{'':<14}" + "".join(f"{name[:11]:>12}" for name in class_names))
for name, row in zip(class_names, matrix):
    print(f"{name:<14}" + "".join(f"{value:>12}" for value in row))
print(
    f"\nCNN at {IMAGE_SIZE} px, {EPOCHS} epochs: accuracy {cnn_accuracy:.1%} "
    f"(balanced {cnn_balanced_accuracy:.1%}); wanted at least 95%"
)
print(
    f"Logistic regression on mean, std, width, height: balanced accuracy {statistics_balanced_accuracy:.1%}; "
    f"wanted under 40% (chance {1 / len(class_names):.0%})"
)
print(f"{time.perf_counter() - started:.0f} s after the phantoms were ready")
