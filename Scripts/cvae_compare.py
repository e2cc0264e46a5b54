"""Compare the original architecture, our default and candidate improvements, by measurement.

Every contender is trained by the training script with the same epoch budget, generates with
the inference script and is judged by cvae_evaluate.py with one shared judge, exactly as a
user would run them; this script only chooses the settings and collects the reports.

Reads   PROCESSED_IMAGES_DIR/<S>x<S>/ (the processed phantoms or your data)
Writes  WORK_DIR/<contender>/{models,latents,generated}/ and WORK_DIR/judge/
        OUTPUT_JSON: {"default": R, "original": R, "candidates": {name: R}, "command", "epochs", "machine"}
        where R holds the judge's real accuracy, class fidelity (overall and per class), FID, KID
        and their real-vs-real floors, precision/recall, density/coverage, memorisation and,
        with --usefulness=True, the usefulness experiment (cvae_usefulness.py, which
        cvae_evaluate.py runs for the contender); then the README's quality table is
        regenerated from OUTPUT_JSON (python Scripts/cilia_cvae/readme_tables.py).

A killed comparison resumes: finished trainings, generations and reports are reused.

Example:
    python Scripts/cvae_compare.py --epochs=10
    python Scripts/cvae_compare.py --contenders=default,original --usefulness=True

Expected run time on 2 cores at 224: the judge 18 minutes once, then per trained contender
about 1.3 minutes per epoch (default) or 3 minutes per epoch (original) plus 2 minutes of
generation and judging; sampling candidates reuse the default's training. The diffusion
candidates (diffusion_guidance_<g>) train the default's latent prior once, PRIOR_EPOCHS of
about 4 minutes, and draw from it; real_test is the control: the real test images judged as if
they were generated, the fidelity, memorisation and near-copies a generator is held to.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cilia_cvae import config, figures
from cilia_cvae.config import UserError, configure
from cilia_cvae.files import write_json_atomic
from cilia_cvae.layout import GeneratedLayout, ProcessedLayout, RunLayout, size_folder_name
from cilia_cvae.preprocessing import read_processed_facts

IMAGE_SIZE = 224  # which processed size to train and judge at
EPOCHS = 10  # the same epoch budget for every trained contender
CONTENDERS = "all"  # "all", or names separated by commas (see CONTENDER_SETTINGS below)
IMAGES_PER_CLASS = 200  # generated and judged per class
USEFULNESS = False  # also run the usefulness experiment for USEFULNESS_FOR (long)
USEFULNESS_FOR = "default,original"  # contenders whose usefulness is measured
USEFULNESS_FRACTIONS = "0.1,0.25,1.0"  # shares of the real training data
USEFULNESS_SEEDS = 3  # repetitions per fraction below 100%
USEFULNESS_SEEDS_AT_FULL_DATA = 1  # repetitions at 100% (the costliest point, and not one of the targets)
USEFULNESS_CLASSIFIER_EPOCHS = 3  # passes of each detection-model stand-in over the real + synthetic set (each in all four quarter turns)
USEFULNESS_CLASSIFIER_REPEATS = (
    3  # classifiers per run, differing only in initialisation; a run scores their mean
)
USEFULNESS_GENERATOR_EPOCHS = 10  # training of the generator on each fraction, in epochs of the full train split (the comparison's budget: the same steps as the full model)
PRIOR_EPOCHS = 7  # the latent prior's training for the diffusion contenders (about 4 minutes per epoch at 224 on 2 cores)
REEVALUATE = False  # evaluate every contender again though a report exists (after a change to the measures)
QUICK = False  # a test-sized run: the evaluation's quick mode (a 2-epoch judge at 32 px)
WORK_DIR = config.MODELS_DIR / "comparison"  # every contender's models, latents and images
PROCESSED_IMAGES_DIR = config.PROCESSED_IMAGES_DIR  # read: the processed train and test splits
OUTPUT_JSON = config.REPOSITORY_ROOT / "docs" / "evaluation_224.json"  # written: the comparison
FIGURE = (
    config.REPOSITORY_ROOT / "docs" / "real_phantom_generated.png"
)  # written: phantoms beside the default's images
CONTENDERS_FIGURE = ""  # written: test phantoms beside the first images of every contender in OUTPUT_JSON ("": contenders_<S>x<S>.png beside OUTPUT_JSON)
REAL_SAMPLES_DIR = ""  # optional folder of real TEM crops shown in the figure's top row ("" for none)
settings = configure(globals())

# Each contender: the training overrides (its architecture or training change) and the
# inference overrides (its sampling). Candidates change one thing against the default.
REAL_TEST_CONTROL = "real_test"
ORIGINAL_TRAINING = [
    "--architecture=original",
    "--augment=False",
    "--class_balanced=False",
    "--kl_warmup_epochs=0",
]
# The class filter's thresholds the variation contenders are measured at (None: no filter).
FILTER_SUFFIXES = {None: "", 0.5: "_filtered", 0.9: "_filtered_0.9"}
CONTENDER_SETTINGS = {
    "default": {"training": [], "inference": []},
    "original": {"training": ORIGINAL_TRAINING, "inference": []},
    "class_density_sampling": {"training": [], "inference": ["--sampling=class_density"]},
    "low_temperature": {"training": [], "inference": ["--temperature=0.5"]},
    "vector_latent": {"training": ["--latent_map_stride=0"], "inference": []},
    "no_kl_warmup": {"training": ["--kl_warmup_epochs=0"], "inference": []},
    "fixed_variance": {"training": ["--reconstruction_loss=sum_squared_error"], "inference": []},
    "structural_similarity": {"training": ["--structural_weight=1"], "inference": []},
    "prior_sampling": {"training": [], "inference": ["--sampling=prior"]},
    # The first stage's look: grain drawn onto the decoder's output (grain.py), and the adversarial
    # patch loss (adversarial.py) without and with grain.
    "grain": {"training": [], "inference": ["--grain=True"]},
    "adversarial_patch": {"training": ["--adversarial_weight=0.5"], "inference": []},
    "adversarial_patch_with_grain": {
        "training": ["--adversarial_weight=0.5"],
        "inference": ["--grain=True"],
    },
    # New latent maps from the default's latent prior, at three classifier-free guidance scales.
    **{
        f"diffusion_guidance_{guidance}": {
            "training": [],
            "inference": ["--sampling=diffusion", f"--guidance={guidance}"],
        }
        for guidance in (1, 2, 4)
    },
    # Real training crops of each class redrawn by the same prior under their own class (guidance 4):
    # the strength trades newness for faithfulness; mixing blends in a second crop of the class; the
    # class filter keeps only the maps it gives their class.
    **{
        f"variation_strength_{strength}{f'_mix_{mix}' if mix else ''}{FILTER_SUFFIXES[threshold]}": {
            "training": [],
            "inference": [
                "--sampling=variation",
                f"--variation_strength={strength}",
                "--guidance=4",
                *([f"--variation_mix={mix}"] if mix else []),
                *(["--class_filter=True"] if threshold else []),
                # (0.5 is the inference script's default: left unsaid, as the first filtered rows were run)
                *([f"--class_filter_threshold={threshold}"] if threshold and threshold != 0.5 else []),
            ],
        }
        for strength in (0.3, 0.5, 0.7, 0.8)
        for mix in (0, 0.5)
        for threshold in FILTER_SUFFIXES
    },
    # The control: real test images, judged as if they were generated. What a generator's
    # fidelity, memorisation and near-copies are held to (its distribution measures against the
    # test split are those of the test split against itself, so they say nothing and are left out).
    REAL_TEST_CONTROL: {"training": [], "inference": []},
}
SCRIPTS_DIR = Path(__file__).resolve().parent
CONTROL_MEASURES_WITHOUT_MEANING = ("kid", "kid_std", "fid", "precision", "recall", "density", "coverage")
# The budgets an evaluation report records for its usefulness, as cvae_evaluate names them.
USEFULNESS_SETTINGS = {
    name: settings[name]
    for name in (
        "USEFULNESS_FRACTIONS",
        "USEFULNESS_SEEDS",
        "USEFULNESS_SEEDS_AT_FULL_DATA",
        "USEFULNESS_CLASSIFIER_EPOCHS",
        "USEFULNESS_CLASSIFIER_REPEATS",
        "USEFULNESS_GENERATOR_EPOCHS",
    )
}

names = (
    list(CONTENDER_SETTINGS)
    if CONTENDERS.strip() == "all"
    else [name.strip() for name in CONTENDERS.split(",")]
)
unknown = [name for name in names if name not in CONTENDER_SETTINGS]
if unknown:
    raise UserError(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDER_SETTINGS)}")
facts = read_processed_facts(PROCESSED_IMAGES_DIR, IMAGE_SIZE)
size_name = size_folder_name(IMAGE_SIZE)
training_script = "cvae_training_448x448" if IMAGE_SIZE == 448 else "cvae_training_224x224"


def run(script, arguments, log_path):
    """Run a pipeline script as a user would, its output to a log; one line of progress here."""
    print(f"  {script}.py {' '.join(arguments)}  (log: {log_path})", flush=True)
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        finished = subprocess.run(
            [sys.executable, str(SCRIPTS_DIR / f"{script}.py"), *arguments],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
    if finished.returncode != 0:
        raise UserError(f"{script}.py failed (exit code {finished.returncode}); see the end of {log_path}")
    return time.perf_counter() - started


def training_key(name):
    # Contenders that differ only in sampling share one trained model.
    training = CONTENDER_SETTINGS[name]["training"]
    return next(other for other in CONTENDER_SETTINGS if CONTENDER_SETTINGS[other]["training"] == training)


def needs_prior(name):
    inference = CONTENDER_SETTINGS[name]["inference"]
    return "--sampling=diffusion" in inference or "--sampling=variation" in inference


def copy_test_split(generated):
    """The control's 'generated' folder: the first IMAGES_PER_CLASS real test images of each class."""
    test_split = ProcessedLayout(PROCESSED_IMAGES_DIR, IMAGE_SIZE).split("test")
    target = GeneratedLayout(generated, IMAGE_SIZE).directory
    for class_name in facts["class_names"]:
        (target / class_name).mkdir(parents=True, exist_ok=True)
        for path in sorted((test_split / class_name).glob("*.png"))[:IMAGES_PER_CLASS]:
            # Named as generated images are, so every tool that reads a generated folder reads this one.
            shutil.copy2(path, target / class_name / f"Synthetic_{path.name}")


