"""Does synthetic data help a detection model? Real only vs real + synthetic vs synthetic only.

At each fraction of the real training data and for each seed, a class-stratified subset of
the training split is chosen; a generator is trained on that subset only (by the training
script, with the evaluated model's settings and as many steps as a full-data generator) and
generates with the inference script; then small classifiers, the detection-model stand-ins,
are trained on the subset's real images, on real + synthetic and on synthetic only, and
scored on the real test split (macro-F1, recall per class). At 100% the evaluated model's own
generated images are the synthetic set. cvae_evaluate.py --usefulness=True runs this script.
Each fraction's synthetic images are drawn as the evaluated images were (their manifest says
how): with --sampling=diffusion, by a latent prior of the fraction's own, trained on that
fraction as a second stage with the evaluated prior's settings and as many steps.

Reads   PROCESSED_IMAGES_DIR/<S>x<S>/{train,test}/<Class>/*.png   the real images
        MODELS_DIR/<S>x<S>/cvae_parameters.json                    the settings the generators copy
        GENERATED_IMAGES_DIR/<S>x<S>/<Class>/*.png                 the synthetic set at 100%
Writes  MODELS_DIR/usefulness/<S>x<S>_<architecture>_<N>full_epochs_<data>/fraction_<F>_seed_<K>/
            a generator's images, models, latents and generated images, and its classifiers' scores
        OUTPUT_JSON: {"usefulness": {fraction: summary}, "settings", "work_dir", "seconds"}

An interrupted experiment resumes: a fraction's finished generator and its scores are reused
while their settings are unchanged, and a generator killed part-way resumes from its last epoch.

Example:
    python Scripts/cvae_usefulness.py --image_size=224 --fractions=0.1,0.25 --seeds=3

Expected run time on 2 cores at 224 with the default architecture: each generator takes as
long as GENERATOR_EPOCHS epochs of the full model (about 1.3 minutes each), and the classifiers
of a run (3 variants x 3 repeats) about 1.7 minutes per classifier epoch. The defaults
(6 generators, 9 runs) take about 6 hours; cvae_compare.py's budgets (10 generator epochs,
3 classifier epochs, 1 seed at 100%) about 2 hours. A resumed run costs only what is left.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cilia_cvae import config, usefulness
from cilia_cvae.config import UserError, configure
from cilia_cvae.files import write_json_atomic
from cilia_cvae.images import list_images, load_images
from cilia_cvae.layout import GeneratedLayout, ProcessedLayout, RunLayout, size_folder_name
from cilia_cvae.preprocessing import read_processed_facts

IMAGE_SIZE = 224  # which processed size the generators are trained at
FRACTIONS = "0.1,0.25,1.0"  # shares of the real training data, separated by commas
SEEDS = 3  # repetitions per fraction below 100%, for a mean and a spread
SEEDS_AT_FULL_DATA = 3  # repetitions at 100% of the real data (its generator is the evaluated model)
CLASSIFIER_SIZE = 64  # the detection-model stand-ins work at this size
CLASSIFIER_EPOCHS = 15  # passes over the real + synthetic set: the steps of every classifier of a run
CLASSIFIER_REPEATS = 3  # classifiers per run, differing only in initialisation; a run scores their mean
GENERATOR_EPOCHS = 20  # each generator's training, in epochs of the full train split (10x the epochs on 10%)
PRIOR_EPOCHS = 0  # with images drawn by a latent prior: each fraction's prior's training, in epochs of the full train split (0: as many as the evaluated model's prior took)
SYNTHETIC_PER_CLASS = 200  # synthetic images added per class
PROCESSED_IMAGES_DIR = config.PROCESSED_IMAGES_DIR  # read: the real train and test splits
GENERATED_IMAGES_DIR = config.GENERATED_IMAGES_DIR  # read: the evaluated model's images (synthetic at 100%)
MODELS_DIR = config.MODELS_DIR  # read: the evaluated model's settings; written: usefulness/, the generators
OUTPUT_JSON = ""  # written: the results ("": usefulness_report.json beside the generated images)
settings = configure(globals())

fractions = usefulness.parse_fractions(FRACTIONS)
if fractions is None:
    raise UserError(
        f"--fractions must be shares above 0 and at most 1 separated by commas, not {FRACTIONS!r}"
    )
facts = read_processed_facts(PROCESSED_IMAGES_DIR, IMAGE_SIZE)
class_names, size_name = facts["class_names"], size_folder_name(IMAGE_SIZE)
class_count = len(class_names)
processed = ProcessedLayout(PROCESSED_IMAGES_DIR, IMAGE_SIZE)
full_generated_dir = GeneratedLayout(GENERATED_IMAGES_DIR, IMAGE_SIZE).directory
if 1.0 in fractions and not GeneratedLayout(GENERATED_IMAGES_DIR, IMAGE_SIZE).all_images():
    raise UserError(
        f"no generated images in {full_generated_dir} for the 100% fraction; run python "
        f"Scripts/cvae_inference.py --image_size={IMAGE_SIZE} first, or leave 1.0 out of "
        f"--fractions"
    )
# The generator of each fraction is trained like the evaluated model, on that fraction only.
parameters_path = RunLayout(MODELS_DIR, config.LATENT_TENSORS_DIR, IMAGE_SIZE).parameters
model_parameters = (
    json.loads(parameters_path.read_text(encoding="utf-8")) if parameters_path.is_file() else {}
)
model_settings = model_parameters.get("settings", {})
# ... and draws its synthetic images as the evaluated images were drawn (with diffusion, from
# a latent prior of its own, trained on that fraction like the evaluated model's).
evaluated_sampling = usefulness.sampling_of(GeneratedLayout(GENERATED_IMAGES_DIR, IMAGE_SIZE).manifest)
inference_arguments = usefulness.inference_arguments(evaluated_sampling)
uses_prior = "--sampling=diffusion" in inference_arguments or "--sampling=variation" in inference_arguments
if uses_prior and not model_parameters.get("latent_prior"):
    raise UserError(
        f"the evaluated images were drawn by a latent prior, but {parameters_path} records none; "
        f"train it with --prior_epochs first"
    )

# A counterfactual set is repeated by each fraction as full draws (usefulness.inference_arguments),
# which a prior trained short of pure noise cannot make.
evaluated_max_noise_level = (
    (model_parameters.get("latent_prior") or {}).get("settings", {}).get("PRIOR_MAX_NOISE_LEVEL", 1.0)
)
if evaluated_sampling.get("sampling") == "counterfactual" and evaluated_max_noise_level < 1:
    raise UserError(
        f"the evaluated images are counterfactuals, which each fraction repeats as full draws of its "
        f"own prior, but the evaluated prior was trained on noise levels up to {evaluated_max_noise_level:g} "
        f"only (--prior_max_noise_level); evaluate variations or diffusion draws instead"
    )

# Posterior draws at temperature 1 keep the names they always had, so earlier runs are reused.
sampling_tag = (
    ""
    if inference_arguments in (["--sampling=posterior"], ["--sampling=posterior", "--temperature=1.0"])
    # e.g. _diffusion_temperature1.0_guidance2.0_sampling_steps20
    else "_"
    + "_".join(
        argument.split("=", 1)[-1]
        if argument.startswith("--sampling=")
        else argument.lstrip("-").replace("=", "")
        for argument in inference_arguments
    )
)
work_root = (
    MODELS_DIR / "usefulness" / f"{size_name}_{model_settings.get('ARCHITECTURE', 'default')}_"
    f"{GENERATOR_EPOCHS}full_epochs_{facts['fingerprint'][:12]}"
)
output_path = (
    Path(OUTPUT_JSON) if OUTPUT_JSON else GeneratedLayout(GENERATED_IMAGES_DIR, IMAGE_SIZE).usefulness_report
)
scripts_dir = Path(__file__).resolve().parent
training_script = f"cvae_training_{size_name}"
if not (scripts_dir / f"{training_script}.py").exists():
    training_script = "cvae_training_224x224"


def run_script(name, arguments):
    """Run a pipeline script as a user would; its output streams to ours."""
    sys.stdout.flush()
    finished = subprocess.run(
        [sys.executable, str(scripts_dir / f"{name}.py"), *arguments],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    if finished.returncode != 0:
        raise RuntimeError(f"{name}.py {' '.join(arguments)} failed with exit code {finished.returncode}")


def copy_subset(work_dir, subset, fingerprint):
    """A processed folder holding only the subset's training images, as preprocessing would write it."""
    copy = ProcessedLayout(work_dir / "processed", IMAGE_SIZE)
    if copy.root.exists():
        shutil.rmtree(copy.root)
    for index in subset:
        source = Path(train_paths[index])
        target = copy.class_folder("train", source.parent.name) / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for class_name in class_names:
        copy.class_folder("train", class_name).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(processed.raw_statistics, copy.raw_statistics)
    write_json_atomic(copy.facts, dict(facts, fingerprint=fingerprint))
    return copy.root


