"""Generation run again the way a careless user runs it: after a kill, twice, with a class named twice,
after deleting an image, over a damaged manifest, onto a full disk, through symbolic links."""

import hashlib
import os
import re
import signal
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_inference import start_generation, wait_for_images

from conftest import run_script


def generate(folders, output, *arguments):
    return run_script(
        "cvae_inference",
        "--image_size=32",
        "--figures=False",
        f"--processed_images_dir={folders['processed']}",
        f"--models_dir={folders['models']}",
        f"--latent_tensors_dir={folders['latents']}",
        f"--generated_images_dir={output}",
        *arguments,
    )


def pixel_hashes(size_dir):
    """{pixel hash: [files]} of every generated image: two files under one hash are duplicates."""
    found = {}
    for path in sorted(size_dir.glob("*/Synthetic_*.png")):
        with Image.open(path) as image:
            digest = hashlib.sha256(np.asarray(image.convert("L")).tobytes()).hexdigest()
        found.setdefault(digest, []).append(f"{path.parent.name}/{path.name}")
    return found


def check_manifest(size_dir, complete=True):
    """Every line of the manifest a whole row, each name once, every image with its row (unless a run
    was stopped half way: its last batch's images get their rows from the next run); the rows."""
    text = (size_dir / "generation_manifest.csv").read_text(encoding="utf-8")
    assert text.endswith("\n"), "no partial last row"
    manifest = pd.read_csv(size_dir / "generation_manifest.csv")
    assert manifest["file"].str.fullmatch(r"(\w+)/Synthetic_\1_\d{5}\.png").all(), "only whole rows"
    assert manifest["file"].is_unique, "no name given twice"
    on_disk = {f"{path.parent.name}/{path.name}" for path in size_dir.glob("*/Synthetic_*.png")}
    if complete:
        assert on_disk <= set(manifest["file"]), "every image has its row"
    return manifest


def test_the_same_command_after_a_kill_continues_and_again_writes_nothing(tiny_trained_model, tmp_path):
    output, size_dir = tmp_path / "generated", tmp_path / "generated" / "32x32"
    command = ("--classes=CP", "--images_per_class=400", "--batch_size=8", "--seed=4")
    first = start_generation(tiny_trained_model, output, *command)
    assert wait_for_images(size_dir, 30, first), "the first generation never wrote 30 images"
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = len(list(size_dir.glob("CP/Synthetic_*.png")))
    assert 30 <= killed_at < 400, killed_at
    finished = generate(tiny_trained_model, output, *command)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"CP: {killed_at} of the 400 images asked for (seed 4)" in finished.stdout
    assert f"wrote {400 - killed_at} images" in finished.stdout
    manifest = check_manifest(size_dir)
    assert len(manifest) == 400 and sorted(manifest["stream_index"]) == list(range(400))
    assert all(len(files) == 1 for files in pixel_hashes(size_dir).values()), "no image twice"

    finished = generate(tiny_trained_model, output, *command)
    assert finished.returncode == 0 and "nothing written" in finished.stdout, finished.stderr[-2000:]
    assert "CP: the 400 images asked for (seed 4) are in" in finished.stdout
    assert len(list(size_dir.glob("CP/*.png"))) == 400 and len(check_manifest(size_dir)) == 400


def test_a_class_named_twice_is_generated_once_and_counted_true(tiny_trained_model, tmp_path):
    finished = generate(tiny_trained_model, tmp_path, "--classes=ODA,ODA", "--images_per_class=3")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "ODA named more than once in --classes; generated once" in finished.stdout
    assert "wrote 3 images" in finished.stdout
    assert len(list((tmp_path / "32x32" / "ODA").glob("*.png"))) == 3
    assert len(check_manifest(tmp_path / "32x32")) == 3


def test_a_deleted_image_never_gives_its_name_again(tiny_trained_model, tmp_path):
    size_dir = tmp_path / "32x32"
    assert generate(tiny_trained_model, tmp_path, "--classes=CP", "--images_per_class=4").returncode == 0
    (size_dir / "CP" / "Synthetic_CP_00004.png").unlink()
    finished = generate(tiny_trained_model, tmp_path, "--classes=CP", "--images_per_class=4", "--seed=9")
    assert finished.returncode == 0, finished.stderr[-2000:]
    names = sorted(path.name for path in (size_dir / "CP").glob("*.png"))
    assert names == [f"Synthetic_CP_{number:05d}.png" for number in (1, 2, 3, 5, 6, 7, 8)]
    manifest = pd.read_csv(size_dir / "generation_manifest.csv")
    assert manifest["file"].is_unique and len(manifest) == 8, "the deleted image keeps its one row"