def trained_contender(name):
    """Train the contender's CVAE (and, for prior sampling, its latent prior) unless done; returns what
    generation and judging need of it: its key, folder, folder arguments, record path and prior record."""
    key = training_key(name)
    trained = WORK_DIR / key
    folders = [f"--models_dir={trained / 'models'}", f"--latent_tensors_dir={trained / 'latents'}"]
    parameters_path = RunLayout(trained / "models", trained / "latents", IMAGE_SIZE).parameters
    training_arguments = [
        f"--image_size={IMAGE_SIZE}",
        f"--epochs={EPOCHS}",
        f"--processed_images_dir={PROCESSED_IMAGES_DIR}",
        *folders,
        *CONTENDER_SETTINGS[key]["training"],
    ]
    if not parameters_path.is_file():
        run(training_script, training_arguments, WORK_DIR / f"{key}_training.log")
    prior = json.loads(parameters_path.read_text(encoding="utf-8")).get("latent_prior") or {}
    if needs_prior(name) and prior.get("epochs_done", 0) < PRIOR_EPOCHS:
        # The second stage alone, on the contender's finished CVAE (or resumed where it stopped).
        run(
            training_script,
            [*training_arguments, "--continue_finished=True", f"--prior_epochs={PRIOR_EPOCHS}"],
            WORK_DIR / f"{key}_prior_training.log",
        )
        prior = json.loads(parameters_path.read_text(encoding="utf-8"))["latent_prior"]
    return {
        "key": key,
        "folder": trained,
        "folders": folders,
        "parameters_path": parameters_path,
        "prior": prior,
    }


