"""Measure training speed and memory of the original and the default CVAE, side by side.

Reads   the training scripts' presets (cilia_cvae.model_config.PRESETS: the default contenders are
        exactly those scripts' default models at their default batch sizes).
Writes  OUTPUT_JSON: {"train_images_per_s": {"original_224", "default_224", "original_448",
        "default_448"}, "peak_memory_mb": {...}, "batch_size": {...}, "ratio": {...}, ...}
        and prints the same as a table.

Each contender runs in its own subprocess (this script, with --contender=<name>), so that
one model's memory and compiled graphs cannot favour or burden another and ru_maxrss is
that contender's own peak. A contender builds its model, runs WARMUP_STEPS training steps
(tracing, memory allocation), then TIMED_WINDOWS windows of at least WINDOW_SECONDS each; its
speed is the median of the windows. Images come from memory: this measures the model; the
default contenders then also measure the tf.data pipeline on PNGs of their size
(input_pipeline_images_per_s), which must exceed the training speed by far.

Ratios are the figure to quote: they hold across machines and noisy neighbours; absolute
images/s only mean something for the machine named in the output.

Example:
    python Scripts/cvae_benchmark.py                 # full measurement, about 10-15 minutes on 2 cores
    python Scripts/cvae_benchmark.py --quick=True    # CI-sized: 32 and 64 px instead of 224 and 448, under a minute

Why one file: every contender is measured in one run on one machine, so that its figures are
ratios to the original's; each measurement is its own function below.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cilia_cvae import config
from cilia_cvae.config import UserError, configure
from cilia_cvae.files import write_json_atomic

QUICK = False  # CI-sized run: images of 32 and 64 px stand in for 224 and 448, one short window each
OUTPUT_JSON = config.REPOSITORY_ROOT / "docs" / "benchmark.json"  # where the measurements are written
ORIGINAL_448_BATCH_SIZE = (
    8  # the original 448 model's batch: at its own 32 it runs out of memory on 24 GB (8 takes ~22 GB)
)
NUM_CLASSES = 5  # classes of the benchmark model (the README's five)
WARMUP_STEPS = 3  # untimed steps first: tracing and memory allocation
TIMED_WINDOWS = 5  # timed windows per contender; the median is reported
WINDOW_SECONDS = 10.0  # each window runs whole steps until at least this long
CONTENDER = ""  # internal: measure only these contenders (comma-separated) and print the result; how the script runs itself
settings = configure(globals())

SCRIPTS_DIR = Path(__file__).resolve().parent
# adversarial_224: the default with the adversarial patch loss switched on (adversarial.py), every
# step a discriminator's too: what ADVERSARIAL_WEIGHT costs per epoch once its warm-up is over.
CONTENDERS = ("original_224", "default_224", "original_448", "default_448", "adversarial_224")
ADVERSARIAL_WEIGHT = 0.5
warmup_steps, timed_windows, window_seconds = (
    (1, 2, 0.0) if QUICK else (WARMUP_STEPS, TIMED_WINDOWS, WINDOW_SECONDS)
)


def contender_setup(name):
    """The model configuration and batch size of one contender: the training scripts' own presets."""
    import dataclasses

    from cilia_cvae.model_config import ORIGINAL_LATENT_DIM, PRESETS

    architecture, size_text = name.split("_")
    preset = PRESETS[int(size_text)]
    image_size = {"224": 32, "448": 64}[size_text] if QUICK else int(size_text)
    if architecture == "original":
        batch_size = ORIGINAL_448_BATCH_SIZE if size_text == "448" else 32
        model_config = dataclasses.replace(
            preset.model,
            architecture="original",
            image_size=image_size,
            latent_dim=ORIGINAL_LATENT_DIM,
            num_classes=NUM_CLASSES,
        )
    else:
        batch_size = preset.batch_size
        model_config = dataclasses.replace(preset.model, image_size=image_size, num_classes=NUM_CLASSES)
    return {
        "architecture": "default" if architecture == "adversarial" else architecture,
        "adversarial_weight": ADVERSARIAL_WEIGHT if architecture == "adversarial" else 0.0,
        "image_size": image_size,
        "batch_size": batch_size,
        "model_config": model_config,
    }


def contender_summary(name):
    """What the report says of a contender's setup (the configuration object itself stays in its child)."""
    return {key: value for key, value in contender_setup(name).items() if key != "model_config"}


