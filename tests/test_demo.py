"""`make demo`'s script end to end at a tiny scale: every stage runs quietly, a second run reuses them."""

from test_quiet import notice_lines, run_as_user

from conftest import run_script


def test_demo_runs_every_stage_then_reuses_them(tmp_path):
    folders = {name: tmp_path / name for name in ("raw", "processed", "models", "latents", "generated")}
    arguments = [
        "--image_size=32",
        "--phantom_images=100",
        "--epochs=1",
        "--images_per_class=6",
        "--evaluation_images_per_class=6",
        "--classifier_size=32",
        "--classifier_epochs=1",
        f"--raw_images_dir={folders['raw']}",
        f"--processed_images_dir={folders['processed']}",
        f"--models_dir={folders['models']}",
        f"--latent_tensors_dir={folders['latents']}",
        f"--generated_images_dir={folders['generated']}",
    ]
    # As a user runs it: every stage starts TensorFlow (and the evaluation computes FID) with no notice shown.
    finished = run_as_user("demo", *arguments)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert notice_lines(finished.stderr) == [], finished.stderr[-3000:]
    assert "(missing!)" not in finished.stdout, finished.stdout
    assert "class fidelity" in finished.stdout and "KID" in finished.stdout
    assert len(list((folders["generated"] / "32x32").glob("*/Synthetic_*.png"))) == 30

    again = run_script("demo", *arguments)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("preprocessing", "training", "generation", "evaluation"):
        assert f"== {stage}: reusing" in again.stdout, again.stdout
    assert "using the images already in" in again.stdout
