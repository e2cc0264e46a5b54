"""Variations as a user runs them: real training crops of a class, each in a drawn orientation,
noised part-way and redrawn by the latent prior under their own class (--sampling=variation).

The run is conftest's one-epoch 32 px model with the small jittered denoiser of helpers/fake_prior.py,
so the prior's output is not a cilium: what is checked is what the manifest says and what strength 0,
the seed and mixing do. The script runs are started at once (each spends most of its time importing).
"""

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from helpers.fake_prior import add_latent_prior
from PIL import Image

from cilia_cvae import generation, latent_prior
from cilia_cvae.layout import ProcessedLayout, RunLayout
from conftest import run_script

CLASSES = ("Normal", "ODA")
IMAGES = 6


def arguments(folders, generated, *extra):
    return (
        "--image_size=32",
        f"--processed_images_dir={folders['processed']}",
        f"--models_dir={folders['models']}",
        f"--latent_tensors_dir={folders['latents']}",
        f"--generated_images_dir={generated}",
        "--restore_aspect=False",
        "--grain=False",
        "--sampling=variation",
        f"--classes={','.join(CLASSES)}",
        f"--images_per_class={IMAGES}",
        "--sampling_steps=4",
        "--guidance=2",
        "--seed=7",
        *extra,
    )


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


