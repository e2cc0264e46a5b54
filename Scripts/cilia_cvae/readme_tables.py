"""Keep the generated tables of the documentation in step with the code and the measurements.

Three kinds of block are generated, in any of DOCUMENTS:
- `<!-- constants:<script> -->` ... `<!-- /constants -->`: a script's settings (docs/settings.md);
- `<!-- evaluation:<json path> -->` ... `<!-- /evaluation -->`: every contender of a quality
  comparison written by cvae_compare.py, with its usefulness runs (docs/results.md, docs/history.md);
- `<!-- headline:<json path> -->` ... `<!-- /headline -->`: the original against the default
  from the same comparison (README.md).

`python Scripts/cilia_cvae/readme_tables.py` rewrites every block from the scripts' constant
blocks and the comparison files; tests/test_readme.py fails when a document and the code or the
measurements disagree.
"""

import ast
import json
import os
import re
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
# Run as a script, this file's folder is first on the path; the package is imported from its parent.
if str(REPOSITORY_ROOT / "Scripts") not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT / "Scripts"))

from cilia_cvae import config  # noqa: E402  (after the path is set)
from cilia_cvae.config import constant_comments  # noqa: E402

README = REPOSITORY_ROOT / "README.md"
SETTINGS = REPOSITORY_ROOT / "docs" / "settings.md"
RESULTS = REPOSITORY_ROOT / "docs" / "results.md"
HISTORY = REPOSITORY_ROOT / "docs" / "history.md"  # superseded comparisons, generated the same way
DOCUMENTS = (README, SETTINGS, RESULTS, HISTORY)
SETTINGS_SCRIPTS = (
    "demo",
    "make_phantom_dataset",
    "cvae_pre_processing",
    "cvae_training_224x224",
    "cvae_training_448x448",
    "cvae_inference",
    "cvae_evaluate",
    "cvae_usefulness",
    "cvae_compare",
    "cvae_benchmark",
)


def _block(kind, argument):
    """A generated block: its opening marker, its body and its closing marker, as three groups."""
    return re.compile(rf"(<!-- {kind}:(?P<{argument}>[\w./-]+) -->\n)(.*?)(<!-- /{kind} -->)", re.DOTALL)


BLOCK = _block("constants", "script")
EVALUATION_BLOCK = _block("evaluation", "path")
HEADLINE_BLOCK = _block("headline", "path")


