"""Strategy parameters arrive as YAML values or as ``--param KEY=VALUE`` text; both become the
declared type, or a one-line error."""

from __future__ import annotations

import pytest

from adaptr.engine import resolve_params
from adaptr.errors import InvalidInputError
from adaptr.interfaces import ParamDef


class _Fake:
    name = "fake"
    params = (
        ParamDef("ratio", float, 0.5, ""),
        ParamDef("steps", int, 3, ""),
        ParamDef("flip", bool, False, ""),
        ParamDef("mode", str, "a", ""),
    )


def test_defaults_and_typed_values() -> None:
    assert resolve_params(_Fake(), {}) == {"ratio": 0.5, "steps": 3, "flip": False, "mode": "a"}
    given = {"ratio": "0.25", "steps": "7", "flip": "TRUE", "mode": 5}
    assert resolve_params(_Fake(), given) == {"ratio": 0.25, "steps": 7, "flip": True, "mode": "5"}
    exact = resolve_params(_Fake(), {"steps": 2**60 + 1, "ratio": 1, "flip": "off"})
    assert exact["steps"] == 2**60 + 1 and exact["ratio"] == 1.0 and exact["flip"] is False
    assert resolve_params(_Fake(), {"steps": "4.0"})["steps"] == 4


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"ratio": "half"}, "'ratio' of strategy 'fake' must be a finite number"),
        ({"ratio": float("inf")}, "finite number"),
        ({"ratio": True}, "finite number"),
        ({"steps": "2.5"}, "'steps' of strategy 'fake' must be a whole number"),
        ({"steps": False}, "whole number"),
        ({"flip": "maybe"}, "'flip' of strategy 'fake' must be true or false"),
        ({"flip": 2}, "true or false"),
        ({"other": 1}, "does not take other; it takes flip, mode, ratio, steps"),
    ],
)
def test_bad_values_are_refused_in_one_line(given: dict, says: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        resolve_params(_Fake(), given)
    assert says in str(e.value) and "\n" not in str(e.value)
