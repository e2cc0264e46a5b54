"""Development probe behind docs/latent_probe_*_128px.png: the same CVAE with a latent vector
(A) or a latent map at 1/8 of the side (C), trained for the same steps on the 128 px phantoms.

Usage (after python Scripts/cvae_pre_processing.py --image_size=128):
    python docs/latent_probe.py 128 1200 A,C "Processed Input Images" docs
Each picture: per class, 3 training images | their reconstructions | draws around their
latents | prior draws. Measured: A 410 s, C 530 s on 2 cores while other jobs ran.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Scripts"))
import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from cilia_cvae import models
from cilia_cvae.classifier import list_images, load_images
from cilia_cvae.model_config import ModelConfig

size, steps, variants = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
processed, output = Path(sys.argv[4]), Path(sys.argv[5])
names = ["CP", "Disarranged", "IDA", "Normal", "ODA"]
root = processed / f"{size}x{size}"
paths, labels = list_images(f"{root}/train", names)
x = load_images(paths, size).astype("float32")
if x.max() > 1.5:
    x = x / 255.0
if x.ndim == 3:
    x = x[..., None]
y = np.eye(5, dtype="float32")[labels]
print("data", x.shape, x.min(), x.max(), flush=True)
SETTINGS = {
    "A": dict(latent=128, base=12, spatial=0),
    "C": dict(latent=size // 8 * size // 8 * 4, base=12, spatial=size // 8),
}


def augment(image, label):
    image = tf.image.rot90(tf.image.random_flip_left_right(image), tf.random.uniform((), 0, 4, tf.int32))
    return image, label, tf.constant(1.0)


for name in variants:
    s = SETTINGS[name]
    keras.utils.set_random_seed(1)
    model_config = ModelConfig(
        image_size=size,
        num_classes=5,
        latent_dim=s["latent"],
        base_channels=s["base"],
        max_channels=128,
        latent_map_stride=size // s["spatial"] if s["spatial"] else 0,
    )
    enc, dec = models.build_encoder_and_decoder(model_config)
    model = models.CVAE(enc, dec, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(4000, seed=1)
        .repeat()
        .map(augment)
        .batch(32)
        .prefetch(2)
    )
    it = iter(data)
    started, chunk = time.time(), 100
    for k in range(steps // chunk):
        model.kl_weight.assign(min(1.0, (k + 1) * chunk / (steps * 0.3)))
        hist = model.fit(data, steps_per_epoch=chunk, epochs=1, verbose=0)
        h = {m: round(float(v[-1]), 1) for m, v in hist.history.items()}
        print(name, (k + 1) * chunk, h, round(time.time() - started), "s", flush=True)
    # picture: per class 3 originals | their reconstructions (mean) | posterior samples | prior samples
    rows = []
    rng = np.random.default_rng(0)
    for c in range(5):
        idx = rng.choice(np.flatnonzero(labels == c), 3, replace=False)
        zm, zl = enc.predict([x[idx], y[idx]], verbose=0)
        rec = dec.predict([zm, y[idx]], verbose=0)
        post = dec.predict([zm + np.exp(0.5 * zl) * rng.standard_normal(zm.shape), y[idx]], verbose=0)
        prior = dec.predict([rng.standard_normal(zm.shape).astype("float32"), y[idx]], verbose=0)
        rows.append(
            np.concatenate([np.concatenate(list(a[..., 0]), 1) for a in (x[idx], rec, post, prior)], 1)
        )
    picture = (np.concatenate(rows, 0) * 255).clip(0, 255).astype("uint8")
    Image.fromarray(picture).save(output / f"latent_probe_{name}_{size}px.png")
    print(
        name,
        "done",
        round(time.time() - started),
        "s; kl per dim",
        float(np.mean(-0.5 * (1 + zl - zm**2 - np.exp(zl)))),
        flush=True,
    )
