"""Training as a user runs it: tiny models at 32 px, every output checked, faults and scale-out.

Each script runs in a subprocess with tiny settings (cleanrl style); the saved models are
reloaded in a fresh process to prove the round trip. The whole file runs in about 3 minutes
on 2 cores (3.3 minutes measured while other programs kept the load average at 3-5).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPOSITORY_ROOT, SCRIPTS_DIR, run_script

HELPERS_DIR = REPOSITORY_ROOT / "tests" / "helpers"

CLASS_NAMES = ["Central pair", "Normal", "ODA"]
SIZE = 32
TINY_MODEL = [
    f"--image_size={SIZE}",
    "--base_channels=4",
    "--max_channels=8",
    "--latent_map_channels=2",
    "--batch_size=8",
    "--sample_every=1",
    "--kl_warmup_epochs=2",
]
# The distributed runs must agree with one device to float32 round-off of summed gradients;
# after a few SGD steps every weight agrees to this absolute tolerance.
DISTRIBUTED_TOLERANCE = 1e-5


def write_processed_split(root, images_per_class=20, test_images_per_class=2):
    """The preprocessing stage's output layout, by hand: a dark ring and a class-placed blob per image."""
    rng = np.random.default_rng(0)
    y, x = (np.mgrid[:SIZE, :SIZE] + 0.5) / SIZE - 0.5
    counts = {"train": {}, "test": {}}
    for label, class_name in enumerate(CLASS_NAMES):
        for split, count in (("train", images_per_class), ("test", test_images_per_class)):
            folder = root / f"{SIZE}x{SIZE}" / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                angle = rng.uniform(0, 2 * np.pi)
                ring = np.abs(np.hypot(x, y) - 0.3) < 0.05
                blob = np.hypot(x - 0.15 * (label - 1) * np.cos(angle), y - 0.15 * np.sin(angle)) < 0.08
                pixels = 200 - 120 * ring - 80 * blob + rng.normal(0, 8, (SIZE, SIZE))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    folder / f"image {index:03d}.png"
                )
            counts[split][class_name] = count
    facts = {
        "image_size": SIZE,
        "resize_mode": "squash",
        "class_names": CLASS_NAMES,
        "counts": counts,
        "fingerprint": "0123abcd",
    }
    (root / f"{SIZE}x{SIZE}" / "preprocessing.json").write_text(json.dumps(facts))
    return root


def folders(base):
    return [
        f"--processed_images_dir={base / 'processed'}",
        f"--models_dir={base / 'models'}",
        f"--latent_tensors_dir={base / 'latents'}",
    ]


def train(base, *arguments, **keywords):
    return run_script("cvae_training_224x224", *TINY_MODEL, *folders(base), *arguments, **keywords)


def history_epochs(path):
    lines = path.read_text().splitlines()[1:] if path.exists() else []
    return [int(line.split(",")[0]) for line in lines]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("finished")
    write_processed_split(base / "processed")
    result = train(base, "--epochs=1")
    assert result.returncode == 0, result.stderr
    return base


def test_one_epoch_run_writes_every_file(finished_run):
    model_dir, latent_dir = finished_run / "models" / "32x32", finished_run / "latents" / "32x32"
    for name in (
        "cvae_encoder.keras",
        "cvae_decoder.keras",
        "cvae_parameters.json",
        "training_history.csv",
        "loss_plot.png",
        "samples_epoch_1.png",
        "best_epoch_1.npz",
    ):
        assert (model_dir / name).is_file(), name
    assert list((model_dir / "logs").glob("events.out.tfevents.*"))
    assert history_epochs(model_dir / "training_history.csv") == [1]
    header = (model_dir / "training_history.csv").read_text().splitlines()[0].split(",")
    for term in ("loss", "reconstruction_loss", "kl_loss"):
        assert term in header and f"val_{term}" in header
    parameters = json.loads((model_dir / "cvae_parameters.json").read_text())
    assert parameters["class_names"] == CLASS_NAMES
    assert (
        parameters["image_size"] == SIZE and parameters["latent_dim"] == 4 * 4 * 2
    )  # a 4 x 4 latent map (stride 8), 2 deep
    assert parameters["resize_mode"] == "squash" and parameters["data_fingerprint"] == "0123abcd"
    assert parameters["epochs_done"] == 1 and parameters["architecture"] == "default"
    assert parameters["settings"]["EPOCHS"] == 1 and "tensorflow" in parameters["library_versions"]
    for class_name in CLASS_NAMES:
        for name in ("z_mean", "z_log_var"):
            latents = np.load(latent_dir / f"{name}_{class_name}.npy", allow_pickle=False)
            assert latents.dtype == np.float32 and latents.shape == (20, 32)


