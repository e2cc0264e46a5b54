"""Judge the phantoms' realism by numbers: where each real crop falls among the phantoms.

Renders phantoms in memory (the generator's own code, no files written), measures the same
image statistics on them and on the real TEM crops (cilia_cvae/realism.py: grey levels, power
spectrum slope, grain, local contrast, membrane thickness and membrane-to-doublet gap), and places
each real crop's value within the phantoms' distribution as a percentile. The phantoms pass when
every statistic of every real crop lies between their 5th and 95th percentiles: a reader who
measured these could not single out the real crops by any of them.

With --blind_sheet=PATH it does something else: the eye's test. It writes a shuffled, numbered
sheet of every real crop and SHEET_PHANTOMS phantoms (all squashed to SHEET_TILE px squares, the
same way), and the key (which number is which) to a separate file, for an observer who sees only
the sheet and is asked to pick the real crops. SHEET_SEED chooses the phantoms and the order.

Reads   REAL_SAMPLES_DIR (real crops: .jpg, .png, .tif in any mode)
Writes  REPORT_JSON if set: the phantoms' percentiles and each real crop's values and percentiles;
        prints a table and the verdict; exit code 1 when a real crop falls outside the 5-95 band
        or, with BLIND_SHEET: the sheet (PNG) and BLIND_KEY (JSON; default beside it, *_key.json)

Example:
    python Scripts/check_phantom_realism.py --report_json=docs/realism.json
    python Scripts/check_phantom_realism.py --blind_sheet=/tmp/sheet.png --sheet_seed=3 --phantom_seed=31

Expected run time: about 40 s on 2 cores for 500 phantoms; a sheet takes a few seconds.
"""

import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cilia_cvae import config, phantoms, realism
from cilia_cvae.blind_sheet import write_blind_sheet
from cilia_cvae.config import UserError, configure
from cilia_cvae.files import write_json_atomic
from cilia_cvae.preprocessing import end_with_parent

NUM_IMAGES = 500  # phantoms to measure, in the generator's class proportions
PHANTOM_SEED = 2  # a seed other than the default data set's (1)
REAL_SAMPLES_DIR = config.REPOSITORY_ROOT.parent / "shared" / "real-tem-samples"  # the real crops
WORKERS = 0  # processes rendering and measuring in parallel; 0 uses every core
LOW_PERCENTILE, HIGH_PERCENTILE = 5.0, 95.0  # the band every real crop's every statistic must fall in
REPORT_JSON = ""  # if set, also write the numbers here
BLIND_SHEET = ""  # if set, write only a shuffled, numbered sheet of real crops and phantoms here (PNG)
BLIND_KEY = ""  # where the sheet's key goes; default: beside the sheet, <name>_key.json
SHEET_SEED = 0  # chooses the sheet's phantoms and shuffles the tiles
SHEET_PHANTOMS = 12  # phantoms on the sheet, beside every real crop
SHEET_TILE = 256  # side of each square tile, px
SHEET_CLASSES = "all"  # "all": phantoms in the generator's class proportions; or one class name

settings = configure(globals())
SCHEME = "five"
REAL_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}

if NUM_IMAGES < 20:
    raise UserError(f"--num_images must be at least 20 for percentiles to mean anything, not {NUM_IMAGES}")
if not REAL_SAMPLES_DIR.is_dir():
    raise UserError(f"no folder of real crops at {REAL_SAMPLES_DIR}: pass --real_samples_dir")
real_paths = sorted(path for path in REAL_SAMPLES_DIR.iterdir() if path.suffix.lower() in REAL_SUFFIXES)
if not real_paths:
    raise UserError(f"{REAL_SAMPLES_DIR} holds no real crops (.jpg, .png or .tif)")
