"""User-facing errors: one clear line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake in the user's input (a recipe, a path, a flag) that they can fix."""


def one_line(text: str, limit: int = 2000) -> str:
    """`text` as one printable line: newlines folded, control characters and lone surrogates escaped.

    User input ends up inside error messages (names, YAML snippets, argv decoded with surrogateescape);
    printed raw it could span lines, move the cursor, or fail to encode at all.
    """
    folded = " ".join(text.split())
    out = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for c in folded)
    return out if len(out) <= limit else out[:limit] + "..."


def read_yaml(path: str | Path, what: str, first_of_many: bool = False) -> Any:
    """Parse a YAML file the user named; every way it can be unreadable is a UserError naming it.

    `first_of_many`: the file may hold several documents (a compiled KFP pipeline); return the first.
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {p} is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{what} {p} cannot be read ({exc.strerror or exc})") from None
    try:
        return next(yaml.safe_load_all(text), None) if first_of_many else yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{what} {p} is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise UserError(f"{what} {p} nests too deeply to parse") from None
