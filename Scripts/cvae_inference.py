"""Generate class-conditional synthetic TEM images of cilia cross sections with a trained CVAE.

Reads   MODELS_DIR/<S>x<S>/cvae_decoder.keras and cvae_parameters.json (class names, sizes)
        MODELS_DIR/<S>x<S>/latent_prior.keras (for --sampling=diffusion or variation and counterfactuals),
        cvae_encoder.keras (variations of turned crops), class_filter.keras (--class_filter=True)
        LATENT_TENSORS_DIR/<S>x<S>/z_mean_<Class>.npy, z_log_var_<Class>.npy
        PROCESSED_IMAGES_DIR/raw_image_statistics.csv and <S>x<S>/train/ (real examples for the figures)
Writes  GENERATED_IMAGES_DIR/<S>x<S>/<Class>/Synthetic_<Class>_<NNNNN>.png (numbering continues: nothing is
        overwritten, no name given twice; the same command again writes only what a killed run left out)
        GENERATED_IMAGES_DIR/<S>x<S>/generation_manifest.csv (one row per image: how it was made)
        GENERATED_IMAGES_DIR/<S>x<S>/image_comparison.png, latent_space.png, class_interpolation.png
        (with the prior also guidance_sweep.png; with --counterfactual_from also counterfactuals.png,
        with --sampling=variation also variations.png)

Examples:
    python Scripts/cvae_inference.py --classes=ODA,IDA --images_per_class=1000 --sampling=class_density
    python Scripts/cvae_inference.py --sampling=diffusion --guidance=2 --sampling_steps=20
    python Scripts/cvae_inference.py --sampling=variation --variation_strength=0.5 --guidance=4
    python Scripts/cvae_inference.py --counterfactual_from=Normal --classes=ODA,IDA --edit_strength=0.5

Expected run time: a few seconds to start, then a few hundred images/s on 2 cores; with the latent
prior each image costs SAMPLING_STEPS passes of the denoiser (twice that with guidance), so fewer.
"""

import time

import pandas as pd
from tqdm import tqdm

from cilia_cvae import config
from cilia_cvae.config import UserError, check_choice, check_range, configure
from cilia_cvae.layout import GeneratedLayout, ProcessedLayout, RunLayout
from cilia_cvae.stored_run import SAMPLING_MODES, read_parameters, training_script_for

IMAGE_SIZE = 224  # which trained model to use (Models/<S>x<S>)
CLASSES = "all"  # "all", or class names separated by commas, e.g. "ODA,IDA"
IMAGES_PER_CLASS = 100  # images generated for each requested class
SAMPLING = "posterior"  # "posterior" (around a stored training latent, as the original), "prior" (texture only with a latent map), "class_density", "diffusion" (new maps from the run's latent prior) or "variation" (real training crops of the class redrawn part-way by the prior)
TEMPERATURE = 1.0  # scales the sampling noise (with "diffusion", the starting noise): below 1 gives safer, less varied images
GUIDANCE = 2.0  # classifier-free guidance of the latent prior: 1 is the conditional model alone (most varied), above 1 truer to the class
SAMPLING_STEPS = 20  # deterministic DDIM steps (eta 0) of the latent prior, for diffusion and counterfactuals
COUNTERFACTUAL_FROM = ""  # a class name: instead of sampling, redraw that class's real training crops (in file order) as each requested class
EDIT_STRENGTH = 0.5  # how far a counterfactual's latent is noised before it is denoised as the new class: 0 returns the crop's reconstruction, 1 forgets the crop
VARIATION_STRENGTH = 0.5  # "variation": how far each crop's latent is noised before the prior denoises it under its own class: 0 returns the crop's reconstruction (in its drawn orientation), 1 a full prior draw
VARIATION_MIX = 0.0  # "variation": weight of a second crop of the class, mixed in spherically before denoising (0: none; 0.5: halfway between two crops)
CLASS_FILTER = False  # "diffusion" and "variation": keep only the drawn images the run's class filter (a small CNN trained beside the prior on the train split) gives the requested class, drawing on until each class has its count
CLASS_FILTER_THRESHOLD = 0.5  # the filter's probability of the requested class an image needs to be kept
CLASS_FILTER_MAX_DRAWS = (
    4  # at most this many candidates per image asked for; a class that falls short says how many it got
)
GRAIN = False  # draw the grain the decoder averages away back onto each image, from the grain model measured on the training split (grain.py): images with TEM's texture (8 of 8 realism statistics in the real band against 6), but in the one usefulness seed measured they helped a classifier less (docs/results.md); False: the decoder's own, smoother output
RESTORE_ASPECT = True  # give each image an aspect ratio drawn from the raw statistics, as the original did
BATCH_SIZE = 64  # images decoded per call
FIGURES = True  # write the comparison, latent-space and class figures (with the prior also the guidance sweep and counterfactuals)
SEED = 0  # the same seed gives the same images
MODELS_DIR = config.MODELS_DIR  # read: the trained decoder
LATENT_TENSORS_DIR = config.LATENT_TENSORS_DIR  # read: the stored training latents
PROCESSED_IMAGES_DIR = config.PROCESSED_IMAGES_DIR  # read: raw statistics and real examples for the figures
GENERATED_IMAGES_DIR = config.GENERATED_IMAGES_DIR  # written: the synthetic images, manifest and figures

