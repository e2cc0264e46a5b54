"""No function in Scripts/ over 60 lines: a longer one tells more than one story and reads as a wall."""

import ast

import pytest

from conftest import SCRIPTS_DIR

MAX_FUNCTION_LINES = 60

# Files other issues are rewriting: their long functions are split there, not here.
FILES_STILL_BEING_SPLIT = (
    "cvae_compare.py",
    "cilia_cvae/evaluation.py",
    "cilia_cvae/preprocessing.py",
)
# Files already split: a long function there is a regression, whatever the files above hold.
FILES_SPLIT = (
    "cvae_usefulness.py",
    "cvae_benchmark.py",
    "demo.py",
    "cilia_cvae/latent_prior.py",
    "cilia_cvae/usefulness.py",
    "cilia_cvae/metrics.py",
    "cilia_cvae/layout.py",
    "cilia_cvae/figures.py",
    "cilia_cvae/diffusion_figures.py",
)


def long_functions(folder, max_lines=MAX_FUNCTION_LINES):
    """Every function (methods and nested functions included) longer than max_lines, as
    'path:name (N lines)', longest first; a function's lines run from its def to its last line."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > max_lines:
                    found.append((lines, f"{path.relative_to(folder).as_posix()}:{node.name}"))
    return [f"{name} ({lines} lines)" for lines, name in sorted(found, key=lambda item: (-item[0], item[1]))]


def test_the_checker_finds_a_long_function_and_passes_a_short_one(tmp_path):
    body = "\n".join(f"    value_{index} = {index}" for index in range(60))
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "long.py").write_text(
        f"def long_one():\n{body}\n\n\ndef short_one():\n    pass\n"
    )
    (tmp_path / "edge.py").write_text("def exactly_sixty():\n" + "\n".join(["    pass"] * 59) + "\n")
    assert long_functions(tmp_path) == ["package/long.py:long_one (61 lines)"]


@pytest.mark.xfail(
    strict=False,
    reason=f"long functions remain in files other issues own: {', '.join(FILES_STILL_BEING_SPLIT)}",
)
def test_no_function_in_scripts_is_over_60_lines():
    assert long_functions(SCRIPTS_DIR) == []


def test_the_files_already_split_have_no_long_function():
    # The xfail above must not hide a long function coming back where the splitting is done.
    assert [entry for entry in long_functions(SCRIPTS_DIR) if entry.startswith(FILES_SPLIT)] == []
