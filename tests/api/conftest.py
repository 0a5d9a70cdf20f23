"""Each API test gets its own ``adaptr serve`` process (started on demand) over its own catalog."""

from __future__ import annotations

from pathlib import Path

import pytest
from api.helpers import Server


@pytest.fixture
def server(adaptr_home: Path, tmp_path: Path, demo_set: dict):
    s = Server(adaptr_home, tmp_path, Path(demo_set["base"]).parent)
    yield s
    s.stop()