settings = configure(globals())
check_range("IMAGES_PER_CLASS", IMAGES_PER_CLASS, 1)
# A batch is decoded in memory at once: beyond a few thousand it only risks running out of memory.
check_range("BATCH_SIZE", BATCH_SIZE, 1, 4096)
# Beyond a few standard deviations the draws leave the latent space the decoder learnt: black and white only.
check_range("TEMPERATURE", TEMPERATURE, 0.0, 10.0)
check_range("GUIDANCE", GUIDANCE, 0.0)
check_range("SAMPLING_STEPS", SAMPLING_STEPS, 1, 1000)
check_range("EDIT_STRENGTH", EDIT_STRENGTH, 0.0, 1.0)
check_range("VARIATION_STRENGTH", VARIATION_STRENGTH, 0.0, 1.0)
# Beyond halfway the second crop is the main one: the same mixtures as below it, their roles swapped.
check_range("VARIATION_MIX", VARIATION_MIX, 0.0, 0.5)
check_range("SEED", SEED, 0)
check_range("CLASS_FILTER_THRESHOLD", CLASS_FILTER_THRESHOLD, 0.0, 1.0)
check_range("CLASS_FILTER_MAX_DRAWS", CLASS_FILTER_MAX_DRAWS, 1, 1000)
check_choice("SAMPLING", SAMPLING, SAMPLING_MODES)

# The model records its class names, size and latent size; nothing is asked twice.
parameters = read_parameters(RunLayout(MODELS_DIR, LATENT_TENSORS_DIR, IMAGE_SIZE), IMAGE_SIZE)
all_classes = list(parameters["class_names"])
requested = (
    all_classes
    if CLASSES.strip().lower() == "all"
    else [name.strip() for name in CLASSES.split(",") if name.strip()]
)
repeated = sorted({name for name in requested if requested.count(name) > 1})
if repeated:
    # A class named twice is one request: its images would otherwise be made, and counted, twice.
    print(f"note: {', '.join(repeated)} named more than once in --classes; generated once")
    requested = list(dict.fromkeys(requested))
unknown = [name for name in requested if name not in all_classes]
if unknown or not requested:
    raise UserError(
        f"unknown class(es) {', '.join(unknown) or '(none given)'}; this model knows: {', '.join(all_classes)}"
    )

if CLASS_FILTER and SAMPLING not in ("diffusion", "variation"):
    raise UserError(
        f"--class_filter=True screens the latent prior's maps: use it with --sampling=diffusion or "
        f"--sampling=variation, not --sampling={SAMPLING}"
    )
if COUNTERFACTUAL_FROM and SAMPLING == "variation":
    raise UserError(
        "--counterfactual_from redraws crops of one class as others, --sampling=variation redraws each "
        "class's own crops: choose one"
    )
if COUNTERFACTUAL_FROM and COUNTERFACTUAL_FROM not in all_classes:
    raise UserError(
        f"--counterfactual_from={COUNTERFACTUAL_FROM} is not a class of this model; it knows: {', '.join(all_classes)}"
    )

# TensorFlow takes seconds to load: imported only now, so that a mistyped value is refused at once.
from cilia_cvae import class_filter, diffusion_figures, figures, generation, locks  # noqa: E402

