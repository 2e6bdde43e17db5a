"""Errors that a user can fix: the CLI prints them as one line and exits 2 (traceback with --debug)."""

from __future__ import annotations

import json
from pathlib import Path


class UserError(Exception):
    """Bad input or a refused action; the message names the file, id or value and what to do."""


def read_json(path: str | Path) -> dict:
    """Read a JSON file of a run directory; a torn or empty file is an error that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); the file is "
                        "torn or was edited: rerun the stage that writes it or restore it from a copy") from err
