"""Generation as a user runs it, against a model trained for one epoch at 32 px."""

import shutil

import numpy as np
import pandas as pd
from PIL import Image

from conftest import run_script


def generate(folders, *arguments, generated=None):
    return run_script(
        "cvae_inference",
        "--image_size=32",
        f"--processed_images_dir={folders['processed']}",
        f"--models_dir={folders['models']}",
        f"--latent_tensors_dir={folders['latents']}",
        f"--generated_images_dir={generated or folders['generated']}",
        *arguments,
    )


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def test_counts_names_manifest_figures_and_numbering(tiny_trained_model, tmp_path):
    folders, output = tiny_trained_model, tmp_path / "generated"
    finished = generate(
        folders, "--classes=ODA,IDA", "--images_per_class=7", "--batch_size=4", generated=output
    )
    assert finished.returncode == 0, finished.stderr
    size_dir = output / "32x32"
    for class_name in ("ODA", "IDA"):
        names = sorted(path.name for path in (size_dir / class_name).glob("*.png"))
        assert names == [f"Synthetic_{class_name}_{number:05d}.png" for number in range(1, 8)]
    assert not (size_dir / "Normal").exists(), "only the requested classes"
    for figure in ("image_comparison.png", "latent_space.png", "class_interpolation.png"):
        assert (size_dir / figure).stat().st_size > 1000
    manifest = pd.read_csv(size_dir / "generation_manifest.csv")
    assert len(manifest) == 14 and set(manifest["class"]) == {"ODA", "IDA"}
    assert set(manifest.columns) >= {
        "file",
        "class",
        "sampling",
        "temperature",
        "seed",
        "source_latent_index",
        "aspect_ratio",
        "model_fingerprint",
    }
    with Image.open(size_dir / manifest["file"][0]) as image:
        width, height = image.size
    assert abs(width / height - manifest["aspect_ratio"][0]) < 0.1, (
        "the aspect ratio restored is the one recorded"
    )

    # The same command again writes nothing: its images are there; a larger count continues the
    # seed's images (the first 7 are the same, so they are not written twice).
    first_run = {path.name: pixels(path) for path in (size_dir / "ODA").glob("*.png")}
    again = ("--classes=ODA", "--images_per_class=7", "--batch_size=3", "--figures=False")
    finished = generate(folders, *again, generated=output)
    assert finished.returncode == 0, finished.stderr
    assert "nothing written: every image asked for is in" in finished.stdout
    assert "another --seed" in finished.stdout and "--images_per_class above 7" in finished.stdout
    assert (
        len(list((size_dir / "ODA").glob("*.png"))) == 7 and len(pd.read_csv(manifest_path(size_dir))) == 14
    )
    finished = generate(folders, *again[:1], "--images_per_class=10", *again[2:], generated=output)
    assert finished.returncode == 0, finished.stderr
    assert "7 of the 10 images asked for (seed 0)" in finished.stdout and "wrote 3 images" in finished.stdout
    names = sorted(path.name for path in (size_dir / "ODA").glob("*.png"))
    assert names == [f"Synthetic_ODA_{number:05d}.png" for number in range(1, 11)], "nothing overwritten"
    fresh = tmp_path / "fresh"
    finished = generate(folders, *again[:1], "--images_per_class=10", *again[2:], generated=fresh)
    assert finished.returncode == 0, finished.stderr
    for number in range(1, 11):
        name = f"Synthetic_ODA_{number:05d}.png"
        same = pixels(fresh / "32x32" / "ODA" / name)
        assert np.array_equal(same, pixels(size_dir / "ODA" / name)), "the continued stream is the seed's"
        if number <= 7:
            assert np.array_equal(same, first_run[name]), "same seed, same images"
    assert len(pd.read_csv(manifest_path(size_dir))) == 17, "the manifest is appended to"


def manifest_path(size_dir):
    return size_dir / "generation_manifest.csv"


def test_every_sampling_mode_runs_and_square_output_when_asked(tiny_trained_model, tmp_path):
    for sampling in ("prior", "class_density"):
        output = tmp_path / sampling
        finished = generate(
            tiny_trained_model,
            f"--sampling={sampling}",
            "--images_per_class=3",
            "--restore_aspect=False",
            "--figures=False",
            "--temperature=0.8",
            generated=output,
        )
        assert finished.returncode == 0, finished.stderr
        written = sorted((output / "32x32").glob("*/*.png"))
        assert len(written) == 15
        assert all(Image.open(path).size == (32, 32) for path in written)
        assert set(pd.read_csv(output / "32x32" / "generation_manifest.csv")["sampling"]) == {sampling}


