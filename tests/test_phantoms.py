"""The built-in phantom data: determinism, folders and counts, crop sizes, refusals, anatomy."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cilia_cvae import phantoms
from conftest import SCRIPTS_DIR

FIVE_CLASSES = ["Normal", "Disarranged", "ODA", "IDA", "CP"]
MARKER_NAME = ".phantom_dataset.json"


def tree_snapshot(folder):
    """Every file's relative path, content digest and modification time: to prove a folder untouched."""
    return {
        path.relative_to(folder).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    }


def contents(folder):
    return {name: digest for name, (digest, _) in tree_snapshot(folder).items()}


def test_same_seed_gives_identical_files_and_a_second_run_is_refused(tmp_path, script):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, workers in ((first, 2), (second, 1)):
        finished = script(
            "make_phantom_dataset",
            f"--raw_images_dir={folder}",
            "--num_images=60",
            "--seed=1",
            f"--workers={workers}",
        )
        assert finished.returncode == 0, finished.stderr

    expected_counts = phantoms.class_counts(60, "five")
    assert sorted(path.name for path in first.iterdir() if path.is_dir()) == sorted(FIVE_CLASSES)
    for class_name in FIVE_CLASSES:
        files = sorted((first / class_name).iterdir())
        assert [path.name for path in files] == [
            f"{class_name}_{n:04d}.png" for n in range(1, expected_counts[class_name] + 1)
        ]
        with Image.open(files[0]) as image:
            assert image.mode == "L"
    assert expected_counts["Normal"] == max(expected_counts.values())
    # Byte-identical whatever the number of workers, marker included.
    assert contents(first) == contents(second)
    marker = json.loads((first / MARKER_NAME).read_text())
    assert marker["complete"] and len(marker["files"]) == 60

    before = tree_snapshot(first)
    refused = script("make_phantom_dataset", f"--raw_images_dir={first}", "--num_images=60", "--seed=1")
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "--overwrite_phantoms=True" in refused.stderr
    assert tree_snapshot(first) == before

    # With permission, phantoms it wrote itself are replaced, and the same settings give the same folder.
    replaced = script(
        "make_phantom_dataset",
        f"--raw_images_dir={first}",
        "--num_images=60",
        "--seed=1",
        "--overwrite_phantoms=True",
    )
    assert replaced.returncode == 0, replaced.stderr
    assert contents(first) == contents(second)


def test_never_mixes_with_or_replaces_other_images(tmp_path, script):
    real = tmp_path / "real"
    (real / "Normal").mkdir(parents=True)
    Image.new("L", (40, 30), 128).save(real / "Normal" / "patient 1.png")
    before = tree_snapshot(real)
    for extra in ([], ["--overwrite_phantoms=True"]):
        refused = script("make_phantom_dataset", f"--raw_images_dir={real}", "--num_images=5", *extra)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
        assert tree_snapshot(real) == before

    # A foreign image among earlier phantoms, or a phantom changed since, blocks the overwrite too.
    mixed = tmp_path / "mixed"
    assert script("make_phantom_dataset", f"--raw_images_dir={mixed}", "--num_images=5").returncode == 0
    Image.new("L", (40, 30), 128).save(mixed / "ODA" / "patient 2.png")
    before = tree_snapshot(mixed)
    refused = script(
        "make_phantom_dataset", f"--raw_images_dir={mixed}", "--num_images=5", "--overwrite_phantoms=True"
    )
    assert refused.returncode == 2 and "patient 2.png" in refused.stderr
    assert tree_snapshot(mixed) == before
    (mixed / "ODA" / "patient 2.png").unlink()
    Image.new("L", (40, 30), 0).save(mixed / "Normal" / "Normal_0001.png")
    refused = script(
        "make_phantom_dataset", f"--raw_images_dir={mixed}", "--num_images=5", "--overwrite_phantoms=True"
    )
    assert refused.returncode == 2 and "Normal_0001.png" in refused.stderr

    # Hidden system files do not count as images: the folder is still free for phantoms.
    hidden_only = tmp_path / "hidden_only"
    hidden_only.mkdir()
    (hidden_only / ".DS_Store").write_bytes(b"\0")
    assert script("make_phantom_dataset", f"--raw_images_dir={hidden_only}", "--num_images=5").returncode == 0