def finished_generator(done_path, wanted):
    """Whether the generator recorded at done_path was trained and drawn with exactly these settings
    (a retrained evaluated model may differ)."""
    done = json.loads(done_path.read_text(encoding="utf-8")) if done_path.is_file() else {}
    return all(done.get(name) == value for name, value in wanted.items()) and (
        not sampling_tag or done.get("inference_arguments") == inference_arguments
    )


def keep_or_clear_started_generator(work_dir, training_arguments, fingerprint):
    """A generator killed part-way resumes from its last finished epoch, as the training script does
    for a user, when it was started with the same arguments on the same images; otherwise it starts
    again from nothing. Returns the record that says how it was started."""
    started_path = work_dir / "started.json"
    started = {"training_arguments": training_arguments, "subset_fingerprint": fingerprint}
    if not (started_path.is_file() and json.loads(started_path.read_text(encoding="utf-8")) == started):
        for folder in ("models", "latents"):
            if (work_dir / folder).exists():
                shutil.rmtree(work_dir / folder)
        write_json_atomic(started_path, started)
    return started_path


def train_generator(work_dir, folders, training_arguments, prior_arguments, started_path):
    """The fraction's CVAE (unless already finished), then its latent prior when the evaluated images used one."""
    if not RunLayout(work_dir / "models", work_dir / "latents", IMAGE_SIZE).parameters.is_file():
        try:
            run_script(training_script, [*training_arguments, *folders])
        except RuntimeError:
            # The script refused or diverged: the next attempt starts from nothing rather than
            # meeting the same refusal or the same checkpoint again. A kill is not a RuntimeError.
            started_path.unlink()
            raise
    if prior_arguments:
        # The second stage on the fraction's finished CVAE; a killed one resumes where it stopped.
        run_script(training_script, [*training_arguments, *folders, *prior_arguments])