def test_saved_models_reload_identically_in_a_fresh_process(finished_run):
    result = subprocess.run(
        [
            sys.executable,
            str(HELPERS_DIR / "reload_check.py"),
            str(finished_run / "models" / "32x32"),
            str(finished_run / "latents" / "32x32"),
            str(finished_run / "processed"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS_DIR), TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-3000:]


def test_refuses_an_existing_run_without_fresh(finished_run):
    result = train(finished_run, "--epochs=1")
    assert result.returncode == 2
    assert "--fresh=True" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


def test_fresh_moves_the_old_run_aside(finished_run, tmp_path):
    import shutil

    for name in ("processed", "models", "latents"):
        shutil.copytree(finished_run / name, tmp_path / name)
    old_parameters = (tmp_path / "models" / "32x32" / "cvae_parameters.json").read_text()
    result = train(tmp_path, "--epochs=1", "--latent_map_stride=0", "--latent_dim=6", "--fresh=True")
    assert result.returncode == 0, result.stderr
    moved_models = [path for path in (tmp_path / "models").iterdir() if path.name.startswith("32x32_")]
    moved_latents = [path for path in (tmp_path / "latents").iterdir() if path.name.startswith("32x32_")]
    assert len(moved_models) == 1 and len(moved_latents) == 1
    assert (moved_models[0] / "cvae_parameters.json").read_text() == old_parameters
    assert json.loads((tmp_path / "models" / "32x32" / "cvae_parameters.json").read_text())["latent_dim"] == 6


def test_a_finished_run_continues_with_more_epochs_even_after_the_project_moved(finished_run, tmp_path):
    import shutil

    # A run is its settings and data, not its folders: the whole project moved elsewhere continues there.
    shutil.copytree(finished_run, tmp_path / "moved")
    base = tmp_path / "moved"
    model_dir = base / "models" / "32x32"
    first = json.loads((model_dir / "cvae_parameters.json").read_text())
    facts_path = base / "processed" / "32x32" / "preprocessing.json"
    facts = facts_path.read_text()
    other_data = json.dumps(dict(json.loads(facts), fingerprint="another"))
    # Nothing to continue for: the epochs asked for are done; other settings; other data in the same folder.
    for arguments, expected, facts_text in (
        (["--epochs=1"], "--epochs above 1", facts),
        (["--epochs=2", "--learning_rate=0.01"], "(--learning_rate)", facts),
        (["--epochs=2"], "(the preprocessed images (another data fingerprint))", other_data),
    ):
        facts_path.write_text(facts_text)
        result = train(base, *arguments, "--continue_finished=True")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert expected in result.stderr.strip().splitlines()[-1]
        assert (
            json.loads((model_dir / "cvae_parameters.json").read_text()) == first
        )  # left finished, untouched
    facts_path.write_text(facts)
    result = train(base, "--epochs=2", "--continue_finished=True")
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch 1" in result.stdout
    assert history_epochs(model_dir / "training_history.csv") == [1, 2]
    second = json.loads((model_dir / "cvae_parameters.json").read_text())
    assert second["epochs_done"] == 2 and second["training_seconds"] > first["training_seconds"]
    assert not (model_dir / "checkpoints" / "continued_from_parameters.json").exists()
    for class_name in CLASS_NAMES:  # the latents are the continued model's, in the moved project
        assert np.load(base / "latents" / "32x32" / f"z_mean_{class_name}.npy").shape == (20, 32)


def test_a_run_recorded_before_data_fingerprints_compares_its_data_folder():
    from cilia_cvae.runs import changed_settings, comparable_settings

    settings = {"ARCHITECTURE": "default", "EPOCHS": 3, "PROCESSED_IMAGES_DIR": "/data/a", "MODELS_DIR": "/m"}
    comparable = comparable_settings(settings, "abc")
    old_record = {"ARCHITECTURE": "default", "PROCESSED_IMAGES_DIR": "/data/a", "MODELS_DIR": "/elsewhere"}
    assert changed_settings(old_record, comparable, settings) == ""
    assert (
        changed_settings(old_record, comparable, dict(settings, PROCESSED_IMAGES_DIR="/data/b"))
        == "--processed_images_dir"
    )
    assert (
        changed_settings(
            comparable, comparable_settings(dict(settings, PROCESSED_IMAGES_DIR="/data/b"), "abc"), settings
        )
        == ""
    )


def test_refuses_a_size_that_was_not_preprocessed(finished_run):
    result = run_script("cvae_training_224x224", *TINY_MODEL, *folders(finished_run), "--image_size=64")
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert (
        last_line.startswith("error:")
        and "cvae_pre_processing.py" in last_line
        and "Traceback" not in result.stderr
    )


def test_a_diverging_run_stops_with_one_line_and_keeps_no_bad_checkpoint(finished_run, tmp_path):
    result = run_script(
        "cvae_training_224x224",
        *TINY_MODEL,
        "--epochs=2",
        "--learning_rate=1e12",
        f"--processed_images_dir={finished_run / 'processed'}",
        f"--models_dir={tmp_path / 'models'}",
        f"--latent_tensors_dir={tmp_path / 'latents'}",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: the training loss became") and "--learning_rate" in last_line
    assert not (tmp_path / "models" / "32x32" / "cvae_parameters.json").exists()


def test_a_time_budget_stops_between_epochs_and_still_saves_a_model(finished_run, tmp_path):
    # A budget of 0.6 s is over after the first epoch (building the model alone takes longer).
    result = run_script(
        "cvae_training_224x224",
        *TINY_MODEL,
        "--epochs=4",
        "--max_minutes=0.01",
        f"--processed_images_dir={finished_run / 'processed'}",
        f"--models_dir={tmp_path / 'models'}",
        f"--latent_tensors_dir={tmp_path / 'latents'}",
    )
    assert result.returncode == 0, result.stderr
    assert "stopped after epoch 1: another epoch would pass --max_minutes=0.01" in result.stdout
    parameters = json.loads((tmp_path / "models" / "32x32" / "cvae_parameters.json").read_text())
    assert parameters["epochs_done"] == 1
    assert (tmp_path / "models" / "32x32" / "cvae_decoder.keras").is_file()
    # A budget that is not reached changes nothing: every epoch runs.
    result = run_script(
        "cvae_training_224x224",
        *TINY_MODEL,
        "--epochs=2",
        "--max_minutes=60",
        f"--processed_images_dir={finished_run / 'processed'}",
        f"--models_dir={tmp_path / 'roomy'}",
        f"--latent_tensors_dir={tmp_path / 'roomy_latents'}",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "roomy" / "32x32" / "cvae_parameters.json").read_text())["epochs_done"] == 2
    assert "another epoch would pass" not in result.stdout


def test_fixed_variance_loss_is_a_choice_and_recorded(finished_run, tmp_path):
    result = run_script(
        "cvae_training_224x224",
        *TINY_MODEL,
        "--epochs=1",
        "--reconstruction_loss=sum_squared_error",
        f"--processed_images_dir={finished_run / 'processed'}",
        f"--models_dir={tmp_path / 'models'}",
        f"--latent_tensors_dir={tmp_path / 'latents'}",
    )
    assert result.returncode == 0, result.stderr
    parameters = json.loads((tmp_path / "models" / "32x32" / "cvae_parameters.json").read_text())
    assert parameters["reconstruction_loss"] == "sum_squared_error"
    # The sum of squared errors is positive; the calibrated Gaussian's log-variance term is not.
    assert parameters["final_losses"]["last_epoch"]["reconstruction_loss"] > 0
    assert (
        json.loads((finished_run / "models" / "32x32" / "cvae_parameters.json").read_text())[
            "reconstruction_loss"
        ]
        == "calibrated_gaussian"
    )
    result = run_script(
        "cvae_training_224x224",
        *TINY_MODEL,
        "--reconstruction_loss=l1",
        f"--processed_images_dir={finished_run / 'processed'}",
        f"--models_dir={tmp_path / 'other'}",
        f"--latent_tensors_dir={tmp_path / 'other_latents'}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--reconstruction_loss" in result.stderr.strip().splitlines()[-1]


def test_structural_similarity_matches_tensorflow_and_its_term_trains(finished_run, tmp_path):
    import tensorflow as tf

    from cilia_cvae import models
    from cilia_cvae.model_config import ModelConfig

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (3, 40, 40, 1)).astype("float32")
    noisy = np.clip(images + rng.normal(0, 0.1, images.shape), 0, 1).astype("float32")
    ours = np.asarray(models.structural_similarity(images, noisy))
    assert ours == pytest.approx(tf.image.ssim(images, noisy, max_val=1.0).numpy(), abs=1e-5)
    assert np.asarray(models.structural_similarity(images, images)) == pytest.approx(1.0)
    # The term adds exactly D/2 log(1 - SSIM) of each image and its reconstruction to the loss.
    encoder, decoder = models.build_encoder_and_decoder(
        ModelConfig(image_size=40, num_classes=2, base_channels=4, max_channels=8, latent_map_channels=2)
    )
    assert encoder.outputs[0].shape[-1] == 5 * 5 * 2
    images, labels = tf.constant(images), tf.constant(np.eye(2, dtype="float32")[[0, 1, 0]])
    losses = {
        weight: models.CVAE(
            encoder, decoder, sample_posterior=False, structural_weight=weight
        ).per_example_losses(images, labels, training=False)
        for weight in (0.0, 1.0)
    }
    reconstructions = np.asarray(decoder([encoder([images, labels])[0], labels]))
    expected = 0.5 * 40 * 40 * np.log(1 - np.asarray(models.structural_similarity(images, reconstructions)))
    assert np.asarray(
        losses[1.0]["reconstruction_loss"] - losses[0.0]["reconstruction_loss"]
    ) == pytest.approx(expected, rel=1e-3)
    result = run_script(
        "cvae_training_224x224",
        *TINY_MODEL,
        "--epochs=1",
        "--structural_weight=1",
        f"--processed_images_dir={finished_run / 'processed'}",
        f"--models_dir={tmp_path / 'models'}",
        f"--latent_tensors_dir={tmp_path / 'latents'}",
    )
    assert result.returncode == 0, result.stderr
    parameters = json.loads((tmp_path / "models" / "32x32" / "cvae_parameters.json").read_text())
    assert parameters["structural_weight"] == 1.0
    assert np.isfinite(parameters["final_losses"]["last_epoch"]["reconstruction_loss"])
    assert (
        json.loads((finished_run / "models" / "32x32" / "cvae_parameters.json").read_text())[
            "structural_weight"
        ]
        == 0.0
    )
    result = run_script(
        "cvae_training_224x224",
        *TINY_MODEL,
        "--structural_weight=-1",
        f"--processed_images_dir={finished_run / 'processed'}",
        f"--models_dir={tmp_path / 'other'}",
        f"--latent_tensors_dir={tmp_path / 'other_latents'}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--structural_weight must be 0 or more" in result.stderr.strip().splitlines()[-1]


def test_settings_of_old_runs_and_spelled_out_defaults_compare_as_the_run_they_are():
    from cilia_cvae.runs import resolved_settings

    # run_settings.json of a run started before these settings existed.
    old = resolved_settings({"ARCHITECTURE": "default", "EPOCHS": 40})
    assert old == resolved_settings(
        {
            "ARCHITECTURE": "default",
            "EPOCHS": 40,
            "RECONSTRUCTION_LOSS": "calibrated_gaussian",
            "STRUCTURAL_WEIGHT": 0,
            "KL_WEIGHT": 1,
        }
    )
    assert old != resolved_settings({"ARCHITECTURE": "default", "EPOCHS": 40, "KL_WEIGHT": 4})
    assert old != resolved_settings(
        {"ARCHITECTURE": "default", "EPOCHS": 40, "RECONSTRUCTION_LOSS": "sum_squared_error"}
    )
    assert old != resolved_settings({"ARCHITECTURE": "default", "EPOCHS": 40, "STRUCTURAL_WEIGHT": 1})
    assert resolved_settings({"ARCHITECTURE": "original"})["RECONSTRUCTION_LOSS"] == "sum_squared_error"


def test_kl_weight_warms_up_to_its_setting():
    from cilia_cvae.training import kl_weight_for_epoch

    assert [kl_weight_for_epoch(epoch, 4) for epoch in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert [kl_weight_for_epoch(epoch, 4, kl_weight=4.0) for epoch in (1, 2, 4, 9)] == [1.0, 2.0, 4.0, 4.0]
    assert kl_weight_for_epoch(1, 0, kl_weight=2.5) == 2.5


def test_killed_run_resumes_without_repeating_or_losing_epochs(tmp_path):
    write_processed_split(tmp_path / "processed", images_per_class=40)
    command = [
        sys.executable,
        str(SCRIPTS_DIR / "cvae_training_224x224.py"),
        *TINY_MODEL,
        *folders(tmp_path),
        "--epochs=5",
    ]
    history = tmp_path / "models" / "32x32" / "training_history.csv"
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        command, cwd=REPOSITORY_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment
    )
    deadline = time.time() + 120
    while len(history_epochs(history)) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    rows_before = history.read_text().splitlines()
    assert 2 <= len(rows_before) - 1 < 5, "the run was not killed half way"
    assert not (tmp_path / "models" / "32x32" / "cvae_parameters.json").exists()
    # Another loss is another run: refused in one line, and nothing is touched.
    result = train(tmp_path, "--epochs=5", "--reconstruction_loss=sum_squared_error")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "used other settings (--reconstruction_loss)" in result.stderr.strip().splitlines()[-1]
    assert history.read_text().splitlines() == rows_before
    # Spelling out the loss "auto" stands for is the same run.
    result = train(tmp_path, "--epochs=5", "--reconstruction_loss=calibrated_gaussian")
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch" in result.stdout
    assert history_epochs(history) == [1, 2, 3, 4, 5]
    # Rows of epochs the checkpoint already held stay exactly as they were written.
    resumed_from = int(result.stdout.split("resuming after epoch ")[1].split()[0])
    assert history.read_text().splitlines()[: resumed_from + 1] == rows_before[: resumed_from + 1]


def test_a_kill_between_the_checkpoint_and_the_history_row_records_the_epoch_once(tmp_path):
    """The instant between an epoch's two writes, forced by the training's test hook: the epoch
    the checkpoint holds is neither trained again nor given a second, different row."""
    write_processed_split(tmp_path / "processed", images_per_class=20)
    history = tmp_path / "models" / "32x32" / "training_history.csv"
    killed = train(tmp_path, "--epochs=3", environment={"CILIA_CVAE_CRASH_AFTER_CHECKPOINT": "2"})
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert history_epochs(history) == [1], "the kill came after the history row"
    first_row = history.read_text().splitlines()[1]
    resumed = train(tmp_path, "--epochs=3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch 2" in resumed.stdout
    assert "epoch 2:" not in resumed.stdout and "epoch 3:" in resumed.stdout
    assert history_epochs(history) == [1, 2, 3]
    assert history.read_text().splitlines()[1] == first_row


def run_distributed(mode, processed_dir, output, environment=None):
    return subprocess.Popen(
        [sys.executable, str(HELPERS_DIR / "distributed_steps.py"), mode, str(processed_dir), str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS_DIR), TF_CPP_MIN_LOG_LEVEL="2", **(environment or {})),
    )


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for handle in sockets:
        handle.bind(("127.0.0.1", 0))
    ports = [handle.getsockname()[1] for handle in sockets]
    for handle in sockets:
        handle.close()
    return ports


@pytest.fixture(scope="module")
def distributed_weights(finished_run, tmp_path_factory):
    """Weights after 12 SGD steps on one device, on two mirrored CPU devices, and on two
    worker processes on 127.0.0.1; the three trainings run side by side to save time."""
    folder = tmp_path_factory.mktemp("distributed")
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = [run_distributed("local", finished_run / "processed", folder / "local.npz")] + [
        run_distributed(
            "workers",
            finished_run / "processed",
            folder / "workers.npz",
            {
                "TF_CONFIG": json.dumps(
                    {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
                )
            },
        )
        for index in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    with np.load(folder / "local.npz") as local, np.load(folder / "workers.npz") as workers_file:
        weights = {**local, **workers_file}
    # The comparison means something only if training moved the weights by much more than the tolerance.
    assert weights["one_device_change"][0] > 100 * DISTRIBUTED_TOLERANCE
    assert np.all(np.isfinite(weights["one_device"]))
    return weights


def test_mirrored_strategy_on_two_devices_makes_the_same_update_as_one(distributed_weights):
    difference = np.abs(distributed_weights["mirrored"] - distributed_weights["one_device"]).max()
    assert difference < DISTRIBUTED_TOLERANCE


def test_mixed_precision_recipe_trains_on_the_cpu(distributed_weights):
    assert np.isfinite(distributed_weights["mixed_precision_loss"][0])
    assert (
        distributed_weights["mixed_precision_loss_scaled"][0]
        and distributed_weights["mixed_precision_output_float32"][0]
    )


def test_two_workers_train_to_the_same_weights_as_one(distributed_weights):
    difference = np.abs(distributed_weights["workers"] - distributed_weights["one_device"]).max()
    assert difference < DISTRIBUTED_TOLERANCE


def test_benchmark_quick_mode_runs(tmp_path):
    output = tmp_path / "benchmark.json"
    result = run_script("cvae_benchmark", "--quick=True", f"--output_json={output}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(output.read_text())
    for contender in ("original_224", "default_224", "original_448", "default_448", "adversarial_224"):
        assert measured["train_images_per_s"][contender] > 0
        assert measured["peak_memory_mb"][contender] > 0
        assert measured["batch_size"][contender] > 0
    assert measured["ratio"]["adversarial_over_default_224"] > 0
    assert measured["generate_images_per_s"]["diffusion_224"] > 0, (
        "generation with the latent prior, end to end"
    )
    efficiency = measured["efficiency"]
    assert efficiency["matmul_gflops_per_s"] > 0 and 0 < efficiency["decoder_share_of_matmul"]
    flops = efficiency["flops_per_image"]
    # A guided 20-step sample runs the denoiser 40 times, then the decoder once.
    assert flops["diffusion_sample"] == 40 * flops["denoiser_per_call"] + flops["decoder"] > 0
    # A variation at strength 0.5 takes half the steps (10 guided steps, 20 denoiser calls), and the
    # seven turned orientations of eight encode their crop again.
    assert measured["generate_images_per_s"]["variation_224"] > 0
    expected = 20 * flops["denoiser_per_call"] + flops["decoder"] + 7 / 8 * flops["encoder"]
    assert flops["encoder"] > 0 and flops["variation"] == pytest.approx(expected)
    prior_training = measured["prior_training"]
    assert prior_training["latents_per_s"] > 0 and prior_training["map_shape"] == [4, 4, 4]
    assert prior_training["minutes_for_the_comparison_prior"] > 0


def test_presets_are_the_training_scripts_defaults():
    """The benchmark builds the scripts' default models from the presets, so they must not drift apart."""
    import ast

    from cilia_cvae.model_config import PRESETS, ModelConfig

    for image_size, preset in PRESETS.items():
        source = (SCRIPTS_DIR / f"cvae_training_{image_size}x{image_size}.py").read_text(encoding="utf-8")
        constants = {}
        for statement in ast.parse(source).body:
            if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
                try:
                    constants[statement.targets[0].id] = ast.literal_eval(statement.value)
                except ValueError:
                    pass  # the folder constants are expressions
        assert ModelConfig.from_settings(constants, num_classes=preset.model.num_classes) == preset.model
        assert constants["BATCH_SIZE"] == preset.batch_size


def test_model_config_derives_the_latent_shape_and_refuses_impossible_sizes():
    from cilia_cvae.model_config import ModelConfig

    assert (ModelConfig().map_side, ModelConfig().latent_length) == (28, 28 * 28 * 4)
    assert ModelConfig(latent_map_stride=0).latent_length == 128
    assert ModelConfig(architecture="original", latent_map_stride=8).map_side == 0
    assert (
        ModelConfig(reconstruction_loss="auto", architecture="original").reconstruction == "sum_squared_error"
    )
    for wrong, message in (
        ({"image_size": 33}, "3, 4, 5 or 7 times a power of two"),
        ({"latent_map_stride": 3}, "needs a stride among"),
        ({"architecture": "transformer"}, "is not one of 'default', 'original'"),
    ):
        with pytest.raises(ValueError, match=message):
            ModelConfig(**wrong)


def test_a_second_training_into_a_running_one_is_refused_naming_it(tmp_path):
    write_processed_split(tmp_path / "processed", images_per_class=20)
    command = [
        sys.executable,
        str(SCRIPTS_DIR / "cvae_training_224x224.py"),
        *TINY_MODEL,
        *folders(tmp_path),
        "--epochs=200",
    ]
    first = subprocess.Popen(
        command,
        cwd=REPOSITORY_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    try:
        checkpoint = tmp_path / "models" / "32x32" / "checkpoints" / "ckpt-1.index"
        deadline = time.time() + 120
        while not checkpoint.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert checkpoint.exists(), "the first training never finished an epoch"
        second = train(tmp_path, "--epochs=200")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        last_line = second.stderr.strip().splitlines()[-1]
        assert (
            f"is being written by process {first.pid}" in last_line
            and "cvae_training_224x224.py" in last_line
        )
        assert "resuming" not in second.stdout
    finally:
        first.kill()
        first.wait()


def test_small_collections_train_with_a_validation_image_per_class(tmp_path):
    """Ten images per class (the fraction 0.1 would hold out fewer images than there are classes), and
    the smallest collection: one image per class, which trains without validation images."""
    write_processed_split(tmp_path / "processed", images_per_class=10)
    result = train(tmp_path, "--epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "27 training and 3 validation images of 3 classes" in result.stdout
    smallest = tmp_path / "smallest"
    write_processed_split(smallest / "processed", images_per_class=1)
    result = train(smallest, "--epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 training and 0 validation images" in result.stdout
    assert result.stdout.count("has a single training image") == 3
    assert (smallest / "models" / "32x32" / "cvae_decoder.keras").is_file()


def test_a_damaged_processed_image_is_one_line_naming_it(tmp_path):
    write_processed_split(tmp_path / "processed", images_per_class=10)
    damaged = sorted((tmp_path / "processed" / "32x32" / "train" / "ODA").glob("*.png"))[3]
    damaged.write_bytes(damaged.read_bytes()[:40])
    result = train(tmp_path, "--epochs=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert str(damaged) in last_line and "cvae_pre_processing.py" in last_line