generator = generation.load_trained_generator(MODELS_DIR, LATENT_TENSORS_DIR, IMAGE_SIZE)
grain_model = generation.load_grain_model(generator, IMAGE_SIZE) if GRAIN else None
# The figures show images as they are written: with grain when GRAIN draws it.
generator["grain"] = grain_model
diffusion = None
edits = SAMPLING == "variation" or bool(COUNTERFACTUAL_FROM)
if SAMPLING == "diffusion" or edits:
    # The prior must be this run's, the very file its training recorded: checked before anything is written.
    generation.load_latent_prior(generator, MODELS_DIR, LATENT_TENSORS_DIR, IMAGE_SIZE)
    diffusion = {"guidance": GUIDANCE, "steps": SAMPLING_STEPS}
    # A prior trained short of pure noise (--prior_max_noise_level) never learnt the levels above it.
    trained_up_to = generator["prior"]["config"].max_noise_level
    strength_name = "edit_strength" if COUNTERFACTUAL_FROM else "variation_strength"
    strength = (EDIT_STRENGTH if COUNTERFACTUAL_FROM else VARIATION_STRENGTH) if edits else 1.0
    if strength > trained_up_to:
        remedy = (
            f"lower --{strength_name} to at most {trained_up_to:g}"
            if edits
            else f"draw variations instead (--sampling=variation --variation_strength={trained_up_to:g})"
        )
        raise UserError(
            f"this run's latent prior was trained on noise levels up to {trained_up_to:g} only "
            f"(--prior_max_noise_level), so it cannot start from level {strength:g}; {remedy}, or train a "
            f"prior with --prior_max_noise_level=1"
        )
class_screen = None
if CLASS_FILTER:
    # The filter must be the one trained for this prior: checked before anything is written.
    class_screen = class_filter.load(
        generator,
        RunLayout(MODELS_DIR, LATENT_TENSORS_DIR, IMAGE_SIZE),
        training_script_for(IMAGE_SIZE),
    )
    class_screen.update(threshold=CLASS_FILTER_THRESHOLD, max_draws=CLASS_FILTER_MAX_DRAWS)

if SAMPLING == "prior" and parameters.get("latent_map_side") and not COUNTERFACTUAL_FROM:
    # Not refused (it is the textbook draw, and a comparison may want to show it), but said.
    print(
        f"note: this model's latent is a {parameters['latent_map_side']}x{parameters['latent_map_side']} map; "
        "prior draws give texture, not cilia (see docs/results.md); use posterior or class_density"
    )

processed = ProcessedLayout(PROCESSED_IMAGES_DIR, IMAGE_SIZE)
statistics_path = processed.raw_statistics
if RESTORE_ASPECT and not statistics_path.is_file():
    raise UserError(
        f"{statistics_path} is missing, so no aspect ratio can be restored; "
        f"run python Scripts/cvae_pre_processing.py, or pass --restore_aspect=False"
    )
raw_statistics = pd.read_csv(statistics_path).iloc[0].to_dict() if RESTORE_ASPECT else {}
if edits:
    # Each stored latent named by the crop it was encoded from, so the manifest can say which one was redrawn.
    source_classes = [COUNTERFACTUAL_FROM] if COUNTERFACTUAL_FROM else requested
    diffusion.update(
        edit_strength=EDIT_STRENGTH if COUNTERFACTUAL_FROM else VARIATION_STRENGTH,
        counterfactual_from=COUNTERFACTUAL_FROM,
        mix=0.0 if COUNTERFACTUAL_FROM else VARIATION_MIX,
        source_names={
            name: generation.counterfactual_sources(generator, processed, name) for name in source_classes
        },
        source_dir=processed.split("train"),
    )
    if SAMPLING == "variation":
        # A turned crop's latent is the encoder's of the turned crop (source_latents says why).
        generator["encoder"] = generation.load_encoder(RunLayout(MODELS_DIR, LATENT_TENSORS_DIR, IMAGE_SIZE))

generated = GeneratedLayout(GENERATED_IMAGES_DIR, IMAGE_SIZE)
output_dir = generated.directory
# A request the disk cannot hold is refused before anything, the folder included, is made.
generation.check_room_for(output_dir, IMAGES_PER_CLASS * len(requested), IMAGE_SIZE)
output_dir.mkdir(parents=True, exist_ok=True)
# One generation at a time per folder: two would number their files alike and interleave the manifest.
locks.hold_folder_lock(output_dir)
started = time.perf_counter()
with tqdm(
    total=IMAGES_PER_CLASS * len(requested), desc="generating", unit="image", mininterval=1.0
) as progress:
    written = generation.generate(
        generator,
        generated,
        class_names=requested,
        images_per_class=IMAGES_PER_CLASS,
        sampling=SAMPLING,
        temperature=TEMPERATURE,
        seed=SEED,
        restore_aspect_ratio=RESTORE_ASPECT,
        raw_statistics=raw_statistics,
        batch_size=BATCH_SIZE,
        progress=progress,
        diffusion=diffusion,
        grain_model=grain_model,
        class_screen=class_screen,
    )
