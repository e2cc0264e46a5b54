"""What a finished training run recorded, read without TensorFlow.

The inference script reads a run's cvae_parameters.json before TensorFlow loads (seconds), so
that a mistyped class name or a missing model is answered at once; generation.py loads the
networks themselves afterwards.
"""

import json

from cilia_cvae.config import UserError

# The ways inference can draw latents (generation.py draws them); checked before TensorFlow loads.
SAMPLING_MODES = ("posterior", "prior", "class_density", "diffusion", "variation")


def training_script_for(image_size):
    if image_size in (224, 448):
        return f"python Scripts/cvae_training_{image_size}x{image_size}.py"
    return f"python Scripts/cvae_training_224x224.py --image_size={image_size}"


def read_parameters(layout, image_size):
    """A finished run's cvae_parameters.json, or one line saying what is wrong with it."""
    if not layout.parameters.is_file() or not layout.decoder.is_file():
        raise UserError(
            f"no trained model in {layout.directory}; run {training_script_for(image_size)} first"
        )
    try:
        parameters = json.loads(layout.parameters.read_text(encoding="utf-8"))
        for key in ("class_names", "latent_dim", "image_size"):
            parameters[key]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{layout.parameters} is damaged ({type(error).__name__}: {error}); "
            f"train again with {training_script_for(image_size)} --fresh=True"
        ) from None
    return parameters
