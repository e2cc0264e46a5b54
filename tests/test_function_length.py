"""No function in Scripts/ over 60 lines (a longer one tells more than one story and reads as a wall), and
no file over 600 lines that does not say at its top why it is one file."""

import ast

from conftest import SCRIPTS_DIR

MAX_FUNCTION_LINES = 60

MAX_FILE_LINES = 600
# A longer file says why at the top of its docstring.
FILE_REASON = "Why one file:"


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


def test_no_function_in_scripts_is_over_60_lines():
    assert long_functions(SCRIPTS_DIR) == []


def test_a_file_over_600_lines_says_why_at_its_top():
    unexplained = []
    for path in sorted(SCRIPTS_DIR.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_FILE_LINES and FILE_REASON not in "\n".join(text.splitlines()[:40]):
            unexplained.append(f"{path.relative_to(SCRIPTS_DIR).as_posix()} ({text.count(chr(10))} lines)")
    assert unexplained == []
