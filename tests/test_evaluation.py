"""The quality measures on hand-made cases with known answers, and the evaluation script end to end."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cilia_cvae import metrics
from conftest import REPOSITORY_ROOT, SCRIPTS_DIR, run_script

HELPERS_DIR = REPOSITORY_ROOT / "tests" / "helpers"


@pytest.fixture
def two_clouds():
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (400, 16))
    same = rng.normal(0, 1, (400, 16))
    shifted = rng.normal(1.5, 1, (400, 16))
    return real, same, shifted


def test_kid_is_near_zero_for_the_same_distribution_and_large_for_another(two_clouds):
    real, same, shifted = two_clouds
    kid_same, spread = metrics.kernel_inception_distance(real, same)
    kid_shifted, _ = metrics.kernel_inception_distance(real, shifted)
    assert abs(kid_same) < 3 * spread + 1e-3
    assert kid_shifted > 20 * abs(kid_same) and kid_shifted > 0.05
    assert abs(metrics.kernel_inception_distance(real, real.copy())[0]) < kid_shifted / 10, "identical sets"


def test_a_feature_dead_on_real_images_counts_but_cannot_explode_kid_or_fid():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 16))
    real[:, 0] = 0.0  # a judge feature that never fires on real images
    test = rng.normal(size=(300, 16))
    test[:, 0] = 0.0
    generated = rng.normal(size=(300, 16))
    generated[:, 0] = 5.0  # generated images that switch it on
    centre, scale = metrics.feature_standardiser(real)
    assert scale[0] > 0.05 and np.allclose(scale[1:], real[:, 1:].std(axis=0))
    kid_real, _ = metrics.kernel_inception_distance((test - centre) / scale, (real - centre) / scale)
    kid_generated, _ = metrics.kernel_inception_distance(
        (generated - centre) / scale, (real - centre) / scale
    )
    fid_generated = metrics.frechet_distance((generated - centre) / scale, (real - centre) / scale)
    assert abs(kid_real) < 0.05 < kid_generated and np.isfinite(kid_generated)
    # Ten median spreads in one feature: a large but bounded distance (the bare spread made it astronomically large).
    assert 50 < fid_generated < 1e4


def test_fid_orders_distributions(two_clouds):
    real, same, shifted = two_clouds
    assert metrics.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(real, same) < 1.0 < metrics.frechet_distance(real, shifted)
    assert metrics.frechet_distance(real, shifted) == pytest.approx(16 * 1.5**2, rel=0.15)


def test_precision_recall_and_coverage(two_clouds):
    real, same, shifted = two_clouds
    precision, recall = metrics.precision_recall(real, same)
    assert precision > 0.7 and recall > 0.7
    collapsed = np.repeat(real[:1], 400, axis=0) + 1e-3
    precision, recall = metrics.precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.05, "mode collapse: realistic but no variety"
    precision, _ = metrics.precision_recall(real, shifted)
    _, coverage = metrics.density_coverage(real, shifted)
    _, coverage_same = metrics.density_coverage(real, same)
    assert precision < 0.5 and coverage < coverage_same


def test_fidelity_of_shuffled_labels_is_low():
    rng = np.random.default_rng(1)
    requested = np.repeat(np.arange(5), 100)
    overall, per_class = metrics.class_fidelity(requested, requested, 5)
    assert overall == 1.0 and per_class == [1.0] * 5
    overall, per_class = metrics.class_fidelity(rng.permutation(requested), requested, 5)
    assert overall < 0.35 and max(per_class) < 0.45


def test_copies_of_training_images_are_flagged_as_memorised():
    rng = np.random.default_rng(2)
    train, test = rng.normal(0, 1, (300, 8)), rng.normal(0, 1, (100, 8))
    copies = train[:100] + rng.normal(0, 1e-4, (100, 8))
    fresh = rng.normal(0, 1, (100, 8))
    copied = metrics.memorisation(train, test, copies)
    healthy = metrics.memorisation(train, test, fresh)
    assert copied["near_copy_share"] == 1.0 and copied["memorisation_ratio"] < 0.01
    assert healthy["near_copy_share"] < 0.05 and 0.8 < healthy["memorisation_ratio"] < 1.25
    assert healthy["test_near_copy_share"] < 0.05


def test_pixel_space_memorisation_sees_brighter_smoothed_copies_and_passes_new_images():
    rng = np.random.default_rng(3)
    # Images with structure at a few pixels' scale, as crops have (8 x 8 cells of 8 px).
    train, test, fresh = (
        np.kron(rng.uniform(0, 255, (count, 8, 8)), np.ones((8, 8))) for count in (120, 40, 40)
    )
    # A decoder's copy: the training image a little brighter, lower in contrast and smoothed.
    smoothed = (train[:40] + np.roll(train[:40], 1, axis=1) + np.roll(train[:40], 1, axis=2)) / 3
    copies = 0.8 * smoothed + 30
    vectors = {name: metrics.pixel_vectors(images) for name, images in (("train", train), ("test", test))}
    copied = metrics.memorisation(vectors["train"], vectors["test"], metrics.pixel_vectors(copies))
    healthy = metrics.memorisation(vectors["train"], vectors["test"], metrics.pixel_vectors(fresh))
    assert metrics.pixel_vectors(train).shape == (120, metrics.PIXEL_SIDE**2)
    assert copied["near_copy_share"] == 1.0 and copied["memorisation_ratio"] < 0.5
    assert healthy["near_copy_share"] == 0.0 and 0.9 < healthy["memorisation_ratio"] < 1.1
    # A size that is no multiple of the side is compared whole rather than refused.
    assert metrics.pixel_vectors(train[:, :50, :50]).shape == (120, 2500)


def test_a_turned_or_mirrored_copy_is_a_copy_and_its_nearest_crop_is_its_source():
    rng = np.random.default_rng(4)
    train, test = (np.kron(rng.uniform(0, 255, (count, 8, 8)), np.ones((8, 8))) for count in (60, 30))
    # Variations are drawn in any of eight orientations: turned copies of training crops 0-29.
    turned = np.stack([np.rot90(train[index], 1 + index % 3)[:, ::-1] for index in range(30)])
    upright = metrics.pixel_vectors(train)
    eight = metrics.pixel_vectors_in_eight_orientations(train)
    assert eight.shape == (8 * 60, metrics.PIXEL_SIDE**2) and np.array_equal(eight[:60], upright)
    test_vectors, turned_vectors = metrics.pixel_vectors(test), metrics.pixel_vectors(turned)
    # Against upright crops alone a turned copy passes for new; against the eight orientations it is a copy.
    assert metrics.memorisation(upright, test_vectors, turned_vectors)["near_copy_share"] == 0.0
    caught = metrics.memorisation(eight, test_vectors, turned_vectors)
    assert caught["near_copy_share"] == 1.0 and caught["memorisation_ratio"] < 0.1
    sources = [{index} for index in range(30)]
    assert metrics.nearest_is_source_share(eight, turned_vectors, sources, 60) == 1.0
    assert (
        metrics.nearest_is_source_share(eight, turned_vectors, [{index + 30} for index in range(30)], 60)
        == 0.0
    )
    # Images without a recorded source are left out; none at all gives no share.
    assert metrics.nearest_is_source_share(eight, turned_vectors, [None] * 15 + sources[15:], 60) == 1.0
    assert metrics.nearest_is_source_share(eight, turned_vectors, [None] * 30, 60) is None


def test_the_manifest_names_each_images_source_crops(tmp_path):
    from pathlib import Path

    from cilia_cvae.evaluation import source_indices

    train = [Path(f"train/{name}") for name in ("CP/a.png", "CP/b.png", "ODA/c.png", "ODA/d.png")]
    generated = [tmp_path / "CP" / f"Synthetic_CP_0000{number}.png" for number in (1, 2, 3)]
    generated.append(tmp_path / "ODA" / "Synthetic_ODA_00001.png")
    (tmp_path / "generation_manifest.csv").write_text(
        "file,class,sampling,source_latent_index,counterfactual_source,second_source\n"
        "CP/Synthetic_CP_00001.png,CP,variation,1,CP/b.png,CP/a.png\n"
        "CP/Synthetic_CP_00002.png,CP,posterior,1,,\n"
        "CP/Synthetic_CP_00003.png,CP,diffusion,-1,,\n"
        "ODA/Synthetic_ODA_00001.png,ODA,posterior,0,,\n"
    )
    # A posterior draw's source is the class's crop at its latent's row (crops in name order).
    assert source_indices(tmp_path, generated, train) == [{0, 1}, {1}, None, {2}]
    assert source_indices(tmp_path / "none", generated, train) == [None] * 4


def _class_image(label, seed, size=32):
    """Three easy classes: a dark disc, a dark ring, two dots; noise and position vary."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    cy, cx = size / 2 + rng.normal(0, 1.5, 2)
    radius = np.hypot(y - cy, x - cx)
    image = np.full((size, size), 200.0)
    if label == 0:
        image[radius < size / 4] = 60
    elif label == 1:
        image[np.abs(radius - size / 4) < 2] = 60
    else:
        image[np.hypot(y - cy, x - cx + 6) < 3] = 60
        image[np.hypot(y - cy, x - cx - 6) < 3] = 60
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def test_evaluation_script_scores_real_images_as_generated_ones_highly(tmp_path):
    class_names = ["Disc", "Ring", "Dots"]
    processed = tmp_path / "processed"
    size_dir = processed / "32x32"
    seed = 0
    for split, count in (("train", 80), ("test", 20)):
        for label, name in enumerate(class_names):
            (size_dir / split / name).mkdir(parents=True)
            for index in range(count):
                seed += 1
                Image.fromarray(_class_image(label, seed)).save(
                    size_dir / split / name / f"{name}_{index}.png"
                )
    (size_dir / "preprocessing.json").write_text(
        json.dumps(
            {
                "image_size": 32,
                "resize_mode": "squash",
                "class_names": class_names,
                "fingerprint": "abc123",
                "counts": {},
            }
        )
    )
    generated = tmp_path / "generated"
    for label, name in enumerate(class_names):
        (generated / "32x32" / name).mkdir(parents=True)
        for index in range(20):
            seed += 1
            Image.fromarray(_class_image(label, seed)).save(
                generated / "32x32" / name / f"Synthetic_{name}_{index:05d}.png"
            )
    arguments = (
        f"--processed_images_dir={processed}",
        f"--generated_images_dir={generated}",
        f"--models_dir={tmp_path / 'models'}",
        "--image_size=32",
        "--classifier_size=32",
        "--classifier_epochs=12",
        "--seed=1",
    )
    finished = run_script("cvae_evaluate", *arguments)
    assert finished.returncode == 0, finished.stderr
    report = json.loads((generated / "32x32" / "evaluation_report.json").read_text())
    assert report["real_accuracy"] > 0.9
    assert report["class_fidelity"] > 0.85
    assert abs(report["kid"] - report["kid_floor"]) < 0.05
    assert report["memorisation_ratio"] > 0.8 and report["near_copy_share"] == 0.0
    assert (generated / "32x32" / "evaluation_report.md").is_file()
    assert (generated / "32x32" / "evaluation_fidelity.png").is_file()
    assert not report["judge_reused_from_cache"]

    # Mislabelled generated images: the same files under the wrong class names.
    for name in class_names:
        shutil.move(generated / "32x32" / name, generated / "32x32" / f"{name}_old")
    for index, name in enumerate(class_names):
        shutil.move(generated / "32x32" / f"{name}_old", generated / "32x32" / class_names[(index + 1) % 3])
    finished = run_script("cvae_evaluate", *arguments)
    assert finished.returncode == 0, finished.stderr
    report = json.loads((generated / "32x32" / "evaluation_report.json").read_text())
    assert report["judge_reused_from_cache"], "the judge is cached by the split's fingerprint"
    assert report["class_fidelity"] < 0.2

    # --generated_size picks another resolution's folder (as the 448 model's) and judges it against
    # the same splits and judge. The pictures are 32 px here: this tiny judge, trained on noisy 32 px
    # images, calls a downsampled 64 px ring a disc, so resampling is checked on the real data instead
    # (real 448 test images through the 224 judge, in the README).
    for label, name in enumerate(class_names):
        (generated / "64x64" / name).mkdir(parents=True)
        for index in range(20):
            seed += 1
            Image.fromarray(_class_image(label, seed)).save(
                generated / "64x64" / name / f"Synthetic_{name}_{index:05d}.png"
            )
    finished = run_script("cvae_evaluate", *arguments, "--generated_size=64")
    assert finished.returncode == 0, finished.stderr
    report = json.loads((generated / "64x64" / "evaluation_report.json").read_text())
    assert report["judge_reused_from_cache"] and report["class_fidelity"] > 0.85