def test_a_damaged_manifest_is_repaired_from_the_images_own_rows(tiny_trained_model, tmp_path):
    size_dir = tmp_path / "32x32"
    manifest_path = size_dir / "generation_manifest.csv"
    assert (
        generate(tiny_trained_model, tmp_path, "--classes=Disarranged", "--images_per_class=4").returncode
        == 0
    )
    whole = manifest_path.read_bytes()
    damages = {
        "a last row cut short": whole[:-30],
        "random bytes at the head": np.random.default_rng(0).bytes(300) + whole,
        "a junk row": whole + b"junk,row\n",
    }
    for seed, (damage, damaged) in enumerate(damages.items(), start=1):
        manifest_path.write_bytes(damaged)
        finished = generate(
            tiny_trained_model, tmp_path, "--classes=Disarranged", "--images_per_class=2", f"--seed={seed}"
        )
        assert finished.returncode == 0 and "Traceback" not in finished.stderr, (
            damage,
            finished.stderr[-2000:],
        )
        assert f"repaired {manifest_path}:" in finished.stdout, damage
        manifest = check_manifest(size_dir)
        assert len(manifest) == 4 + 2 * seed, damage
        assert set(manifest["sampling"]) == {"posterior"}, "recovered rows are the images' own"
        whole = manifest_path.read_bytes()
    assert len(list(size_dir.glob("generation_manifest.csv.damaged-*"))) >= 1, "the damaged file is kept"


def test_a_full_disk_leaves_whole_rows_names_the_path_and_the_same_command_continues(
    tiny_trained_model, tmp_path
):
    disk = tmp_path / "small disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("this machine cannot mount a small file system for the test")
    try:
        # Few enough images that the estimate lets them start; the manifest and temporary files fill the rest.
        count = os.statvfs(disk).f_bavail
        command = ("--classes=IDA", f"--images_per_class={count}", "--batch_size=4", "--restore_aspect=False")
        finished = generate(tiny_trained_model, disk, *command)
        assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
        last_line = finished.stderr.strip().splitlines()[-1]
        assert f"the disk holding {disk}/32x32/" in last_line and "is full; free some space" in last_line
        written = len(check_manifest(disk / "32x32", complete=False))
        assert 0 < written < count
        subprocess.run(["mount", "-o", "remount,size=2m", str(disk)], check=True)
        finished = generate(tiny_trained_model, disk, *command)
        assert finished.returncode == 0, finished.stderr[-2000:]
        manifest = check_manifest(disk / "32x32")
        assert len(manifest) == count and sorted(manifest["stream_index"]) == list(range(count))

        finished = generate(
            tiny_trained_model, disk, "--classes=IDA", "--images_per_class=100000", "--seed=2"
        )
        assert finished.returncode == 2
        last_line = finished.stderr.strip().splitlines()[-1]
        assert "100,000 images of 32 px need about 409.6 MB" in last_line and re.search(
            r"has \d+\.\d MB free", last_line
        )
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_links_inside_the_output_folder_are_not_written_through(tiny_trained_model, tmp_path):
    size_dir, elsewhere = tmp_path / "generated" / "32x32", tmp_path / "elsewhere"
    elsewhere.mkdir()
    size_dir.mkdir(parents=True)
    (size_dir / "ODA").symlink_to(elsewhere, target_is_directory=True)
    finished = generate(tiny_trained_model, tmp_path / "generated", "--classes=ODA", "--images_per_class=2")
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    assert f"{size_dir / 'ODA'} is a symbolic link" in finished.stderr.strip().splitlines()[-1]
    (size_dir / "ODA").unlink()
    (size_dir / "generation_manifest.csv").symlink_to(elsewhere / "manifest.csv")
    finished = generate(tiny_trained_model, tmp_path / "generated", "--classes=ODA", "--images_per_class=2")
    assert finished.returncode == 2 and "generation_manifest.csv is a symbolic link" in finished.stderr
    assert list(elsewhere.iterdir()) == [], "nothing written through either link"