elapsed = time.perf_counter() - started
if class_screen:
    # Acceptance per class, printed and kept beside the images (the comparison reports it).
    for name, acceptance in written.acceptance.items():
        print(class_filter.summary_line(name, acceptance))
    class_filter.write_acceptance(output_dir / class_filter.ACCEPTANCE_FILE, written.acceptance)
total = sum(len(paths) for paths in written.values())
if total:
    print(f"wrote {total} images in {elapsed:.1f} s ({total / elapsed:.0f} images/s) to {output_dir}")
else:
    # The same command again is answered, not repeated: a second copy of each image would leak
    # across the train/test split of whatever model is trained on them.
    print(
        f"nothing written: every image asked for is in {output_dir} already; for more, pass another "
        f"--seed, or raise --images_per_class above {IMAGES_PER_CLASS} to continue seed {SEED}'s images"
    )

if FIGURES:
    # Real training examples beside generated ones; the latents on a map; one latent under each label.
    real_paths = figures.first_images(processed.split("train"), requested, 4)
    figures.image_comparison(
        real_paths,
        {name: paths[:4] for name, paths in written.requested.items()},
        requested,
        output_dir / "image_comparison.png",
    )
    figures.latent_space(
        {name: generator["latents"][name][0] for name in all_classes}, output_dir / "latent_space.png"
    )
    figure_names = ["image_comparison.png", "latent_space.png", diffusion_figures.CLASS_FIGURE_NAME]
    # The class acts in the prior, not the decoder: the same noise under each class, and guidance's effect.
    # Both start from pure noise, which a prior trained short of it (--prior_max_noise_level) never
    # learnt: such a run gets the decoder's figure instead.
    if "prior" in generator and generator["prior"]["config"].max_noise_level == 1:
        diffusion_figures.same_noise_under_each_class(
            generator,
            all_classes,
            output_dir / diffusion_figures.CLASS_FIGURE_NAME,
            seed=SEED,
            guidance=GUIDANCE,
            steps=SAMPLING_STEPS,
        )
        diffusion_figures.guidance_sweep(
            generator,
            all_classes,
            output_dir / diffusion_figures.GUIDANCE_FIGURE_NAME,
            seed=SEED,
            steps=SAMPLING_STEPS,
        )
        figure_names.append(diffusion_figures.GUIDANCE_FIGURE_NAME)
    else:
        largest = max(all_classes, key=lambda name: len(generator["latents"][name][0]))
        reference_class = "Normal" if "Normal" in all_classes else largest
        reference_latent = generator["latents"][reference_class][0][0]
        figures.class_interpolation(
            lambda latents, labels: generation.decode_mixed(
                generator["decoder"], latents, labels, grain_model=grain_model
            ),
            int(parameters["latent_dim"]),
            all_classes,
            reference_class,
            reference_latent,
            {name: generator["latents"][name][0][0] for name in all_classes},
            output_dir / diffusion_figures.CLASS_FIGURE_NAME,
        )
    if COUNTERFACTUAL_FROM:
        diffusion_figures.counterfactuals(
            generator,
            processed,
            COUNTERFACTUAL_FROM,
            written.requested,
            requested,
            output_dir / diffusion_figures.COUNTERFACTUAL_FIGURE_NAME,
            edit_strength=EDIT_STRENGTH,
        )
        figure_names.append(diffusion_figures.COUNTERFACTUAL_FIGURE_NAME)
    if SAMPLING == "variation":
        diffusion_figures.variations(
            generator,
            processed,
            written.requested,
            requested,
            output_dir / diffusion_figures.VARIATION_FIGURE_NAME,
            seed=SEED,
            diffusion=diffusion,
        )
        figure_names.append(diffusion_figures.VARIATION_FIGURE_NAME)
    print(f"figures: {output_dir / figure_names[0]}, {', '.join(figure_names[1:])}")
    # With images generated at several resolutions, compare them side by side as the original did.
    size_dirs = sorted(
        (
            path
            for path in GENERATED_IMAGES_DIR.glob("*x*")
            if path.name.split("x")[0].isdigit()
            and GeneratedLayout(GENERATED_IMAGES_DIR, int(path.name.split("x")[0])).all_images()
        ),
        key=lambda path: int(path.name.split("x")[0]),
    )
    if len(size_dirs) > 1:
        figures.cross_resolution(
            real_paths,
            {path.name: figures.first_images(path, requested, 2, "Synthetic_*.png") for path in size_dirs},
            requested,
            GENERATED_IMAGES_DIR / "image_comparison_resolutions.png",
        )
        print(f"cross-resolution figure: {GENERATED_IMAGES_DIR / 'image_comparison_resolutions.png'}")
print(f"manifest: {generated.manifest}")
