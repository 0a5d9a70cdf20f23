"""Strict JSON loading with one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adaptr.errors import CorruptFileError, InvalidInputError


def load_json_object(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidInputError(f"{path}: missing; {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: invalid JSON ({e}); fix or re-export the file") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, found {type(data).__name__}; fix the file")
    return data