def test_an_unreadable_image_of_another_class_does_not_stop_generation(tiny_trained_model, tmp_path):
    size_dir = tmp_path / "32x32"
    (size_dir / "Normal").mkdir(parents=True)
    (size_dir / "Normal" / "Synthetic_Normal_00001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (size_dir / "Normal" / "Synthetic_Normal_00002.png").symlink_to(tmp_path / "gone.png")
    finished = generate(tiny_trained_model, tmp_path, "--classes=ODA", "--images_per_class=2")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "2 image(s) in" in finished.stdout and "cannot be read" in finished.stdout
    assert "Normal/Synthetic_Normal_00001.png" in finished.stdout
    assert len(list((size_dir / "ODA").glob("*.png"))) == 2


def test_values_and_missing_files_are_one_line_naming_what_to_do(tiny_trained_model, tmp_path):
    for argument, words in (
        ("--guidance=nan", "--guidance must be a finite number, not 'nan'"),
        ("--temperature=inf", "--temperature must be a finite number"),
        ("--temperature=1e30", "--temperature must be between 0.0 and 10.0"),
    ):
        finished = generate(tiny_trained_model, tmp_path / "g", argument)
        assert finished.returncode == 2 and words in finished.stderr.strip().splitlines()[-1], argument
    import shutil

    copy = dict(tiny_trained_model, latents=tmp_path / "latents")
    shutil.copytree(tiny_trained_model["latents"], copy["latents"])
    (copy["latents"] / "32x32" / "latents.json").unlink()
    finished = generate(copy, tmp_path / "g", "--images_per_class=1")
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    line = finished.stderr.strip().splitlines()[-1]
    assert "latents.json is missing" in line and "belong to another model" not in line
    assert not list((tmp_path / "g").glob("*/*/*.png")), "nothing generated after a refusal"


def test_a_truncated_generated_image_is_named_by_the_evaluation(tiny_trained_model, tmp_path):
    output = tmp_path / "generated"
    assert generate(tiny_trained_model, output, "--images_per_class=2").returncode == 0
    damaged = output / "32x32" / "ODA" / "Synthetic_ODA_00002.png"
    damaged.write_bytes(damaged.read_bytes()[:120])
    evaluate = (
        "cvae_evaluate",
        "--image_size=32",
        "--quick=True",
        f"--processed_images_dir={tiny_trained_model['processed']}",
        f"--models_dir={tiny_trained_model['models']}",
        f"--generated_images_dir={output}",
        f"--judge_dir={tmp_path / 'judge'}",
    )
    finished = run_script(*evaluate)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
    line = finished.stderr.strip().splitlines()[-1]
    assert f"{damaged} cannot be read" in line and "move it out of the folder" in line
    damaged.rename(tmp_path / damaged.name)  # the remedy the message names
    finished = run_script(*evaluate)
    assert finished.returncode == 0, finished.stderr[-2000:]


def test_a_damaged_cached_judge_is_trained_again(tmp_path, capsys):
    from cilia_cvae.classifier import cached_domain_classifier

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (16, 32, 32), dtype=np.uint8), np.arange(16) % 2
    arguments = (tmp_path, "f" * 64, images, labels, 2, 1, 0)
    cached_domain_classifier(*arguments)
    [cached] = tmp_path.glob("domain_classifier_*.keras")
    cached.write_bytes(cached.read_bytes()[:500])
    model, reused = cached_domain_classifier(*arguments)
    assert not reused and "cannot be loaded" in capsys.readouterr().out
    assert cached_domain_classifier(*arguments)[1], "the judge trained again is the cache now"


def test_preprocessing_under_a_running_evaluation_is_refused_naming_it(tiny_trained_model, tmp_path):
    import shutil
    import sys

    from test_robustness_stages import wait_for_lock

    from conftest import REPOSITORY_ROOT, SCRIPTS_DIR

    processed, output = tmp_path / "processed", tmp_path / "generated"
    shutil.copytree(tiny_trained_model["processed"], processed)
    folders = dict(tiny_trained_model, processed=processed)
    assert generate(folders, output, "--images_per_class=2").returncode == 0
    evaluation = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS_DIR / "cvae_evaluate.py"),
            "--image_size=32",
            "--classifier_epochs=400",
            "--classifier_size=32",
            f"--processed_images_dir={processed}",
            f"--models_dir={tiny_trained_model['models']}",
            f"--generated_images_dir={output}",
            f"--judge_dir={tmp_path / 'judge'}",
        ],
        cwd=REPOSITORY_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_lock(processed / ".32x32.lock", f"reading: process {evaluation.pid} ", evaluation)
        finished = run_script(
            "cvae_pre_processing",
            f"--raw_images_dir={tiny_trained_model['raw']}",
            f"--processed_images_dir={processed}",
            "--image_size=32",
        )
        assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
        assert f"is being read by process {evaluation.pid}" in finished.stderr.strip().splitlines()[-1]
    finally:
        evaluation.kill()
        evaluation.wait()
