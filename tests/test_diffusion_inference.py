"""Generation with the latent prior as a user runs it: diffusion sampling, counterfactuals, refusals.

The run is the one-epoch 32 px model of conftest, given a small denoiser by helpers/fake_prior.py
(untrained, its weights jittered so that class and guidance change what it draws). Every script
run is started at once in a thread pool, since each spends most of its time importing TensorFlow.
"""

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from helpers.fake_prior import add_latent_prior
from PIL import Image

from cilia_cvae import generation, latent_prior
from cilia_cvae import manifest as manifest_module
from cilia_cvae.config import UserError
from cilia_cvae.layout import ProcessedLayout
from conftest import run_script

STEPS = 3
IMAGES = 3
CLASSES = ("ODA", "IDA")


def inference_arguments(folders, generated, *arguments):
    return (
        "--image_size=32",
        f"--processed_images_dir={folders['processed']}",
        f"--models_dir={folders['models']}",
        f"--latent_tensors_dir={folders['latents']}",
        f"--generated_images_dir={generated}",
        "--restore_aspect=False",
        # These tests compare written pixels with the prior's and decoder's own output: no grain drawn.
        "--grain=False",
        *arguments,
    )


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


@pytest.fixture(scope="module")
def prior_run(tiny_trained_model, tmp_path_factory):
    """The tiny run with a latent prior (its own copy: other tests use the run without one)."""
    root = tmp_path_factory.mktemp("prior_run")
    folders = dict(tiny_trained_model, models=root / "models")
    shutil.copytree(tiny_trained_model["models"], folders["models"])
    denoiser, prior_config = add_latent_prior(folders["models"], folders["latents"], 32, width=8)
    return {"folders": folders, "root": root, "denoiser": denoiser, "prior_config": prior_config}


@pytest.fixture(scope="module")
def finished(prior_run, tiny_trained_model):
    """Every script run of this file, run concurrently, by name."""
    folders, root = prior_run["folders"], prior_run["root"]
    diffusion = (f"--classes={','.join(CLASSES)}", f"--images_per_class={IMAGES}", "--sampling=diffusion")
    diffusion += ("--guidance=1", f"--sampling_steps={STEPS}", "--batch_size=2", "--seed=3")
    requests = {
        "diffusion": inference_arguments(folders, root / "first", *diffusion),
        "diffusion_again": inference_arguments(folders, root / "again", *diffusion, "--figures=False"),
        "counterfactual": inference_arguments(
            folders,
            root / "counterfactual",
            "--counterfactual_from=Normal",
            "--classes=Normal,ODA",
            "--images_per_class=2",
            "--edit_strength=0",
            f"--sampling_steps={STEPS}",
        ),
        "no_prior": inference_arguments(tiny_trained_model, root / "refused", "--sampling=diffusion"),
        "bad_guidance": inference_arguments(folders, root / "refused", "--guidance=-0.5"),
        "bad_steps": inference_arguments(folders, root / "refused", "--sampling_steps=0"),
        "bad_strength": inference_arguments(folders, root / "refused", "--edit_strength=1.5"),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(run_script, "cvae_inference", *arguments)
            for name, arguments in requests.items()
        }
        return {name: future.result() for name, future in futures.items()}


def test_diffusion_writes_images_manifest_and_figures(prior_run, finished):
    assert finished["diffusion"].returncode == 0, finished["diffusion"].stderr
    size_dir = prior_run["root"] / "first" / "32x32"
    for class_name in CLASSES:
        names = sorted(path.name for path in (size_dir / class_name).glob("*.png"))
        assert names == [f"Synthetic_{class_name}_{number:05d}.png" for number in range(1, IMAGES + 1)]
    for figure in (
        "image_comparison.png",
        "latent_space.png",
        "class_interpolation.png",
        "guidance_sweep.png",
    ):
        assert (size_dir / figure).stat().st_size > 1000, figure
    manifest = pd.read_csv(size_dir / "generation_manifest.csv")
    assert list(manifest.columns) == manifest_module.MANIFEST_COLUMNS
    assert len(manifest) == IMAGES * len(CLASSES)
    assert set(manifest["sampling"]) == {"diffusion"} and set(manifest["guidance"]) == {1.0}
    assert set(manifest["sampling_steps"]) == {STEPS} and set(manifest["seed"]) == {3}
    assert manifest["counterfactual_source"].isna().all()


def test_same_seed_same_bytes(prior_run, finished):
    assert finished["diffusion_again"].returncode == 0, finished["diffusion_again"].stderr
    for class_name in CLASSES:
        first = sorted((prior_run["root"] / "first" / "32x32" / class_name).glob("*.png"))
        again = sorted((prior_run["root"] / "again" / "32x32" / class_name).glob("*.png"))
        assert [path.read_bytes() for path in first] == [path.read_bytes() for path in again], class_name