if BLIND_SHEET:
    if SHEET_PHANTOMS < 1 or SHEET_TILE < 32:
        raise UserError(
            f"--sheet_phantoms must be at least 1 and --sheet_tile at least 32, not {SHEET_PHANTOMS}, {SHEET_TILE}"
        )
    proportions = phantoms.CLASS_PROPORTIONS[SCHEME]
    if SHEET_CLASSES != "all" and SHEET_CLASSES not in proportions:
        raise UserError(
            f"--sheet_classes must be 'all' or one of {', '.join(proportions)}, not {SHEET_CLASSES!r}"
        )
    sheet_path = Path(BLIND_SHEET)
    key_path = Path(BLIND_KEY) if BLIND_KEY else sheet_path.with_name(sheet_path.stem + "_key.json")
    # The phantoms: classes in the generator's proportions (or one class), numbers drawn without
    # repeats from far beyond any data set's, so the sheet's phantoms are new ones.
    sheet_rng = np.random.default_rng(SHEET_SEED)
    names = list(proportions) if SHEET_CLASSES == "all" else [SHEET_CLASSES]
    shares = np.array([proportions[name] for name in names])
    chosen_classes = sheet_rng.choice(names, size=SHEET_PHANTOMS, p=shares / shares.sum())
    numbers = sheet_rng.choice(np.arange(10_001, 1_000_000), size=SHEET_PHANTOMS, replace=False)
    entries = [{"source": "real", "file": path.name} for path in real_paths]
    images = [realism.grey_array(path) for path in real_paths]
    for class_name, number in zip(chosen_classes.tolist(), numbers.tolist()):
        pixels, _ = phantoms.render_phantom(PHANTOM_SEED, SCHEME, class_name, number)
        entries.append({"source": "phantom", "class": class_name, "seed": PHANTOM_SEED, "number": number})
        images.append(pixels.astype(np.float64))
    settings = {"SHEET_SEED": SHEET_SEED, "PHANTOM_SEED": PHANTOM_SEED, "SHEET_CLASSES": SHEET_CLASSES}
    key = write_blind_sheet(
        images,
        entries,
        rng=sheet_rng,
        tile_side=SHEET_TILE,
        sheet_path=sheet_path,
        key_path=key_path,
        settings=settings,
    )
    tiles = key["tiles"]
    print(f"sheet of {len(tiles)} tiles ({len(real_paths)} real) written to {sheet_path}; key in {key_path}")
    sys.exit(0)

counts = phantoms.class_counts(NUM_IMAGES, SCHEME)
tasks = [(name, number) for name in counts for number in range(1, counts[name] + 1)]


def measure_phantom(task):
    class_name, number = task
    pixels, _ = phantoms.render_phantom(PHANTOM_SEED, SCHEME, class_name, number)
    return realism.measure(pixels)


# 1. The phantoms' distribution of each statistic, and the real crops' values. Workers are
# forked (they inherit the settings above) and end with this process if it is killed.
context = multiprocessing.get_context("fork")
with ProcessPoolExecutor(
    max_workers=WORKERS or os.cpu_count() or 1,
    mp_context=context,
    initializer=end_with_parent,
    initargs=(os.getpid(),),
) as pool:
    measured = list(pool.map(measure_phantom, tasks, chunksize=8))
reals = {path.name: realism.measure(path) for path in real_paths}

# 2. Each real crop's percentile within the phantoms, statistic by statistic.
rows, outside = [], []
for statistic, meaning in realism.STATISTICS.items():
    values = np.array([m[statistic] for m in measured], dtype=float)
    finite = values[np.isfinite(values)]
    band = np.percentile(finite, [LOW_PERCENTILE, 50.0, HIGH_PERCENTILE]).tolist()
    placed = {}
    for name, real in reals.items():
        percentile = realism.percentile_within(real[statistic], finite)
        placed[name] = {"value": real[statistic], "percentile": percentile}
        if not (LOW_PERCENTILE <= percentile <= HIGH_PERCENTILE):  # NaN counts as outside
            outside.append(f"{name} {statistic} at the {percentile:.0f}th percentile")
    rows.append(
        {
            "statistic": statistic,
            "meaning": meaning,
            "phantoms_p05_p50_p95": band,
            "unmeasured_phantoms": int(values.size - finite.size),
            "real": placed,
        }
    )

# 3. The table and the verdict.
names = list(reals)
print(
    f"{len(measured)} phantoms (seed {PHANTOM_SEED}) against {len(names)} real crops from {REAL_SAMPLES_DIR}"
)
print("| statistic | phantoms 5th / 50th / 95th | " + " | ".join(names) + " |")
print("| --- | --- |" + " --- |" * len(names))
for row in rows:
    low, middle, high = row["phantoms_p05_p50_p95"]
    cells = [
        f"{row['real'][name]['value']:.3g} ({row['real'][name]['percentile']:.0f})"
        if math.isfinite(row["real"][name]["percentile"])
        else "unmeasured"
        for name in names
    ]
    print(f"| {row['statistic']} | {low:.3g} / {middle:.3g} / {high:.3g} | " + " | ".join(cells) + " |")
print("(each real crop: its value, and in brackets its percentile among the phantoms)")
if REPORT_JSON:
    write_json_atomic(
        REPORT_JSON,
        {
            "settings": {key: str(value) for key, value in settings.items()},
            "phantoms": len(measured),
            "statistics": rows,
            "outside_band": outside,
        },
    )
if outside:
    print(
        f"NOT realistic by these numbers: {len(outside)} real value(s) outside the "
        f"{LOW_PERCENTILE:.0f}-{HIGH_PERCENTILE:.0f}th percentiles: " + "; ".join(outside)
    )
    sys.exit(1)
print(
    f"Every statistic of every real crop lies within the phantoms' {LOW_PERCENTILE:.0f}-"
    f"{HIGH_PERCENTILE:.0f}th percentiles."
)