def test_refusals_are_one_line_with_exit_code_2(tiny_trained_model, tmp_path):
    folders = tiny_trained_model
    finished = generate(folders, "--classes=ODA,Nonsense", generated=tmp_path / "g")
    assert finished.returncode == 2 and "Nonsense" in finished.stderr and "Normal" in finished.stderr
    assert not (tmp_path / "g" / "32x32" / "ODA").exists(), "nothing generated after a refusal"

    missing = dict(folders, models=tmp_path / "no_models")
    finished = generate(missing, generated=tmp_path / "g")
    assert finished.returncode == 2 and "cvae_training_224x224.py" in finished.stderr

    mismatched = dict(folders, latents=tmp_path / "latents")
    shutil.copytree(folders["latents"], mismatched["latents"])
    for path in (mismatched["latents"] / "32x32").glob("*.npy"):
        np.save(path, np.zeros((3, 5), np.float32))
    finished = generate(mismatched, generated=tmp_path / "g")
    assert finished.returncode == 2 and "belong to another model" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_cross_resolution_figure_when_several_sizes_were_generated(tiny_trained_model, tmp_path):
    output = tmp_path / "generated"
    other_size = output / "64x64" / "ODA"
    other_size.mkdir(parents=True)
    Image.fromarray(np.full((64, 64), 120, np.uint8)).save(other_size / "Synthetic_ODA_00001.png")
    finished = generate(tiny_trained_model, "--images_per_class=2", generated=output)
    assert finished.returncode == 0, finished.stderr
    assert (output / "image_comparison_resolutions.png").stat().st_size > 1000


def start_generation(folders, output, *arguments):
    """A generation started in the background, as a second terminal would."""
    import os
    import subprocess
    import sys

    from conftest import REPOSITORY_ROOT, SCRIPTS_DIR

    command = [
        sys.executable,
        str(SCRIPTS_DIR / "cvae_inference.py"),
        "--image_size=32",
        "--figures=False",
        f"--processed_images_dir={folders['processed']}",
        f"--models_dir={folders['models']}",
        f"--latent_tensors_dir={folders['latents']}",
        f"--generated_images_dir={output}",
        *arguments,
    ]
    return subprocess.Popen(
        command,
        cwd=REPOSITORY_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )


def wait_for_images(folder, count, process, seconds=120):
    import time

    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if len(list(folder.glob("*/Synthetic_*.png"))) >= count:
            return True
        time.sleep(0.05)
    return False


def test_a_second_generation_into_the_same_folder_is_refused_naming_the_first(tiny_trained_model, tmp_path):
    output = tmp_path / "generated"
    first = start_generation(tiny_trained_model, output, "--images_per_class=200000", "--seed=1")
    try:
        assert wait_for_images(output / "32x32", 1, first), "the first generation never started writing"
        second = generate(
            tiny_trained_model, "--images_per_class=5", "--seed=2", "--figures=False", generated=output
        )
        assert second.returncode == 2 and "Traceback" not in second.stderr
        last_line = second.stderr.strip().splitlines()[-1]
        assert f"is being written by process {first.pid}" in last_line and "cvae_inference.py" in last_line
    finally:
        first.kill()
        first.wait()


