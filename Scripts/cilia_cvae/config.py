"""The script contract: constants at the top of a script, `--lower_case_name=value` overrides.

Every script in `Scripts/` declares ONE block of UPPER_CASE constants, then calls
`configure(globals())`. That call reads the command line, replaces the constants the user
named, checks each value against the type of its default, and answers `--help` with the
script's docstring and a table of every constant, its default and its comment.

User errors (an unknown key, a value of the wrong type, a missing input found later by the
script) are raised as `UserError`; the hook installed by `configure` prints them as one line
and exits with code 2. Any other exception is an internal failure: a traceback and exit 1.
"""

import ast
import contextlib
import errno
import io
import math
import os
import sys
import tokenize
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]

# The top-level data folders of the design card, resolved from the repository root so that
# a script started from any working directory finds them.
RAW_IMAGES_DIR = REPOSITORY_ROOT / "Raw Input Images"
PROCESSED_IMAGES_DIR = REPOSITORY_ROOT / "Processed Input Images"
MODELS_DIR = REPOSITORY_ROOT / "Models"
LATENT_TENSORS_DIR = REPOSITORY_ROOT / "Latent Space Tensors"
GENERATED_IMAGES_DIR = REPOSITORY_ROOT / "Generated Images"

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake the user can fix: printed as one sentence, exit code 2, no traceback."""


def _print_user_errors_as_one_line(exception_type, exception, traceback):
    if issubclass(exception_type, UserError):
        sys.stdout.flush()
        print(f"error: {exception}", file=sys.stderr, flush=True)
        # os._exit because an exception hook cannot choose the exit code any other way.
        os._exit(USER_ERROR_EXIT_CODE)
    if issubclass(exception_type, OSError) and exception.errno == errno.ENOSPC:
        sys.stdout.flush()
        where = f" holding {exception.filename}" if exception.filename else ""
        print(
            f"error: the disk{where} is full; free some space (or point the output folder elsewhere) and run "
            f"again: a killed or interrupted run resumes",
            file=sys.stderr,
            flush=True,
        )
        os._exit(USER_ERROR_EXIT_CODE)
    if issubclass(exception_type, KeyboardInterrupt):
        print("\ninterrupted", file=sys.stderr, flush=True)
        os._exit(130)
    sys.__excepthook__(exception_type, exception, traceback)


def constant_comments(script_path):
    """Map each module-level UPPER_CASE assignment of a script to its trailing comment."""
    source = Path(script_path).read_text(encoding="utf-8")
    comments_by_line = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments_by_line[token.start[0]] = token.string.lstrip("#").strip()
    comments = {}
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Name) and target.id.isupper():
                lines = range(statement.lineno, statement.end_lineno + 1)
                comments[target.id] = " ".join(comments_by_line[n] for n in lines if n in comments_by_line)
    return comments


def script_constants(namespace):
    """The UPPER_CASE constants a script declared itself, in the order it declared them."""
    comments = constant_comments(namespace["__file__"])
    return {name: namespace[name] for name in comments if name in namespace}


def parse_value(name, text, default):
    """Turn the text of `--name=text` into a value of the type of the constant's default."""
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UserError(f"--{name.lower()} takes True or False, not {text!r}")
    if isinstance(default, Path):
        if not text:
            raise UserError(f"--{name.lower()} needs a folder or file path")
        return Path(text).expanduser().resolve()
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(default, float) and isinstance(value, str):
        # "nan" and "inf" are no Python literals, but float() reads them: refused as numbers below.
        with contextlib.suppress(ValueError):
            value = float(text)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, float) and isinstance(value, float) and not math.isfinite(value):
        # No setting means anything at infinity or NaN; caught here, it never reaches a model or a file.
        raise UserError(f"--{name.lower()} must be a finite number, not {text!r}")
    if default is None or type(value) is type(default):
        return value
    raise UserError(
        f"--{name.lower()} takes a value of type {type(default).__name__} (default {default!r}), not {text!r}"
    )


def format_help(namespace, constants):
    comments = constant_comments(namespace["__file__"])
    lines = [(namespace.get("__doc__") or "").strip(), "", "Settings (override any as --name=value):"]
    width = max(len(name) for name in constants) + 2
    for name, default in constants.items():
        shown = str(default) if isinstance(default, Path) else repr(default)
        lines.append(f"  --{name.lower():<{width}} default {shown}")
        if comments.get(name):
            lines.append(f"  {'':<{width + 2}} {comments[name]}")
    return "\n".join(lines)


def configure(namespace, argv=None):
    """Apply `--lower_case_name=value` overrides to a script's constants, in place.

    Returns the dictionary of every constant's final value, which scripts record beside
    their outputs (e.g. in cvae_parameters.json) so the next stage never has to ask again.
    """
    sys.excepthook = _print_user_errors_as_one_line
    arguments = sys.argv[1:] if argv is None else argv
    constants = script_constants(namespace)
    if any(argument in ("-h", "--help") for argument in arguments):
        print(format_help(namespace, constants))
        sys.exit(0)
    valid = ", ".join(f"--{name.lower()}" for name in constants)
    for argument in arguments:
        if not argument.startswith("--") or "=" not in argument:
            raise UserError(f"arguments look like --name=value, got {argument!r}; valid names: {valid}")
        key, text = argument[2:].split("=", 1)
        name = key.upper()
        if key != key.lower() or name not in constants:
            raise UserError(f"unknown setting --{key}; valid names: {valid}")
        namespace[name] = parse_value(name, text, constants[name])
    return {name: namespace[name] for name in constants}


def check_range(name, value, minimum, maximum=None, why=""):
    """Refuse a number outside [minimum, maximum], naming the setting (and, when given, why)."""
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise UserError(f"--{name.lower()} must be {bounds}, not {value}{f' ({why})' if why else ''}")


def check_choice(name, value, choices):
    """Refuse a constant whose value is not one of a fixed set, naming the valid ones."""
    if value not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise UserError(f"--{name.lower()}={value!r} is not one of {listed}")


def jsonable(settings):
    """Settings as plain JSON values: paths become strings."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in settings.items()}