def expected_diffusion_images(prior_run, generator, class_name, guidance):
    """The script's images, made here by latent_prior.sample directly: each class's noise is the first
    draw of numpy's generator seeded with [seed, class index], decoded at the script's batch size."""
    label = generator["parameters"]["class_names"].index(class_name)
    prior_config = prior_run["prior_config"]
    noise = np.random.default_rng([3, label]).standard_normal((IMAGES, *prior_config.map_shape))
    maps = latent_prior.sample(
        prior_run["denoiser"],
        np.full(IMAGES, label),
        noise.astype(np.float32),
        steps=STEPS,
        guidance=guidance,
    )
    latents = latent_prior.to_model_latents(maps, prior_config)
    decode = generation.make_decode_function(generator["decoder"], 2, latents.shape[1], 5)
    return np.concatenate([decode(latents[start : start + 2], label) for start in range(0, IMAGES, 2)])


def test_guidance_1_is_the_conditional_model_alone(prior_run, finished):
    folders = prior_run["folders"]
    generator = generation.load_trained_generator(folders["models"], folders["latents"], 32)
    for class_name in CLASSES:
        written = [
            pixels(path)
            for path in sorted((prior_run["root"] / "first" / "32x32" / class_name).glob("*.png"))
        ]
        conditional = expected_diffusion_images(prior_run, generator, class_name, guidance=1.0)
        assert np.array_equal(np.stack(written), conditional), class_name
        guided = expected_diffusion_images(prior_run, generator, class_name, guidance=4.0)
        assert not np.array_equal(guided, conditional), (
            "guidance changes the samples, so the check above can fail"
        )


def test_counterfactuals_at_edit_strength_0_are_the_reconstructions(prior_run, finished):
    assert finished["counterfactual"].returncode == 0, finished["counterfactual"].stderr
    folders, size_dir = prior_run["folders"], prior_run["root"] / "counterfactual" / "32x32"
    assert (size_dir / "counterfactuals.png").stat().st_size > 1000
    manifest = pd.read_csv(size_dir / "generation_manifest.csv")
    crops = ProcessedLayout(folders["processed"], 32).images("train", "Normal")
    assert list(manifest["counterfactual_source"]) == [f"Normal/{path.name}" for path in crops[:2]] * 2
    assert set(manifest["sampling"]) == {"counterfactual"} and set(manifest["edit_strength"]) == {0.0}
    generator = generation.load_trained_generator(folders["models"], folders["latents"], 32)
    z_mean = generator["latents"]["Normal"][0][:2]
    class_names = generator["parameters"]["class_names"]
    decode = generation.make_decode_function(generator["decoder"], 64, z_mean.shape[1], len(class_names))
    for class_name in ("Normal", "ODA"):
        written = [pixels(path) for path in sorted((size_dir / class_name).glob("*.png"))]
        assert np.array_equal(np.stack(written), decode(z_mean, class_names.index(class_name))), class_name


def one_line_refusal(process, *fragments):
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1 and "Traceback" not in process.stderr, process.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_refusals_are_one_line(prior_run, finished):
    one_line_refusal(
        finished["no_prior"], "has no latent prior", "cvae_training_224x224.py", "--continue_finished=True"
    )
    one_line_refusal(finished["no_prior"], "--prior_epochs=")
    one_line_refusal(finished["bad_guidance"], "--guidance")
    one_line_refusal(finished["bad_steps"], "--sampling_steps")
    one_line_refusal(finished["bad_strength"], "--edit_strength")
    assert not (prior_run["root"] / "refused").exists(), "nothing written after a refusal"


def test_a_prior_of_another_run_or_a_changed_file_is_refused(prior_run, tmp_path):
    folders = dict(prior_run["folders"], models=tmp_path / "models")
    shutil.copytree(prior_run["folders"]["models"], folders["models"])
    generator = generation.load_trained_generator(folders["models"], folders["latents"], 32)
    record = generator["parameters"]["latent_prior"]
    for key, value, message in (
        ("run_fingerprint", "0123456789abcdef", "another CVAE run"),
        ("sha256", "0" * 64, "sha256 differs"),
    ):
        generator["parameters"]["latent_prior"] = dict(record, **{key: value})
        with pytest.raises(UserError, match=message) as refusal:
            generation.load_latent_prior(generator, folders["models"], folders["latents"], 32)
        assert "\n" not in str(refusal.value)


def test_a_manifest_written_before_the_new_columns_gains_them(tmp_path):
    manifest = tmp_path / "generation_manifest.csv"
    old_columns = manifest_module.MANIFEST_COLUMNS[:9]
    manifest.write_text(
        ",".join(old_columns) + "\n" + ",".join(["ODA/Synthetic_ODA_00001.png", "ODA"] + ["1"] * 7) + "\n"
    )
    manifest_module.append_manifest_rows(
        manifest, [{"file": "ODA/Synthetic_ODA_00002.png", "class": "ODA", "guidance": 2.0}]
    )
    rows = pd.read_csv(manifest)
    assert list(rows.columns) == manifest_module.MANIFEST_COLUMNS and len(rows) == 2
    assert rows["guidance"].isna().tolist() == [True, False]
    manifest.write_text("name,label\nx,y\n")
    with pytest.raises(UserError, match="other columns"):
        manifest_module.append_manifest_rows(manifest, [])