def test_a_killed_generation_leaves_nothing_unrecorded_for_the_next_run(tiny_trained_model, tmp_path):
    import signal

    output = tmp_path / "generated"
    first = start_generation(tiny_trained_model, output, "--images_per_class=200000", "--seed=1")
    assert wait_for_images(output / "32x32", 40, first), "the first generation never wrote 40 images"
    first.send_signal(signal.SIGKILL)
    first.wait()
    size_dir = output / "32x32"
    # The next run into the folder is not blocked by the dead run's lock, and reconciles what it left.
    finished = generate(
        tiny_trained_model, "--images_per_class=2", "--seed=2", "--figures=False", generated=output
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    on_disk = {f"{path.parent.name}/{path.name}" for path in size_dir.glob("*/*.png")}
    assert not [path for path in size_dir.rglob(".*") if path.name != ".32x32.lock"], (
        "hidden partial files remain"
    )
    manifest = pd.read_csv(size_dir / "generation_manifest.csv")
    assert set(manifest["file"]) == on_disk and len(manifest) == len(on_disk)
    # Rows recovered from the images themselves carry what the killed run wrote, not placeholders.
    assert set(manifest["seed"]) == {1, 2} and set(manifest["sampling"]) == {"posterior"}


def copied_run(folders, tmp_path):
    """A copy of the trained run's model and latent folders, to damage without touching the original."""
    copy = dict(folders, models=tmp_path / "models", latents=tmp_path / "latents")
    shutil.copytree(folders["models"], copy["models"])
    shutil.copytree(folders["latents"], copy["latents"])
    return copy


def refusal(folders, tmp_path, *arguments):
    finished = generate(
        folders, "--images_per_class=2", "--figures=False", *arguments, generated=tmp_path / "g"
    )
    assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
    return finished.stderr.strip().splitlines()[-1]


def test_damaged_or_foreign_files_are_one_line_naming_the_file(tiny_trained_model, tmp_path):
    run = copied_run(tiny_trained_model, tmp_path)
    latent = run["latents"] / "32x32" / "z_mean_ODA.npy"
    original = np.load(latent)
    # Same shape, other values: latents of another run (or edited) are refused, not decoded.
    np.save(latent, original + 0.5)
    assert "z_mean_ODA.npy belong to another model" in refusal(run, tmp_path)
    np.save(latent, np.where(np.arange(original.size).reshape(original.shape) == 0, np.nan, original))
    assert "z_mean_ODA.npy holds values that are not finite" in refusal(run, tmp_path)
    np.save(latent, np.array([{"code": "never run"}] * len(original), dtype=object), allow_pickle=True)
    assert "z_mean_ODA.npy is not a plain latent array" in refusal(run, tmp_path)
    np.save(latent, original)
    record = run["latents"] / "32x32" / "latents.json"
    record.write_text(record.read_text().replace('"run_fingerprint": "', '"run_fingerprint": "0'))
    assert "belong to another model" in refusal(run, tmp_path)

    run = copied_run(tiny_trained_model, tmp_path / "second")
    decoder = run["models"] / "32x32" / "cvae_decoder.keras"
    decoder.write_bytes(decoder.read_bytes()[: decoder.stat().st_size // 2])
    assert "cvae_decoder.keras cannot be loaded" in refusal(run, tmp_path)
    parameters = run["models"] / "32x32" / "cvae_parameters.json"
    parameters.write_text("{not json")
    assert "cvae_parameters.json is damaged" in refusal(run, tmp_path)
    parameters.write_text("{}")
    assert "cvae_parameters.json is damaged" in refusal(run, tmp_path)


def test_bad_values_are_one_line_before_anything_is_written(tiny_trained_model, tmp_path):
    for argument, words in (
        ("--batch_size=1000000000", "--batch_size must be between 1 and 4096"),
        ("--seed=-1", "--seed must be at least 0"),
        ("--images_per_class=1000000000000", "ask for fewer with --images_per_class"),
        ("--temperature=1e999", "--temperature must be a finite number"),
    ):
        assert words in refusal(tiny_trained_model, tmp_path, argument)
    assert not list((tmp_path / "g").glob("*/*/*.png")), "nothing generated after a refusal"


def test_bad_values_of_the_other_stages_are_one_line(tmp_path):
    cases = (
        ("cvae_pre_processing", "--workers=-1", "--workers must be at least 0"),
        ("cvae_pre_processing", "--seed=-1", "--seed must be at least 0"),
        ("cvae_pre_processing", "--image_size=99999992", "multiple of 8 between 16 and 4096"),
        ("cvae_training_224x224", "--image_size=33", "multiple of 8 between 16 and 4096"),
        ("cvae_training_224x224", "--learning_rate=1e999", "--learning_rate must be a finite number"),
    )
    for script, argument, words in cases:
        finished = run_script(
            script,
            argument,
            f"--processed_images_dir={tmp_path / 'processed'}",
            f"--raw_images_dir={tmp_path / 'raw'}"
            if script == "cvae_pre_processing"
            else f"--models_dir={tmp_path / 'models'}",
        )
        assert finished.returncode == 2 and "Traceback" not in finished.stderr, (
            argument,
            finished.stderr[-2000:],
        )
        assert words in finished.stderr.strip().splitlines()[-1], (argument, finished.stderr[-500:])
