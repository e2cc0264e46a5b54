"""Every folder and file name that passes data between the stages, in one place.

Each stage asks this module where things are instead of spelling names itself, so a name
changes in one line and two stages can never disagree about it:

    <processed>/raw_image_statistics.csv                 the original's six columns, one row
    <processed>/<S>x<S>/preprocessing.json, manifest.csv the facts of one size, a row per raw file
    <processed>/<S>x<S>/{train,test}/<Class>/*.png       the square images
    <models>/<S>x<S>/                                    one training run (see RunLayout)
    <latents>/<S>x<S>/z_mean_<Class>.npy, z_log_var_<Class>.npy
    <generated>/<S>x<S>/<Class>/Synthetic_<Class>_<N>.png, generation_manifest.csv, reports
"""

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")
RAW_STATISTICS_FILE_NAME = "raw_image_statistics.csv"
FACTS_FILE_NAME = "preprocessing.json"
MANIFEST_FILE_NAME = "manifest.csv"
PARAMETERS_FILE_NAME = "cvae_parameters.json"
LATENT_NAMES = ("z_mean", "z_log_var")
SYNTHETIC_PREFIX = "Synthetic_"


def size_folder_name(image_size):
    """The per-resolution folder name every stage uses: 224x224."""
    return f"{image_size}x{image_size}"


def is_visible(path):
    """False for the hidden temporary files of atomic writes, which no stage may read."""
    return not Path(path).name.startswith(".")


@dataclass(frozen=True)
class ProcessedLayout:
    """The preprocessing stage's output for one image size."""

    root: Path
    image_size: int

    @property
    def directory(self):
        return Path(self.root) / size_folder_name(self.image_size)

    @property
    def facts(self):
        return self.directory / FACTS_FILE_NAME

    @property
    def manifest(self):
        return self.directory / MANIFEST_FILE_NAME

    @property
    def raw_statistics(self):
        # Beside the size folders, as the original wrote it: it describes the raw images, not a size.
        return Path(self.root) / RAW_STATISTICS_FILE_NAME

    def split(self, split):
        return self.directory / split

    def class_folder(self, split, class_name):
        return self.directory / split / class_name

    def images(self, split, class_name):
        """The visible PNGs of one class of one split, in name order."""
        return sorted(path for path in self.class_folder(split, class_name).glob("*.png") if is_visible(path))


@dataclass(frozen=True)
class RunLayout:
    """One training run: its model folder and its latent folder for one image size.

    checkpoints/            every finished epoch (weights, optimizer, epoch, best so far) and run_settings.json
    best_epoch_<N>.npz      weights of the best validation epoch so far
    training_history.csv    a row per finished epoch
    logs/                   TensorBoard scalars and a sample grid per epoch
    samples_epoch_<N>.png   sample grids every few epochs
    cvae_encoder.keras, cvae_decoder.keras, loss_plot.png, and cvae_parameters.json (written
    last: its presence marks a finished run)

    The second stage, the latent prior (prior_training.py), beside them:
    checkpoints/prior/      every finished prior epoch, and prior_settings.json
    prior_history.csv       a row per finished prior epoch
    prior_samples_epoch_<N>.png  prior draws of every class, decoded, every few epochs
    latent_prior.keras      the denoiser's moving-average weights (recorded under "latent_prior"
                            in cvae_parameters.json once its training finished)
    """

    models_dir: Path
    latent_tensors_dir: Path
    image_size: int

    @property
    def directory(self):
        return Path(self.models_dir) / size_folder_name(self.image_size)

    @property
    def latent_directory(self):
        return Path(self.latent_tensors_dir) / size_folder_name(self.image_size)

    @property
    def checkpoints(self):
        return self.directory / "checkpoints"

    @property
    def run_settings(self):
        return self.checkpoints / "run_settings.json"

    @property
    def continued_parameters(self):
        """Where a finished run's parameters wait while it is continued."""
        return self.checkpoints / "continued_from_parameters.json"

    @property
    def history(self):
        return self.directory / "training_history.csv"

    @property
    def parameters(self):
        return self.directory / PARAMETERS_FILE_NAME

    @property
    def encoder(self):
        return self.directory / "cvae_encoder.keras"

    @property
    def decoder(self):
        return self.directory / "cvae_decoder.keras"

    @property
    def loss_plot(self):
        return self.directory / "loss_plot.png"

    @property
    def logs(self):
        return self.directory / "logs"

    def best_weights(self, epoch):
        return self.directory / f"best_epoch_{epoch}.npz"

    def all_best_weights(self):
        return sorted(self.directory.glob("best_epoch_*.npz"))

    def samples(self, epoch):
        return self.directory / f"samples_epoch_{epoch}.png"

    @property
    def prior_checkpoints(self):
        return self.checkpoints / "prior"

    @property
    def prior_settings(self):
        return self.prior_checkpoints / "prior_settings.json"

    @property
    def prior_history(self):
        return self.directory / "prior_history.csv"

    def prior_samples(self, epoch):
        return self.directory / f"prior_samples_epoch_{epoch}.png"

    @property
    def latent_prior(self):
        return self.directory / "latent_prior.keras"

    @property
    def class_filter(self):
        """class_filter.keras: the classifier over latent maps inference's --class_filter uses (class_filter.py)."""
        return self.directory / "class_filter.keras"

    @property
    def grain_model(self):
        """grain_model.json: the grain the decoder averages away, measured on the train split (grain.py)."""
        return self.directory / "grain_model.json"

    @property
    def latent_record(self):
        """latents.json: the run fingerprint the latents belong to and each latent file's hash."""
        return self.latent_directory / "latents.json"

    def latent(self, name, class_name):
        """z_mean_<Class>.npy or z_log_var_<Class>.npy."""
        if name not in LATENT_NAMES:
            raise ValueError(f"latent name {name!r} is not one of {LATENT_NAMES}")
        return self.latent_directory / f"{name}_{class_name}.npy"


@dataclass(frozen=True)
class GeneratedLayout:
    """The generated images of one image size, their manifest and the reports beside them."""

    root: Path
    image_size: int

    @property
    def directory(self):
        return Path(self.root) / size_folder_name(self.image_size)

    @property
    def manifest(self):
        return self.directory / "generation_manifest.csv"

    @property
    def evaluation_report_json(self):
        return self.directory / "evaluation_report.json"

    @property
    def evaluation_report_markdown(self):
        return self.directory / "evaluation_report.md"

    @property
    def usefulness_report(self):
        return self.directory / "usefulness_report.json"

    @property
    def fidelity_figure(self):
        return self.directory / "evaluation_fidelity.png"

    def class_folder(self, class_name):
        return self.directory / class_name

    def image(self, class_name, number):
        return self.class_folder(class_name) / f"{SYNTHETIC_PREFIX}{class_name}_{number:05d}.png"

    def images(self, class_name):
        """The visible synthetic images of one class, in name order."""
        folder = self.class_folder(class_name)
        return sorted(path for path in folder.glob(f"{SYNTHETIC_PREFIX}*.png") if is_visible(path))

    def all_images(self):
        return sorted(path for path in self.directory.glob(f"*/{SYNTHETIC_PREFIX}*.png") if is_visible(path))
