"""The realism check: its statistics measure what they name, and the script reports and refuses."""

import copy
import json
import math

import numpy as np
import pytest
from PIL import Image

from cilia_cvae import phantoms, realism
from conftest import REAL_SAMPLES_DIR


def render_with(seed, class_name, number, change):
    """One phantom drawn twice from the same random state, the second time with `change` applied."""
    rng, cilium, width, height = phantoms.plan_phantom(seed, "five", class_name, number)
    images = []
    for altered in (False, True):
        state, drawn = copy.deepcopy(rng), copy.deepcopy(cilium)
        if altered:
            change(drawn)
        density, pixels_per_nm = phantoms.compose_section(state, drawn, width, height)
        images.append(phantoms.apply_microscope(state, density, pixels_per_nm))
    return images


def test_the_membrane_statistics_follow_the_membrane():
    thicker, wider_gap = [], []
    for number in range(1, 5):

        def thicken(cilium):
            cilium.membrane_thickness *= 2.0

        def enlarge(cilium):
            # The membrane moves out, the doublets stay: the pale band between them widens.
            cilium.membrane_radius *= 1.12

        plain, thick = render_with(4, "Normal", number, thicken)
        thicker.append(
            realism.measure(thick)["membrane_thickness"] - realism.measure(plain)["membrane_thickness"]
        )
        plain, wide = render_with(4, "Normal", number, enlarge)
        wider_gap.append(realism.measure(wide)["membrane_gap"] - realism.measure(plain)["membrane_gap"])
    assert np.median(thicker) > 0.005 and min(thicker) > 0
    assert np.median(wider_gap) > 0.005


def test_grain_and_spectrum_see_added_noise():
    pixels, _ = phantoms.render_phantom(4, "five", "ODA", 1)
    noisy = np.clip(pixels + np.random.default_rng(0).normal(0.0, 20.0, pixels.shape), 0, 255)
    plain, grainy = realism.measure(pixels), realism.measure(noisy)
    assert grainy["fine_grain_share"] > plain["fine_grain_share"] + 0.05
    assert grainy["spectrum_slope"] > plain["spectrum_slope"]  # flatter: more power at fine scales
    assert realism.percentile_within(5.0, [1.0, 2.0, 3.0, 4.0]) == 100.0
    assert math.isnan(realism.percentile_within(math.nan, [1.0]))


@pytest.mark.skipif(not REAL_SAMPLES_DIR.is_dir(), reason="the real crops are not beside the repository")
def test_every_statistic_is_measured_on_every_real_crop():
    for path in sorted(REAL_SAMPLES_DIR.glob("*.jpg")):
        measured = realism.measure(path)
        assert set(measured) == set(realism.STATISTICS)
        assert all(math.isfinite(value) for value in measured.values()), path.name


def test_the_script_places_each_crop_and_refuses_a_folder_without_crops(tmp_path, script):
    crops = tmp_path / "crops"
    crops.mkdir()
    for number in (1, 2):
        pixels, _ = phantoms.render_phantom(9, "five", "Normal", number)
        Image.fromarray(pixels).save(crops / f"crop_{number}.png")
    report = tmp_path / "realism.json"
    finished = script(
        "check_phantom_realism", f"--real_samples_dir={crops}", "--num_images=40", f"--report_json={report}"
    )
    assert finished.returncode in (0, 1), finished.stderr
    assert "crop_1.png" in finished.stdout and "membrane_gap" in finished.stdout
    written = json.loads(report.read_text())
    assert {row["statistic"] for row in written["statistics"]} == set(realism.STATISTICS)
    percentiles = [row["real"]["crop_2.png"]["percentile"] for row in written["statistics"]]
    assert all(0.0 <= value <= 100.0 for value in percentiles)

    empty = tmp_path / "empty"
    empty.mkdir()
    refused = script("check_phantom_realism", f"--real_samples_dir={empty}", "--num_images=40")
    assert refused.returncode == 2
    assert "holds no real crops" in refused.stderr and "Traceback" not in refused.stderr


def test_the_blind_sheet_hides_the_key_and_repeats_with_its_seed(tmp_path, script):
    crops = tmp_path / "crops"
    crops.mkdir()
    for number in (1, 2):
        Image.new("L", (90, 70), 40 * number).save(crops / f"real_{number}.png")
    sheets = {}
    for name, seed in (("first", 3), ("again", 3), ("other", 4)):
        finished = script(
            "check_phantom_realism",
            f"--real_samples_dir={crops}",
            f"--blind_sheet={tmp_path / name}.png",
            "--sheet_phantoms=3",
            "--sheet_tile=48",
            f"--sheet_seed={seed}",
            "--phantom_seed=8",
        )
        assert finished.returncode == 0, finished.stderr
        key = json.loads((tmp_path / f"{name}_key.json").read_text())
        sheets[name] = ((tmp_path / f"{name}.png").read_bytes(), key)
    sheet, key = sheets["first"]
    # Five numbered tiles: the two real crops somewhere among three phantoms, the key apart.
    assert sorted(tile["tile"] for tile in key["tiles"]) == [1, 2, 3, 4, 5]
    assert sorted(tile["file"] for tile in key["tiles"] if tile["source"] == "real") == [
        "real_1.png",
        "real_2.png",
    ]
    assert key["tiles_by_source"]["real"] == [
        tile["tile"] for tile in key["tiles"] if tile["source"] == "real"
    ]
    assert all(tile["seed"] == 8 for tile in key["tiles"] if tile["source"] == "phantom")
    assert b"real_1" not in sheet
    with Image.open(tmp_path / "first.png") as image:
        assert image.mode == "L" and image.width == 4 * (48 + 8)
        # A real crop's tile holds its flat grey (40 or 80) after squashing: the sheet shows the crops.
        pixels = np.asarray(image)
    position = key["tiles_by_source"]["real"][0] - 1
    real_grey = 40 * int(key["tiles"][position]["file"][5])
    left, top = (position % 4) * 56 + 4, (position // 4) * (56 + 22) + 22
    assert abs(float(np.median(pixels[top : top + 48, left : left + 48])) - real_grey) <= 1
    # The same seed repeats the sheet byte for byte; another seed draws other phantoms.
    assert sheets["again"][0] == sheet and sheets["again"][1]["tiles"] == key["tiles"]
    assert sheets["other"][1]["tiles"] != key["tiles"]
