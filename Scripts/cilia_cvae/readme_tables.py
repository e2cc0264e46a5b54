"""Keep the README's tables of script constants in step with the code.

Each script's table sits between `<!-- constants:<script> -->` and `<!-- /constants -->` in
README.md, and the quality comparison between `<!-- evaluation:<json path> -->` and
`<!-- /evaluation -->`. `python Scripts/cilia_cvae/readme_tables.py` rewrites them from the
scripts' constant blocks and from the comparison that cvae_compare.py wrote; a test fails
when the README and the code or the measurements disagree.
"""

import ast
import json
import re
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
README = REPOSITORY_ROOT / "README.md"
BLOCK = re.compile(r"(<!-- constants:(?P<script>[\w.]+) -->\n)(.*?)(<!-- /constants -->)", re.DOTALL)
EVALUATION_BLOCK = re.compile(r"(<!-- evaluation:(?P<path>[\w./-]+) -->\n)(.*?)(<!-- /evaluation -->)", re.DOTALL)


def constants_table(script_name):
    """A markdown table of a script's UPPER_CASE constants: name, default as written, comment."""
    sys.path.insert(0, str(REPOSITORY_ROOT / "Scripts"))
    from cilia_cvae import config
    from cilia_cvae.config import constant_comments

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
                default = ast.get_source_segment(source, statement.value)
                folder = getattr(config, default.removeprefix("config."), None)
                if default.startswith("config.") and folder is not None:
                    default = f"`{folder.name}/`"
                else:
                    default = f"`{default}`"
                rows.append(f"| `--{name.lower()}` | {default} | {comments[name].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def _percent(value):
    return "" if value is None else f"{100 * value:.0f}%"


def evaluation_table(relative_path):
    """The comparison of docs/evaluation_<S>.json as markdown: one row per contender."""
    comparison = json.loads((REPOSITORY_ROOT / relative_path).read_text(encoding="utf-8"))
    contenders = {"original": comparison.get("original"), "default": comparison.get("default"),
                  **comparison.get("candidates", {})}
    contenders = {name: result for name, result in contenders.items() if result}
    original_kid = contenders["original"]["kid"] if "original" in contenders else None
    rows = ["| contender | change against the default | class fidelity (lowest class) | KID +- spread (floor) "
            "| KID distance to the floor closed vs original | FID (floor) | precision / recall "
            "| memorisation ratio (near-copies) | best epoch |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, result in contenders.items():
        change = " ".join(result["training"]["overrides"] + result["inference"]["overrides"]) or "(the default)"
        lowest = min(result["class_fidelity_per_class"].items(), key=lambda item: item[1])
        closed = ""
        if original_kid is not None and name != "original" and original_kid != result["kid_floor"]:
            closed = _percent((original_kid - result["kid"]) / (original_kid - result["kid_floor"]))
        rows.append(
            f"| {name} | `{change}` | {_percent(result['class_fidelity'])} ({lowest[0]} {_percent(lowest[1])}) "
            f"| {result['kid']:.3g} +- {result['kid_std']:.2g} ({result['kid_floor']:.2g}) | {closed} "
            f"| {result['fid']:.3g} ({result['fid_floor']:.3g}) | {result['precision']:.2f} / {result['recall']:.2f} "
            f"| {result['memorisation_ratio']:.3g} ({_percent(result['near_copy_share'])}) "
            f"| {result['training']['best_epoch']} of {result['training']['epochs']} |")
    useful = {name: result["usefulness"] for name, result in contenders.items() if result.get("usefulness")}
    if useful:
        rows += ["", "| contender | share of the real training data | macro-F1 real only | real + synthetic | synthetic only "
                 "| gain per seed (real + synthetic minus real only) |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for name, fractions in useful.items():
            for fraction, values in fractions.items():
                rows.append(f"| {name} | {_percent(float(fraction))} ({values.get('seeds', '?')} seed{'' if values.get('seeds') == 1 else 's'}"
                            f"{f' x {repeats} classifiers' if (repeats := values.get('classifier_repeats', 1)) > 1 else ''}) "
                            f"| {values['real_only_f1']:.3f} +- {values['real_only_f1_std']:.3f} "
                            f"| {values['real_plus_synthetic_f1']:.3f} +- {values['real_plus_synthetic_f1_std']:.3f} "
                            f"| {values['synthetic_only_f1']:.3f} +- {values['synthetic_only_f1_std']:.3f} "
                            f"| {', '.join(f'{gain:+.3f}' for gain in values.get('gain_per_seed', [])) or 'not recorded'} |")
    commands = comparison.get("commands", [comparison["command"]])
    rows += ["", f"Judge accuracy on the real test split: {100 * contenders[next(iter(contenders))]['real_accuracy']:.1f}%. "
             f"Budget: {comparison['epochs']} epochs at {comparison['image_size']} px for every trained contender. "
             f"Machine: {comparison['machine']}. "
             + ("Commands (each row's contenders were run by one of them): " if len(commands) > 1 else "Command: ")
             + ", then ".join(f"`{text}`" for text in commands) + "."]
    return "\n".join(rows) + "\n"


def updated_readme(text):
    text = BLOCK.sub(lambda match: match.group(1) + constants_table(match.group("script")) + match.group(4), text)
    return EVALUATION_BLOCK.sub(lambda match: match.group(1) + evaluation_table(match.group("path")) + match.group(4), text)


if __name__ == "__main__":
    current = README.read_text(encoding="utf-8")
    README.write_text(updated_readme(current), encoding="utf-8")
    print("README tables", "updated" if updated_readme(current) != current else "already up to date")
