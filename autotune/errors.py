"""Errors a user can cause. Each carries one line that names the problem and the fix.

The CLI turns these into one line on stderr and exit code 2; anything else is a bug
and shows a traceback only when ``AUTOTUNE_DEBUG=1``.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input autotune cannot use: a missing file, malformed JSON or TOML, a bad value."""


class FactsError(UserError):
    """A facts file that does not follow the facts contract."""


class ConfigError(UserError):
    """A config dict (or from_pretrained kwargs) that cannot be understood."""


class NotApplicable(RuntimeError):
    """An option asked for that changes nothing in this model (nothing to fuse, no grouped heads
    to give SDPA): the model would run as loaded, so a tuner's candidate with it would be another
    candidate under its name. The worker's results say so (``not_applicable``), and the tuner
    counts such a candidate as not measured, not as failed."""


class RuleFileError(ValueError):
    """A rule file that is malformed. Names the file and the key."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        super().__init__(f"{path}: {key}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


def read_text_file(path: object, kind: str, error: type[UserError] = UserError) -> str:
    """Read a UTF-8 text file named by the user; every problem is ``error`` with one clear line."""
    from pathlib import Path

    p = Path(str(path))
    try:
        return p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not an error
    except FileNotFoundError:
        raise error(f"{kind} file not found: {p}") from None
    except IsADirectoryError:
        raise error(f"{kind} file is a directory: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {kind} file {p}: {e}") from None


def read_json_file(path: object, kind: str, error: type[UserError] = UserError) -> object:
    """Read a JSON file named by the user; every problem is ``error`` with one clear line."""
    import json
    from pathlib import Path

    p = Path(str(path))
    text = read_text_file(p, kind, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise error(f"{p}: JSON nested too deeply to be a {kind}") from None
