"""Recipe hashes: what an artifact was computed from, so an identical request computes nothing.

A recipe is the inputs' content hashes, the operation, its fully resolved parameters, the
plugins (names and versions) that do the work and the seed. It is known before any tensor is
read; an artifact recorded with the same recipe is reused instead of being recomputed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

RECIPE_VERSION = 1  # bump when what goes into a recipe changes meaning


def recipe_hash(
    operation: str,
    inputs: list[dict[str, Any]],
    params: dict[str, Any],
    plugins: list[tuple[str, str | None]],
    seed: int | None = None,
) -> str:
    """sha256 of the canonical JSON of everything that decides an artifact's bytes."""
    doc = {
        "recipe": RECIPE_VERSION,
        "operation": operation,
        "inputs": inputs,
        "params": params,
        "plugins": sorted([list(p) for p in set(plugins)]),
        "seed": seed,
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()
