"""Keep the README's tables of script constants in step with the code.

Each script's table sits between `<!-- constants:<script> -->` and `<!-- /constants -->` in
README.md. `python Scripts/cilia_cvae/readme_tables.py` rewrites them from the scripts'
constant blocks; a test fails when the README and the code disagree.
"""

import ast
import re
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
README = REPOSITORY_ROOT / "README.md"
BLOCK = re.compile(r"(<!-- constants:(?P<script>[\w.]+) -->\n)(.*?)(<!-- /constants -->)", re.DOTALL)


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
            if name in comments:
                default = ast.get_source_segment(source, statement.value)
                folder = getattr(config, default.removeprefix("config."), None)
                if default.startswith("config.") and folder is not None:
                    default = f"`{folder.name}/`"
                else:
                    default = f"`{default}`"
                rows.append(f"| `--{name.lower()}` | {default} | {comments[name].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def updated_readme(text):
    return BLOCK.sub(lambda match: match.group(1) + constants_table(match.group("script")) + match.group(4), text)


if __name__ == "__main__":
    current = README.read_text(encoding="utf-8")
    README.write_text(updated_readme(current), encoding="utf-8")
    print("README tables", "updated" if updated_readme(current) != current else "already up to date")