def test_missing_generated_images_is_a_clear_error(tmp_path):
    size_dir = tmp_path / "processed" / "32x32"
    size_dir.mkdir(parents=True)
    (size_dir / "preprocessing.json").write_text(json.dumps({"class_names": ["A", "B"], "fingerprint": "x"}))
    finished = run_script(
        "cvae_evaluate",
        f"--processed_images_dir={tmp_path / 'processed'}",
        f"--generated_images_dir={tmp_path / 'generated'}",
        "--image_size=32",
    )
    assert finished.returncode == 2 and "cvae_inference.py" in finished.stderr


def test_a_fraction_generator_takes_the_steps_of_a_full_data_one():
    from cilia_cvae.usefulness import generator_schedule

    # 10% of the data: 10x the epochs and 10x the warm-up epochs, the same steps for both.
    assert generator_schedule({"KL_WARMUP_EPOCHS": 5}, 0.1, 20) == (200, 50)
    assert generator_schedule({"KL_WARMUP_EPOCHS": 5}, 0.25, 20) == (80, 20)
    assert generator_schedule({"KL_WARMUP_EPOCHS": 5}, 1.0, 20) == (20, 5)
    # The warm-up never outlasts the training.
    assert generator_schedule({"KL_WARMUP_EPOCHS": 40}, 0.5, 10) == (20, 20)


