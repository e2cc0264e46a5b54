"""Development probe behind the tolerance table of docs/latent-prior.md: how far may a latent map
be from a real one before the decoder stops drawing its class?

Decodes the stored latent means of the first 40 training crops per class with white noise of
each given spread added (in the latents' own units, whose spread is about 1), into one
generated-images folder per spread, which cvae_evaluate.py then judges.

Usage (a trained run at 224, then one evaluation per folder):
    python docs/latent_tolerance.py Models "Latent Space Tensors" 0,0.1,0.3,0.6 /tmp/tolerance
    python Scripts/cvae_evaluate.py --images_per_class=40 --generated_images_dir=/tmp/tolerance/noise_0.3
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Scripts"))
import numpy as np
from PIL import Image

from cilia_cvae import generation

models_dir, latents_dir, spreads, output = (
    Path(sys.argv[1]),
    Path(sys.argv[2]),
    sys.argv[3],
    Path(sys.argv[4]),
)
generator = generation.load_trained_generator(models_dir, latents_dir, 224)
class_names = generator["parameters"]["class_names"]
rng = np.random.default_rng(0)
for spread in (float(value) for value in spreads.split(",")):
    folder = output / f"noise_{spread}" / "224x224"
    for label, class_name in enumerate(class_names):
        means = generator["latents"][class_name][0][:40]
        noisy = means + spread * rng.standard_normal(means.shape).astype("float32")
        one_hot = np.zeros((len(noisy), len(class_names)), "float32")
        one_hot[:, label] = 1
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        for index, pixels in enumerate(generation.decode_mixed(generator["decoder"], noisy, one_hot)):
            Image.fromarray(pixels).save(folder / class_name / f"Synthetic_{class_name}_{index:05d}.png")
    print(f"wrote {folder}")