def _path_of(node):
    """The path a default such as `config.MODELS_DIR / "comparison"` names; None for any other expression."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
        base = _path_of(node.left)
        return base / node.right.value if base is not None and isinstance(node.right.value, str) else None
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        base = _path_of(node.value)
        return None if base is None else base.parent
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config":
        value = getattr(config, node.attr, None)
        return value if isinstance(value, Path) else None
    return None


def _shown_default(source, node):
    """A default as a reader needs it: paths relative to the repository, anything else as written."""
    path = _path_of(node)
    if path is None:
        return f"`{ast.get_source_segment(source, node)}`"
    relative = Path(os.path.relpath(path, REPOSITORY_ROOT)).as_posix()
    return f"`{relative}`" if path.suffix else f"`{relative}/`"


def constants_table(script_name):
    """A markdown table of a script's UPPER_CASE constants: name, default, comment."""
    path = REPOSITORY_ROOT / "Scripts" / f"{script_name}.py"
    source = path.read_text(encoding="utf-8")
    comments = constant_comments(path)
    rows = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            name = getattr(statement.targets[0], "id", "")
            if name == "settings":
                break  # the constants block ends where configure() reads it; later names are not settings
            if name in comments:
                default = _shown_default(source, statement.value)
                rows.append(f"| `--{name.lower()}` | {default} | {comments[name].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def _percent(value):
    """A share in whole percent, or one decimal where whole ones would show 100% or 0% for a share that is not."""
    if value is None:
        return ""
    whole = f"{100 * value:.0f}%"
    return f"{100 * value:.1f}%" if whole in ("100%", "0%") and value not in (0, 1) else whole


def _contenders(relative_path):
    """The comparison file and its contenders by name: original, default, then the candidates."""
    comparison = json.loads((REPOSITORY_ROOT / relative_path).read_text(encoding="utf-8"))
    contenders = {
        "original": comparison.get("original"),
        "default": comparison.get("default"),
        **comparison.get("candidates", {}),
    }
    return comparison, {name: result for name, result in contenders.items() if result}


def _quality_cells(result):
    """The cells every quality table shares: fidelity, KID, FID, precision / recall, memorisation.

    The real-test control has no distribution measures (against the test split they would be the
    test split's against itself) and comparisons from before pixel-space memorisation have none:
    their cells say so.
    """
    lowest = min(result["class_fidelity_per_class"].items(), key=lambda item: item[1])
    control = "kid" not in result
    return {
        "fidelity": f"{_percent(result['class_fidelity'])} ({lowest[0]} {_percent(lowest[1])})",
        "kid": "(the reference)"
        if control
        else f"{result['kid']:.3g} +- {result['kid_std']:.2g} ({result['kid_floor']:.2g})",
        "fid": "" if control else f"{result['fid']:.3g} ({result['fid_floor']:.3g})",
        "precision_recall": "" if control else f"{result['precision']:.2f} / {result['recall']:.2f}",
        "memorisation": f"{result['memorisation_ratio']:.3g} ({_percent(result['near_copy_share'])})",
        "pixel_memorisation": (
            f"{result['pixel_memorisation_ratio']:.3g} ({_percent(result['pixel_near_copy_share'])})"
            + _own_source(result)
            if "pixel_memorisation_ratio" in result
            else "not measured"
        ),
        "texture": _texture_cell(result.get("texture")),
    }


def _own_source(result):
    """How often an image's nearest training crop is the one it was made from, where sources are recorded."""
    share = result.get("pixel_nearest_is_source_share")
    return "" if share is None else f"; nearest is own source {_percent(share)}"


def _texture_cell(texture):
    """Realism statistics whose median lies in the real test images' 5-95 band, and the finest-scale power."""
    if not texture:
        return "not measured"
    return (
        f"{texture['statistics_in_band']} of {texture['statistics_measured']} "
        f"(texture {texture['texture_statistics_in_band']} of {texture['texture_statistics_measured']}); "
        f"{texture['finest_scale_power_ratio']:.2f}"
    )


def _budget_sentence(comparison, contenders):
    return (
        f"Judge accuracy on the real test split: "
        f"{100 * contenders[next(iter(contenders))]['real_accuracy']:.1f}%. "
        f"Budget: {comparison['epochs']} epochs at {comparison['image_size']} px "
        f"for every trained contender. "
        f"Machine: {comparison['machine']}. "
    )


def _usefulness_rows(contenders):
    """One row per contender and share of the real data whose usefulness was measured."""
    rows = [
        "",
        (
            "| contender | share of the real training data | macro-F1 real only | real + synthetic "
            "| synthetic only | gain per seed (real + synthetic minus real only) |"
        ),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in contenders.items():
        for fraction, values in (result.get("usefulness") or {}).items():
            seeds, repeats = values.get("seeds", "?"), values.get("classifier_repeats", 1)
            runs = f"{seeds} seed{'' if seeds == 1 else 's'}"
            runs += f" x {repeats} classifiers" if repeats > 1 else ""
            gains = ", ".join(f"{gain:+.3f}" for gain in values.get("gain_per_seed", [])) or "not recorded"
            # A spread over one seed is zero by construction: shown only when there are several.
            scores = " | ".join(
                f"{values[f'{arm}_f1']:.3f}" + (f" +- {values[f'{arm}_f1_std']:.3f}" if seeds != 1 else "")
                for arm in ("real_only", "real_plus_synthetic", "synthetic_only")
            )
            rows.append(f"| {name} | {_percent(float(fraction))} ({runs}) | {scores} | {gains} |")
    return rows if len(rows) > 3 else []


def evaluation_table(relative_path):
    """The comparison of docs/evaluation_<S>.json as markdown: one row per contender, then usefulness."""
    comparison, contenders = _contenders(relative_path)
    original_kid = contenders["original"]["kid"] if "original" in contenders else None
    rows = [
        (
            "| contender | change against the default | class fidelity (lowest class) "
            "| KID +- spread (floor) | KID distance to the floor closed vs original | FID (floor) "
            "| precision / recall | memorisation ratio (near-copies) | pixel-space memorisation (near-copies) "
            "| realism statistics in the real band (texture); finest-scale power vs real | best epoch |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in contenders.items():
        cells = _quality_cells(result)
        if "training" not in result:  # the real-test control
            rows.append(
                f"| {name} | real test images, judged the same way | {cells['fidelity']} | {cells['kid']} | "
                f"| | | {cells['memorisation']} | {cells['pixel_memorisation']} | {cells['texture']} | |"
            )
            continue
        overrides = result["training"]["overrides"] + result["inference"]["overrides"]
        change = " ".join(overrides) or "(the default)"
        closed = ""
        if original_kid is not None and name != "original" and original_kid != result["kid_floor"]:
            closed = _percent((original_kid - result["kid"]) / (original_kid - result["kid_floor"]))
        rows.append(
            f"| {name} | `{change}` | {cells['fidelity']} | {cells['kid']} | {closed} "
            f"| {cells['fid']} | {cells['precision_recall']} | {cells['memorisation']} "
            f"| {cells['pixel_memorisation']} | {cells['texture']} "
            f"| {result['training']['best_epoch']} of {result['training']['epochs']} |"
        )
    rows += _usefulness_rows(contenders)
    # (a default in .get would be evaluated, and fail, even when "commands" is there)
    commands = comparison.get("commands") or [comparison["command"]]
    introduction = (
        "Commands (each row's contenders were run by one of them): " if len(commands) > 1 else "Command: "
    )
    rows += [
        "",
        _budget_sentence(comparison, contenders)
        + introduction
        + ", then ".join(f"`{text}`" for text in commands)
        + ".",
    ]
    return "\n".join(rows) + "\n"


HEADLINE_VARIATIONS = (
    "variation_strength_0.3",
    "variation_strength_0.7",
    "variation_strength_0.7_filtered_0.9",
    "variation_strength_0.5_mix_0.5_filtered_0.9",
)


def headline_table(relative_path):
    """The README's summary of a comparison: the original architecture against the default model."""
    comparison, contenders = _contenders(relative_path)
    rows = [
        (
            "| model | class fidelity (lowest class) | KID +- spread (floor) "
            "| precision / recall | memorisation ratio (near-copies) | pixel-space memorisation (near-copies) "
            "| realism statistics in the real band (texture); finest-scale power vs real "
            "| macro-F1 with 10% of the real data: real + synthetic (real only) |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    # The original, the default, the latent prior's sampling and the real-test control, if measured.
    shown = [
        "original",
        "default",
        # The first stage's look: grain drawn onto the decoder's output, and the adversarial lever.
        "grain",
        "adversarial_patch",
        *sorted(name for name in contenders if name.startswith("diffusion_guidance_4")),
        # Real crops redrawn by the prior: the two ends of the strength's trade and the filtered best
        # (every variation row is in docs/results.md).
        *HEADLINE_VARIATIONS,
        "real_test",
    ]
    for name in shown:
        if name not in contenders:
            continue
        cells = _quality_cells(contenders[name])
        useful = (contenders[name].get("usefulness") or {}).get("0.1")
        usefulness = (
            f"{useful['real_plus_synthetic_f1']:.3f} ({useful['real_only_f1']:.3f})"
            if useful
            else ("" if name == "real_test" else "not measured")
        )
        rows.append(
            f"| {name} | {cells['fidelity']} | {cells['kid']} "
            f"| {cells['precision_recall']} | {cells['memorisation']} | {cells['pixel_memorisation']} "
            f"| {cells['texture']} | {usefulness} |"
        )
    rows += ["", _budget_sentence(comparison, contenders).rstrip()]
    return "\n".join(rows) + "\n"


def updated_document(text):
    """The text with every generated block rewritten from the scripts and the comparison files."""

    def rewritten(table, argument):
        return lambda match: match.group(1) + table(match.group(argument)) + match.group(4)

    text = BLOCK.sub(rewritten(constants_table, "script"), text)
    text = EVALUATION_BLOCK.sub(rewritten(evaluation_table, "path"), text)
    return HEADLINE_BLOCK.sub(rewritten(headline_table, "path"), text)


if __name__ == "__main__":
    for document in DOCUMENTS:
        current = document.read_text(encoding="utf-8")
        updated = updated_document(current)
        if updated != current:
            document.write_text(updated, encoding="utf-8")
        state = "updated" if updated != current else "already up to date"
        print(document.relative_to(REPOSITORY_ROOT), state)