def measure_training(setup):
    """Images per second of training steps (median over windows) and this process's peak memory."""
    import keras
    import numpy as np
    import tensorflow as tf

    from cilia_cvae import training

    strategy = training.choose_strategy()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = training.build_cvae(
        strategy,
        setup["model_config"],
        learning_rate=1e-3,
        seed=0,
        adversarial_weight=setup["adversarial_weight"],
    )
    # As after the warm-up: every step trains the discriminator too.
    model.adversarial_active = setup["adversarial_weight"] > 0
    train_step, _ = training.make_step_functions(model, strategy, jit_compile=training.use_gpu_speedups())
    batch_size, size = setup["batch_size"], setup["image_size"]
    rng = np.random.default_rng(0)
    batch = (
        tf.constant(rng.uniform(size=(batch_size, size, size, 1)).astype("float32")),
        tf.one_hot(rng.integers(0, NUM_CLASSES, batch_size), NUM_CLASSES),
        tf.ones(batch_size),
    )
    distributed = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch))))
    started = time.perf_counter()
    for _ in range(warmup_steps):
        train_step(distributed)
    float(model.trackers["loss"].result())  # wait for the last step to finish before timing
    first_steps_seconds = time.perf_counter() - started
    window_speeds, window_cpu_speeds = [], []
    for _ in range(timed_windows):
        steps, started, cpu_started = 0, time.perf_counter(), time.process_time()
        while steps == 0 or time.perf_counter() - started < window_seconds:
            train_step(distributed)
            steps += 1
        float(model.trackers["loss"].result())
        window_speeds.append(steps * batch_size / (time.perf_counter() - started))
        window_cpu_speeds.append(steps * batch_size / (time.process_time() - cpu_started))
    return {
        "train_images_per_s": statistics.median(window_speeds),
        "window_images_per_s": window_speeds,
        # Images per CPU-second of this process: steadier than wall time when other programs
        # share the cores, so a second witness for the ratios on a busy machine.
        "train_images_per_cpu_s": statistics.median(window_cpu_speeds),
        "warmup_seconds": first_steps_seconds,
        "parameters": model.encoder.count_params() + model.decoder.count_params(),
        # ru_maxrss is in kilobytes on Linux.
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure_input_pipeline(image_size, batch_size, image_count=256):
    """Images per second the tf.data pipeline delivers (decode, cache, shuffle, augment, batch)
    from PNGs of the given size: it must exceed the training speed, or the model would wait."""
    import numpy as np
    from PIL import Image

    from cilia_cvae import data

    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        paths = []
        for index in range(image_count):
            path = Path(folder) / f"{index}.png"
            Image.fromarray(rng.integers(0, 256, (image_size, image_size), dtype=np.uint8)).save(path)
            paths.append(str(path))
        labels = np.arange(image_count, dtype=np.int32) % NUM_CLASSES
        dataset = data.training_dataset(
            np.array(paths),
            labels,
            NUM_CLASSES,
            image_size,
            batch_size,
            seed=0,
            augment=True,
            class_balanced=True,
        )
        iterator = iter(dataset)
        for _ in range(image_count // batch_size):  # the first pass decodes and fills the cache
            next(iterator)
        batches, started = 0, time.perf_counter()
        while batches == 0 or time.perf_counter() - started < max(window_seconds, 1.0):
            next(iterator)
            batches += 1
        return batches * batch_size / (time.perf_counter() - started)


def measure_original_generation_loop(image_size, image_count):
    """The original inference: one `predict` call per image, then a resize to a drawn aspect ratio and a PNG."""
    import numpy as np
    from PIL import Image

    from cilia_cvae import models
    from cilia_cvae.model_config import ORIGINAL_LATENT_DIM, ModelConfig

    decoder = models.build_original_decoder(
        ModelConfig(
            architecture="original",
            image_size=image_size,
            num_classes=NUM_CLASSES,
            latent_dim=ORIGINAL_LATENT_DIM,
        )
    )
    rng = np.random.default_rng(0)
    one_hot = np.eye(NUM_CLASSES, dtype="float32")
    with tempfile.TemporaryDirectory() as folder:

        def one_image(index):
            latent = rng.standard_normal((1, ORIGINAL_LATENT_DIM)).astype("float32")
            pixels = decoder.predict([latent, one_hot[index % NUM_CLASSES][None]], verbose=0)[0, :, :, 0]
            aspect = rng.normal(1.04, 0.117)
            image = Image.fromarray((pixels * 255).astype("uint8"))
            image = image.resize((round(image_size * aspect**0.5), round(image_size / aspect**0.5)))
            image.save(Path(folder) / f"Synthetic_{index}.png")

        for index in range(2):  # warm-up: the first predict builds the graph
            one_image(index)
        started = time.perf_counter()
        for index in range(image_count):
            one_image(index)
        return image_count / (time.perf_counter() - started)


def benchmark_generator(decoder, class_names, latent_dim, image_size, stored_latents):
    """What generation.generate expects of a trained run, for untrained benchmark networks."""
    return {
        "parameters": {
            "class_names": class_names,
            "latent_dim": latent_dim,
            "image_size": image_size,
            "resize_mode": "squash",
        },
        "decoder": decoder,
        "latents": stored_latents,
        "fingerprint": "benchmark",
    }


def measure_default_generation(image_size, images_per_class):
    """Our inference: batched decoding alone, then end to end with PNGs written by cvae_inference's own code.

    Peak memory is this process's after writing NUM_CLASSES * images_per_class images."""
    import dataclasses

    import numpy as np
    from tqdm import tqdm

    from cilia_cvae import generation, models
    from cilia_cvae.layout import GeneratedLayout
    from cilia_cvae.model_config import PRESETS

    model_config = dataclasses.replace(PRESETS[224].model, image_size=image_size, num_classes=NUM_CLASSES)
    latent_dim = model_config.latent_length
    decoder = models.build_default_decoder(model_config)
    batch_size = 64
    decode_batch = generation.make_decode_function(decoder, batch_size, latent_dim, NUM_CLASSES)
    latents = np.random.default_rng(0).standard_normal((batch_size, latent_dim)).astype("float32")
    decode_batch(latents, 0)
    speeds = []
    for _ in range(timed_windows):
        batches, started = 0, time.perf_counter()
        while batches == 0 or time.perf_counter() - started < max(window_seconds / 2, 1.0):
            decode_batch(latents, batches % NUM_CLASSES)
            batches += 1
        speeds.append(batches * batch_size / (time.perf_counter() - started))
    class_names = [f"Class{index}" for index in range(NUM_CLASSES)]
    rng = np.random.default_rng(1)
    stored = {
        name: (
            rng.standard_normal((50, latent_dim)).astype("float32"),
            np.full((50, latent_dim), -2.0, "float32"),
        )
        for name in class_names
    }
    generator = benchmark_generator(decoder, class_names, latent_dim, image_size, stored)
    with tempfile.TemporaryDirectory() as folder, tqdm(disable=True) as progress:
        started = time.perf_counter()
        written = generation.generate(
            generator,
            GeneratedLayout(folder, image_size),
            class_names=class_names,
            images_per_class=images_per_class,
            sampling="posterior",
            temperature=1.0,
            seed=0,
            restore_aspect_ratio=True,
            raw_statistics={"aspect_ratio_mean": 1.04, "aspect_ratio_std": 0.117},
            batch_size=batch_size,
            progress=progress,
        )
        end_to_end = sum(len(paths) for paths in written.values()) / (time.perf_counter() - started)
    return {
        "default_decode_only": statistics.median(speeds),
        "default_end_to_end": end_to_end,
        "images_written": NUM_CLASSES * images_per_class,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def count_flops(model, input_specs):
    """Floating-point operations of one forward pass (a multiply-add counts 2), by TensorFlow's
    profiler on the model's frozen graph."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    function = tf.function(lambda *inputs: model(list(inputs), training=False))
    frozen = convert_variables_to_constants_v2(function.get_concrete_function(*input_specs))
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    profile = tf.compat.v1.profiler.profile(
        graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="scope", options=options
    )
    return int(profile.total_float_ops)


def measure_matmul_gflops(side=1024):
    """What this machine's float32 matrix multiply reaches in GFLOP/s: the ceiling a network's layers
    are compared with (the median of TIMED_WINDOWS windows)."""
    import tensorflow as tf

    left, right = tf.random.normal((side, side)), tf.random.normal((side, side))
    multiply = tf.function(lambda: tf.reduce_sum(tf.matmul(left, right)))
    multiply().numpy()
    speeds = []
    for _ in range(timed_windows):
        count, started = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - started < max(window_seconds / 4, 0.5):
            multiply().numpy()
            count += 1
        speeds.append(2 * side**3 * count / (time.perf_counter() - started) / 1e9)
    return statistics.median(speeds)


def untrained_diffusion_generator(image_size):
    """The default decoder and latent prior at image_size, untrained (the cost of a forward pass does
    not depend on its weights), with one stored latent per class, as cvae_inference's code takes them."""
    import dataclasses

    import numpy as np

    from cilia_cvae import latent_prior, models
    from cilia_cvae.model_config import PRESETS

    model_config = dataclasses.replace(PRESETS[224].model, image_size=image_size, num_classes=NUM_CLASSES)
    decoder = models.build_default_decoder(model_config)
    prior_config = latent_prior.PriorConfig(
        map_side=model_config.map_side,
        latent_channels=model_config.latent_map_channels,
        num_classes=NUM_CLASSES,
    )
    denoiser = latent_prior.build_denoiser(prior_config)
    class_names = [f"Class{index}" for index in range(NUM_CLASSES)]
    latent_dim = model_config.latent_length
    stored = {name: (np.zeros((1, latent_dim), "float32"),) * 2 for name in class_names}
    generator = benchmark_generator(decoder, class_names, latent_dim, image_size, stored)
    generator["prior"] = {"denoiser": denoiser, "config": prior_config}
    return generator, class_names


def time_diffusion_generation(
    generator, class_names, image_size, images_per_class, diffusion, sampling="diffusion"
):
    """Images per second of sampling with the prior (diffusion, or variations of stored crops),
    decoding and PNG writing, after a warm-up."""
    from tqdm import tqdm

    from cilia_cvae import generation
    from cilia_cvae.layout import GeneratedLayout

    with tempfile.TemporaryDirectory() as folder, tqdm(disable=True) as progress:
        options = dict(
            class_names=class_names,
            sampling=sampling,
            temperature=1.0,
            seed=0,
            restore_aspect_ratio=True,
            raw_statistics={"aspect_ratio_mean": 1.04, "aspect_ratio_std": 0.117},
            batch_size=64,
            progress=progress,
            diffusion=diffusion,
        )
        # A first class of one batch traces the sampler and the decoder; then the timed run.
        generation.generate(
            generator, GeneratedLayout(Path(folder) / "warm-up", image_size), images_per_class=1, **options
        )
        started = time.perf_counter()
        written = generation.generate(
            generator, GeneratedLayout(folder, image_size), images_per_class=images_per_class, **options
        )
        return sum(len(paths) for paths in written.values()) / (time.perf_counter() - started)


def measure_diffusion_generation(image_size, images_per_class, steps=20, guidance=2.0):
    """Generation with the latent prior, end to end (DDIM over the latent maps, decoding, PNGs written
    by cvae_inference's own code), and each network's FLOPs per image."""

    generator, class_names = untrained_diffusion_generator(image_size)
    end_to_end = time_diffusion_generation(
        generator, class_names, image_size, images_per_class, {"guidance": guidance, "steps": steps}
    )
    decoder_flops, denoiser_flops = network_flops(generator)
    calls_per_image = steps * (2 if guidance != 1 else 1)
    return {
        "diffusion_end_to_end": end_to_end,
        "diffusion_images_written": NUM_CLASSES * images_per_class,
        "diffusion_steps": steps,
        "diffusion_guidance": guidance,
        "decoder_flops_per_image": decoder_flops,
        "denoiser_flops_per_call": denoiser_flops,
        "diffusion_flops_per_image": calls_per_image * denoiser_flops + decoder_flops,
        "matmul_gflops_per_s": measure_matmul_gflops(),
    }


def measure_variation_generation(image_size, images_per_class, steps=20, guidance=4.0, strength=0.5):
    """Variations end to end, as cvae_inference draws them: a training crop read, turned and encoded (or,
    upright, its stored latent), noised to the strength and denoised in ceil(strength x steps) guided
    DDIM steps, decoded, PNGs written."""
    import dataclasses
    import math

    import numpy as np
    from PIL import Image

    from cilia_cvae import models
    from cilia_cvae.model_config import PRESETS

    generator, class_names = untrained_diffusion_generator(image_size)
    model_config = dataclasses.replace(PRESETS[224].model, image_size=image_size, num_classes=NUM_CLASSES)
    # Seven of eight drawn orientations are turned: those crops are read and encoded again.
    generator["encoder"] = models.build_default_encoder(model_config)
    with tempfile.TemporaryDirectory() as crops:
        for name in class_names:
            (Path(crops) / name).mkdir()
            pixels = np.random.default_rng(0).integers(0, 256, (image_size, image_size), dtype=np.uint8)
            Image.fromarray(pixels).save(Path(crops) / name / "crop.png")
        diffusion = {
            "guidance": guidance,
            "steps": steps,
            "edit_strength": strength,
            "counterfactual_from": "",
            "mix": 0.0,
            "source_names": {name: [f"{name}/crop.png"] for name in class_names},
            "source_dir": crops,
        }
        end_to_end = time_diffusion_generation(
            generator, class_names, image_size, images_per_class, diffusion, sampling="variation"
        )
    import tensorflow as tf

    decoder_flops, denoiser_flops = network_flops(generator)
    encoder_flops = count_flops(
        generator["encoder"], [tf.TensorSpec((1, image_size, image_size, 1)), tf.TensorSpec((1, NUM_CLASSES))]
    )
    calls_per_image = math.ceil(strength * steps) * (2 if guidance != 1 else 1)
    return {
        "variation_end_to_end": end_to_end,
        "variation_encoder_flops_per_turned_crop": encoder_flops,
        "variation_images_written": NUM_CLASSES * images_per_class,
        "variation_strength": strength,
        "variation_denoiser_calls_per_image": calls_per_image,
        "variation_flops_per_image": calls_per_image * denoiser_flops + decoder_flops + 7 / 8 * encoder_flops,
    }


def network_flops(generator):
    """FLOPs of one decoder pass (one image) and of one denoiser call (one latent map)."""
    import tensorflow as tf

    decoder, denoiser = generator["decoder"], generator["prior"]["denoiser"]
    prior_config, latent_dim = generator["prior"]["config"], generator["parameters"]["latent_dim"]
    decoder_flops = count_flops(decoder, [tf.TensorSpec((1, latent_dim)), tf.TensorSpec((1, NUM_CLASSES))])
    denoiser_flops = count_flops(
        denoiser,
        [tf.TensorSpec((1, *prior_config.map_shape)), tf.TensorSpec((1, 1)), tf.TensorSpec((1,), tf.int32)],
    )
    return decoder_flops, denoiser_flops


def measure_preprocessing(image_count):
    """Raw phantom crops (~520 px, written first by make_phantom_dataset.py) -> 224 px PNGs, on every core."""
    from cilia_cvae.preprocessing import preprocess

    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "raw"
        subprocess.run(
            [
                sys.executable,
                str(SCRIPTS_DIR / "make_phantom_dataset.py"),
                f"--raw_images_dir={raw}",
                f"--num_images={image_count}",
                "--seed=7",
            ],
            check=True,
            capture_output=True,
        )
        started = time.perf_counter()
        preprocess(
            raw_images_dir=raw,
            processed_images_dir=Path(folder) / "processed",
            image_size=224,
            resize_mode="squash",
            test_fraction=0.2,
            seed=123,
        )
        return image_count / (time.perf_counter() - started)


def measure_prior_training(image_size, batch_size=64):
    """The latent prior's training speed in latent maps per second: the training stage's own
    compiled step (prior_training.py), on random standardised maps of the size the CVAE's
    latent map has at image_size (28 x 28 x 4 at 224); the median of TIMED_WINDOWS windows."""
    import numpy as np
    import tensorflow as tf

    from cilia_cvae import latent_prior, training

    strategy = tf.distribute.get_strategy()
    prior_config = latent_prior.PriorConfig(map_side=image_size // 8, num_classes=NUM_CLASSES)
    prior = latent_prior.build_latent_prior(prior_config, learning_rate=1e-3, strategy=strategy)
    train_step = training.make_step_functions(prior, strategy)[0]
    rng = np.random.default_rng(0)
    batch = (
        tf.constant(rng.standard_normal((batch_size, *prior_config.map_shape)), tf.float32),
        tf.constant(rng.integers(0, NUM_CLASSES, batch_size), tf.int32),
    )
    for _ in range(warmup_steps):
        train_step(batch)
    speeds = []
    for _ in range(timed_windows):
        steps, started = 0, time.perf_counter()
        while steps == 0 or time.perf_counter() - started < window_seconds:
            train_step(batch)
            steps += 1
        float(prior.trackers["prior_loss"].result())  # waits for the last step
        speeds.append(steps * batch_size / (time.perf_counter() - started))
    return {
        "latents_per_s": statistics.median(speeds),
        "batch_size": batch_size,
        "map_shape": list(prior_config.map_shape),
    }


GENERATION_SIZE = 32 if QUICK else 224
# The latent prior of the comparison: 4,169 training crops x 8 orientations, 7 epochs.
PRIOR_TRAINING_LATENTS, PRIOR_TRAINING_EPOCHS = 4169 * 8, 7
EXTRA_MEASUREMENTS = {
    "generation_original_loop": lambda: {
        "original_loop": measure_original_generation_loop(GENERATION_SIZE, 5 if QUICK else 40)
    },
    "generation_default": lambda: measure_default_generation(GENERATION_SIZE, 4 if QUICK else 2000),
    "generation_diffusion": lambda: measure_diffusion_generation(GENERATION_SIZE, 4 if QUICK else 200),
    "generation_variation": lambda: measure_variation_generation(GENERATION_SIZE, 4 if QUICK else 200),
    "preprocessing": lambda: {"images_per_s": measure_preprocessing(40 if QUICK else 400)},
    "prior_training": lambda: measure_prior_training(GENERATION_SIZE),
}


# A QUICK run measures everything in one child (each TensorFlow start costs seconds, and a
# QUICK run only checks that everything works); it keeps the extra measurements' results here.
quick_extra_results = {}


def extra_results(name):
    """One of EXTRA_MEASUREMENTS, in its own child (or the QUICK run's one child's result)."""
    return quick_extra_results[name] if QUICK else contender_results(name)[name]


def generate_images_per_s():
    """Generation at 224, each way in its own child: the original's loop, our decoding alone, ours end to end."""
    original = extra_results("generation_original_loop")
    default = extra_results("generation_default")
    diffusion = extra_results("generation_diffusion")
    variation = extra_results("generation_variation")
    speeds = {
        "original_loop_224": original.get("original_loop"),
        "default_224": default.get("default_end_to_end"),
        "default_decode_only_224": default.get("default_decode_only"),
        "diffusion_224": diffusion.get("diffusion_end_to_end"),
        "variation_224": variation.get("variation_end_to_end"),
    }
    memory = {
        "images_written": default.get("images_written"),
        "peak_memory_mb": default.get("peak_memory_mb"),
    }
    return speeds, memory, {**original, **default, **diffusion, **variation}


def compute_efficiency(details, speeds):
    """Each network's FLOPs per image and the GFLOP/s it reaches, beside the machine's matmul rate."""
    matmul = details.get("matmul_gflops_per_s")
    decoder_flops = details.get("decoder_flops_per_image")
    decode_speed = speeds.get("default_decode_only_224")
    diffusion_speed = speeds.get("diffusion_224")
    efficiency = {
        "matmul_gflops_per_s": matmul,
        "flops_per_image": {
            "decoder": decoder_flops,
            "denoiser_per_call": details.get("denoiser_flops_per_call"),
            "diffusion_sample": details.get("diffusion_flops_per_image"),
            "variation": details.get("variation_flops_per_image"),
            "encoder": details.get("variation_encoder_flops_per_turned_crop"),
        },
    }
    if decoder_flops and decode_speed:
        efficiency["decoder_gflops_per_s"] = decoder_flops * decode_speed / 1e9
    if details.get("diffusion_flops_per_image") and diffusion_speed:
        efficiency["diffusion_end_to_end_gflops_per_s"] = (
            details["diffusion_flops_per_image"] * diffusion_speed / 1e9
        )
    if matmul and "decoder_gflops_per_s" in efficiency:
        efficiency["decoder_share_of_matmul"] = efficiency["decoder_gflops_per_s"] / matmul
    return efficiency


def preprocess_images_per_s():
    """Preprocessing at 224 of ~520 px phantom crops on every core, in its own child."""
    return extra_results("preprocessing").get("images_per_s")


def start_contender(names, original_448_batch_size=ORIGINAL_448_BATCH_SIZE):
    """Measure contenders in a child process (this script with --contender=<names>)."""
    print(f"measuring {names} ...", flush=True)
    arguments = [
        f"--{key}={value}"
        for key, value in (
            ("quick", QUICK),
            ("original_448_batch_size", original_448_batch_size),
            ("warmup_steps", WARMUP_STEPS),
            ("timed_windows", TIMED_WINDOWS),
            ("window_seconds", WINDOW_SECONDS),
            ("contender", names),
        )
    ]
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    return subprocess.run(
        [sys.executable, __file__, *arguments], capture_output=True, text=True, env=environment
    )


def contender_results(names, original_448_batch_size=ORIGINAL_448_BATCH_SIZE):
    """{name: result} from a child, read from the last line of its stdout, or the reason it failed."""
    child = start_contender(names, original_448_batch_size)
    if child.returncode != 0:
        killed = child.returncode < 0 or child.returncode == 137
        # TensorFlow ends its error messages with an op name; the line naming the error says more.
        lines = child.stderr.strip().splitlines() or ["?"]
        reason = (
            "killed (out of memory?)"
            if killed
            else next((line for line in reversed(lines) if "Error" in line), lines[-1])
        )
        return {name: {"error": reason} for name in names.split(",")}
    return json.loads(child.stdout.strip().splitlines()[-1])


def measure_all_contenders():
    """One child per contender, one at a time, so that no contender shares the cores or the
    memory with another. A QUICK run only checks that everything works: one child measures all, the extra
    measurements too."""
    if QUICK:
        measured = contender_results(",".join([*CONTENDERS, *EXTRA_MEASUREMENTS]))
        quick_extra_results.update({name: measured[name] for name in EXTRA_MEASUREMENTS})
        return {name: {**contender_summary(name), **measured[name]} for name in CONTENDERS}
    results = {name: {**contender_summary(name), **contender_results(name)[name]} for name in CONTENDERS}
    # The original 448 model needs ~22 GB at batch 8: when other programs hold memory it does
    # not fit, so it is measured at the largest batch that does (halving), and the table says which.
    batch_size = ORIGINAL_448_BATCH_SIZE
    while "error" in results["original_448"] and batch_size > 1:
        batch_size //= 2
        results["original_448"] = {
            **contender_summary("original_448"),
            "batch_size": batch_size,
            **contender_results("original_448", batch_size)["original_448"],
        }
    return results


def processor_name():
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_table(results):
    print(
        f"\n{'contender':<14} {'image':>6} {'batch':>6} {'images/s':>10} {'per CPU-s':>10} {'peak MB':>9} {'parameters':>13}"
    )
    for name, result in results.items():
        if "error" in result:
            print(
                f"{name:<14} {result['image_size']:>6} {result['batch_size']:>6}  failed: {result['error']}"
            )
            continue
        print(
            f"{name:<14} {result['image_size']:>6} {result['batch_size']:>6} {result['train_images_per_s']:>10.2f} "
            f"{result['train_images_per_cpu_s']:>10.2f} "
            f"{result['peak_memory_mb']:>9.0f} {result['parameters']:>13,}"
        )


def measure_contender(name):
    setup = contender_setup(name)
    result = measure_training(setup)
    if name.startswith("default"):
        result["input_pipeline_images_per_s"] = measure_input_pipeline(
            setup["image_size"], setup["batch_size"], image_count=64 if QUICK else 256
        )
    return result


if CONTENDER:
    unknown = [
        name for name in CONTENDER.split(",") if name not in CONTENDERS and name not in EXTRA_MEASUREMENTS
    ]
    if unknown:
        raise UserError(
            f"--contender={unknown[0]!r} is not one of {', '.join([*CONTENDERS, *EXTRA_MEASUREMENTS])}"
        )
    print(
        json.dumps(
            {
                name: EXTRA_MEASUREMENTS[name]() if name in EXTRA_MEASUREMENTS else measure_contender(name)
                for name in CONTENDER.split(",")
            }
        )
    )
    sys.exit(0)

results = measure_all_contenders()
print_table(results)
speed = {name: result.get("train_images_per_s") for name, result in results.items()}
cpu_speed = {name: result.get("train_images_per_cpu_s") for name, result in results.items()}
ratios = {}
for size in ("224", "448"):
    if speed[f"default_{size}"] and speed[f"original_{size}"]:
        ratios[f"default_over_original_{size}"] = speed[f"default_{size}"] / speed[f"original_{size}"]
        ratios[f"default_over_original_{size}_cpu_time"] = (
            cpu_speed[f"default_{size}"] / cpu_speed[f"original_{size}"]
        )
if speed.get("adversarial_224") and speed["default_224"]:
    ratios["adversarial_over_default_224"] = speed["adversarial_224"] / speed["default_224"]
    ratios["adversarial_over_default_224_cpu_time"] = cpu_speed["adversarial_224"] / cpu_speed["default_224"]
input_pipeline = {
    size: results[f"default_{size}"].get("input_pipeline_images_per_s") for size in ("224", "448")
}
for name, value in ratios.items():
    print(f"{name}: {value:.1f}x")
load = os.getloadavg()[0]
competed = " (above the CPU count: other programs competed for the cores)" if load > os.cpu_count() else ""
print(f"machine: {processor_name()}, {os.cpu_count()} CPUs; load average {load:.1f} at the end{competed}")
for size, value in input_pipeline.items():
    print(f"input pipeline at the default_{size} setting: {value or 0:.0f} images/s")
generation_speeds, generation_memory, generation_details = generate_images_per_s()
preprocessing_speed = preprocess_images_per_s()
original_loop = generation_speeds["original_loop_224"]
for name, value in generation_speeds.items():
    if value and original_loop:
        print(f"generation {name}: {value:.1f} images/s ({value / original_loop:.0f}x the original's loop)")
print(
    f"generating {generation_memory['images_written']} images: peak memory {generation_memory['peak_memory_mb'] or 0:.0f} MB"
)
print(f"preprocessing at 224 of ~520 px crops: {preprocessing_speed or 0:.0f} images/s")
prior_training = extra_results("prior_training")
if prior_training.get("latents_per_s"):
    prior_training["minutes_for_the_comparison_prior"] = (
        PRIOR_TRAINING_EPOCHS * PRIOR_TRAINING_LATENTS / prior_training["latents_per_s"] / 60
    )
    print(
        f"latent prior training at {GENERATION_SIZE}: {prior_training['latents_per_s']:.0f} latent maps/s; "
        f"{PRIOR_TRAINING_EPOCHS} epochs of {PRIOR_TRAINING_LATENTS} maps in "
        f"{prior_training['minutes_for_the_comparison_prior']:.1f} minutes"
    )
efficiency = compute_efficiency(generation_details, generation_speeds)
if efficiency.get("decoder_share_of_matmul"):
    print(
        f"decoding: {efficiency['flops_per_image']['decoder'] / 1e9:.2f} GFLOP per image at "
        f"{efficiency['decoder_gflops_per_s']:.1f} GFLOP/s, {efficiency['decoder_share_of_matmul']:.0%} of a float32 "
        f"matmul's {efficiency['matmul_gflops_per_s']:.1f} GFLOP/s on this machine"
    )
report = {
    "train_images_per_s": speed,
    "train_images_per_cpu_s": cpu_speed,
    "peak_memory_mb": {name: result.get("peak_memory_mb") for name, result in results.items()},
    "batch_size": {name: result["batch_size"] for name, result in results.items()},
    "image_size": {name: result["image_size"] for name, result in results.items()},
    "parameters": {name: result.get("parameters") for name, result in results.items()},
    "ratio": ratios,
    "input_pipeline_images_per_s": input_pipeline,
    "generate_images_per_s": generation_speeds,
    "generate_ratio_over_original_loop": {
        name: value / original_loop for name, value in generation_speeds.items() if value and original_loop
    },
    "generate_memory": generation_memory,
    "efficiency": efficiency,
    "generate_details": generation_details,
    "preprocess_images_per_s": preprocessing_speed,
    "prior_training": prior_training,
    "details": results,
    "quick": QUICK,
    "load_average_at_end": os.getloadavg()[0],
    "machine": {
        "processor": processor_name(),
        "cpus": os.cpu_count(),
        "system": platform.platform(),
        "python": platform.python_version(),
    },
    "settings": config.jsonable(settings),
}
write_json_atomic(OUTPUT_JSON, report)
print(f"wrote {OUTPUT_JSON}")