def generator_for_fraction(work_dir, subset, seed, fraction):
    """Train a CVAE on one fraction of the train split and generate from it; reuse an earlier one."""
    training_arguments, epochs, warmup = usefulness.generator_training_arguments(
        model_settings, image_size=IMAGE_SIZE, fraction=fraction, full_data_epochs=GENERATOR_EPOCHS, seed=seed
    )
    prior_arguments = (
        usefulness.prior_training_arguments(model_parameters["latent_prior"], fraction, PRIOR_EPOCHS)
        if uses_prior
        else None
    )
    generated = work_dir / f"generated{sampling_tag}"
    done_path = work_dir / f"done{sampling_tag}.json"
    wanted = {"training_arguments": training_arguments, "prior_arguments": prior_arguments}
    if finished_generator(done_path, wanted):
        return generated / size_name
    done_path.unlink(missing_ok=True)
    (work_dir / f"scores{sampling_tag}.json").unlink(missing_ok=True)
    fingerprint = usefulness.subset_fingerprint(facts["fingerprint"], subset, seed)
    fraction_processed = copy_subset(work_dir, subset, fingerprint)
    started_path = keep_or_clear_started_generator(work_dir, training_arguments, fingerprint)
    if generated.exists():
        shutil.rmtree(generated)
    folders = [
        f"--processed_images_dir={fraction_processed}",
        f"--models_dir={work_dir / 'models'}",
        f"--latent_tensors_dir={work_dir / 'latents'}",
    ]
    train_generator(work_dir, folders, training_arguments, prior_arguments, started_path)
    run_script(
        "cvae_inference",
        [
            f"--image_size={IMAGE_SIZE}",
            f"--images_per_class={SYNTHETIC_PER_CLASS}",
            "--restore_aspect=False",
            "--figures=False",
            f"--seed={seed}",
            *inference_arguments,
            *folders,
            f"--generated_images_dir={generated}",
        ],
    )
    write_json_atomic(
        done_path,
        {
            "training_images": int(len(subset)),
            "epochs": epochs,
            "kl_warmup_epochs": warmup,
            **wanted,
            "inference_arguments": inference_arguments,
        },
    )
    return generated / size_name


