"""One typed description of a CVAE: what the training scripts' constants say about the model.

A `ModelConfig` is built from a training script's settings (`ModelConfig.from_settings`),
checked when it is made (an impossible size raises ValueError saying why), written into
`cvae_parameters.json` under "model" and read back from it (`ModelConfig.from_parameters`),
so inference, evaluation and the benchmark rebuild the same model without repeating the
derivation of the latent's shape. The presets are the two training scripts' defaults, for
code that needs them without running a script (the benchmark); a test keeps them equal.
"""

import dataclasses
import math
from dataclasses import dataclass

ARCHITECTURES = ("default", "original")
# "auto" is each architecture's own: the original's sum of squared errors (a fixed variance),
# our calibrated Gaussian (the variance learnt, in closed form, per image).
RECONSTRUCTION_LOSSES = ("auto", "calibrated_gaussian", "sum_squared_error")
# The original's latent is a vector of this length at every resolution.
ORIGINAL_LATENT_DIM = 128


def smallest_map_size(image_size):
    """The side of the smallest feature map: 7 for 224 and 448 (as in ResNets), 4 for powers of two."""
    for side in (7, 4, 5, 3):
        quotient = image_size // side
        if image_size % side == 0 and quotient & (quotient - 1) == 0 and quotient >= 4:
            return side
    raise ValueError(
        f"image size {image_size} must be 3, 4, 5 or 7 times a power of two, at least 4 times "
        f"(e.g. 32, 64, 128, 224, 448)"
    )


def latent_map_side(image_size, stride):
    """The side of a spatial latent map at 1/stride of the image (28 for 224 at stride 8), or 0
    for a vector latent (stride 0). The map must be one of the encoder's feature maps."""
    if not stride:
        return 0
    smallest, sides, size = smallest_map_size(image_size), [], image_size // 2
    while size >= smallest:
        sides.append(size)
        size //= 2
    if image_size % stride or image_size // stride not in sides:
        strides = [image_size // side for side in sides]
        raise ValueError(f"a latent map at {image_size} px needs a stride among {strides}, not {stride}")
    return image_size // stride


def reconstruction_loss_kind(architecture, choice="auto"):
    """The original used a plain sum of squared errors; ours a Gaussian with calibrated variance."""
    if choice != "auto":
        return choice
    return "sum_squared_error" if architecture == "original" else "calibrated_gaussian"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture, sizes, latent, channels and losses of one CVAE."""

    architecture: str = "default"  # "default" (ours) or "original" (the first implementation)
    image_size: int = 224
    num_classes: int = 5
    latent_dim: int = 128  # length of a latent vector (the original, or latent_map_stride 0)
    base_channels: int = 12  # default architecture: channels at half resolution
    max_channels: int = 128  # default architecture: cap on the low-resolution channels
    latent_map_stride: int = 8  # default architecture: a latent map at 1/stride of the side; 0: a vector
    latent_map_channels: int = 4  # default architecture: numbers per cell of the latent map
    reconstruction_loss: str = "auto"
    structural_weight: float = 0.0

    def __post_init__(self):
        for name, value, choices in (
            ("architecture", self.architecture, ARCHITECTURES),
            ("reconstruction_loss", self.reconstruction_loss, RECONSTRUCTION_LOSSES),
        ):
            if value not in choices:
                listed = ", ".join(repr(choice) for choice in choices)
                raise ValueError(f"--{name}={value!r} is not one of {listed}")
        if self.architecture == "original" and self.image_size % 8:
            raise ValueError(
                f"the original decoder upsamples three times, so the image size must be a "
                f"multiple of 8, not {self.image_size}"
            )
        if self.architecture == "default":
            smallest_map_size(self.image_size)
            latent_map_side(self.image_size, self.latent_map_stride)

    @property
    def map_side(self):
        """Side of the latent map (28 at 224 by default), 0 for a latent vector; the original has none."""
        if self.architecture == "original":
            return 0
        return latent_map_side(self.image_size, self.latent_map_stride)

    @property
    def latent_length(self):
        """How many numbers one latent holds: cells x channels for a map, latent_dim for a vector."""
        side = self.map_side
        return side * side * self.latent_map_channels if side else self.latent_dim

    @property
    def reconstruction(self):
        """The reconstruction loss "auto" stands for with this architecture."""
        return reconstruction_loss_kind(self.architecture, self.reconstruction_loss)

    @property
    def channels(self):
        """Channels of the default architecture's feature maps from half resolution down to the
        smallest map: doubling at each halving, capped, so the low-resolution levels stay cheap."""
        levels = int(round(math.log2(self.image_size // smallest_map_size(self.image_size))))
        return [min(self.base_channels * 2**level, self.max_channels) for level in range(levels)]

    @classmethod
    def from_settings(cls, settings, *, num_classes):
        """The model a training script's UPPER_CASE settings describe (settings it lacks keep their defaults)."""
        names = {field.name.upper(): field.name for field in dataclasses.fields(cls)}
        chosen = {field: settings[name] for name, field in names.items() if name in settings}
        if "structural_weight" in chosen:
            chosen["structural_weight"] = float(chosen["structural_weight"])
        return cls(**chosen, num_classes=num_classes)

    @classmethod
    def from_parameters(cls, parameters):
        """The model of a finished run, from its cvae_parameters.json (runs saved before "model" existed
        are read from their recorded settings)."""
        if "model" in parameters:
            return cls(**parameters["model"])
        return cls.from_settings(parameters["settings"], num_classes=len(parameters["class_names"]))

    def to_json(self):
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A training script's defaults that other code needs: its model and its batch size."""

    model: ModelConfig
    batch_size: int


PRESETS = {
    224: Preset(model=ModelConfig(image_size=224), batch_size=32),
    # One level deeper than the 224 model, with twice its latent and low-resolution width; the
    # map stays 28 x 28, so each cell covers the same tissue as at 224.
    448: Preset(
        model=ModelConfig(
            image_size=448, latent_dim=256, max_channels=256, latent_map_stride=16, latent_map_channels=8
        ),
        batch_size=16,
    ),
}