def generate_contender(name, trained, generated):
    """The contender's images, drawn again when they were drawn under other settings or by another model."""
    generation_done = WORK_DIR / name / "generation_done.json"
    parameters = json.loads(trained["parameters_path"].read_text(encoding="utf-8"))
    generation_record = {
        "images_per_class": IMAGES_PER_CLASS,
        # Images drawn under other inference settings (an older default's) are drawn again.
        "inference": CONTENDER_SETTINGS[name]["inference"],
        "grain_model_sha256": (parameters.get("grain_model") or {}).get("sha256"),
        # Images drawn by an earlier prior (or class filter) are drawn again by the current one.
        **({"prior_sha256": trained["prior"].get("sha256")} if needs_prior(name) else {}),
        **(
            {"class_filter_sha256": (parameters.get("class_filter") or {}).get("sha256")}
            if "--class_filter=True" in CONTENDER_SETTINGS[name]["inference"]
            else {}
        ),
    }
    if (
        generation_done.is_file()
        and json.loads(generation_done.read_text(encoding="utf-8")) == generation_record
    ):
        return
    # Generation appends, so an interrupted one is started again from nothing.
    shutil.rmtree(generated, ignore_errors=True)
    if name == REAL_TEST_CONTROL:
        copy_test_split(generated)
    else:
        run(
            "cvae_inference",
            [
                f"--image_size={IMAGE_SIZE}",
                f"--images_per_class={IMAGES_PER_CLASS}",
                f"--processed_images_dir={PROCESSED_IMAGES_DIR}",
                f"--generated_images_dir={generated}",
                *trained["folders"],
                *CONTENDER_SETTINGS[name]["inference"],
            ],
            WORK_DIR / f"{name}_inference.log",
        )
    write_json_atomic(generation_done, generation_record)


