"""Class-conditional generation from a trained decoder: loading, sampling, batched decoding, writing.

Four ways to choose latent vectors, all recorded in the generation manifest:
- "posterior": the original pipeline's draw, around one stored training latent of the class
  (z = mean + exp(log_var / 2) * noise * temperature); close to real examples, less variety;
- "prior": z ~ N(0, temperature^2 I), the textbook VAE draw; the label alone sets the class;
- "class_density": a Gaussian mixture fitted to the class's stored latent means, then sampled;
  it follows where the class's images really lie instead of assuming the prior is filled;
- "diffusion": a latent map drawn by the run's class-conditional latent prior (latent_prior.py),
  deterministic DDIM from noise (scaled by the temperature) with classifier-free guidance.
And edits of real training crops' latents, noised part-way and denoised by the prior (SDEdit):
- counterfactuals, under another class: "this cilium, with that defect";
- "variation", under the crop's own class: a crop drawn with the seed, in one of its eight
  orientations (optionally mixed with a second crop of the class), keeps its layout and has its
  detail redrawn; the strength trades newness against faithfulness.

Why one file: loading a run, drawing latents (posterior, density, diffusion, edits) and writing
images share the random streams that make a seed's images reproducible and resumable; the
manifest's reading and repair live in manifest.py.
"""

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from cilia_cvae import class_filter, grain, latent_prior, models  # noqa: F401  (models registers the custom layers the saved models use)
from cilia_cvae.config import UserError
from cilia_cvae.files import describe_size, sha256_of_file, write_png_atomic
from cilia_cvae.layout import RunLayout
from cilia_cvae.manifest import (
    MANIFEST_ROW_KEY,
    images_of_request,
    manifest_appender,
    next_file_number,
    reconcile_with_disk,
)
from cilia_cvae.stored_run import read_parameters, training_script_for

# The random stream of a counterfactual's noise and aspect ratio: drawn per source class, not per
# target class, so that image i of every target class is the same crop under the same noise.
COUNTERFACTUAL_STREAM = 1_000_003
# A variation's streams: per (seed, class), one each for its noise, source crops, orientations and mixing.
VARIATION_STREAM = 1_000_033
# The random streams of one (seed, class) besides its first draw (the latent noise): one per
# quantity, so that image i is the same whatever the number of images asked for, and a larger
# --images_per_class continues the seed's images instead of drawing others.
SOURCE_STREAM, ASPECT_STREAM = 1, 2


def load_saved_model(path, remedy):
    """A saved Keras model in safe mode; a damaged file is one line naming it and the remedy."""
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except (
        Exception
    ) as error:  # Keras raises several kinds (ValueError, OSError, zipfile errors) for one fault
        raise UserError(f"{path} cannot be loaded ({type(error).__name__}); {remedy}") from None


def load_decoder(layout, image_size, latent_dim):
    """The saved decoder in safe mode; a damaged file is one line naming it."""
    decoder = load_saved_model(
        layout.decoder, "it is damaged or incomplete: copy it again or train again with --fresh=True"
    )
    decoder_latent_dim = int(decoder.inputs[0].shape[-1])
    if decoder_latent_dim != latent_dim:
        raise UserError(
            f"the decoder in {layout.directory} takes {decoder_latent_dim} latent values but its "
            f"cvae_parameters.json says {latent_dim}; train again with --fresh=True"
        )
    return decoder


