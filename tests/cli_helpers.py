"""Helpers shared by the CLI-driven tests (on ``sys.path`` through pytest's ``pythonpath``)."""

from __future__ import annotations

import json


def ok_json(cli, *args):
    """Run ``adaptr ARGS --json`` through the ``cli`` fixture; it must succeed; its parsed output."""
    code, out, err = cli(*args, "--json")
    assert code == 0, (args, out, err)
    return json.loads(out)


def register_demo(cli, demo_set: dict, base_name: str = "llama") -> None:
    """Register the session's demo base and its three adapters."""
    ok_json(cli, "base", "add", demo_set["base"], "--name", base_name)
    for path in demo_set["adapters"].values():
        ok_json(cli, "adapter", "add", path, "--base", base_name)


def read_tensors(folder) -> dict:
    """Every tensor of a (sharded) safetensors folder, by name."""
    from pathlib import Path

    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 (a handle, not a dict)
    return out