def usefulness_is_stale(earlier, usefulness):
    """Whether the earlier report lacks the usefulness asked for, or measured it with other budgets.
    (A report from before classifier repeats existed ran one classifier per run.)"""
    if earlier is None:
        return True
    recorded = {"USEFULNESS_CLASSIFIER_REPEATS": 1, **earlier.get("settings", {})}
    return usefulness and (
        not earlier.get("usefulness")
        or any(recorded.get(setting) != value for setting, value in USEFULNESS_SETTINGS.items())
    )


def evaluated_contender(name, trained, generated):
    """The evaluation report of the contender's images, judged again only when asked or out of date."""
    report_path = GeneratedLayout(generated, IMAGE_SIZE).evaluation_report_json
    usefulness = USEFULNESS and name in USEFULNESS_FOR.split(",") and name != REAL_TEST_CONTROL
    earlier = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else None
    if REEVALUATE or usefulness_is_stale(earlier, usefulness):
        run(
            "cvae_evaluate",
            [
                f"--image_size={IMAGE_SIZE}",
                f"--images_per_class={IMAGES_PER_CLASS}",
                f"--processed_images_dir={PROCESSED_IMAGES_DIR}",
                f"--generated_images_dir={generated}",
                f"--models_dir={trained['folder'] / 'models'}",
                f"--judge_dir={WORK_DIR / 'judge'}",
                f"--usefulness={usefulness}",
                *(f"--{setting.lower()}={value}" for setting, value in USEFULNESS_SETTINGS.items()),
                f"--quick={QUICK}",
            ],
            WORK_DIR / f"{name}_evaluate.log",
        )
    report = json.loads(report_path.read_text(encoding="utf-8"))
    if earlier and earlier.get("usefulness") and not report.get("usefulness"):
        # Re-measuring quality alone keeps the (hours-long) usefulness measured before.
        report["usefulness"] = earlier["usefulness"]
        report["settings"].update({name: earlier["settings"].get(name) for name in USEFULNESS_SETTINGS})
        write_json_atomic(report_path, report)
    return report


