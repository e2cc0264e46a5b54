"""Does synthetic data help a detection model? The experiment behind the project's purpose.

At each fraction of the real training data, a classifier (the detection-model stand-in) is
trained on real images only, on real + synthetic, and on synthetic only, and tested on the
real test split: macro-F1 and per-class recall, over several seeds.

The generator used at a fraction is trained on that same fraction only: a generator trained
on all the data would leak the held-back real images into the "small data" experiment. Each
fraction's generator is made by the user-facing scripts themselves (training, then inference),
in a work folder that a later run reuses.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, recall_score

from cilia_cvae import models
from cilia_cvae.classifier import list_images, load_images, predict, train_classifier
from cilia_cvae.files import write_json_atomic
from cilia_cvae.preprocessing import FACTS_FILE_NAME, size_folder_name

SCRIPTS_DIR = Path(__file__).resolve().parents[1]
# Settings of the evaluated model that the fraction's generator copies; the rest are per fraction
# (the epochs and the KL warm-up are stretched, see generator_schedule).
COPIED_TRAINING_SETTINGS = ("ARCHITECTURE", "LATENT_DIM", "LATENT_MAP_STRIDE", "LATENT_MAP_CHANNELS", "BASE_CHANNELS",
                            "MAX_CHANNELS", "BATCH_SIZE", "LEARNING_RATE", "VALIDATION_FRACTION", "CLASS_BALANCED", "AUGMENT",
                            "RECONSTRUCTION_LOSS", "STRUCTURAL_WEIGHT")


def stratified_subset(labels, fraction, seed):
    """Indices of a class-stratified share of the training images; at least 2 of each class."""
    rng = np.random.default_rng([seed, int(fraction * 1000)])
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(len(members), max(2, int(round(fraction * len(members)))))
        chosen.extend(rng.choice(members, count, replace=False))
    return np.sort(np.array(chosen))


def run_script(name, arguments):
    """Run a pipeline script as a user would; its output streams to ours."""
    finished = subprocess.run([sys.executable, str(SCRIPTS_DIR / f"{name}.py"), *arguments],
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if finished.returncode != 0:
        raise RuntimeError(f"{name}.py {' '.join(arguments)} failed with exit code {finished.returncode}")


def is_default_choice(model_settings, name):
    """True for a setting whose value is "auto", what "auto" stands for on that architecture, or no structural term.

    Leaving such a setting out of a generator's arguments keeps the generators trained before
    the setting existed valid, and makes spelling out the default no change.
    """
    if name == "STRUCTURAL_WEIGHT":
        return float(model_settings[name]) == 0.0
    if name != "RECONSTRUCTION_LOSS":
        return model_settings[name] == "auto"
    architecture = model_settings.get("ARCHITECTURE", "default")
    return models.reconstruction_loss_kind(architecture, model_settings[name]) == models.reconstruction_loss_kind(architecture)


def generator_schedule(model_settings, fraction, full_data_epochs):
    """Epochs and KL warm-up for a generator trained on a fraction of the data.

    Counted in epochs, a generator on 10% of the images would take a tenth of the steps of one
    on all of them: its samples are then the blobs of an early epoch (seen in the sample grids
    of the first measurement), which teach a classifier the wrong anatomy. So both the epochs
    and the KL warm-up are stretched by 1 / fraction: every generator takes as many steps.
    """
    epochs = max(1, int(round(full_data_epochs / fraction)))
    warmup = int(round(model_settings.get("KL_WARMUP_EPOCHS", 0) / fraction))
    return epochs, min(warmup, epochs)


def generator_for_fraction(work_dir, processed_dir, image_size, class_names, facts, train_paths, subset,
                           model_settings, generator_epochs, synthetic_per_class, seed, fraction):
    """Train a CVAE on one fraction of the train split and generate from it; reuse an earlier one."""
    generated_dir = work_dir / "generated" / size_folder_name(image_size)
    epochs, warmup = generator_schedule(model_settings, fraction, generator_epochs)
    copied = [f"--{name.lower()}={model_settings[name]}" for name in COPIED_TRAINING_SETTINGS
              if name in model_settings and not is_default_choice(model_settings, name)]
    training_arguments = [f"--image_size={image_size}", *copied, f"--epochs={epochs}", f"--kl_warmup_epochs={warmup}",
                          f"--sample_every={max(1, epochs // 5)}", f"--seed={seed}"]
    subset_fingerprint = f"{facts['fingerprint'][:16]}-subset-{len(subset)}-seed{seed}"
    # Reused only if trained with exactly these settings (a retrained evaluated model may differ).
    done_path = work_dir / "done.json"
    if done_path.is_file() and json.loads(done_path.read_text(encoding="utf-8")).get("training_arguments") == training_arguments:
        return generated_dir
    done_path.unlink(missing_ok=True)
    (work_dir / "scores.json").unlink(missing_ok=True)
    fraction_processed = work_dir / "processed"
    if fraction_processed.exists():
        shutil.rmtree(fraction_processed)
    size_dir = fraction_processed / size_folder_name(image_size)
    for index in subset:
        source = Path(train_paths[index])
        target = size_dir / "train" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for class_name in class_names:
        (size_dir / "train" / class_name).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(processed_dir).parent / "raw_image_statistics.csv", fraction_processed / "raw_image_statistics.csv")
    write_json_atomic(size_dir / FACTS_FILE_NAME, dict(facts, fingerprint=subset_fingerprint))
    script = f"cvae_training_{size_folder_name(image_size)}"
    if not (SCRIPTS_DIR / f"{script}.py").exists():
        script = "cvae_training_224x224"
    # A generator killed part-way (each one takes a quarter of an hour at 224) resumes from its
    # last finished epoch, as the training script does for a user, when it was started with the
    # same arguments on the same images; otherwise it starts again from nothing.
    started_path = work_dir / "started.json"
    started = {"training_arguments": training_arguments, "subset_fingerprint": subset_fingerprint}
    if not (started_path.is_file() and json.loads(started_path.read_text(encoding="utf-8")) == started):
        for folder in ("models", "latents"):
            if (work_dir / folder).exists():
                shutil.rmtree(work_dir / folder)
        write_json_atomic(started_path, started)
    if (work_dir / "generated").exists():
        shutil.rmtree(work_dir / "generated")
    if not (work_dir / "models" / size_folder_name(image_size) / "cvae_parameters.json").is_file():
        try:
            run_script(script, [*training_arguments,
                                f"--processed_images_dir={fraction_processed}", f"--models_dir={work_dir / 'models'}",
                                f"--latent_tensors_dir={work_dir / 'latents'}"])
        except RuntimeError:
            # The script refused or diverged: the next attempt starts from nothing rather than
            # meeting the same refusal or the same checkpoint again. A kill is not a RuntimeError.
            started_path.unlink()
            raise
    run_script("cvae_inference", [f"--image_size={image_size}", f"--images_per_class={synthetic_per_class}",
                                  "--restore_aspect=False", "--figures=False", f"--seed={seed}",
                                  f"--processed_images_dir={fraction_processed}", f"--models_dir={work_dir / 'models'}",
                                  f"--latent_tensors_dir={work_dir / 'latents'}",
                                  f"--generated_images_dir={work_dir / 'generated'}"])
    write_json_atomic(done_path, {"training_images": int(len(subset)), "epochs": epochs, "kl_warmup_epochs": warmup,
                                  "training_arguments": training_arguments})
    return generated_dir


def scores(model, images, labels, class_count):
    predicted = predict(model, images)[0].argmax(axis=1)
    return {
        "macro_f1": float(f1_score(labels, predicted, average="macro", labels=range(class_count), zero_division=0)),
        "recall_per_class": recall_score(labels, predicted, average=None, labels=range(class_count),
                                         zero_division=0).tolist(),
    }


def usefulness_experiment(processed_dir, work_root, image_size, class_names, facts, model_settings, full_generated_dir,
                          fractions, seeds, classifier_size, classifier_epochs, generator_epochs, synthetic_per_class,
                          log=print, seeds_at_full_data=None, classifier_repeats=1):
    """Real only vs real + synthetic vs synthetic only, per fraction and seed; returns means, spreads and runs.

    Every classifier of a run takes the same number of optimisation steps: classifier_epochs
    passes over the real + synthetic set. Counting epochs instead would give the larger
    real + synthetic set more steps, and its advantage would partly be longer training.

    A run's score is the mean over classifier_repeats classifiers that differ only in their
    initialisation and batch order. On 10% of the phantoms two such classifiers of the same
    images scored 0.846 and 0.789: one classifier per run measures its initialisation as much
    as the data it was given, and the effect of synthetic data is smaller than that.
    """
    class_count = len(class_names)
    train_paths, train_labels = list_images(Path(processed_dir) / "train", class_names)
    test_paths, test_labels = list_images(Path(processed_dir) / "test", class_names)
    train_images = load_images(train_paths, classifier_size)
    test_images = load_images(test_paths, classifier_size)
    results = {}
    for fraction in fractions:
        runs = []
        for seed in range(seeds if fraction < 1.0 or seeds_at_full_data is None else seeds_at_full_data):
            subset = stratified_subset(train_labels, fraction, seed)
            scores_path, scores_key = None, None
            if fraction >= 1.0:
                generated_dir = full_generated_dir
            else:
                work_dir = Path(work_root) / f"fraction_{fraction}_seed_{seed}"
                generated_dir = generator_for_fraction(work_dir, processed_dir, image_size, class_names, facts,
                                                       train_paths, subset, model_settings, generator_epochs,
                                                       synthetic_per_class, seed, fraction)
                # A fraction's scores are kept beside its generator (which clears them when it is
                # trained again): finishing an interrupted experiment then costs only what is left.
                scores_path = work_dir / "scores.json"
                scores_key = {"classifier_size": classifier_size, "classifier_epochs": classifier_epochs,
                              "classifier_repeats": classifier_repeats, "synthetic_per_class": synthetic_per_class,
                              "real_images": int(len(subset)), "test_images": int(len(test_labels))}
                if scores_path.is_file():
                    kept = json.loads(scores_path.read_text(encoding="utf-8"))
                    if kept.get("key") == scores_key:
                        runs.append(kept["run"])
                        log(f"usefulness at {fraction:.0%} of the real data, seed {seed}: scores reused from {scores_path}")
                        continue
            synthetic_paths, synthetic_labels = list_images(generated_dir, class_names, synthetic_per_class)
            synthetic_images = load_images(synthetic_paths, classifier_size)
            real_images, real_labels = train_images[subset], train_labels[subset]
            variants = {
                "real_only": (real_images, real_labels),
                "real_plus_synthetic": (np.concatenate([real_images, synthetic_images]),
                                        np.concatenate([real_labels, synthetic_labels])),
                "synthetic_only": (synthetic_images, synthetic_labels),
            }
            run = {"seed": seed, "real_images": int(len(subset)), "synthetic_images": int(len(synthetic_labels)),
                   "classifier_repeats": classifier_repeats}
            largest = max(len(labels) for _, labels in variants.values())
            for name, (images, labels) in variants.items():
                epochs = max(1, int(round(classifier_epochs * largest / len(labels))))
                # Repeat 0 uses the run's seed, as a single classifier did before repeats existed.
                repeats = [scores(train_classifier(images, labels, class_count, epochs, seed + 1000 * repeat),
                                  test_images, test_labels, class_count) for repeat in range(classifier_repeats)]
                run[name] = {"macro_f1": float(np.mean([result["macro_f1"] for result in repeats])),
                             "macro_f1_per_repeat": [result["macro_f1"] for result in repeats],
                             "recall_per_class": np.mean([result["recall_per_class"] for result in repeats],
                                                         axis=0).tolist()}
            log(f"usefulness at {fraction:.0%} of the real data, seed {seed}: macro-F1 real only "
                f"{run['real_only']['macro_f1']:.3f}, real + synthetic {run['real_plus_synthetic']['macro_f1']:.3f}, "
                f"synthetic only {run['synthetic_only']['macro_f1']:.3f}")
            if scores_path is not None:
                write_json_atomic(scores_path, {"key": scores_key, "run": run})
            runs.append(run)
        summary = {"runs": runs, "classifier_repeats": classifier_repeats,
                   # Paired by seed (same real images, same generator): the spread of the means hides this.
                   "gain_per_seed": [run["real_plus_synthetic"]["macro_f1"] - run["real_only"]["macro_f1"] for run in runs]}
        for name in ("real_only", "real_plus_synthetic", "synthetic_only"):
            values = np.array([run[name]["macro_f1"] for run in runs])
            summary[f"{name}_f1"] = float(values.mean())
            summary[f"{name}_f1_std"] = float(values.std())
            recalls = np.array([run[name]["recall_per_class"] for run in runs]).mean(axis=0)
            summary[f"{name}_recall_per_class"] = dict(zip(class_names, recalls.tolist()))
        results[str(fraction)] = summary
    return results


def load_model_settings(models_dir, image_size):
    path = Path(models_dir) / size_folder_name(image_size) / "cvae_parameters.json"
    return json.loads(path.read_text(encoding="utf-8"))["settings"] if path.is_file() else {}