def _stand_in_usefulness(tmp_path):
    """The usefulness script beside stand-ins for the training and inference scripts, which record
    each call, on 4 + 4 training and 2 + 2 test images of two classes: (run, calls, work_dir)."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(SCRIPTS_DIR / "cvae_usefulness.py", scripts)
    for name in ("cvae_training_224x224", "cvae_inference"):
        shutil.copy(HELPERS_DIR / "stand_in_pipeline_script.py", scripts / f"{name}.py")
    processed = tmp_path / "processed" / "32x32"
    class_names = ["Normal", "ODA"]
    for split, count in (("train", 4), ("test", 2)):
        for label, class_name in enumerate(class_names):
            for index in range(count):
                path = processed / split / class_name / f"{class_name}_{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (32, 32), 60 + 120 * label).save(path)
    (processed / "preprocessing.json").write_text(
        json.dumps(
            {
                "image_size": 32,
                "class_names": class_names,
                "fingerprint": "0123456789abcdef0123",
                "counts": {},
            }
        )
    )
    (tmp_path / "processed" / "raw_image_statistics.csv").write_text("image,width,height\n")
    models, calls_path = tmp_path / "models", tmp_path / "calls.jsonl"
    work_dir = models / "usefulness" / "32x32_default_2full_epochs_0123456789ab" / "fraction_0.5_seed_0"

    def run_usefulness(training, model_settings=None, latent_prior=None):
        """The experiment at 50% with one seed; training is what the training stand-in does."""
        (models / "32x32").mkdir(parents=True, exist_ok=True)
        parameters = {"settings": model_settings or DEFAULT_STAND_IN_SETTINGS}
        if latent_prior:
            parameters["latent_prior"] = latent_prior
        (models / "32x32" / "cvae_parameters.json").write_text(json.dumps(parameters))
        return subprocess.run(
            [
                sys.executable,
                str(scripts / "cvae_usefulness.py"),
                "--image_size=32",
                "--fractions=0.5",
                "--seeds=1",
                "--classifier_size=32",
                "--classifier_epochs=1",
                "--classifier_repeats=1",
                "--generator_epochs=2",
                "--synthetic_per_class=4",
                f"--processed_images_dir={tmp_path / 'processed'}",
                f"--generated_images_dir={tmp_path / 'generated'}",
                f"--models_dir={models}",
                f"--output_json={tmp_path / 'usefulness.json'}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(
                os.environ,
                PYTHONPATH=str(SCRIPTS_DIR),
                TF_CPP_MIN_LOG_LEVEL="2",
                STAND_IN_TRAINING=training,
                STAND_IN_CALLS=str(calls_path),
            ),
            # A suite started in the background (`make test &`) inherits an ignored SIGINT, and
            # the stand-in's Ctrl-C would then be lost: the experiment gets Python's own handler.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def calls():
        lines = calls_path.read_text().splitlines() if calls_path.is_file() else []
        return [json.loads(line) for line in lines]

    return run_usefulness, calls, work_dir


DEFAULT_STAND_IN_SETTINGS = {"ARCHITECTURE": "default", "KL_WARMUP_EPOCHS": 5}


def test_usefulness_refuses_counterfactuals_of_a_prior_that_cannot_draw_from_pure_noise(tmp_path):
    # Each fraction repeats a counterfactual set as full draws; a prior trained up to 0.7 only
    # (--prior_max_noise_level=0.7) cannot make them, so the experiment is refused before it trains.
    run_usefulness, calls, _ = _stand_in_usefulness(tmp_path)
    manifest = tmp_path / "generated" / "32x32" / "generation_manifest.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(
        "file,class,sampling,temperature,seed,guidance,sampling_steps,edit_strength\n"
        "ODA/Synthetic_ODA_00001.png,ODA,counterfactual,1.0,0,4.0,20,0.5\n"
    )
    prior = {"epochs_done": 3, "settings": {"PRIOR_MAX_NOISE_LEVEL": 0.7}}
    refused = run_usefulness("finish", latent_prior=prior)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "up to 0.7 only" in lines[0], refused.stderr
    assert calls() == []


def test_usefulness_with_diffusion_trains_each_fractions_prior_and_draws_from_it(tmp_path):
    run_usefulness, calls, work_dir = _stand_in_usefulness(tmp_path)
    # The evaluated images were drawn by a latent prior at guidance 4.
    manifest = tmp_path / "generated" / "32x32" / "generation_manifest.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(
        "file,class,sampling,temperature,seed,guidance,sampling_steps\n"
        "Normal/Synthetic_Normal_00001.png,Normal,diffusion,1.0,0,4.0,20\n"
    )
    refused = run_usefulness("finish")
    assert refused.returncode == 2 and "records none" in refused.stderr.strip().splitlines()[-1]
    prior = {"epochs_done": 3, "settings": {"PRIOR_LEARNING_RATE": 0.001}}
    finished = run_usefulness("finish", latent_prior=prior)
    assert finished.returncode == 0, finished.stderr[-3000:]
    made = calls()
    assert [call["script"] for call in made] == ["cvae_training_224x224"] * 2 + ["cvae_inference"]
    # The second training call is the prior's stage alone, on half the crops for twice the epochs.
    assert "--continue_finished=True" in made[1]["arguments"] and "--prior_epochs=6" in made[1]["arguments"]
    assert "--prior_learning_rate=0.001" in made[1]["arguments"]
    assert {"--sampling=diffusion", "--guidance=4.0", "--sampling_steps=20"} <= set(made[2]["arguments"])
    assert (work_dir / "generated_diffusion_temperature1.0_guidance4.0_sampling_steps20").is_dir()
    # Run again: the fraction's generator, prior, images and scores are reused.
    again = run_usefulness("finish", latent_prior=prior)
    assert again.returncode == 0 and len(calls()) == 3 and "scores reused from" in again.stdout


def test_a_killed_fraction_generator_resumes_and_a_finished_one_is_reused(tmp_path):
    from cilia_cvae.usefulness import stratified_subset

    run_usefulness, calls, work_dir = _stand_in_usefulness(tmp_path)
    checkpoint = work_dir / "models" / "32x32" / "checkpoints" / "epoch.weights.h5"
    default_settings = DEFAULT_STAND_IN_SETTINGS

    killed = run_usefulness("kill")
    assert killed.returncode == 130, killed.stderr[-3000:]
    finished = run_usefulness("finish")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert calls()[1]["checkpoint"] == "epochs 1-3", "the killed run's checkpoint was kept for it to resume"
    assert [call["script"] for call in calls()] == [
        "cvae_training_224x224",
        "cvae_training_224x224",
        "cvae_inference",
    ]
    subset = stratified_subset(np.repeat([0, 1], 4), 0.5, 0)
    assert sorted(
        path.name for path in (work_dir / "processed" / "32x32" / "train" / "ODA").iterdir()
    ) == sorted(f"ODA_{index - 4}.png" for index in subset if index >= 4)
    results = json.loads((tmp_path / "usefulness.json").read_text())
    assert results["usefulness"]["0.5"]["runs"][0]["synthetic_images"] == 8, "the fraction's generated images"
    # Finished: reused without training or generating again; spelling out the default loss changes nothing.
    reused = run_usefulness("finish", {**default_settings, "RECONSTRUCTION_LOSS": "calibrated_gaussian"})
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert len(calls()) == 3 and "scores reused from" in reused.stdout
    # A trained model whose images were not generated yet (killed in between) is not trained again.
    (work_dir / "done.json").unlink()
    assert run_usefulness("finish").returncode == 0
    assert [call["script"] for call in calls()[3:]] == ["cvae_inference"]
    # Other settings: the old run is cleared and training starts from nothing.
    checkpoint.write_text("a run with the old settings")
    killed = run_usefulness("kill", {**default_settings, "RECONSTRUCTION_LOSS": "sum_squared_error"})
    assert killed.returncode == 130, killed.stderr[-3000:]
    assert [call["checkpoint"] for call in calls() if call["behaviour"] == "kill"] == [None, None], (
        "the run with other settings was cleared before training"
    )
    assert not (work_dir / "models" / "32x32" / "cvae_parameters.json").exists()
    # A run the training script refuses (exit code 2) is not resumed by the next attempt.
    refused = run_usefulness("refuse")
    assert refused.returncode == 1 and "RuntimeError" in refused.stderr, refused.stderr[-3000:]
    assert not (work_dir / "started.json").exists()


def test_usefulness_draws_each_fraction_as_the_evaluated_images_were_drawn(tmp_path):
    from cilia_cvae import usefulness

    assert usefulness.sampling_of(tmp_path / "missing.csv") == {"sampling": "posterior"}
    manifest = tmp_path / "generation_manifest.csv"
    manifest.write_text(
        "file,class,sampling,temperature,seed,guidance,sampling_steps\n"
        "CP/Synthetic_CP_00001.png,CP,diffusion,1.0,0,2.0,20\n"
    )
    sampling = usefulness.sampling_of(manifest)
    assert usefulness.inference_arguments(sampling) == [
        "--sampling=diffusion",
        "--temperature=1.0",
        "--guidance=2.0",
        "--sampling_steps=20",
    ]
    manifest.write_text(
        "file,class,sampling,temperature,seed,guidance,sampling_steps,edit_strength,mix_weight,filter_threshold\n"
        "CP/Synthetic_CP_00001.png,CP,variation,1.0,0,4.0,20,0.5,0.5,0.5\n"
    )
    # A variation set is drawn as variations of the fraction's own crops, by its own prior.
    assert usefulness.inference_arguments(usefulness.sampling_of(manifest)) == [
        "--sampling=variation",
        "--temperature=1.0",
        "--guidance=4.0",
        "--sampling_steps=20",
        "--variation_strength=0.5",
        "--variation_mix=0.5",
        "--class_filter=True",
        "--class_filter_threshold=0.5",
    ]
    # A manifest from before the diffusion columns: posterior draws, as they were.
    manifest.write_text("file,class,sampling,temperature,seed\nCP/a.png,CP,posterior,1.0,0\n")
    assert usefulness.inference_arguments(usefulness.sampling_of(manifest)) == [
        "--sampling=posterior",
        "--temperature=1.0",
    ]
    record = {
        "epochs_done": 7,
        "settings": {"PRIOR_EPOCHS": 7, "PRIOR_LEARNING_RATE": 0.001, "PRIOR_WIDTH": 32},
    }
    arguments = usefulness.prior_training_arguments(record, 0.1)
    # On a tenth of the crops, ten times the epochs: the same steps as the evaluated prior's.
    assert arguments[:2] == ["--continue_finished=True", "--prior_epochs=70"]
    assert "--prior_learning_rate=0.001" in arguments and "--prior_width=32" in arguments
    assert usefulness.prior_training_arguments(None, 0.1) is None
    # A shorter budget, in epochs of the full data, is stretched the same way.
    assert usefulness.prior_training_arguments(record, 0.1, 3)[1] == "--prior_epochs=30"


def test_usefulness_fractions_outside_zero_to_one_are_refused_in_one_line(tmp_path):
    finished = run_script(
        "cvae_evaluate",
        "--usefulness=True",
        "--usefulness_fractions=0,0.5",
        f"--processed_images_dir={tmp_path}",
        f"--generated_images_dir={tmp_path}",
    )
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    assert (
        "--usefulness_fractions must be shares above 0 and at most 1"
        in finished.stderr.strip().splitlines()[-1]
    )


def test_usefulness_trains_a_generator_per_fraction_and_compares_classifiers(tiny_trained_model, tmp_path):
    folders = tiny_trained_model
    generated = tmp_path / "generated"
    finished = run_script(
        "cvae_inference",
        "--image_size=32",
        "--images_per_class=6",
        "--figures=False",
        f"--processed_images_dir={folders['processed']}",
        f"--models_dir={folders['models']}",
        f"--latent_tensors_dir={folders['latents']}",
        f"--generated_images_dir={generated}",
    )
    assert finished.returncode == 0, finished.stderr
    models = tmp_path / "models"
    shutil.copytree(folders["models"], models)
    evaluation = [
        "cvae_evaluate",
        "--image_size=32",
        "--quick=True",
        "--usefulness=True",
        "--usefulness_seeds=1",
        "--usefulness_classifier_size=32",
        "--usefulness_classifier_epochs=1",
        "--usefulness_classifier_repeats=2",
        "--usefulness_generator_epochs=1",
        "--synthetic_per_class=6",
        f"--processed_images_dir={folders['processed']}",
        f"--generated_images_dir={generated}",
        f"--models_dir={models}",
    ]
    finished = run_script(*evaluation, "--usefulness_fractions=0.5,1.0")
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads((generated / "32x32" / "evaluation_report.json").read_text())
    assert set(report["usefulness"]) == {"0.5", "1.0"}
    for result in report["usefulness"].values():
        for name in ("real_only_f1", "real_plus_synthetic_f1", "synthetic_only_f1"):
            assert 0.0 <= result[name] <= 1.0
        assert result["runs"][0]["synthetic_images"] == 30
        # Two classifiers per run, differing only in initialisation; the run scores their mean.
        for variant in ("real_only", "real_plus_synthetic", "synthetic_only"):
            per_repeat = result["runs"][0][variant]["macro_f1_per_repeat"]
            assert len(per_repeat) == 2 and result["runs"][0][variant]["macro_f1"] == pytest.approx(
                np.mean(per_repeat)
            )
        assert np.mean(result["gain_per_seed"]) == pytest.approx(
            result["real_plus_synthetic_f1"] - result["real_only_f1"]
        )
        assert len(result["gain_per_seed"]) == len(result["runs"])
    assert result["runs"][0]["real_images"] > report["usefulness"]["0.5"]["runs"][0]["real_images"]
    fraction_runs = list((models / "usefulness").glob("*/fraction_0.5_seed_0"))
    assert len(fraction_runs) == 1, "the 50% generator was trained in its own work folder"
    fraction_parameters = json.loads(
        (fraction_runs[0] / "models" / "32x32" / "cvae_parameters.json").read_text()
    )
    assert fraction_parameters["training_images"] == report["usefulness"]["0.5"]["runs"][0]["real_images"]
    # On half the data, 2 epochs: the same number of steps as 1 epoch on all of it.
    assert fraction_parameters["epochs_done"] == 2
    assert "Usefulness" in (generated / "32x32" / "evaluation_report.md").read_text()
    standalone = json.loads((generated / "32x32" / "usefulness_report.json").read_text())
    assert standalone["usefulness"] == report["usefulness"], "the usefulness script's own results, read back"
    # Run again: the fraction's generator and its classifiers' scores are reused, not trained again.
    # The usefulness script alone, with the settings the evaluation gave it: the judge and the
    # distribution measures a second evaluation would repeat cost a minute on the slower machine.
    again = run_script(
        "cvae_usefulness",
        "--image_size=32",
        "--fractions=0.5",
        "--seeds=1",
        "--classifier_size=32",
        "--classifier_epochs=1",
        "--classifier_repeats=2",
        "--generator_epochs=1",
        "--synthetic_per_class=6",
        f"--processed_images_dir={folders['processed']}",
        f"--generated_images_dir={generated}",
        f"--models_dir={models}",
        f"--output_json={tmp_path / 'usefulness_again.json'}",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "seed 0: scores reused from" in again.stdout
    rerun = json.loads((tmp_path / "usefulness_again.json").read_text())
    assert rerun["usefulness"]["0.5"]["runs"] == report["usefulness"]["0.5"]["runs"]


def test_compare_trains_each_contender_once_and_writes_the_comparison(tiny_trained_model, tmp_path):
    from cilia_cvae import readme_tables

    folders, work = tiny_trained_model, tmp_path / "comparison"
    output, figure = tmp_path / "evaluation_32.json", tmp_path / "picture.png"
    arguments = [
        "--image_size=32",
        "--epochs=1",
        "--prior_epochs=1",
        "--contenders=default,variation_strength_0.3,real_test",
        "--images_per_class=8",  # every test image of the tiny split, so the control is the whole split
        "--quick=True",
        f"--work_dir={work}",
        f"--processed_images_dir={folders['processed']}",
        f"--output_json={output}",
        f"--figure={figure}",
        f"--contenders_figure={tmp_path / 'contenders.png'}",
    ]
    finished = run_script("cvae_compare", *arguments, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:] + finished.stdout[-2000:]
    comparison = json.loads(output.read_text())
    candidates = comparison["candidates"]
    assert set(candidates) == {"variation_strength_0.3", "real_test"}
    assert comparison["epochs"] == 1
    for result in (comparison["default"], candidates["variation_strength_0.3"]):
        for key in (
            "real_accuracy",
            "class_fidelity",
            "class_fidelity_per_class",
            "fid",
            "kid",
            "kid_floor",
            "memorisation_ratio",
            "near_copy_share",
            "test_near_copy_share",
            "pixel_memorisation_ratio",
            "pixel_near_copy_share",
            "usefulness",
        ):
            assert key in result, key
        assert set(result["class_fidelity_per_class"]) == {"CP", "Disarranged", "IDA", "Normal", "ODA"}
    assert comparison["default"]["training"]["architecture"] == "default"
    assert candidates["variation_strength_0.3"]["inference"]["overrides"] == [
        "--sampling=variation",
        "--variation_strength=0.3",
        "--guidance=4",
    ]
    # A variation is nearest to a training crop; whether it is its own source is measured.
    assert 0 <= candidates["variation_strength_0.3"]["pixel_nearest_is_source_share"] <= 1
    # A sampling candidate reuses the default's training instead of training again: the
    # variation candidate trained the default's latent prior, as a second stage, and drew from it.
    assert not (work / "variation_strength_0.3" / "models").exists()
    assert candidates["variation_strength_0.3"]["latent_prior"]["epochs_done"] == 1
    assert (work / "default" / "models" / "32x32" / "latent_prior.keras").is_file()
    manifest = (
        work / "variation_strength_0.3" / "generated" / "32x32" / "generation_manifest.csv"
    ).read_text()
    assert "variation" in manifest
    assert (work / "variation_strength_0.3" / "generated" / "32x32" / "evaluation_report.json").is_file()
    # The control is the real test split judged as generated images: the judge's own accuracy,
    # a memorisation ratio of exactly 1, and no distribution measures against itself.
    control = candidates["real_test"]
    assert control["class_fidelity"] == pytest.approx(control["real_accuracy"])
    assert control["memorisation_ratio"] == pytest.approx(1.0)
    assert control["near_copy_share"] == control["test_near_copy_share"]
    assert "kid" not in control and "precision" not in control and "training" not in control
    assert figure.is_file()
    assert (tmp_path / "contenders.png").is_file(), "every contender's first images side by side"
    assert (
        comparison["commands"] == [comparison["command"]]
        and "--contenders=default,variation_strength_0.3" in comparison["command"]
    )
    table = readme_tables.evaluation_table(output)
    for row in ("| default |", "| variation_strength_0.3 |", "| real_test |"):
        assert row in table
    assert "`--sampling=variation --variation_strength=0.3 --guidance=4`" in table
    headline = readme_tables.headline_table(output)
    assert "| variation_strength_0.3 |" in headline and "| real_test |" in headline
    # A second run reuses everything: nothing is trained, generated or judged again.
    again = run_script("cvae_compare", *arguments, timeout=600)
    assert again.returncode == 0 and ".py --" not in again.stdout, again.stdout
