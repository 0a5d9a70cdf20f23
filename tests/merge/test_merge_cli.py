"""``adaptr merge`` as a user drives it: JSON shape, lineage, YAML config, defaults, versions, --verify.

Numbers are checked against oracles in test_merge_oracles.py; this file checks the contract around them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from cli_helpers import ok_json, register_demo

from adaptr.testing import make_llama_base

SHOW_KEYS = {
    "name",
    "version",
    "kind",
    "content_hash",
    "size_bytes",
    "path",
    "files",
    "parents",
    "tags",
    "metadata",
}
EDGE_KEYS = {"parent", "child", "operation", "params", "plugin", "plugin_version", "seed"}


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


THREE = ("--adapter", "chat-r4", "--adapter", "code-r8", "--adapter", "math-r16-rslora")


def test_merge_json_is_show_json(cli, demo_set):
    register_demo(cli, demo_set)
    art = ok_json(
        cli,
        "merge",
        *THREE,
        "--strategy",
        "ties",
        "--weights",
        "0.5,1,0.8",
        "--density",
        "0.3",
        "--seed",
        "4",
        "--name",
        "trio",
    )
    assert set(art) >= SHOW_KEYS
    shown = ok_json(cli, "show", "trio")
    assert art.pop("reused") is False and art.pop("seconds") > 0
    assert art == shown
    assert art["kind"] == "merged" and art["ref"] == "trio@1" and art["base"] == "llama@1"
    meta = art["metadata"]
    assert meta["strategy"] == "ties"
    assert meta["strategy_params"] == {"density": 0.3, "lambda": 1.0}
    assert meta["weights"] == [0.5, 1.0, 0.8]
    assert meta["adapters"] == ["chat-r4@1", "code-r8@1", "math-r16-rslora@1"]
    assert meta["seed"] == 4
    # The recorded files are the folder's files, with their hashes.
    assert {f["path"]: f["sha256"] for f in art["files"]} == tree_hashes(Path(art["path"]))
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {f["path"] for f in art["files"]}
    listed = ok_json(cli, "ls", "--kind", "merged")
    assert [r["ref"] for r in listed] == ["trio@1"]


def test_merge_lineage_edges(cli, demo_set):
    register_demo(cli, demo_set)
    ok_json(
        cli,
        "merge",
        *THREE,
        "--strategy",
        "dare_ties",
        "--weights",
        "0.5,1,0.8",
        "--density",
        "0.4",
        "--seed",
        "9",
        "--name",
        "trio",
    )
    graph = ok_json(cli, "lineage", "trio")
    edges = [e for e in graph["edges"] if e["child"] == "trio@1"]
    assert {e["parent"] for e in edges} == {"llama@1", "chat-r4@1", "code-r8@1", "math-r16-rslora@1"}
    assert len(edges) == 4
    plugins = {p["name"]: p for p in ok_json(cli, "plugins")}
    for e in edges:
        assert set(e) == EDGE_KEYS
        assert e["operation"] == "merge"
        assert e["seed"] == 9
        assert e["plugin"] and e["plugin_version"]
        p = e["params"]
        assert p["strategy"] == "dare_ties"
        assert p["weights"] == [0.5, 1.0, 0.8]
        assert p["params"]["density"] == 0.4
        assert p["params"]["lambda"] == 1.0
        assert p["params"]["rescale"] == "density"
        assert p["adapters"] == ["chat-r4@1", "code-r8@1", "math-r16-rslora@1"]
    by_parent = {e["parent"]: e for e in edges}
    assert by_parent["code-r8@1"]["params"]["weight"] == 1.0
    assert by_parent["math-r16-rslora@1"]["params"]["weight"] == 0.8
    # The plugin named on the edge is the one that registered the strategy, with its version.
    plugin = plugins[edges[0]["plugin"]]
    assert "dare_ties" in plugin["registers"]["strategy"]
    assert all(e["plugin_version"] == plugin["version"] for e in edges)
    # The merged model is a node of every source's lineage.
    for ref in ("llama@1", "chat-r4@1"):
        assert "trio@1" in {n["ref"] for n in ok_json(cli, "lineage", ref)["nodes"]}


def test_yaml_config_equals_flags_and_flags_override(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    by_flags = ok_json(
        cli,
        "merge",
        *THREE,
        "--base",
        "llama",
        "--strategy",
        "ties",
        "--weights",
        "0.7,0.3,1",
        "--density",
        "0.3",
        "--lambda",
        "1.2",
        "--seed",
        "3",
        "--dtype",
        "bf16",
        "--max-shard-size",
        "50KB",
        "--name",
        "by-flags",
    )
    cfg = {
        "base": "llama",
        "adapters": ["chat-r4", "code-r8", "math-r16-rslora"],
        "strategy": "ties",
        "weights": [0.7, 0.3, 1.0],
        "density": 0.3,
        "lambda": 1.2,
        "seed": 3,
        "dtype": "bf16",
        "max_shard_size": "50KB",
        "name": "by-yaml",
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    by_yaml = ok_json(cli, "merge", "--config", path)
    assert by_yaml["ref"] == "by-yaml@1"
    assert by_yaml["content_hash"] == by_flags["content_hash"]
    assert (Path(by_flags["path"]) / "model.safetensors.index.json").is_file()
    for key in ("strategy", "strategy_params", "weights", "adapters", "seed"):
        assert by_yaml["metadata"][key] == by_flags["metadata"][key]

    # Flags win over the file; the rest of the file still applies.
    over = ok_json(cli, "merge", "--config", path, "--density", "0.6", "--name", "override")
    assert over["metadata"]["strategy_params"]["density"] == 0.6
    assert over["metadata"]["strategy_params"]["lambda"] == 1.2
    assert over["metadata"]["seed"] == 3
    assert over["content_hash"] != by_flags["content_hash"]

    # Same keys, same validation: a typo in the file is one clear line, exit 2.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "densty": 0.3, "name": "bad"}))
    code, _out, err = cli("merge", "--config", bad)
    assert code == 2 and "densty" in err and len(err.strip().splitlines()) == 1


def test_defaults_one_adapter_simple_base_omitted(cli, demo_set):
    register_demo(cli, demo_set)
    art = ok_json(cli, "merge", "--adapter", "code-r8", "--name", "solo")
    assert art["metadata"]["strategy"] == "simple"
    assert art["metadata"]["weights"] == [1.0]
    assert art["base"] == "llama@1"
    explicit = ok_json(
        cli,
        "merge",
        "--adapter",
        "code-r8",
        "--base",
        "llama@1",
        "--strategy",
        "simple",
        "--name",
        "solo-explicit",
    )
    assert explicit["content_hash"] == art["content_hash"]
    # Several adapters default to a documented multi-adapter strategy, and record it.
    multi = ok_json(cli, "merge", *THREE, "--name", "multi")
    assert multi["metadata"]["strategy"] in {"linear", "ties", "task_arithmetic"}
    # The text output names what happened and where it went.
    code, out, err = cli("merge", "--adapter", "chat-r4", "--name", "text")
    assert code == 0, err
    assert "text@1" in out and "simple" in out and "chat-r4@1" in out


def test_new_version_on_a_taken_name(cli, demo_set):
    register_demo(cli, demo_set)
    first = ok_json(cli, "merge", "--adapter", "chat-r4", "--name", "out")
    code, _out, err = cli("merge", "--adapter", "code-r8", "--name", "out")
    assert code == 2 and "--new-version" in err
    second = ok_json(cli, "merge", "--adapter", "code-r8", "--name", "out", "--new-version")
    assert (first["ref"], second["ref"]) == ("out@1", "out@2")
    assert first["content_hash"] != second["content_hash"]
    assert ok_json(cli, "show", "out")["ref"] == "out@2"
    assert ok_json(cli, "show", "out@1")["metadata"]["adapters"] == ["chat-r4@1"]


def test_verify_records_logit_difference(cli, demo_set):
    register_demo(cli, demo_set)
    art = ok_json(cli, "merge", "--adapter", "math-r16-rslora", "--name", "checked", "--verify")
    check = art["metadata"]["verify"]
    assert 0 <= check["max_abs_logit_diff"] < 1e-4  # fp32 merge of an fp32 adapter
    assert check["ok"] is True
    assert "verify_failed" not in art["flags"]
    assert ok_json(cli, "show", "checked")["metadata"]["verify"] == check


def test_verify_failure_exits_3_and_flags_the_artifact(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    path = tmp_path / "strict.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "adapters": ["code-r8"],
                "name": "strict",
                "dtype": "bf16",
                "verify": True,
                "verify_tolerance": 1e-12,
            }
        )
    )
    code, out, err = cli("merge", "--config", path)
    assert code == 3, (out, err)
    assert len(err.strip().splitlines()) == 1 and "strict@1" in err
    art = ok_json(cli, "show", "strict")
    assert "verify_failed" in art["flags"]
    assert art["metadata"]["verify"]["ok"] is False
    assert art["metadata"]["verify"]["max_abs_logit_diff"] > 1e-12
    assert art["metadata"]["verify"]["tolerance"] == 1e-12


def test_merging_never_destroys_a_source(cli, demo_set, tmp_path):
    # A linked base in a private folder, so its files can be hashed before and after.
    base = make_llama_base(tmp_path / "base", seed=0)
    assert tree_hashes(base) == tree_hashes(demo_set["base"])
    ok_json(cli, "base", "add", base, "--name", "llama")
    for _name, path in demo_set["adapters"].items():
        ok_json(cli, "adapter", "add", path, "--base", "llama")
    sources = {r["ref"]: (Path(r["path"]), r["content_hash"]) for r in ok_json(cli, "ls")}
    before = {ref: tree_hashes(p) for ref, (p, _) in sources.items()}
    inputs_before = {name: tree_hashes(p) for name, p in demo_set["adapters"].items()}

    ok_json(cli, "merge", *THREE, "--strategy", "ties", "--name", "m1")
    ok_json(cli, "merge", *THREE, "--strategy", "dare_linear", "--name", "m2")
    ok_json(cli, "merge", "--adapter", "chat-r4", "--name", "m3", "--dtype", "bf16")

    for ref, (p, content_hash) in sources.items():
        assert tree_hashes(p) == before[ref], f"{ref} changed on disk"
        shown = ok_json(cli, "show", ref)
        assert shown["content_hash"] == content_hash
    assert {name: tree_hashes(p) for name, p in demo_set["adapters"].items()} == inputs_before
    reports = ok_json(cli, "verify")
    assert reports and all(r["ok"] for r in reports), reports
    code, _, err = cli("verify")
    assert code == 0, err


def test_verify_tolerance_flag(cli, demo_set):
    register_demo(cli, demo_set)
    code, out, err = cli(
        "merge",
        "-a",
        "code-r8",
        "--name",
        "strict",
        "--dtype",
        "bf16",
        "--verify",
        "--verify-tolerance",
        "1e-12",
    )
    assert code == 3, (out, err)
    assert ok_json(cli, "show", "strict")["metadata"]["verify"]["tolerance"] == 1e-12
    art = ok_json(
        cli,
        "merge",
        "-a",
        "code-r8",
        "--name",
        "lax",
        "--dtype",
        "bf16",
        "--verify",
        "--verify-tolerance",
        "10",
    )
    assert art["metadata"]["verify"]["ok"] is True and art["metadata"]["verify"]["tolerance"] == 10


def _strategy_params(cli, name: str) -> dict:
    edges = [e for e in ok_json(cli, "lineage", name)["edges"] if e["child"] == f"{name}@1"]
    return edges[0]["params"]["params"]


def test_param_flags_reach_the_strategy_typed(cli, demo_set, tmp_path):
    """``--param KEY=VALUE`` sets any strategy parameter, parsed as its declared type; it overrides
    the YAML ``params:`` and lands in the lineage like a flag."""
    register_demo(cli, demo_set)
    art = ok_json(
        cli,
        "merge",
        *THREE,
        "--strategy",
        "dare_ties",
        "--param",
        "density=0.35",
        "--param",
        "rescale=l1",
        "--name",
        "p1",
    )
    assert _strategy_params(cli, "p1")["density"] == 0.35
    assert _strategy_params(cli, "p1")["rescale"] == "l1"
    same = ok_json(
        cli,
        "merge",
        *THREE,
        "--strategy",
        "dare_ties",
        "--density",
        "0.35",
        "--rescale",
        "l1",
        "--name",
        "p2",
    )
    assert same["content_hash"] == art["content_hash"]
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "adapters": ["chat-r4", "code-r8"],
                "strategy": "linear",
                "params": {"normalize": False},
                "name": "p3",
            }
        )
    )
    ok_json(cli, "merge", "--config", cfg, "--param", "normalize=true")
    assert _strategy_params(cli, "p3")["normalize"] is True
    for bad, says in [
        (("--param", "density"), "KEY=VALUE"),
        (("--param", "density=lots"), "finite number"),
        (("--param", "density=nan"), "finite number"),
        (("--param", "gamma=0.1"), "does not take gamma"),
    ]:
        code, _out, err = cli("merge", *THREE, "--strategy", "ties", *bad, "--name", "bad")
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, (bad, err)