def summary_of(name, report, trained, generated):
    """The comparison's record of one contender: its report's measures, how it was trained and drawn."""
    parameters = json.loads(trained["parameters_path"].read_text(encoding="utf-8"))
    result = {
        key_name: value
        for key_name, value in report.items()
        if key_name not in ("settings", "confusion", "counts", "class_names")
    }
    result["usefulness"] = {
        fraction: {
            **{measure: values[measure] for measure in values if measure != "runs"},
            "seeds": len(values["runs"]),
        }
        for fraction, values in report.get("usefulness", {}).items()
    }
    result["training"] = {
        "overrides": CONTENDER_SETTINGS[trained["key"]]["training"],
        "epochs": parameters["epochs_done"],
        "best_epoch": parameters["best_epoch"],
        "seconds": parameters.get("training_seconds"),
        "architecture": parameters["architecture"],
    }
    result["inference"] = {
        "overrides": CONTENDER_SETTINGS[name]["inference"],
        "images_per_class": IMAGES_PER_CLASS,
    }
    if needs_prior(name):
        result["latent_prior"] = {
            field: trained["prior"].get(field)
            for field in ("epochs_done", "final_loss", "training_latents", "training_seconds", "parameters")
        }
    acceptance = GeneratedLayout(generated, IMAGE_SIZE).directory / "class_filter_acceptance.json"
    if "--class_filter=True" in CONTENDER_SETTINGS[name]["inference"] and acceptance.is_file():
        # How many drawn maps the filter passed per class, and how well it classifies held-out training crops.
        result["class_filter"] = {
            "acceptance": json.loads(acceptance.read_text(encoding="utf-8")),
            "validation_accuracy": (parameters.get("class_filter") or {}).get("validation_accuracy"),
        }
    if name == REAL_TEST_CONTROL:
        result = {
            key_name: value
            for key_name, value in result.items()
            if key_name not in (*CONTROL_MEASURES_WITHOUT_MEANING, "training", "inference", "usefulness")
        }
        result["per_class"] = {
            class_name: {"class_fidelity": values["class_fidelity"]}
            for class_name, values in result.get("per_class", {}).items()
        }
    result["generated_images_dir"] = str(GeneratedLayout(generated, IMAGE_SIZE).directory)
    return result


def contender_report(name):
    """Train, generate and judge one contender as a user would, each step reused when already done."""
    trained, generated = trained_contender(name), WORK_DIR / name / "generated"
    generate_contender(name, trained, generated)
    report = evaluated_contender(name, trained, generated)
    return summary_of(name, report, trained, generated)


WORK_DIR.mkdir(parents=True, exist_ok=True)
results = {}
for name in names:
    print(f"{name}:", flush=True)
    results[name] = contender_report(name)
    distribution = (
        f", KID {results[name]['kid']:.4f} (floor {results[name]['kid_floor']:.4f})"
        if "kid" in results[name]
        else ""
    )
    print(
        f"  class fidelity {results[name]['class_fidelity']:.1%}{distribution}, memorisation ratio "
        f"{results[name]['memorisation_ratio']:.2f}, near-copies {results[name]['near_copy_share']:.1%}",
        flush=True,
    )