@pytest.fixture(scope="module")
def variation_run(tiny_trained_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("variation_run")
    folders = dict(tiny_trained_model, models=root / "models")
    shutil.copytree(tiny_trained_model["models"], folders["models"])
    add_latent_prior(folders["models"], folders["latents"], 32, width=8)
    # The same run with a prior trained on noise levels up to 0.5 only (--prior_max_noise_level=0.5).
    short = dict(folders, models=root / "short_prior_models")
    shutil.copytree(tiny_trained_model["models"], short["models"])
    add_latent_prior(short["models"], short["latents"], 32, width=8, max_noise_level=0.5)
    requests = {
        "strength_0": arguments(folders, root / "strength_0", "--variation_strength=0", "--figures=False"),
        "half": arguments(folders, root / "half", "--variation_strength=0.5"),
        "half_again": arguments(folders, root / "half_again", "--variation_strength=0.5", "--figures=False"),
        "mixed": arguments(
            folders, root / "mixed", "--variation_strength=0.5", "--variation_mix=0.5", "--figures=False"
        ),
        "bad_strength": arguments(folders, root / "refused", "--variation_strength=1.5"),
        "bad_mix": arguments(folders, root / "refused", "--variation_mix=0.8"),
        "with_counterfactual": arguments(folders, root / "refused", "--counterfactual_from=Normal"),
        "no_prior": arguments(tiny_trained_model, root / "refused"),
        "short_prior_at_its_level": arguments(
            short, root / "short_prior_at_its_level", "--variation_strength=0.5"
        ),
        "short_prior_above_its_level": arguments(short, root / "refused", "--variation_strength=0.7"),
        "short_prior_full_draw": arguments(short, root / "refused", "--sampling=diffusion"),
        "short_prior_counterfactual": arguments(
            short,
            root / "refused",
            "--sampling=diffusion",
            "--counterfactual_from=Normal",
            "--edit_strength=0.7",
        ),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(run_script, "cvae_inference", *values) for name, values in requests.items()
        }
        finished = {name: future.result() for name, future in futures.items()}
    return {"folders": folders, "root": root, "finished": finished}


def manifest_of(variation_run, name):
    finished = variation_run["finished"][name]
    assert finished.returncode == 0, finished.stderr[-3000:]
    return pd.read_csv(variation_run["root"] / name / "32x32" / "generation_manifest.csv")


def test_strength_0_returns_each_source_crops_reconstruction_in_its_orientation(variation_run):
    manifest = manifest_of(variation_run, "strength_0")
    folders = variation_run["folders"]
    assert set(manifest["sampling"]) == {"variation"} and set(manifest["edit_strength"]) == {0.0}
    generator = generation.load_trained_generator(folders["models"], folders["latents"], 32)
    class_names = generator["parameters"]["class_names"]
    latent_dim = int(generator["parameters"]["latent_dim"])
    decode = generation.make_decode_function(generator["decoder"], 64, latent_dim, len(class_names))
    processed = ProcessedLayout(folders["processed"], 32)
    for class_name in CLASSES:
        rows = manifest[manifest["class"] == class_name].sort_values("stream_index")
        crops = [f"{class_name}/{path.name}" for path in processed.images("train", class_name)]
        # The manifest names a crop of the image's own class, and the stored latent of that crop.
        assert all(source in crops for source in rows["counterfactual_source"])
        assert list(rows["source_latent_index"]) == [
            crops.index(source) for source in rows["counterfactual_source"]
        ]
        assert set(rows["source_orientation"]) <= set(range(8))
        z_mean = generator["latents"][class_name][0][rows["source_latent_index"].to_numpy()]
        # A turned crop's latent is the encoder's of the turned crop itself.
        encoder = generation.load_encoder(RunLayout(folders["models"], folders["latents"], 32))
        orientations = rows["source_orientation"].to_numpy()
        crops = np.stack([pixels(processed.split("train") / name) for name in rows["counterfactual_source"]])
        turned = generation.orient_maps(crops[..., None] / 255.0, orientations).astype(np.float32)
        one_hot = np.zeros((len(rows), len(class_names)), np.float32)
        one_hot[:, class_names.index(class_name)] = 1
        encoded = encoder.predict([turned, one_hot], verbose=0)[0].reshape(len(rows), -1)
        latents = np.where((orientations == 0)[:, None], z_mean, encoded)
        expected = decode(latents, class_names.index(class_name))
        written = np.stack(
            [pixels(variation_run["root"] / "strength_0" / "32x32" / file) for file in rows["file"]]
        )
        assert np.array_equal(written, expected), class_name
        upright = (rows["source_orientation"] == 0).to_numpy()
        if upright.any():
            # Upright, strength 0 is exactly the crop's reconstruction.
            assert np.array_equal(written[upright], decode(z_mean[upright], class_names.index(class_name)))
    # The seed draws the orientations: not all the same.
    assert manifest["source_orientation"].nunique() > 1


def test_a_variation_redraws_its_source_and_the_same_seed_gives_the_same_bytes(variation_run):
    half, reconstruction = manifest_of(variation_run, "half"), manifest_of(variation_run, "strength_0")
    manifest_of(variation_run, "half_again")
    assert set(half["edit_strength"]) == {0.5}
    # Same seed: the same source crops and orientations whatever the strength.
    columns = ["class", "stream_index", "counterfactual_source", "source_orientation"]
    assert half[columns].equals(reconstruction[columns])
    root = variation_run["root"]
    for class_name in CLASSES:
        names = sorted(path.name for path in (root / "half" / "32x32" / class_name).glob("*.png"))
        assert len(names) == IMAGES
        first = [(root / "half" / "32x32" / class_name / name).read_bytes() for name in names]
        again = [(root / "half_again" / "32x32" / class_name / name).read_bytes() for name in names]
        assert first == again, class_name
        redrawn = np.stack([pixels(root / "half" / "32x32" / class_name / name) for name in names])
        kept = np.stack([pixels(root / "strength_0" / "32x32" / class_name / name) for name in names])
        assert not np.array_equal(redrawn, kept), "strength 0.5 changes the image, so the test above can fail"
    assert (root / "half" / "32x32" / "variations.png").stat().st_size > 1000


def test_mixing_names_a_second_crop_of_the_class(variation_run):
    mixed = manifest_of(variation_run, "mixed")
    assert set(mixed["mix_weight"]) == {0.5}
    assert (mixed["second_source"] != mixed["counterfactual_source"]).all()
    assert all(source.split("/")[0] == name for source, name in zip(mixed["second_source"], mixed["class"]))
    assert set(mixed["second_source_orientation"]) <= set(range(8))


def test_refusals_are_one_line(variation_run):
    finished = variation_run["finished"]
    for name, fragment in (
        ("bad_strength", "--variation_strength"),
        ("bad_mix", "--variation_mix"),
        ("with_counterfactual", "choose one"),
        ("no_prior", "has no latent prior"),
        ("short_prior_above_its_level", "up to 0.5 only"),
        ("short_prior_full_draw", "cannot start from level 1"),
        ("short_prior_counterfactual", "lower --edit_strength to at most 0.5"),
    ):
        lines = finished[name].stderr.strip().splitlines()
        assert finished[name].returncode == 2 and len(lines) == 1, (name, finished[name].stderr[-2000:])
        assert fragment in lines[0], (name, lines[0])
    assert not (variation_run["root"] / "refused").exists()
    # A prior trained up to 0.5 draws variations at 0.5 itself.
    assert len(manifest_of(variation_run, "short_prior_at_its_level")) == IMAGES * len(CLASSES)
    # Its figures draw nothing from pure noise: the decoder's class figure, no guidance sweep.
    figures = variation_run["root"] / "short_prior_at_its_level" / "32x32"
    assert (figures / "variations.png").is_file() and not (figures / "guidance_sweep.png").exists()


def test_orientations_are_the_ones_the_prior_learnt():
    maps = np.random.default_rng(0).standard_normal((3, 5, 5, 2))
    eight = latent_prior.eight_orientations(maps)
    for orientation in range(8):
        oriented = generation.orient_maps(maps, [orientation] * 3)
        assert np.array_equal(oriented, eight[orientation * 3 : orientation * 3 + 3]), orientation


def test_spherical_mix_keeps_the_ends_and_the_size_of_a_map():
    rng = np.random.default_rng(1)
    first, second = rng.standard_normal((2, 4, 7, 7, 4)).astype(np.float32)
    assert np.allclose(generation.spherical_mix(first, second, 0.0), first, atol=1e-5)
    assert np.allclose(generation.spherical_mix(first, second, 1.0), second, atol=1e-5)
    halfway = generation.spherical_mix(first, second, 0.5)
    norms = np.linalg.norm(halfway.reshape(4, -1), axis=1)
    ends = np.linalg.norm(first.reshape(4, -1), axis=1), np.linalg.norm(second.reshape(4, -1), axis=1)
    assert np.all(norms > 0.9 * np.minimum(*ends))  # the straight average would be about 0.71 of them


@pytest.fixture(scope="module")
def filter_run(variation_run, tmp_path_factory):
    """The variation run given its class filter by the training script, as a user adds one to a finished
    prior (--continue_finished=True), then filtered generations; the test split is first removed from a
    copy of the processed images, so a filter that read it could not have been trained."""
    root = tmp_path_factory.mktemp("filter_run")
    folders = dict(variation_run["folders"], models=root / "models", processed=root / "processed")
    shutil.copytree(variation_run["folders"]["models"], folders["models"])
    shutil.copytree(variation_run["folders"]["processed"], folders["processed"])
    shutil.rmtree(ProcessedLayout(folders["processed"], 32).split("test"))
    trained = run_script(
        "cvae_training_224x224",
        "--image_size=32",
        "--epochs=1",
        "--latent_dim=16",
        "--base_channels=8",
        "--max_channels=32",
        f"--processed_images_dir={folders['processed']}",
        f"--models_dir={folders['models']}",
        f"--latent_tensors_dir={folders['latents']}",
        "--continue_finished=True",
        "--class_filter_epochs=2",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    # Generation reads the processed images the run was trained on (the figures' real crops).
    folders["processed"] = variation_run["folders"]["processed"]
    requests = {
        "open": arguments(folders, root / "open", "--class_filter=True", "--class_filter_threshold=0"),
        "starved": arguments(
            folders,
            root / "starved",
            "--class_filter=True",
            "--class_filter_threshold=1",
            "--class_filter_max_draws=2",
            "--figures=False",
        ),
        "posterior": arguments(folders, root / "refused", "--class_filter=True", "--sampling=posterior"),
        "no_filter": arguments(variation_run["folders"], root / "refused", "--class_filter=True"),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(run_script, "cvae_inference", *values) for name, values in requests.items()
        }
        finished = {name: future.result() for name, future in futures.items()}
    return {"folders": folders, "root": root, "finished": finished, "trained": trained}


def test_the_class_filter_is_trained_on_the_train_split_alone(filter_run):
    import json

    from cilia_cvae import class_filter
    from cilia_cvae.layout import RunLayout

    layout = RunLayout(filter_run["folders"]["models"], filter_run["folders"]["latents"], 32)
    record = json.loads(layout.parameters.read_text(encoding="utf-8"))["class_filter"]
    processed = ProcessedLayout(filter_run["folders"]["processed"], 32)
    train = [
        path
        for name in ("CP", "Disarranged", "IDA", "Normal", "ODA")
        for path in processed.images("train", name)
    ]
    # Every crop it saw is a training crop; no test crop is among them (the test split was removed first).
    assert record["training_crops"] + record["validation_crops"] == len(train)
    assert record["crops_sha256"] == class_filter.crops_sha256(train)
    assert 0 <= record["validation_accuracy"] <= 1 and record["validation_crops"] > 0
    assert "held-out training crops" in filter_run["trained"].stdout


def test_filtered_images_carry_their_scores_and_acceptance_is_reported(filter_run):
    finished = filter_run["finished"]["open"]
    assert finished.returncode == 0, finished.stderr[-3000:]
    size_dir = filter_run["root"] / "open" / "32x32"
    manifest = pd.read_csv(size_dir / "generation_manifest.csv")
    assert len(manifest) == IMAGES * len(CLASSES) and manifest["filter_score"].between(0, 1).all()
    assert set(manifest["filter_threshold"]) == {0.0}
    acceptance = __import__("json").loads((size_dir / "class_filter_acceptance.json").read_text())
    assert {name: acceptance[name]["accepted"] for name in CLASSES} == dict.fromkeys(CLASSES, IMAGES)
    assert "passed the class filter" in finished.stdout


def test_a_class_the_filter_starves_gets_one_line(filter_run):
    finished = filter_run["finished"]["starved"]
    assert finished.returncode == 0, finished.stderr[-3000:]
    lines = [line for line in finished.stdout.splitlines() if "passed the class filter" in line]
    assert len(lines) == len(CLASSES), finished.stdout
    for class_name, line in zip(CLASSES, lines):
        assert line.startswith(f"{class_name}: only ") and f"within {2 * IMAGES} draws" in line, line


def test_filter_refusals_are_one_line(filter_run):
    for name, fragment in (("posterior", "--sampling=posterior"), ("no_filter", "has no class filter")):
        process = filter_run["finished"][name]
        lines = process.stderr.strip().splitlines()
        assert process.returncode == 2 and len(lines) == 1, (name, process.stderr[-2000:])
        assert fragment in lines[0], (name, lines[0])
