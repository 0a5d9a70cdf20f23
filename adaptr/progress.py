"""Progress reporting that the service layer can use without knowing its front end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> contextmanager[Callable[[int], None]]:
        """Context manager yielding ``advance(n)``; front ends draw a bar, services just call it."""


class NullProgress:
    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n: None
