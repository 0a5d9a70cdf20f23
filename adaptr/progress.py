"""Progress reporting that the service layer can use without knowing its front end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> contextmanager[Callable[[int], None]]:
        """Context manager yielding ``advance(n, detail=None)``: ``n`` units done (bytes), and an
        optional short status such as ``"12/201 tensors"``; front ends draw a bar, services call it."""


class NullProgress:
    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n, detail=None: None
