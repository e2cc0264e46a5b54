"""A blinded look: a shuffled, numbered sheet of images from two sources, with its key written apart.

Numbers can place an image among real ones and still miss what the eye sees at once (a blur, a
template redrawn). So anyone can repeat the look: show the sheet, without its key, to an observer,
ask which tiles come from the source under test, then score the picks against the key. Every tile
is squashed to the same square the same way, so neither size nor aspect ratio tells the source.

Only numpy and pillow: the scripts that write sheets answer before TensorFlow loads.
"""

import math

import numpy as np
from PIL import Image, ImageDraw

from cilia_cvae.files import atomic_path, write_json_atomic

COLUMNS = 4
LABEL_HEIGHT = 22
MARGIN = 4


def write_blind_sheet(images, entries, *, rng, tile_side, sheet_path, key_path, settings):
    """Shuffle `images` (grey arrays) with `rng`, write the numbered sheet and the key; return the key.

    `entries` describe each image (its "source" and whatever else identifies it); the key lists
    each tile's number with its entry, and the tiles of each source."""
    order = rng.permutation(len(images))
    cell = tile_side + 2 * MARGIN
    rows = math.ceil(len(order) / COLUMNS)
    sheet = Image.new("L", (COLUMNS * cell, rows * (cell + LABEL_HEIGHT)), 255)
    draw = ImageDraw.Draw(sheet)
    tiles = []
    for position, index in enumerate(order.tolist()):
        tile = Image.fromarray(np.clip(np.asarray(images[index]), 0, 255).astype(np.uint8), mode="L")
        tile = tile.resize((tile_side, tile_side), Image.Resampling.LANCZOS)
        left, top = (position % COLUMNS) * cell + MARGIN, (position // COLUMNS) * (cell + LABEL_HEIGHT)
        sheet.paste(tile, (left, top + LABEL_HEIGHT))
        draw.text((left + 2, top + 4), str(position + 1), fill=0, font_size=16)
        tiles.append({"tile": position + 1, **entries[index]})
    with atomic_path(sheet_path) as temporary_path:
        sheet.save(temporary_path, format="PNG")
    sources = sorted({tile["source"] for tile in tiles})
    key = {
        "sheet": str(sheet_path),
        "settings": settings,
        "tiles_by_source": {
            source: [tile["tile"] for tile in tiles if tile["source"] == source] for source in sources
        },
        "tiles": tiles,
    }
    write_json_atomic(key_path, key)
    return key


def score_picks(key, source, picks):
    """How many of the observer's picked tile numbers are really of `source`, against the key."""
    truth = set(key["tiles_by_source"].get(source, []))
    return sum(int(pick) in truth for pick in picks)


def sheet_of_generated_and_real(
    test_split, generated_dir, class_names, *, count, tile_side, seed, sheet_path
):
    """`count` real test images and `count` generated ones, each drawn with the seed from all their
    classes, on one blind sheet; the key (with the path it was written to) is returned."""
    from cilia_cvae.images import list_images

    rng = np.random.default_rng([seed, 29])
    images, entries = [], []
    for source, folder in (("real_test", test_split), ("generated", generated_dir)):
        paths, labels = list_images(folder, class_names)
        if len(paths) < count:
            raise ValueError(
                f"{folder} holds {len(paths)} images, fewer than the {count} a blind sheet shows"
            )
        for index in sorted(rng.choice(len(paths), size=count, replace=False).tolist()):
            with Image.open(paths[index]) as image:
                images.append(np.asarray(image.convert("L")))
            entries.append({"source": source, "class": class_names[labels[index]], "file": paths[index].name})
    key_path = sheet_path.with_name(sheet_path.stem + "_key.json")
    settings = {"seed": seed, "count": count, "tile_side": tile_side, "generated_dir": str(generated_dir)}
    key = write_blind_sheet(
        images,
        entries,
        rng=rng,
        tile_side=tile_side,
        sheet_path=sheet_path,
        key_path=key_path,
        settings=settings,
    )
    return {**key, "key_path": str(key_path)}