def check_provenance(layout, parameters, decoder_fingerprint, image_size):
    """The decoder and the latents must come from the run the parameters describe (runs saved before
    fingerprints were recorded are checked by shape only)."""
    run_fingerprint = parameters.get("run_fingerprint")
    if run_fingerprint is None:
        return None
    if decoder_fingerprint != run_fingerprint:
        raise UserError(
            f"{layout.decoder} is not the decoder its cvae_parameters.json was written with "
            f"(another run's file?); copy the whole run folder again or train again with --fresh=True"
        )
    if not layout.latent_record.is_file():
        raise UserError(
            f"{layout.latent_record} is missing, so the latents in {layout.latent_directory} cannot be checked "
            f"against the model; copy that folder again with it, or run {training_script_for(image_size)} --fresh=True"
        )
    try:
        record = json.loads(layout.latent_record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    if record.get("run_fingerprint") != run_fingerprint:
        raise UserError(
            f"the latent tensors in {layout.latent_directory} belong to another model than "
            f"{layout.directory}; run {training_script_for(image_size)} --fresh=True to write both again"
        )
    return record.get("sha256", {})


def load_latents(path, latent_dim, expected_hash):
    """One stored latent tensor, checked: a plain float array of the decoder's width, all finite, and
    the very file the training wrote (its hash in latents.json)."""
    try:
        values = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise UserError(
            f"{path} is not a plain latent array ({error}); it was not written by training"
        ) from None
    if values.ndim != 2 or values.shape[1] != latent_dim:
        raise UserError(
            f"latent tensors in {path} have shape {values.shape}, but the decoder takes "
            f"{latent_dim} latent values; they belong to another model"
        )
    if not np.issubdtype(values.dtype, np.floating) or not np.all(np.isfinite(values)):
        raise UserError(
            f"{path} holds values that are not finite numbers; run the training again with --fresh=True"
        )
    if expected_hash is not None and expected_hash != sha256_of_file(path):
        raise UserError(
            f"latent tensors in {path} belong to another model or were changed after training "
            f"(the hash differs from latents.json); run the training again with --fresh=True"
        )
    return values.astype(np.float32)


def load_trained_generator(models_dir, latent_tensors_dir, image_size):
    """The decoder, its recorded parameters and every class's stored latents, or a UserError."""
    layout = RunLayout(models_dir, latent_tensors_dir, image_size)
    parameters = read_parameters(layout, image_size)
    latent_dim = int(parameters["latent_dim"])
    decoder = load_decoder(layout, image_size, latent_dim)
    fingerprint = sha256_of_file(layout.decoder)[:16]
    hashes = check_provenance(layout, parameters, fingerprint, image_size)
    latents = {}
    for class_name in parameters["class_names"]:
        paths = [layout.latent(name, class_name) for name in ("z_mean", "z_log_var")]
        missing = [path.name for path in paths if not path.is_file()]
        if missing:
            raise UserError(
                f"latent tensors {', '.join(missing)} missing in {layout.latent_directory}; "
                f"run {training_script_for(image_size)} again to write them"
            )
        z_mean, z_log_var = (
            load_latents(path, latent_dim, None if hashes is None else hashes.get(path.name))
            for path in paths
        )
        if z_mean.shape != z_log_var.shape:
            raise UserError(
                f"z_mean and z_log_var of {class_name} in {layout.latent_directory} differ in shape; "
                f"they belong to different runs"
            )
        latents[class_name] = (z_mean, z_log_var)
    return {
        "parameters": parameters,
        "decoder": decoder,
        "latents": latents,
        "fingerprint": fingerprint,
        "model_dir": layout.directory,
        "run_folders": (models_dir, latent_tensors_dir),
    }


def load_grain_model(generator, image_size):
    """The run's grain model (grain.py), checked against the hash its training recorded; None, with a
    note, for a run trained before grain models existed (its images are then the decoder's own)."""
    layout = RunLayout(*generator["run_folders"], image_size)
    recorded = generator["parameters"].get("grain_model")
    if recorded is None:
        print(
            f"note: the run in {layout.directory} has no grain model (trained before grain models existed); "
            f"images are written without grain; train a new run (--fresh=True) to have one"
        )
        return None
    remedy = f"run {training_script_for(image_size)} --fresh=True to train and measure it again"
    if not layout.grain_model.is_file() or sha256_of_file(layout.grain_model) != recorded.get("sha256"):
        raise UserError(f"{layout.grain_model} is missing or not the one its training measured; {remedy}")
    try:
        model = json.loads(layout.grain_model.read_text(encoding="utf-8"))
        grain.check_model(model, image_size)
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{layout.grain_model} cannot be used ({error}); {remedy}") from None
    return model


def prior_training_command(image_size):
    return f"{training_script_for(image_size)} --continue_finished=True --prior_epochs=N"


def read_prior_record(layout, parameters, image_size):
    """The latent prior's entry in cvae_parameters.json and its configuration, checked against the run."""
    record = parameters.get("latent_prior")
    if not isinstance(record, dict) or not layout.latent_prior.is_file():
        raise UserError(
            f"{layout.directory} has no latent prior: train it with {prior_training_command(image_size)}"
        )
    try:
        prior_config = latent_prior.PriorConfig.from_json(record["prior_config"])
        recorded_hash, recorded_run = str(record["sha256"]), record["run_fingerprint"]
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(
            f"the latent prior's entry in {layout.parameters} is damaged ({type(error).__name__}: {error}); "
            f"train it again with {prior_training_command(image_size)}"
        ) from None
    recorded_config_hash = record.get("prior_config_sha256")
    if (
        recorded_config_hash is not None
        and recorded_config_hash
        != hashlib.sha256(json.dumps(record["prior_config"], sort_keys=True).encode()).hexdigest()
    ):
        raise UserError(
            f"the latent prior's configuration in {layout.parameters} (its standardisation included) was "
            f"changed after training; copy the run folder again or train it again with {prior_training_command(image_size)}"
        )
    if recorded_run != parameters.get("run_fingerprint"):
        raise UserError(
            f"{layout.latent_prior} was trained on another CVAE run than {layout.directory} holds; "
            f"train it again with {prior_training_command(image_size)}"
        )
    if recorded_hash != sha256_of_file(layout.latent_prior):
        raise UserError(
            f"{layout.latent_prior} is not the file its training recorded (its sha256 differs from "
            f"cvae_parameters.json); copy the run folder again or train it again with {prior_training_command(image_size)}"
        )
    map_values = prior_config.map_side**2 * prior_config.latent_channels
    if map_values != int(parameters["latent_dim"]) or prior_config.num_classes != len(
        parameters["class_names"]
    ):
        raise UserError(
            f"the latent prior in {layout.directory} models {prior_config.num_classes} classes of "
            f"{map_values} latent values, but the decoder takes {parameters['latent_dim']} values of "
            f"{len(parameters['class_names'])} classes; train it again with {prior_training_command(image_size)}"
        )
    return prior_config


def load_latent_prior(generator, models_dir, latent_tensors_dir, image_size):
    """Add the run's latent prior (its moving-average denoiser, loaded in safe mode, and its
    configuration) to a loaded generator, or refuse in one line."""
    layout = RunLayout(models_dir, latent_tensors_dir, image_size)
    prior_config = read_prior_record(layout, generator["parameters"], image_size)
    denoiser = load_saved_model(
        layout.latent_prior, f"train it again with {prior_training_command(image_size)}"
    )
    if tuple(denoiser.inputs[0].shape[1:]) != prior_config.map_shape:
        raise UserError(
            f"{layout.latent_prior} takes maps of {tuple(denoiser.inputs[0].shape[1:])}, but its record says "
            f"{prior_config.map_shape}; train it again with {prior_training_command(image_size)}"
        )
    generator["prior"] = {"denoiser": denoiser, "config": prior_config}
    return generator


def load_encoder(layout):
    """The run's encoder in safe mode, the very file its training saved (its hash in latents.json, for
    runs that recorded it); a damaged or foreign file is one line naming it."""
    remedy = "copy the run folder again or train the CVAE again with --fresh=True"
    try:
        recorded = json.loads(layout.latent_record.read_text(encoding="utf-8")).get("sha256", {})
    except (OSError, ValueError, AttributeError):
        recorded = {}
    expected = recorded.get(layout.encoder.name)
    if expected is not None and (not layout.encoder.is_file() or sha256_of_file(layout.encoder) != expected):
        raise UserError(
            f"{layout.encoder} is not the encoder its run saved (its sha256 differs from {layout.latent_record}); {remedy}"
        )
    return load_saved_model(layout.encoder, f"it is damaged or not this project's: {remedy}")


def counterfactual_sources(generator, processed_layout, source_class):
    """The processed file name of each stored latent of the source class.

    Training stored the latents of the train split in file-name order (data.list_training_images),
    so row i of z_mean_<Class>.npy is the i-th image of train/<Class>/ by name; a folder that no
    longer holds as many images was changed after training and cannot be matched."""
    z_mean = generator["latents"][source_class][0]
    paths = processed_layout.images("train", source_class)
    if len(paths) != len(z_mean):
        raise UserError(
            f"{processed_layout.class_folder('train', source_class)} holds {len(paths)} images but the model "
            f"stored {len(z_mean)} latents of {source_class}; the processed images changed after training: "
            f"train again on them, or point --processed_images_dir at the ones it was trained on"
        )
    return [f"{source_class}/{path.name}" for path in paths]


# A generated micrograph is noisy, so PNG barely compresses it: about one byte per pixel, plus headers.
BYTES_PER_PIXEL_ESTIMATE = 1.05
# Requests expected to run longer than this are announced with their estimate before they start.
ANNOUNCE_ABOVE_IMAGES = 100_000


def check_room_for(output_dir, image_count, image_size):
    """Say what a large request will take, and refuse one the disk cannot hold, before writing anything.

    Each image takes whole blocks of the file system (4 kB on most), which at small sizes is most of it."""
    existing = next(folder for folder in (Path(output_dir), *Path(output_dir).parents) if folder.exists())
    block = os.statvfs(existing).f_frsize or 4096
    image_bytes = image_size * image_size * BYTES_PER_PIXEL_ESTIMATE + 1000  # headers and the embedded row
    needed = image_count * block * np.ceil(image_bytes / block)
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UserError(
            f"{image_count:,} images of {image_size} px need about {describe_size(needed)}, but the disk "
            f"holding {output_dir} has {describe_size(free)} free; ask for fewer with --images_per_class"
        )
    if image_count > ANNOUNCE_ABOVE_IMAGES:
        print(
            f"generating {image_count:,} images: about {describe_size(needed)} in {output_dir} "
            f"({describe_size(free)} free); at a few hundred images/s on 2 cores this takes hours"
        )


def fit_class_density(z_mean, seed):
    """A Gaussian mixture over a class's latent means: a few components, full covariance if affordable."""
    from sklearn.mixture import GaussianMixture

    count, dimension = z_mean.shape
    components = int(np.clip(count // 50, 1, 8))
    covariance = "full" if count >= 2 * dimension * components else "diag"
    mixture = GaussianMixture(components, covariance_type=covariance, reg_covar=1e-4, random_state=seed)
    return mixture.fit(z_mean)


def draw_latents(sampling, count, temperature, z_mean, z_log_var, rng, seed, source_rng):
    """(latents, source index per latent): the training latent drawn around, the mixture component, or -1.
    The noise is `rng`'s first draw and the sources come from `source_rng`, so that the first k of
    any count are the same k."""
    dimension = z_mean.shape[1]
    noise = rng.standard_normal((count, dimension)).astype(np.float32)
    if sampling == "prior":
        return noise * temperature, np.full(count, -1)
    if sampling == "posterior":
        sources = source_rng.integers(0, len(z_mean), count)
        return z_mean[sources] + np.exp(0.5 * z_log_var[sources]) * noise * temperature, sources
    mixture = fit_class_density(z_mean, seed)
    sources = source_rng.choice(
        len(mixture.weights_), size=count, p=mixture.weights_ / mixture.weights_.sum()
    )
    if mixture.covariance_type == "full":
        factors = np.linalg.cholesky(mixture.covariances_)
        offsets = np.einsum("nij,nj->ni", factors[sources], noise)
    else:
        offsets = np.sqrt(mixture.covariances_[sources]) * noise
    return (mixture.means_[sources] + temperature * offsets).astype(np.float32), sources


def draw_aspect_ratios(count, statistics, rng):
    """Aspect ratios (width / height) from the raw statistics, clipped to what crops plausibly have."""
    ratios = rng.normal(statistics["aspect_ratio_mean"], statistics["aspect_ratio_std"], count)
    return np.clip(ratios, 0.6, 1.6)


def restore_aspect(image, aspect_ratio, resize_mode):
    """Give a square output the aspect ratio of a real crop.

    After "squash" preprocessing the model learnt squashed crops, so stretching back (keeping
    the pixel area, as the original did) undoes the squash. After "pad" the square holds the
    crop in its true proportions, so the crop is cut out instead of stretched.
    """
    side = image.width
    if resize_mode == "pad":
        if aspect_ratio >= 1:
            height = max(1, round(side / aspect_ratio))
            top = (side - height) // 2
            return image.crop((0, top, side, top + height))
        width = max(1, round(side * aspect_ratio))
        left = (side - width) // 2
        return image.crop((left, 0, left + width, side))
    width = max(1, round(side * np.sqrt(aspect_ratio)))
    height = max(1, round(side / np.sqrt(aspect_ratio)))
    return image.resize((width, height), Image.Resampling.BICUBIC)


def make_decode_function(decoder, batch_size, latent_dim, num_classes):
    """A compiled decode of fixed batch shape (the last batch is padded), so it is traced once."""
    decode = tf.function(
        lambda latents, labels: decoder([latents, labels], training=False), reduce_retracing=True
    )

    def decode_batch(latents, label):
        count = len(latents)
        padded = np.zeros((batch_size, latent_dim), np.float32)
        padded[:count] = latents
        one_hot = np.zeros((batch_size, num_classes), np.float32)
        one_hot[:, label] = 1.0
        images = decode(tf.constant(padded), tf.constant(one_hot)).numpy()[:count, :, :, 0]
        return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)

    return decode_batch


def decode_mixed(decoder, latents, label_vectors, batch_size=64, grain_model=None):
    """Decode any latents under any (possibly blended) label vectors; for figures, which show images as
    inference writes them: with `grain_model`, grain drawn onto them (a fixed stream, seed 0)."""
    outputs = []
    for start in range(0, len(latents), batch_size):
        images = decoder(
            [latents[start : start + batch_size], label_vectors[start : start + batch_size]], training=False
        )
        outputs.append(np.asarray(images)[..., 0])
    images = np.clip(np.rint(np.concatenate(outputs) * 255.0), 0, 255).astype(np.uint8)
    if grain_model is None:
        return images
    return grain.add_grain(images, grain_model, grain.image_rngs(0, 0, range(len(images))))


def save_generated(path, pixels, aspect_ratio, resize_mode, row):
    """Runs in a writer thread: restore the aspect ratio (if asked) and write the PNG, its manifest
    row inside it, so that a run killed before writing the row can have it recovered."""
    image = Image.fromarray(pixels)
    if aspect_ratio is not None:
        image = restore_aspect(image, aspect_ratio, resize_mode)
    write_png_atomic(path, image, compress_level=1, text={MANIFEST_ROW_KEY: json.dumps(row)})


def finish_batch(pending, append, progress):
    """Wait for a batch's PNGs, then record them: a manifest row never names a missing file."""
    if pending is None:
        return
    jobs, rows = pending
    for job in jobs:
        job.result()
    append(rows)
    progress.update(len(rows))


def prior_latents(generator, labels, starting_maps, diffusion, *, edited=None):
    """Decoder latents from the latent prior: DDIM from the starting maps (noise), or, for an edit, the
    standardised source maps `edited` noised with them to the edit strength and walked back."""
    prior = generator["prior"]
    denoiser, prior_config = prior["denoiser"], prior["config"]
    options = {
        "steps": diffusion["steps"],
        "guidance": diffusion["guidance"],
        "prediction": prior_config.prediction,
        "batch_size": len(labels),
    }
    if edited is None:
        maps = latent_prior.sample(denoiser, labels, starting_maps, **options)
    else:
        maps = latent_prior.edit(
            denoiser, edited, labels, strength=diffusion["edit_strength"], noise=starting_maps, **options
        )
    return latent_prior.to_model_latents(maps, prior_config)


def orient_maps(maps, orientations):
    """Each (side, side, channels) map in its orientation: 0-3 quarter turns, 4-7 the same turns of the
    mirrored map, in latent_prior.eight_orientations' order (the orientations the prior learnt)."""
    maps = np.asarray(maps)
    oriented = [
        np.rot90(one[:, ::-1] if orientation >= 4 else one, orientation % 4, axes=(0, 1))
        for one, orientation in zip(maps, np.asarray(orientations).tolist())
    ]
    return np.stack(oriented) if oriented else maps.copy()


def spherical_mix(first, second, weight):
    """Per row, the spherical interpolation of two standardised maps at `weight` (0: the first): the
    mixture keeps the size of a map, where the straight average of two unrelated maps would shrink it."""
    a, b = first.reshape(len(first), -1), second.reshape(len(second), -1)
    cosine = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    angle = np.arccos(np.clip(cosine, -1.0, 1.0))[:, None]
    sine = np.sin(angle)
    # Parallel maps: the straight line is the arc.
    safe = sine > 1e-6
    first_weight = np.where(safe, np.sin((1 - weight) * angle) / np.where(safe, sine, 1), 1 - weight)
    second_weight = np.where(safe, np.sin(weight * angle) / np.where(safe, sine, 1), weight)
    return (first_weight * a + second_weight * b).reshape(first.shape).astype(np.float32)


def edit_sources(generator, label, count, seed, diffusion):
    """Which stored training latents an edit starts from, in which orientation, mixed with which.

    A counterfactual redraws the source class's crops in file order, upright, under the noise of the
    source class (image i of every target class is crop i under the same noise). A variation draws
    crops of its own class with the seed, each in one of its eight orientations (and a second crop for
    mixing), one random stream per quantity: image i is the same whatever the count asked for."""
    class_names = list(generator["parameters"]["class_names"])
    source_class = diffusion.get("counterfactual_from") or class_names[label]
    available = len(generator["latents"][source_class][0])
    if diffusion.get("counterfactual_from"):
        stream = [seed, class_names.index(source_class), COUNTERFACTUAL_STREAM]
        sources, orientations = np.arange(count) % available, np.zeros(count, np.int64)
    else:
        stream = [seed, label, VARIATION_STREAM]
        sources = np.random.default_rng([*stream, 1]).integers(available, size=count)
        orientations = np.random.default_rng([*stream, 2]).integers(8, size=count)
    drawn = {
        "source_class": source_class,
        "sources": sources,
        "orientations": orientations,
        "noise": np.random.default_rng(stream)
        .standard_normal((count, *generator["prior"]["config"].map_shape))
        .astype(np.float32),
        "stream": stream,
    }
    if diffusion.get("mix"):
        # The second crop is never the first (a class of one crop mixes it with itself).
        offsets = np.random.default_rng([*stream, 3]).integers(1, max(available, 2), size=count)
        drawn["partners"] = (sources + offsets) % available
        drawn["partner_orientations"] = np.random.default_rng([*stream, 4]).integers(8, size=count)
    return drawn


def source_latents(generator, source_class, sources, orientations, diffusion):
    """The decoder latents of training crops in their drawn orientations: the stored latent of an
    upright crop, and of a turned or mirrored one the encoder's mean of the turned crop itself. (The
    latent map is not equivariant: turning the map of a crop decodes about twice as far from the turned
    crop as encoding the turned crop does, docs/latent-prior.md; the prior learnt encoded turns.)"""
    latents = generator["latents"][source_class][0][sources].copy()
    turned = np.flatnonzero(np.asarray(orientations) != 0)
    if len(turned):
        names = diffusion["source_names"][source_class]
        paths = [Path(diffusion["source_dir"]) / names[index] for index in np.asarray(sources)[turned]]
        image_size = int(generator["parameters"]["image_size"])
        crops = np.stack([np.asarray(Image.open(path).convert("L"), np.float32) for path in paths])
        crops = orient_maps(
            crops.reshape(len(paths), image_size, image_size, 1) / 255.0, np.asarray(orientations)[turned]
        )
        one_hot = np.zeros((len(paths), len(generator["parameters"]["class_names"])), np.float32)
        one_hot[:, list(generator["parameters"]["class_names"]).index(source_class)] = 1.0
        latents[turned] = (
            generator["encoder"]
            .predict([crops, one_hot], batch_size=64, verbose=0)[0]
            .reshape(len(paths), -1)
        )
    return latents


def edit_request(generator, label, count, seed, aspect_statistics, diffusion):
    """Counterfactuals and variations, one code path: stored training latents (oriented, mixed) noised to
    the edit strength and denoised by the prior under the requested class (SDEdit)."""
    drawn = edit_sources(generator, label, count, seed, diffusion)
    prior_config = generator["prior"]["config"]
    names = diffusion["source_names"][drawn["source_class"]]

    def oriented(sources, orientations):
        return source_latents(generator, drawn["source_class"], sources, orientations, diffusion)

    def latents_for(indices):
        chosen = oriented(drawn["sources"][indices], drawn["orientations"][indices])
        mixing = "partners" in drawn
        if diffusion["edit_strength"] == 0 and not mixing:
            # The crop's latent itself, not its round trip through the standardisation: strength 0
            # returns the source's reconstruction (in its orientation); upright, bit for bit.
            return chosen
        standardised = latent_prior.from_model_latents(chosen, prior_config)
        if mixing:
            partner = oriented(drawn["partners"][indices], drawn["partner_orientations"][indices])
            standardised = spherical_mix(
                standardised, latent_prior.from_model_latents(partner, prior_config), diffusion["mix"]
            )
            if diffusion["edit_strength"] == 0:
                return latent_prior.to_model_latents(standardised, prior_config)
        # Both crops of a mixture share one noise draw, so mixing the noised maps is mixing the crops.
        return prior_latents(
            generator, np.full(len(indices), label), drawn["noise"][indices], diffusion, edited=standardised
        )

    per_image = {
        "counterfactual_source": [names[index] for index in drawn["sources"]],
        "source_orientation": drawn["orientations"].tolist(),
    }
    if "partners" in drawn:
        per_image["second_source"] = [names[index] for index in drawn["partners"]]
        per_image["second_source_orientation"] = drawn["partner_orientations"].tolist()
    return {
        "label": label,
        "count": count,
        "latents_for": latents_for,
        "sources": drawn["sources"],
        "per_image": per_image,
        "aspects": (
            draw_aspect_ratios(
                count, aspect_statistics, np.random.default_rng([*drawn["stream"], ASPECT_STREAM])
            )
            if aspect_statistics is not None
            else np.ones(count)
        ),
    }


def class_request(
    generator, class_name, *, images_per_class, sampling, temperature, seed, aspect_statistics, diffusion=None
):
    """What one class's images are made of: its label, a function giving the decoder latents of the
    images at some stream indices, the source latent of each image and its aspect ratio.

    Random generators per (seed, class): the same seed gives the same images, whatever other
    classes are asked for in the same run, and image i of the stream is the same whatever the count
    asked for. A diffusion image starts from noise of the map's shape, the first generator's first
    draw (times the temperature); the prior then denoises it batch by batch."""
    label = list(generator["parameters"]["class_names"]).index(class_name)
    if diffusion and diffusion.get("source_names"):
        return edit_request(generator, label, images_per_class, seed, aspect_statistics, diffusion)
    rng = np.random.default_rng([seed, label])
    if sampling == "diffusion":
        map_shape = generator["prior"]["config"].map_shape
        noise = rng.standard_normal((images_per_class, *map_shape)).astype(np.float32) * temperature
        sources = np.full(images_per_class, -1)

        def latents_for(indices):
            return prior_latents(generator, np.full(len(indices), label), noise[indices], diffusion)
    else:
        z_mean, z_log_var = generator["latents"][class_name]
        source_rng = np.random.default_rng([seed, label, SOURCE_STREAM])
        latents, sources = draw_latents(
            sampling, images_per_class, temperature, z_mean, z_log_var, rng, seed, source_rng
        )

        def latents_for(indices):
            return latents[indices]

    aspects = (
        draw_aspect_ratios(
            images_per_class, aspect_statistics, np.random.default_rng([seed, label, ASPECT_STREAM])
        )
        if aspect_statistics is not None
        else np.ones(images_per_class)
    )
    return {
        "label": label,
        "count": images_per_class,
        "latents_for": latents_for,
        "sources": sources,
        "per_image": {},
        "aspects": aspects,
    }


def say_what_exists(class_name, folder, count, existing, seed):
    if len(existing) == count:
        print(
            f"{class_name}: the {count} images asked for (seed {seed}) are in {folder} already; none written"
        )
    elif existing:
        print(
            f"{class_name}: {len(existing)} of the {count} images asked for (seed {seed}) are in {folder} "
            f"already; writing the other {count - len(existing)}"
        )


def screened(drawn, indices, images, screen, wanted):
    """The indices and images of a decoded batch the class filter keeps (at most `wanted`), with their scores."""
    scores = class_filter.scores_of(screen, images)[:, drawn["label"]]
    kept = np.flatnonzero(scores >= screen["threshold"])[:wanted]
    return indices[kept], images[kept], scores[kept]


def submit_batch(writers, request, template, drawn, indices, images, files, scores):
    """Hand one batch's PNGs to the writer threads; returns their jobs and the batch's manifest rows."""
    jobs, rows = [], []
    for offset, (index, pixels, path) in enumerate(zip(indices.tolist(), images, files)):
        row = image_row(template, drawn, index, path)
        if scores is not None:
            row["filter_score"] = round(float(scores[offset]), 4)
        aspect = drawn["aspects"][index] if request["restore_aspect_ratio"] else None
        jobs.append(writers.submit(save_generated, path, pixels, aspect, request["resize_mode"], row))
        rows.append(row)
    return jobs, rows


def write_class(
    generator,
    generated_layout,
    class_name,
    request,
    *,
    decode_batch,
    writers,
    append,
    progress,
    manifest_rows,
):
    """Decode and write the images of one class's request that are not there yet, a batch at a time, each
    batch's PNGs finishing while the next is drawn and decoded; a batch's manifest rows are written once
    its files exist. With the class filter, candidates are drawn in stream order up to the bound and
    only those it accepts are written. Returns (the paths written, the paths of every image of the
    request, the filter's acceptance or None)."""
    screen, count = request["filter"], request["draw"]["images_per_class"]
    # With the filter, the request's stream holds `max_draws` candidates per image asked for.
    bound = count * screen["max_draws"] if screen else count
    drawn = class_request(generator, class_name, **dict(request["draw"], images_per_class=bound))
    template = {"class": class_name, **request["row"]}
    if "counterfactual_source" in drawn["per_image"]:
        template["counterfactual_source"] = drawn["per_image"]["counterfactual_source"][0]
    existing = images_of_request(manifest_rows, template, bound)
    folder = generated_layout.class_folder(class_name)
    say_what_exists(class_name, folder, count, existing, request["draw"]["seed"])
    progress.update(len(existing))
    to_try = np.array([index for index in range(bound) if index not in existing], dtype=np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    number = next_file_number(generated_layout, class_name, manifest_rows)
    paths = {index: generated_layout.directory / name for index, name in existing.items()}
    pending, batch_size, written = None, request["batch_size"], []
    for start in range(0, len(to_try), batch_size):
        if len(paths) >= count:
            break
        indices = to_try[start : start + batch_size]
        images, scores = decode_batch(drawn["latents_for"](indices), drawn["label"]), None
        if screen:
            indices, images, scores = screened(drawn, indices, images, screen, count - len(paths))
            if not len(indices):
                continue
        if request["grain"] is not None:
            rngs = grain.image_rngs(request["draw"]["seed"], drawn["label"], indices)
            images = grain.add_grain(images, request["grain"], rngs)
        files = [generated_layout.image(class_name, number + offset) for offset in range(len(indices))]
        number += len(indices)
        jobs, rows = submit_batch(writers, request, template, drawn, indices, images, files, scores)
        paths.update(zip(indices.tolist(), files))
        written += files
        finish_batch(pending, append, progress)
        pending = (jobs, rows)
    finish_batch(pending, append, progress)
    acceptance = filter_acceptance(paths, count, bound) if screen else None
    return written, [paths[index] for index in sorted(paths)], acceptance


def filter_acceptance(paths, count, bound):
    """Candidates are tried in stream order, so every one up to the last accepted was judged (all
    `bound` of them when the class fell short): the same figures after a resumed run."""
    tried = bound if len(paths) < count else max(paths) + 1
    return {"accepted": len(paths), "drawn": int(tried), "asked_for": count, "bound": bound}


def image_row(template, drawn, index, path):
    """One image's manifest row: the request's columns, then what is the image's own."""
    row = {
        **template,
        "file": f"{template['class']}/{path.name}",
        "source_latent_index": int(drawn["sources"][index]),
        "aspect_ratio": round(float(drawn["aspects"][index]), 4),
        "stream_index": index,
    }
    row.update({column: values[index] for column, values in drawn["per_image"].items()})
    return row


class Written(dict):
    """The paths a generation wrote, per class; `requested` holds, per class, every image of the
    request in stream order, the ones an earlier run had written included (for the figures)."""

    def __init__(self):
        super().__init__()
        self.requested = {}
        self.acceptance = {}


def manifest_row_fields(
    generator, sampling, temperature, seed, diffusion, grain_model=None, class_screen=None
):
    """The columns every row of one run shares: how its images were made and by which model."""
    fields = {
        "grain": grain_model is not None,
        "sampling": sampling,
        "temperature": temperature,
        "seed": seed,
        "model_fingerprint": generator["fingerprint"],
        "image_size": int(generator["parameters"]["image_size"]),
    }
    if diffusion:
        fields.update(guidance=diffusion["guidance"], sampling_steps=diffusion["steps"])
        if diffusion.get("source_names"):
            fields.update(
                sampling="counterfactual" if diffusion.get("counterfactual_from") else "variation",
                edit_strength=diffusion["edit_strength"],
            )
            if diffusion.get("mix"):
                fields["mix_weight"] = diffusion["mix"]
    if class_screen:
        fields["filter_threshold"] = class_screen["threshold"]
    return fields


def generation_request(generator, *, grain_model, class_screen, batch_size, **draw):
    """What every class of one run is drawn and written with: the draw's settings, the manifest columns
    its rows share, grain, class filter, batch size and how the aspect ratio is restored."""
    sampling, temperature, seed, diffusion = (
        draw[name] for name in ("sampling", "temperature", "seed", "diffusion")
    )
    return {
        "draw": draw,
        "row": manifest_row_fields(
            generator, sampling, temperature, seed, diffusion, grain_model, class_screen
        ),
        "grain": grain_model,
        "filter": class_screen,
        "batch_size": batch_size,
        "restore_aspect_ratio": draw["aspect_statistics"] is not None,
        "resize_mode": generator["parameters"].get("resize_mode", "squash"),
    }


def write_classes(generator, generated_layout, class_names, request, decode_batch, progress):
    """Every class's images after what an earlier or killed run wrote is recorded (not written again);
    the PNGs are written by one thread per core while the next batch is decoded."""
    parameters = generator["parameters"]
    generated_layout.directory.mkdir(parents=True, exist_ok=True)
    # What an earlier or killed run wrote is recorded first: its images are not written again.
    manifest_rows = reconcile_with_disk(generated_layout, list(parameters["class_names"]))
    written = Written()
    with (
        manifest_appender(generated_layout.manifest) as append,
        ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as writers,
    ):
        tools = dict(
            decode_batch=decode_batch,
            writers=writers,
            append=append,
            progress=progress,
            manifest_rows=manifest_rows,
        )
        for class_name in dict.fromkeys(class_names):
            written[class_name], written.requested[class_name], acceptance = write_class(
                generator, generated_layout, class_name, request, **tools
            )
            if acceptance:
                written.acceptance[class_name] = acceptance
    return written


def generate(
    generator,
    generated_layout,
    *,
    class_names,
    images_per_class,
    sampling,
    temperature,
    seed,
    restore_aspect_ratio,
    raw_statistics,
    batch_size,
    progress,
    diffusion=None,
    grain_model=None,
    class_screen=None,
):
    """Decode and write images class by class, a manifest row per image; the images of the request an
    earlier run wrote (the same command again, after a kill or not) are not written again. `diffusion`,
    for sampling "diffusion" or counterfactuals (the generator then holds its prior, load_latent_prior),
    is {"guidance", "steps"}; for counterfactuals and variations also "edit_strength", "source_names"
    ({class: the file name of each stored latent}), "counterfactual_from" (the source class; absent for
    variations) and "mix" (a variation's weight of its second crop, 0 for none). With `grain_model`
    (load_grain_model), each image gets grain drawn from it (grain.py). With `class_screen`
    (class_filter.load, plus "threshold" and "max_draws"), only maps the filter gives the class at least the threshold are written, up to max_draws candidates per image asked for."""
    parameters = generator["parameters"]
    decode_batch = make_decode_function(
        generator["decoder"], batch_size, int(parameters["latent_dim"]), len(parameters["class_names"])
    )
    request = generation_request(
        generator,
        images_per_class=images_per_class,
        sampling=sampling,
        temperature=temperature,
        seed=seed,
        aspect_statistics=raw_statistics if restore_aspect_ratio else None,
        diffusion=diffusion,
        grain_model=grain_model,
        class_screen=class_screen,
        batch_size=batch_size,
    )
    return write_classes(generator, generated_layout, class_names, request, decode_batch, progress)