def score_run(fraction, seed, subset, generated_dir):
    """Train the stand-in classifiers of one run on its three training sets; score them on the real test.

    Every classifier of a run takes the same number of optimisation steps: CLASSIFIER_EPOCHS
    passes over the real + synthetic set. Counting epochs instead would give the larger
    real + synthetic set more steps, and its advantage would partly be longer training. A
    variant scores the mean of CLASSIFIER_REPEATS classifiers that differ only in their
    initialisation and batch order: one classifier measures its initialisation as much as the
    data it was given, and the effect of synthetic data is smaller than that.
    """
    # TensorFlow loads with the first classifier (seconds): refusals, and a generator killed before
    # its classifiers, never wait for it.
    from cilia_cvae.classifier import train_classifier

    synthetic_paths, synthetic_labels = list_images(generated_dir, class_names, SYNTHETIC_PER_CLASS)
    synthetic_images = load_images(synthetic_paths, CLASSIFIER_SIZE)
    real_images, real_labels = train_images[subset], train_labels[subset]
    training_sets = {
        "real_only": (real_images, real_labels),
        "real_plus_synthetic": (
            np.concatenate([real_images, synthetic_images]),
            np.concatenate([real_labels, synthetic_labels]),
        ),
        "synthetic_only": (synthetic_images, synthetic_labels),
    }
    run = {
        "seed": seed,
        "real_images": int(len(subset)),
        "synthetic_images": int(len(synthetic_labels)),
        "classifier_repeats": CLASSIFIER_REPEATS,
    }
    largest = max(len(labels) for _, labels in training_sets.values())
    for name, (images, labels) in training_sets.items():
        epochs = max(1, int(round(CLASSIFIER_EPOCHS * largest / len(labels))))
        # Repeat 0 uses the run's seed, as a single classifier did before repeats existed.
        repeats = []
        for repeat in range(CLASSIFIER_REPEATS):
            classifier = train_classifier(images, labels, class_count, epochs, seed + 1000 * repeat)
            repeats.append(usefulness.scores(classifier, test_images, test_labels, class_count))
        run[name] = usefulness.combine_repeats(repeats)
    print(
        f"usefulness at {fraction:.0%} of the real data, seed {seed}: macro-F1 real only "
        f"{run['real_only']['macro_f1']:.3f}, "
        f"real + synthetic {run['real_plus_synthetic']['macro_f1']:.3f}, "
        f"synthetic only {run['synthetic_only']['macro_f1']:.3f}",
        flush=True,
    )
    return run


def usefulness_run(fraction, seed):
    """One seed of one fraction: its generator and its classifiers' scores, reused when a run left them."""
    subset = usefulness.stratified_subset(train_labels, fraction, seed)
    if fraction >= 1.0:
        return score_run(fraction, seed, subset, full_generated_dir)
    work_dir = work_root / f"fraction_{fraction}_seed_{seed}"
    generated_dir = generator_for_fraction(work_dir, subset, seed, fraction)
    # A fraction's scores are kept beside its generator (which clears them when it is trained
    # again): finishing an interrupted experiment then costs only what is left.
    scores_path = work_dir / f"scores{sampling_tag}.json"
    scores_key = {
        "classifier_size": CLASSIFIER_SIZE,
        "classifier_epochs": CLASSIFIER_EPOCHS,
        "classifier_repeats": CLASSIFIER_REPEATS,
        "synthetic_per_class": SYNTHETIC_PER_CLASS,
        "real_images": int(len(subset)),
        "test_images": int(len(test_labels)),
    }
    if scores_path.is_file():
        kept = json.loads(scores_path.read_text(encoding="utf-8"))
        if kept.get("key") == scores_key:
            print(
                f"usefulness at {fraction:.0%} of the real data, seed {seed}: scores reused from "
                f"{scores_path}",
                flush=True,
            )
            return kept["run"]
    run = score_run(fraction, seed, subset, generated_dir)
    write_json_atomic(scores_path, {"key": scores_key, "run": run})
    return run


started = time.perf_counter()
train_paths, train_labels = list_images(processed.split("train"), class_names)
test_paths, test_labels = list_images(processed.split("test"), class_names)
train_images = load_images(train_paths, CLASSIFIER_SIZE)
test_images = load_images(test_paths, CLASSIFIER_SIZE)

results = {}
for fraction in fractions:
    runs = []
    for seed in range(SEEDS if fraction < 1.0 else SEEDS_AT_FULL_DATA):
        runs.append(usefulness_run(fraction, seed))
    results[str(fraction)] = usefulness.summarise_fraction(runs, class_names, CLASSIFIER_REPEATS)

write_json_atomic(
    output_path,
    {
        "usefulness": results,
        "settings": config.jsonable(settings),
        "work_dir": str(work_root),
        "seconds": round(time.perf_counter() - started, 1),
    },
)
for fraction, result in results.items():
    print(
        f"usefulness at {float(fraction):.0%} of the real data: macro-F1 real only "
        f"{result['real_only_f1']:.3f} +- {result['real_only_f1_std']:.3f}, "
        f"real + synthetic {result['real_plus_synthetic_f1']:.3f} "
        f"+- {result['real_plus_synthetic_f1_std']:.3f}, synthetic only {result['synthetic_only_f1']:.3f}"
    )
print(f"usefulness results: {output_path}")