# Merge with what an earlier comparison recorded, so contenders can be run a few at a time.
previous = json.loads(OUTPUT_JSON.read_text(encoding="utf-8")) if OUTPUT_JSON.is_file() else {}
command = (
    f"python Scripts/cvae_compare.py --epochs={EPOCHS} --images_per_class={IMAGES_PER_CLASS}"
    + ("" if CONTENDERS.strip() == "all" else f" --contenders={CONTENDERS}")
    + (f" --prior_epochs={PRIOR_EPOCHS}" if any(needs_prior(name) for name in names) else "")
    + (
        f" --usefulness=True --usefulness_for={USEFULNESS_FOR} --usefulness_fractions={USEFULNESS_FRACTIONS} "
        f"--usefulness_seeds={USEFULNESS_SEEDS} --usefulness_seeds_at_full_data={USEFULNESS_SEEDS_AT_FULL_DATA} "
        f"--usefulness_classifier_epochs={USEFULNESS_CLASSIFIER_EPOCHS} "
        f"--usefulness_classifier_repeats={USEFULNESS_CLASSIFIER_REPEATS} "
        f"--usefulness_generator_epochs={USEFULNESS_GENERATOR_EPOCHS}"
        if USEFULNESS
        else ""
    )
)
for result in results.values():
    result["command"] = command
# Contenders run a few at a time each keep the command that produced them; "commands" lists them all.
earlier_commands = previous.get("commands", [previous["command"]] if previous.get("command") else [])
comparison = {
    "default": results.get("default", previous.get("default")),
    "original": results.get("original", previous.get("original")),
    "candidates": {
        **previous.get("candidates", {}),
        **{name: result for name, result in results.items() if name not in ("default", "original")},
    },
    "command": command,
    "commands": [*[text for text in earlier_commands if text != command], command],
    "epochs": EPOCHS,
    "image_size": IMAGE_SIZE,
    "data": {"fingerprint": facts["fingerprint"], "counts": facts.get("counts", {})},
    "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}",
}
OUTPUT_JSON.parent.mkdir(parents=True, exist_ok=True)
write_json_atomic(OUTPUT_JSON, comparison)
print(f"comparison: {OUTPUT_JSON}")

# Every contender's first images side by side: a number can hide what looking shows at once.
contender_folders = {
    name: Path(result["generated_images_dir"])
    for name, result in [
        ("default", comparison["default"]),
        ("original", comparison["original"]),
        *comparison["candidates"].items(),
    ]
    if result and name != REAL_TEST_CONTROL and Path(result["generated_images_dir"]).is_dir()
}
if contender_folders:
    class_names = facts["class_names"]
    contenders_figure = (
        Path(CONTENDERS_FIGURE) if CONTENDERS_FIGURE else OUTPUT_JSON.parent / f"contenders_{size_name}.png"
    )
    figures.cross_resolution(
        figures.first_images(ProcessedLayout(PROCESSED_IMAGES_DIR, IMAGE_SIZE).split("test"), class_names, 1),
        {
            name: figures.first_images(folder, class_names, 1, "Synthetic_*.png")
            for name, folder in contender_folders.items()
        },
        class_names,
        contenders_figure,
        examples=1,
        title="A test phantom (left) beside the first image of each contender, per class",
    )
    print(f"figure: {contenders_figure}")

# The picture for the README: test-split phantoms beside the default model's generated images.
if "default" in results:
    class_names = facts["class_names"]
    phantoms = figures.first_images(
        ProcessedLayout(PROCESSED_IMAGES_DIR, IMAGE_SIZE).split("test"), class_names, 3
    )
    generated = figures.first_images(
        Path(results["default"]["generated_images_dir"]), class_names, 3, "Synthetic_*.png"
    )
    real = (
        sorted(
            path
            for path in Path(REAL_SAMPLES_DIR).glob("*")
            if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff")
        )
        if REAL_SAMPLES_DIR
        else []
    )
    figures.real_phantom_generated(real, phantoms, generated, class_names, FIGURE)
    print(f"figure: {FIGURE}")
