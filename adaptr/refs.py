"""Artifact references: ``NAME`` (latest version) or ``NAME@N``."""

from __future__ import annotations

import re

from adaptr.errors import InvalidInputError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")


def parse_ref(ref: str) -> tuple[str, int | None]:
    name, sep, ver = ref.partition("@")
    if sep:
        if not ver.isdigit() or int(ver) < 1:
            raise InvalidInputError(f"bad reference {ref!r}: use NAME or NAME@N with N a version number >= 1")
        return check_name(name), int(ver)
    return check_name(name), None


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidInputError(
            f"bad artifact name {name!r}: use letters, digits, '.', '_' or '-' (at most 200, no '@' or '/')"
        )
    return name