def test_written_sizes_follow_the_plan_and_match_the_real_crop_statistics(tmp_path, script):
    folder = tmp_path / "phantoms"
    assert (
        script("make_phantom_dataset", f"--raw_images_dir={folder}", "--num_images=20", "--seed=3").returncode
        == 0
    )
    for class_name, count in phantoms.class_counts(20, "five").items():
        for number in range(1, count + 1):
            _, _, width, height = phantoms.plan_phantom(3, "five", class_name, number)
            with Image.open(folder / phantoms.phantom_relative_path(class_name, number)) as image:
                assert image.size == (width, height)

    # The plan of 400 images (sizes are drawn before any rendering), against the real statistics.
    sizes = np.array(
        [
            phantoms.plan_phantom(5, "five", class_name, number)[2:]
            for class_name, count in phantoms.class_counts(400, "five").items()
            for number in range(1, count + 1)
        ],
        dtype=float,
    )
    widths, heights = sizes[:, 0], sizes[:, 1]
    aspects = widths / heights
    assert abs(widths.mean() - 524.6) < 35 and abs(widths.std() - 174.4) < 30
    assert abs(heights.mean() - 508.5) < 35 and abs(heights.std() - 173.9) < 30
    assert abs(aspects.mean() - 1.040) < 0.03 and abs(aspects.std() - 0.117) < 0.03


def clean_density(cilium):
    """The cilium alone, unrotated and unblurred, at 2 px/nm: what the microscope then degrades."""
    pixels_per_nm, size = 2.0, 640
    view = phantoms.make_view(pixels_per_nm, 0.0, 1.0, 0.0, False, (size / 2, size / 2))
    return phantoms.draw_density(cilium, view, size, size, 1), view


def density_at(density, view, point):
    column, row = np.rint(view.to_canvas(np.asarray(point)[None, :])).astype(int)
    return density[row, column]


def arm_counts(cilium):
    """How many doublets show an outer and an inner arm, read from the pixels at the arm's middle.

    Arms are faint (their excess over the matrix is 30-60% of the wall's, the inner arm's less),
    so "shows" means clearly denser than the bare matrix (0.10), which absent arms leave.
    """
    density, view = clean_density(cilium)
    outer = sum(
        density_at(density, view, d.place(phantoms.OUTER_ARM_PATH[2:3])[0]) > 0.3
        for d in cilium.doublets
        if d.present
    )
    inner = sum(
        density_at(density, view, d.place(phantoms.INNER_ARM_PATH[2:3])[0]) > 0.28
        for d in cilium.doublets
        if d.present
    )
    return outer, inner


def test_each_class_draws_its_defining_structure():
    for number in range(1, 13):
        plan = {name: phantoms.plan_phantom(11, "five", name, number)[1] for name in FIVE_CLASSES}
        assert min(arm_counts(plan["Normal"])) >= 8
        outer, inner = arm_counts(plan["ODA"])
        assert outer <= 2 and inner >= 8
        outer, inner = arm_counts(plan["IDA"])
        assert outer >= 8 and inner <= 2

        normal, central = plan["Normal"], plan["CP"]
        assert len(normal.central_tubules) == 2 and normal.transposed_doublet is None
        pair_offset = (
            np.linalg.norm(sum(central.central_tubules) / 2) if len(central.central_tubules) == 2 else 0.0
        )
        assert len(central.central_tubules) != 2 or pair_offset >= 20.0
        if central.transposed_doublet is not None:
            assert sum(d.present for d in central.doublets) == 8

        assert not normal.displacements and max(plan["Disarranged"].displacements) >= 25.0
        assert all(d.present for d in normal.doublets)


def test_outer_arms_point_clockwise_from_base_to_tip_and_mirror_flips_them():
    cilium = phantoms.plan_phantom(1, "five", "Normal", 1)[1]
    for mirror, expected_turn in ((False, 1.0), (True, -1.0)):
        view = phantoms.make_view(1.0, 0.7, 1.0, 0.0, mirror, (0.0, 0.0))
        for doublet in cilium.doublets:
            base, tip = (
                np.array(view.to_canvas(point[None, :]))
                for point in doublet.place(phantoms.OUTER_ARM_PATH[[0, -1]])
            )
            # In screen coordinates (y down), a positive cross product turns clockwise.
            turn = base[0] * tip[1] - base[1] * tip[0]
            assert math.copysign(1.0, turn) == expected_turn


def test_the_generator_does_not_import_tensorflow():
    helper = Path(__file__).resolve().parent / "helpers" / "phantom_imports.py"
    finished = subprocess.run(
        [sys.executable, str(helper)],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS_DIR)),
    )
    assert finished.stdout.strip() == "False"
