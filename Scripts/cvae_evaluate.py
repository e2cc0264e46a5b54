"""Measure how good generated images are, in the feature space of a domain classifier.

Reads   PROCESSED_IMAGES_DIR/<S>x<S>/{train,test}/<Class>/*.png   the real images
        GENERATED_IMAGES_DIR/<S>x<S>/<Class>/*.png                 the generated images
Writes  GENERATED_IMAGES_DIR/<S>x<S>/evaluation_report.json, evaluation_report.md and plots
        JUDGE_DIR/domain_classifier_*.keras    the judge, cached per training split

The judge is a CNN trained on the real training split only; its accuracy on the real test
split comes first, because every other number depends on it. Then, against the real test
split: class fidelity (does the classifier see the class that was asked for?), FID and KID
beside the real-vs-real floor (train vs test), precision/recall and density/coverage, and
memorisation (are generated images near-copies of training images?), and the look: each realism
statistic of realism.py placed among the real test images' (texture_report.py). With --usefulness=True
it also runs cvae_usefulness.py with these settings and adds its results to the report.

With --blind_sheet=PATH it writes only a blinded look instead (seconds, no judge): a shuffled,
numbered sheet of BLIND_SHEET_IMAGES real test images and as many generated ones, its key apart.

Example:
    python Scripts/cvae_evaluate.py --image_size=224 --images_per_class=200
    python Scripts/cvae_evaluate.py --blind_sheet=/tmp/sheet.png --seed=1   # which tiles are generated?
    python Scripts/cvae_evaluate.py --image_size=224 --generated_size=448   # the 448 model, same judge

Expected run time: about 18 minutes on 2 cores the first time for 5,210 images, nearly all
of it training the judge (8 epochs of ~2 minutes, measured); later runs on the same data
reuse the cached judge and take a minute or two.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cilia_cvae import blind_sheet, config, locks
from cilia_cvae.config import UserError, check_range, configure
from cilia_cvae.layout import GeneratedLayout, ProcessedLayout
from cilia_cvae.preprocessing import read_processed_facts
from cilia_cvae.usefulness import parse_fractions

IMAGE_SIZE = 224  # which resolution's processed and generated folders to judge
GENERATED_SIZE = 0  # judge the generated images of this resolution instead (0: IMAGE_SIZE); e.g. 448 images against the 224 splits and judge, since the judge resizes everything to CLASSIFIER_SIZE
IMAGES_PER_CLASS = 200  # generated images judged per class (the first ones in name order)
CLASSIFIER_SIZE = 128  # the judge works at this size; images are resized to it
CLASSIFIER_EPOCHS = (
    8  # epochs of the judge's training (cached once trained); 8 gave 98.4% on the phantom test split
)
SEED = 0  # seeds the judge's training and the KID subsets
QUICK = False  # a test-sized run: 2 classifier epochs, 32 px, few images
USEFULNESS = False  # also run the usefulness experiment (long: trains a generator per fraction and seed)
USEFULNESS_FRACTIONS = "0.1,0.25,1.0"  # shares of the real training data, separated by commas
USEFULNESS_SEEDS = 3  # repetitions per fraction, for a mean and a spread
USEFULNESS_SEEDS_AT_FULL_DATA = (
    3  # repetitions at 100% of the real data (its generator is the evaluated model itself)
)
USEFULNESS_CLASSIFIER_SIZE = 64  # the detection-model stand-ins work at this size
USEFULNESS_CLASSIFIER_EPOCHS = (
    15  # passes over the real + synthetic set; every stand-in classifier of a run gets that many steps
)
USEFULNESS_CLASSIFIER_REPEATS = 3  # classifiers per run, differing only in initialisation; a run scores their mean (one classifier's luck moved macro-F1 by 0.06 at 10%)
USEFULNESS_GENERATOR_EPOCHS = 20  # training of the CVAE on each fraction, in epochs of the full train split: on 10% it runs 10x the epochs, so every generator takes the same steps
SYNTHETIC_PER_CLASS = 200  # synthetic images added per class
PROCESSED_IMAGES_DIR = config.PROCESSED_IMAGES_DIR  # the real train and test splits
GENERATED_IMAGES_DIR = config.GENERATED_IMAGES_DIR  # the generated images; the report is written beside them
MODELS_DIR = config.MODELS_DIR  # read: the evaluated model's settings, which the usefulness generators copy
JUDGE_DIR = ""  # where the judge is cached ("" : MODELS_DIR; one judge can serve several models' evaluations)
BLIND_SHEET = ""  # if set, write only a blinded look instead: a shuffled, numbered sheet (PNG) of real test images and generated images, its key beside it (<name>_key.json)
BLIND_SHEET_IMAGES = 8  # images of each source on the blind sheet, drawn with SEED across the classes
BLIND_SHEET_TILE = 256  # side in pixels of each tile on the blind sheet

settings = configure(globals())
if QUICK:
    CLASSIFIER_EPOCHS, CLASSIFIER_SIZE = min(CLASSIFIER_EPOCHS, 2), min(CLASSIFIER_SIZE, 32)

generated_size = GENERATED_SIZE or IMAGE_SIZE
if USEFULNESS and generated_size != IMAGE_SIZE:
    raise UserError(
        f"--usefulness trains generators at --image_size={IMAGE_SIZE}, so it cannot judge "
        f"--generated_size={generated_size}; run it with the two sizes equal"
    )
if USEFULNESS and parse_fractions(USEFULNESS_FRACTIONS) is None:
    raise UserError(
        f"--usefulness_fractions must be shares above 0 and at most 1 separated by commas, "
        f"not {USEFULNESS_FRACTIONS!r}"
    )

facts = read_processed_facts(PROCESSED_IMAGES_DIR, IMAGE_SIZE)
generated = GeneratedLayout(GENERATED_IMAGES_DIR, generated_size)
generated_dir = generated.directory
if not generated.all_images():
    raise UserError(
        f"no generated images in {generated_dir}; run python Scripts/cvae_inference.py "
        f"--image_size={generated_size} first"
    )
# TensorFlow takes seconds to load: imported only now, so that a mistyped value is refused at once.
if BLIND_SHEET:
    # The eye's test, repeatable by anyone: which tiles are generated? (No judge, no TensorFlow.)
    check_range("BLIND_SHEET_IMAGES", BLIND_SHEET_IMAGES, 1, 64)
    check_range("BLIND_SHEET_TILE", BLIND_SHEET_TILE, 32, 1024)
    try:
        key = blind_sheet.sheet_of_generated_and_real(
            ProcessedLayout(PROCESSED_IMAGES_DIR, IMAGE_SIZE).split("test"),
            generated_dir,
            facts["class_names"],
            count=BLIND_SHEET_IMAGES,
            tile_side=BLIND_SHEET_TILE,
            seed=SEED,
            sheet_path=Path(BLIND_SHEET),
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    print(f"blind sheet: {BLIND_SHEET} ({len(key['tiles'])} tiles); key: {key['key_path']}")
    sys.exit(0)
from cilia_cvae.evaluation import evaluate_generated, write_report  # noqa: E402

# The report is written beside the images: no generation may add to them meanwhile.
locks.hold_folder_lock(generated_dir)
# The real splits are read for the whole run: no preprocessing may replace them meanwhile.
locks.hold_folder_lock(ProcessedLayout(PROCESSED_IMAGES_DIR, IMAGE_SIZE).directory, shared=True)
started = time.perf_counter()
report = evaluate_generated(
    processed_dir=ProcessedLayout(PROCESSED_IMAGES_DIR, IMAGE_SIZE).directory,
    generated_dir=generated_dir,
    class_names=facts["class_names"],
    fingerprint=facts["fingerprint"],
    classifier_cache_dir=Path(JUDGE_DIR) if JUDGE_DIR else MODELS_DIR,
    classifier_size=CLASSIFIER_SIZE,
    classifier_epochs=CLASSIFIER_EPOCHS,
    images_per_class=IMAGES_PER_CLASS,
    seed=SEED,
)
if USEFULNESS:
    # The experiment is a script of its own; its progress streams to our output.
    usefulness_json = generated.usefulness_report
    arguments = [
        f"--image_size={IMAGE_SIZE}",
        f"--fractions={USEFULNESS_FRACTIONS}",
        f"--seeds={USEFULNESS_SEEDS}",
        f"--seeds_at_full_data={USEFULNESS_SEEDS_AT_FULL_DATA}",
        f"--classifier_size={USEFULNESS_CLASSIFIER_SIZE}",
        f"--classifier_epochs={USEFULNESS_CLASSIFIER_EPOCHS}",
        f"--classifier_repeats={USEFULNESS_CLASSIFIER_REPEATS}",
        f"--generator_epochs={USEFULNESS_GENERATOR_EPOCHS}",
        f"--synthetic_per_class={SYNTHETIC_PER_CLASS}",
        f"--processed_images_dir={PROCESSED_IMAGES_DIR}",
        f"--generated_images_dir={GENERATED_IMAGES_DIR}",
        f"--models_dir={MODELS_DIR}",
        f"--output_json={usefulness_json}",
    ]
    usefulness_script = Path(__file__).resolve().parent / "cvae_usefulness.py"
    sys.stdout.flush()
    finished = subprocess.run(
        [sys.executable, str(usefulness_script), *arguments], env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    )
    if finished.returncode == config.USER_ERROR_EXIT_CODE:
        raise UserError("the usefulness experiment refused its settings; its reason is printed above")
    if finished.returncode != 0:
        raise RuntimeError(
            f"cvae_usefulness.py {' '.join(arguments)} failed with exit code {finished.returncode}"
        )
    report["usefulness"] = json.loads(usefulness_json.read_text(encoding="utf-8"))["usefulness"]
report["settings"] = config.jsonable(settings)
report["seconds"] = round(time.perf_counter() - started, 1)
json_path, markdown_path = write_report(report, generated)

print(f"\njudge (domain classifier) accuracy on the real test split: {report['real_accuracy']:.1%}")
print(
    f"class fidelity: {report['class_fidelity']:.1%}  "
    + "  ".join(f"{name} {share:.0%}" for name, share in report["class_fidelity_per_class"].items())
)
print(
    f"KID {report['kid']:.4f} +- {report['kid_std']:.4f} (real-vs-real floor {report['kid_floor']:.4f}); "
    f"FID {report['fid']:.2f} (floor {report['fid_floor']:.2f})"
)
print(
    f"precision {report['precision']:.2f}, recall {report['recall']:.2f}; "
    f"memorisation ratio {report['memorisation_ratio']:.2f}, near-copies {report['near_copy_share']:.1%}"
)
for fraction, result in report.get("usefulness", {}).items():
    print(
        f"usefulness at {float(fraction):.0%} of the real data: macro-F1 real only {result['real_only_f1']:.3f} "
        f"+- {result['real_only_f1_std']:.3f}, real + synthetic {result['real_plus_synthetic_f1']:.3f} "
        f"+- {result['real_plus_synthetic_f1_std']:.3f}, synthetic only {result['synthetic_only_f1']:.3f}"
    )
print(f"report: {markdown_path} and {json_path.name}")
