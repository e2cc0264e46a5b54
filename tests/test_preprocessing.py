"""Preprocessing as a user meets it: a messy raw folder in, square PNGs and a manifest out."""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cilia_cvae.config import UserError, configure, parse_value
from cilia_cvae.images import UnreadableImage, make_square, read_grayscale
from conftest import REAL_SAMPLES_DIR, run_script


def textured_image(seed, width=120, height=100):
    """A distinct grayscale image per seed, so no two test images are accidental duplicates."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = (
        128
        + 60 * np.sin(x / (5 + seed % 7)) * np.cos(y / (4 + seed % 5))
        + rng.normal(0, 10, (height, width))
    )
    return np.clip(pixels, 0, 255).astype(np.uint8)


def tree_snapshot(folder):
    """Every file's relative path, bytes digest and modification time: to prove a folder untouched."""
    return {
        path.relative_to(folder).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    }


def build_messy_raw_folder(raw):
    """A raw folder with every kind of bad input a real collection holds; returns the expected outcomes."""
    expected = {}
    normal, oda, cp, empty = raw / "Normal", raw / "ODA", raw / "CP défaut", raw / "Empty"
    for folder in (normal, oda, cp, empty):
        folder.mkdir(parents=True)
    if REAL_SAMPLES_DIR.is_dir():
        for sample in sorted(REAL_SAMPLES_DIR.glob("*.jpg")):
            shutil.copyfile(sample, normal / sample.name)
            expected[f"Normal/{sample.name}"] = "kept"
    for index in range(4):
        Image.fromarray(textured_image(index)).save(normal / f"plain {index}.png")
        expected[f"Normal/plain {index}.png"] = "kept"
    # The same stem twice in one class: the second becomes <stem>_<ext>.png.
    Image.fromarray(textured_image(50)).save(normal / "twin.png")
    Image.fromarray(textured_image(51)).save(normal / "twin.bmp")
    expected.update({"Normal/twin.png": "kept", "Normal/twin.bmp": "kept"})
    # Colour and exotic modes.
    rgb = np.stack([textured_image(10)] * 3, axis=-1)
    Image.fromarray(rgb).convert("RGBA").save(oda / "rgba.png")
    Image.fromarray(np.stack([textured_image(13)] * 3, axis=-1)).convert("CMYK").save(oda / "cmyk.tiff")
    Image.fromarray(textured_image(11)).convert("LA").save(oda / "gray_alpha.png")
    palette_frames = [Image.fromarray(textured_image(40 + frame)).convert("P") for frame in range(2)]
    palette_frames[0].save(oda / "animated.gif", save_all=True, append_images=palette_frames[1:])
    sixteen_bit = textured_image(14).astype(np.uint16) * 257
    Image.fromarray(sixteen_bit).save(oda / "sixteen_bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(textured_image(15, 80, 40)).convert("RGB").save(oda / "rotated.jpg", exif=exif)
    Image.fromarray(textured_image(16)).save(cp / "ünïcode name.tif")
    Image.fromarray(textured_image(17)).save(cp / "second.png")
    for name in ("rgba.png", "cmyk.tiff", "gray_alpha.png", "animated.gif", "sixteen_bit.png", "rotated.jpg"):
        expected[f"ODA/{name}"] = "kept"
    expected.update({"CP défaut/ünïcode name.tif": "kept", "CP défaut/second.png": "kept"})
    # Duplicates within a class are kept once; the same image in two classes is a conflict.
    Image.fromarray(textured_image(1)).save(normal / "zz copy of plain 1.png")
    expected["Normal/zz copy of plain 1.png"] = "duplicate"
    Image.fromarray(textured_image(20)).save(normal / "shared.png")
    Image.fromarray(textured_image(20)).save(cp / "shared.png")
    expected.update({"Normal/shared.png": "conflict", "CP défaut/shared.png": "conflict"})
    # Files that are not usable images.
    buffer = io.BytesIO()
    Image.fromarray(textured_image(30)).save(buffer, format="PNG")
    (normal / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (normal / "empty.png").write_bytes(b"")
    (normal / "notes.txt").write_text("microscope settings")
    (normal / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (oda / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    Image.fromarray(textured_image(31, 10, 12)).save(oda / "tiny.png")
    Image.fromarray(textured_image(32)).save(raw / "loose_in_root.png")
    (normal / "deeper").mkdir()
    Image.fromarray(textured_image(33)).save(normal / "deeper" / "nested.png")
    for name in (
        "Normal/truncated.png",
        "Normal/empty.png",
        "Normal/notes.txt",
        "Normal/.DS_Store",
        "ODA/Thumbs.db",
        "ODA/tiny.png",
        "loose_in_root.png",
        "Normal/deeper/nested.png",
    ):
        expected[name] = "rejected"
    return expected


def test_messy_raw_folder_gives_a_defined_outcome_for_every_file(tmp_path):
    raw, processed = tmp_path / "raw", tmp_path / "processed"
    expected = build_messy_raw_folder(raw)
    before = tree_snapshot(raw)

    finished = run_script(
        "cvae_pre_processing",
        f"--raw_images_dir={raw}",
        f"--processed_images_dir={processed}",
        "--image_size=64",
    )
    assert finished.returncode == 0, finished.stderr
    assert tree_snapshot(raw) == before, "the raw folder must never be modified"

    manifest = pd.read_csv(processed / "64x64" / "manifest.csv", keep_default_na=False)
    assert sorted(manifest["source_path"]) == sorted(expected), "one manifest row per file found"
    outcome_of = dict(zip(manifest["source_path"], manifest["outcome"]))
    for source, expected_outcome in expected.items():
        outcome = outcome_of[source]
        if expected_outcome == "kept":
            assert outcome in ("train", "test"), (source, outcome)
        else:
            assert outcome == expected_outcome, (source, outcome)
    left_out = manifest[~manifest["outcome"].isin(["train", "test"])]
    assert (left_out["reason"].str.len() > 0).all(), "every file left out has a reason"

    written = sorted(
        path.relative_to(processed / "64x64").as_posix() for path in (processed / "64x64").glob("*/*/*.png")
    )
    kept = manifest[manifest["outcome"].isin(["train", "test"])]
    assert written == sorted(kept["processed_path"])
    processed_name = {
        source: path.rsplit("/", 1)[-1] for source, path in zip(kept["source_path"], kept["processed_path"])
    }
    assert processed_name["Normal/twin.bmp"] == "twin.png", (
        "the first file of a stem (in name order) keeps it"
    )
    assert processed_name["Normal/twin.png"] == "twin_png.png", "the second gets <stem>_<ext>.png"
    for path in (processed / "64x64").glob("*/*/*.png"):
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (64, 64)

    facts = json.loads((processed / "64x64" / "preprocessing.json").read_text())
    assert facts["class_names"] == ["CP défaut", "Normal", "ODA"], "an empty class folder is not a class"
    statistics = pd.read_csv(processed / "raw_image_statistics.csv")
    assert list(statistics.columns) == [
        "width_mean",
        "width_std",
        "height_mean",
        "height_std",
        "aspect_ratio_mean",
        "aspect_ratio_std",
    ]
    assert len(statistics) == 1
    assert "rejected" in finished.stdout and "conflict" in finished.stdout, (
        "the summary names what was left out"
    )


def test_sixteen_bit_is_scaled_from_the_full_range_not_clipped(tmp_path):
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((32, 32), 32896, dtype=np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I"), "the test needs a real 16-bit file"
    pixels, facts = read_grayscale(path)
    assert facts["bit_depth"] == 16
    assert pixels.dtype == np.uint8 and np.all(pixels == 128)

    ramp = (np.linspace(1000, 5000, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    stretched, _ = read_grayscale(path, stretch_percentiles=(0.1, 99.9))
    assert stretched.min() == 0 and stretched.max() == 255, "percentile stretch fills the 8-bit range"


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((40, 80), dtype=np.uint8)
    pixels[:, :40] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(pixels).convert("RGB").save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    read, facts = read_grayscale(tmp_path / "rotated.jpg")
    assert (facts["width"], facts["height"]) == (40, 80)
    assert read[:35].mean() > 200 and read[45:].mean() < 50, "the white half ends up on top after rotation"


def test_unreadable_and_tiny_files_raise_with_a_reason(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    Image.fromarray(textured_image(3, 8, 8)).save(tmp_path / "tiny.png")
    for name, words in (("zero.png", "not an image"), ("tiny.png", "at least 16")):
        with pytest.raises(UnreadableImage, match=words):
            read_grayscale(tmp_path / name)


def test_pad_keeps_aspect_without_a_hard_border():
    pixels = np.full((50, 100), 200, dtype=np.uint8)
    pixels[20:30, 40:60] = 20
    square = np.asarray(make_square(pixels, 64, "pad"))
    assert square.shape == (64, 64)
    # Mirrored padding continues the light background: no dark or flat band along the edge.
    assert square[:5].mean() > 150 and square[-5:].mean() > 150
    squashed = np.asarray(make_square(pixels, 64, "squash"))
    assert squashed.shape == (64, 64)


@pytest.mark.skipif(
    not REAL_SAMPLES_DIR.is_dir(), reason="../shared/real-tem-samples is not beside this checkout"
)
@pytest.mark.parametrize("resize_mode", ["squash", "pad"])
def test_real_samples_in_both_resize_modes(tmp_path, resize_mode):
    raw = tmp_path / "raw"
    for index, sample in enumerate(sorted(REAL_SAMPLES_DIR.glob("*.jpg"))):
        folder = raw / ("Normal" if index % 2 else "Mirrored")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample, folder / sample.name)
    processed = tmp_path / "processed"
    finished = run_script(
        "cvae_pre_processing",
        f"--raw_images_dir={raw}",
        f"--processed_images_dir={processed}",
        "--image_size=64",
        f"--resize_mode={resize_mode}",
    )
    assert finished.returncode == 0, finished.stderr
    outputs = sorted((processed / "64x64").glob("*/*/*.png"))
    assert len(outputs) == 4
    for path in outputs:
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (64, 64) and 30 < pixels.mean() < 230 and pixels.std() > 10


def test_split_is_stratified_and_the_same_on_every_rerun(tmp_path):
    raw = tmp_path / "raw"
    sizes = {"Normal": 40, "ODA": 10, "IDA": 2, "Rare": 1}
    seed = 0
    for class_name, count in sizes.items():
        (raw / class_name).mkdir(parents=True)
        for index in range(count):
            seed += 1
            Image.fromarray(textured_image(seed, 24, 24)).save(
                raw / class_name / f"{class_name}_{index:03d}.png"
            )
    splits = []
    for run in range(2):
        processed = tmp_path / f"processed{run}"
        finished = run_script(
            "cvae_pre_processing",
            f"--raw_images_dir={raw}",
            f"--processed_images_dir={processed}",
            "--image_size=16",
            "--workers=1" if run else "--workers=2",
        )
        assert finished.returncode == 0, finished.stderr
        manifest = pd.read_csv(processed / "16x16" / "manifest.csv", keep_default_na=False)
        splits.append(dict(zip(manifest["source_path"], manifest["outcome"])))
    assert splits[0] == splits[1], "same seed, same split, whatever the worker count"
    counts = (
        pd.Series(splits[0]).groupby(lambda source: source.split("/")[0]).value_counts().unstack(fill_value=0)
    )
    assert counts.loc["Normal", "test"] == 8 and counts.loc["ODA", "test"] == 2
    assert counts.loc["IDA", "test"] == 1 and counts.loc["IDA", "train"] == 1, "2 images: one in each split"
    assert counts.loc["Rare", "train"] == 1 and counts.loc["Rare"].get("test", 0) == 0

    other_seed = tmp_path / "other_seed"
    run_script(
        "cvae_pre_processing",
        f"--raw_images_dir={raw}",
        f"--processed_images_dir={other_seed}",
        "--image_size=16",
        "--seed=7",
    )
    manifest = pd.read_csv(other_seed / "16x16" / "manifest.csv", keep_default_na=False)
    assert dict(zip(manifest["source_path"], manifest["outcome"])) != splits[0], "the seed chooses the split"


def test_rerun_replaces_the_previous_output_for_that_size(tmp_path):
    raw, processed = tmp_path / "raw", tmp_path / "processed"
    for class_name in ("A", "B"):
        (raw / class_name).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(textured_image(index + (10 if class_name == "B" else 0))).save(
                raw / class_name / f"{index}.png"
            )
    arguments = (f"--raw_images_dir={raw}", f"--processed_images_dir={processed}", "--image_size=32")
    assert run_script("cvae_pre_processing", *arguments).returncode == 0
    (raw / "A" / "0.png").unlink()
    # What a killed run leaves: its hidden work folder and a half-swapped old output.
    for leftover in (".32x32.partial-killed/staging", ".32x32.old-999"):
        (processed / leftover).mkdir(parents=True)
    (processed / ".32x32.partial-killed" / "staging" / "x.png").write_bytes(b"")
    assert run_script("cvae_pre_processing", *arguments).returncode == 0
    assert not list((processed / "32x32").glob("*/A/0.png")), (
        "a file gone from the raw folder is gone from the output"
    )
    # Only the lock file stays (a lock nobody holds, which blocks nobody).
    assert not [
        path for path in processed.iterdir() if path.name.startswith(".") and path.name != ".32x32.lock"
    ], "no temporary folders left"


@pytest.mark.parametrize(
    "layout, words",
    [
        ("missing", "does not exist"),
        ("empty", "no images in class sub-folders"),
        ("one_class", "at least two class folders"),
    ],
)
def test_unusable_raw_folder_is_one_line_and_exit_code_2(tmp_path, layout, words):
    raw = tmp_path / "raw"
    if layout != "missing":
        raw.mkdir()
    if layout == "one_class":
        (raw / "Normal").mkdir()
        Image.fromarray(textured_image(1)).save(raw / "Normal" / "a.png")
    finished = run_script(
        "cvae_pre_processing", f"--raw_images_dir={raw}", f"--processed_images_dir={tmp_path / 'p'}"
    )
    assert finished.returncode == 2
    assert words in finished.stderr and "Traceback" not in finished.stderr
    assert len(finished.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argument, words",
    [
        ("--no_such_setting=1", "unknown setting --no_such_setting"),
        ("--image_size=big", "takes a value of type int"),
        ("--resize_mode=crop", "is not one of"),
        ("--image_size=100", "multiple of 8"),
        ("image_size=64", "look like --name=value"),
    ],
)
def test_bad_flags_are_one_line_and_exit_code_2(argument, words):
    finished = run_script("cvae_pre_processing", argument)
    assert finished.returncode == 2
    assert words in finished.stderr and len(finished.stderr.strip().splitlines()) == 1


def test_help_lists_every_constant_and_works_from_any_directory(tmp_path):
    finished = run_script("cvae_pre_processing", "--help", cwd=tmp_path)
    assert finished.returncode == 0
    for name in (
        "image_size",
        "resize_mode",
        "test_fraction",
        "seed",
        "stretch_16bit",
        "workers",
        "raw_images_dir",
        "processed_images_dir",
    ):
        assert f"--{name}" in finished.stdout
    assert "Processed Input Images" in finished.stdout, "folder defaults resolve from the repository root"


def test_override_parser_types():
    assert parse_value("EPOCHS", "5", 10) == 5
    assert parse_value("LEARNING_RATE", "1", 0.001) == 1.0
    assert parse_value("FRESH", "true", False) is True
    assert parse_value("RESIZE_MODE", "pad", "squash") == "pad"
    assert parse_value("RAW_IMAGES_DIR", "some dir", Path("/x")) == Path("some dir").resolve()
    with pytest.raises(UserError):
        parse_value("FRESH", "maybe", False)
    with pytest.raises(UserError):
        parse_value("EPOCHS", "2.5", 10)


def test_configure_overrides_in_place(tmp_path):
    script = tmp_path / "fake_script.py"
    script.write_text("EPOCHS = 10  # how long\nNAME = 'x'  # a name\n")
    namespace = {"__file__": str(script), "__doc__": "A fake.", "EPOCHS": 10, "NAME": "x"}
    settings = configure(namespace, ["--epochs=3", "--name=hello world"])
    assert settings == {"EPOCHS": 3, "NAME": "hello world"} and namespace["EPOCHS"] == 3
    with pytest.raises(UserError, match="valid names: --epochs, --name"):
        configure(namespace, ["--EPOCHS=3"])


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    from cilia_cvae.files import FILE_MODE, write_text_atomic

    write_text_atomic(tmp_path / "out.txt", "hello")
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == FILE_MODE, (
        "0666 less the umask, not mkstemp's 0600"
    )


def test_odd_raw_entries_each_get_a_row_with_what_happened(tmp_path):
    import os

    import pandas as pd

    raw, processed, elsewhere = (
        tmp_path / "raw",
        tmp_path / "processed",
        tmp_path / "elsewhere" / "IDA images",
    )
    for folder in (raw / "Normal", raw / "ODA", elsewhere):
        folder.mkdir(parents=True)
    for index in range(3):
        Image.fromarray(textured_image(60 + index)).save(raw / "Normal" / f"{index}.png")
        Image.fromarray(textured_image(70 + index)).save(raw / "ODA" / f"{index}.png")
        Image.fromarray(textured_image(80 + index)).save(elsewhere / f"{index}.png")
    (raw / "IDA").symlink_to(elsewhere, target_is_directory=True)  # a class assembled from a link
    (raw / "ODA" / "linked folder").symlink_to(elsewhere, target_is_directory=True)
    os.mkfifo(raw / "ODA" / "pipe.png")
    unreadable = raw / "Normal" / "locked.png"
    Image.fromarray(textured_image(90)).save(unreadable)
    unreadable.chmod(0)
    result = run_script(
        "cvae_pre_processing",
        f"--raw_images_dir={raw}",
        f"--processed_images_dir={processed}",
        "--image_size=32",
        timeout=120,
    )
    unreadable.chmod(0o644)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = pd.read_csv(processed / "32x32" / "manifest.csv", keep_default_na=False).set_index(
        "source_path"
    )
    assert {f"IDA/{index}.png" for index in range(3)} <= set(manifest.index)
    assert set(manifest.loc[[f"IDA/{index}.png" for index in range(3)], "outcome"]) <= {"train", "test"}
    assert "symbolic link to a folder" in manifest.loc["ODA/linked folder", "reason"]
    assert manifest.loc["ODA/pipe.png", "outcome"] == "rejected"
    assert "named pipe" in manifest.loc["ODA/pipe.png", "reason"]
    if os.geteuid() != 0:  # the superuser reads any file, so only another user sees the refusal
        assert "permission denied" in manifest.loc["Normal/locked.png", "reason"]


def test_a_full_disk_is_one_line_naming_it(tmp_path):
    import subprocess

    full = tmp_path / "small disk"
    full.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], capture_output=True
    ).returncode:
        pytest.skip("this machine cannot mount a small file system for the test")
    try:
        raw = tmp_path / "raw"
        for class_name in ("A", "B"):
            (raw / class_name).mkdir(parents=True)
            for index in range(40):
                Image.fromarray(textured_image(index + (100 if class_name == "B" else 0))).save(
                    raw / class_name / f"{index}.png"
                )
        result = run_script(
            "cvae_pre_processing",
            f"--raw_images_dir={raw}",
            f"--processed_images_dir={full}",
            "--image_size=64",
            "--workers=1",
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "is full; free some space" in result.stderr.strip().splitlines()[-1]
        assert len(list(raw.rglob("*.png"))) == 80, "the raw folder is untouched"
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)


def test_non_finite_float_settings_are_refused_at_the_door():
    from cilia_cvae.config import UserError, parse_value

    for text in ("1e999", "-1e999", "nan", "inf"):
        with pytest.raises(UserError, match="--temperature"):
            parse_value("TEMPERATURE", text, 1.0)
    assert parse_value("TEMPERATURE", "1e300", 1.0) == 1e300


def test_a_killed_preprocessing_leaves_no_pool_workers_behind(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPOSITORY_ROOT, SCRIPTS_DIR

    raw = tmp_path / "raw for the worker test"
    for class_name in ("A", "B"):
        (raw / class_name).mkdir(parents=True)
        for index in range(150):
            Image.fromarray(textured_image(index, 600, 600)).save(raw / class_name / f"{index}.png")
    command = [
        sys.executable,
        str(SCRIPTS_DIR / "cvae_pre_processing.py"),
        f"--raw_images_dir={raw}",
        f"--processed_images_dir={tmp_path / 'processed'}",
        "--image_size=448",
        "--workers=2",
    ]
    parent = subprocess.Popen(
        command, cwd=REPOSITORY_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def workers():
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if (
                    entry.name.isdigit()
                    and int(entry.name) != parent.pid
                    and str(raw).encode() in (entry / "cmdline").read_bytes()
                ):
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

    deadline = time.time() + 60
    while not workers() and parent.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert workers(), "the pool never started"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 5
    while workers() and time.time() < deadline:
        time.sleep(0.05)
    assert not workers(), "pool workers outlived their killed parent"


def test_listings_never_read_the_hidden_files_of_writes_in_progress(tmp_path):
    from cilia_cvae.images import list_images
    from cilia_cvae.layout import GeneratedLayout

    folder = tmp_path / "32x32" / "ODA"
    folder.mkdir(parents=True)
    Image.fromarray(textured_image(1)).save(folder / "Synthetic_ODA_00001.png")
    (folder / ".Synthetic_ODA_00002.abc123.partial.png").write_bytes(b"")
    paths, _ = list_images(tmp_path / "32x32", ["ODA"])
    assert [path.name for path in paths] == ["Synthetic_ODA_00001.png"]
    assert [path.name for path in GeneratedLayout(tmp_path, 32).all_images()] == ["Synthetic_ODA_00001.png"]
