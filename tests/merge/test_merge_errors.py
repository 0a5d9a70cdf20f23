"""Every refused or failed merge: one line on stderr, a non-zero exit, and nothing left behind.

"Nothing left behind" means: ``ls --json`` unchanged, no new folder under the store's artifacts or
objects, and no staging folder left in ``$ADAPTR_HOME/store/tmp``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import ok_json, register_demo

from adaptr.testing import make_llama_base, make_lora_adapter

THREE = ("--adapter", "chat-r4", "--adapter", "code-r8", "--adapter", "math-r16-rslora")


def _tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def snapshot(cli, home: Path) -> tuple:
    store = home / "store"
    return ok_json(cli, "ls"), _tree(store / "artifacts"), _tree(store / "objects")


def assert_refused(cli, home: Path, *args, code: int | set[int] = 2, says: tuple[str, ...] = ()) -> str:
    before = snapshot(cli, home)
    rc, out, err = cli("merge", *args)
    assert rc in (code if isinstance(code, set) else {code}), (args, rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for word in says:
        assert word.lower() in err.lower(), (word, err)
    assert snapshot(cli, home) == before
    tmp = home / "store" / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), f"staging left behind: {_tree(tmp)}"
    return err


def test_unknown_strategy_lists_the_known_ones(cli, demo_set, adaptr_home):
    register_demo(cli, demo_set)
    assert_refused(
        cli,
        adaptr_home,
        *THREE,
        "--strategy",
        "tie",
        "--name",
        "m",
        says=(
            "tie",
            "ties",
            "dare_ties",
            "dare_linear",
            "linear",
            "task_arithmetic",
            "magnitude_prune",
            "simple",
        ),
    )


def test_adapters_of_different_bases(cli, demo_set, adaptr_home, tmp_path):
    register_demo(cli, demo_set)
    other = make_llama_base(tmp_path / "other", seed=99)  # same shapes, other weights
    ok_json(cli, "base", "add", other, "--name", "other")
    ok_json(cli, "adapter", "add", demo_set["adapters"]["code-r8"], "--base", "other", "--name", "code-other")
    assert_refused(
        cli,
        adaptr_home,
        "--adapter",
        "chat-r4",
        "--adapter",
        "code-other",
        "--name",
        "m",
        says=("different bases", "llama@1", "other@1"),
    )
    # --base naming a base the adapters were not registered on
    assert_refused(
        cli,
        adaptr_home,
        "--adapter",
        "chat-r4",
        "--base",
        "other",
        "--name",
        "m",
        says=("chat-r4@1", "other@1"),
    )
    assert_refused(
        cli,
        adaptr_home,
        "--adapter",
        "chat-r4",
        "--adapter",
        "code-r8",
        "--base",
        "other",
        "--strategy",
        "ties",
        "--name",
        "m",
        says=("other@1",),
    )


@pytest.mark.parametrize(
    "args,says",
    [
        (("--weights", "1,0.5"), ("--weights", "2", "3")),
        (("--weights", "1,0.5,0.2,1"), ("--weights", "4", "3")),
        (("--weights", "nan,1,1"), ("finite",)),
        (("--weights", "1,inf,1"), ("finite",)),
        (("--weights", "1,x,1"), ("--weights",)),
        (("--strategy", "ties", "--weights", "1,-0.5,1"), ("negative", "ties")),
        (("--strategy", "dare_ties", "--weights", "-1,1,1"), ("negative", "dare_ties")),
        (("--strategy", "linear", "--density", "0.5"), ("linear", "density")),
        (("--strategy", "task_arithmetic", "--rescale", "l1"), ("task_arithmetic", "rescale")),
        (("--strategy", "ties", "--density", "nan"), ("density",)),
        (("--strategy", "dare_linear", "--rescale", "l3"), ("rescale",)),
        (("--strategy", "ties", "--dtype", "int8"), ("dtype",)),
        (
            (
                "--strategy",
                "simple",
            ),
            ("simple", "1"),
        ),
        (("--strategy", "ties", "--verify"), ("verify", "one")),
        (("--strategy", "ties", "--max-shard-size", "lots"), ("lots",)),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) and v and v[0].startswith("--") else None,
)
def test_bad_parameters(cli, demo_set, adaptr_home, args, says):
    register_demo(cli, demo_set)
    assert_refused(cli, adaptr_home, *THREE, *args, "--name", "m", says=says)


def test_invalid_options_fail_before_any_tensor_is_merged(cli, demo_set, adaptr_home, monkeypatch):
    register_demo(cli, demo_set)
    import adaptr.engine

    def execute(*args, **kwargs):
        raise AssertionError("the merge ran before the options were validated")

    monkeypatch.setattr(adaptr.engine, "execute", execute)
    for args in (
        ("--strategy", "ties", "--verify"),
        ("--strategy", "ties", "--weights", "1,-1,1"),
        ("--strategy", "linear", "--density", "0.2"),
        ("--weights", "1,2"),
    ):
        assert_refused(cli, adaptr_home, *THREE, *args, "--name", "m")


def test_output_name_taken(cli, demo_set, adaptr_home):
    register_demo(cli, demo_set)
    ok_json(cli, "merge", "--adapter", "chat-r4", "--name", "m")
    assert_refused(
        cli, adaptr_home, *THREE, "--strategy", "ties", "--name", "m", says=("m@1", "--new-version")
    )
    # A name taken by another kind of artifact is taken too.
    assert_refused(cli, adaptr_home, "--adapter", "chat-r4", "--name", "code-r8", says=("code-r8",))


def test_dora_refused_by_multi_adapter_strategies(cli, demo_set, adaptr_home, tmp_path):
    register_demo(cli, demo_set)
    dora = make_lora_adapter(tmp_path / "dora", demo_set["base"], r=4, lora_alpha=8, use_dora=True, seed=6)
    ok_json(cli, "adapter", "add", dora, "--base", "llama", "--name", "dora")
    for strategy in ("ties", "linear", "dare_ties"):
        assert_refused(
            cli,
            adaptr_home,
            "--adapter",
            "dora",
            "--adapter",
            "chat-r4",
            "--strategy",
            strategy,
            "--name",
            "m",
            says=("dora@1", "DoRA", "simple"),
        )
    assert_refused(cli, adaptr_home, "--adapter", "dora", "--strategy", "ties", "--name", "m", says=("DoRA",))
    ok_json(cli, "merge", "--adapter", "dora", "--name", "alone")  # simple merges it


def test_two_modules_to_save_need_a_choice(cli, demo_set, adaptr_home, tmp_path):
    from safetensors.torch import load_file

    register_demo(cli, demo_set)
    paths = {}
    for i, name in enumerate(("head-a", "head-b")):
        paths[name] = make_lora_adapter(
            tmp_path / name, demo_set["base"], r=4, lora_alpha=8, seed=30 + i, modules_to_save=["lm_head"]
        )
        ok_json(cli, "adapter", "add", paths[name], "--base", "llama", "--name", name)
    assert_refused(
        cli,
        adaptr_home,
        "--adapter",
        "head-a",
        "--adapter",
        "head-b",
        "--strategy",
        "linear",
        "--name",
        "m",
        says=("lm_head", "--modules-to-save-from"),
    )
    assert_refused(
        cli,
        adaptr_home,
        "--adapter",
        "head-a",
        "--adapter",
        "head-b",
        "--strategy",
        "linear",
        "--modules-to-save-from",
        "chat-r4",
        "--name",
        "m",
        says=("chat-r4",),
    )
    art = ok_json(
        cli,
        "merge",
        "--adapter",
        "head-a",
        "--adapter",
        "head-b",
        "--strategy",
        "linear",
        "--modules-to-save-from",
        "head-b",
        "--name",
        "m",
    )
    merged = load_file(str(Path(art["path"]) / "model.safetensors"))
    saved = load_file(str(paths["head-b"] / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    assert (merged["lm_head.weight"] == saved).all()


def test_pissa_adapter_refused(cli, demo_set, adaptr_home, tmp_path):
    register_demo(cli, demo_set)
    pissa = make_lora_adapter(
        tmp_path / "pissa", demo_set["base"], r=4, lora_alpha=4, seed=8, init_lora_weights="pissa"
    )
    ok_json(cli, "adapter", "add", pissa, "--base", "llama", "--name", "pissa")
    assert_refused(cli, adaptr_home, "--adapter", "pissa", "--name", "m", says=("pissa@1", "PISSA"))
    assert_refused(
        cli,
        adaptr_home,
        "--adapter",
        "pissa",
        "--adapter",
        "chat-r4",
        "--strategy",
        "ties",
        "--name",
        "m",
        says=("PISSA",),
    )


def test_not_enough_disk_space(cli, demo_set, adaptr_home, monkeypatch):
    register_demo(cli, demo_set)
    import adaptr.io.files

    monkeypatch.setattr(adaptr.io.files, "disk_free", lambda path: 1000)
    assert_refused(
        cli, adaptr_home, *THREE, "--strategy", "ties", "--name", "m", code=1, says=("disk space", "free")
    )


@pytest.mark.parametrize("damage", ["truncate", "garbage-header", "missing"])
def test_unreadable_base_file(cli, demo_set, adaptr_home, tmp_path, damage):
    base = make_llama_base(tmp_path / "base", seed=0)  # a private copy, linked (not copied) into the store
    ok_json(cli, "base", "add", base, "--name", "llama")
    ok_json(cli, "adapter", "add", demo_set["adapters"]["chat-r4"], "--base", "llama")
    weights = base / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "garbage-header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\xff" * 32
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    err = assert_refused(cli, adaptr_home, "--adapter", "chat-r4", "--name", "m", code={1, 2})
    assert "model.safetensors" in err


def test_ctrl_c_mid_merge_registers_nothing(cli, demo_set, adaptr_home, monkeypatch):
    register_demo(cli, demo_set)
    import adaptr.ops.ties_merge as ref

    real = ref.ties_merge
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # a few tensors already streamed into the staging folder
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ref, "ties_merge", interrupted)
    assert_refused(
        cli,
        adaptr_home,
        *THREE,
        "--strategy",
        "ties",
        "--max-shard-size",
        "20KB",
        "--name",
        "m",
        code=130,
        says=("interrupted",),
    )
    assert 4 <= len(calls) <= 4 + 2  # merge workers may have started the next tensor already
    monkeypatch.setattr(ref, "ties_merge", real)
    ok_json(cli, "merge", *THREE, "--strategy", "ties", "--name", "m")  # the name is still free


def test_failure_while_writing_cleans_up(cli, demo_set, adaptr_home, monkeypatch):
    """Any exception from a strategy (not only Ctrl-C) leaves nothing behind."""
    register_demo(cli, demo_set)
    import adaptr.ops.weighted_sum as ref

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ref, "weighted_sum", broken)
    before = snapshot(cli, adaptr_home)
    try:
        rc, _out, _err = cli("merge", *THREE, "--strategy", "linear", "--name", "m")
    except OSError:
        rc = None  # not turned into a one-line error; the cleanup below is what matters here
    assert rc != 0
    assert snapshot(cli, adaptr_home) == before
    tmp = adaptr_home / "store" / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())


@pytest.mark.parametrize("strategy", ["simple", "ties", "linear"])
def test_overflow_to_inf_in_the_output_dtype_is_refused(cli, adaptr_home, tmp_path, strategy):
    """Finite adapters whose merged weights overflow float16 (max 65504): refused, nothing kept."""
    base = make_llama_base(tmp_path / "base", dtype="float16")
    ok_json(cli, "base", "add", str(base), "--name", "b16")
    for name in ("big1", "big2"):
        path = make_lora_adapter(tmp_path / name, base, r=8, lora_alpha=8, init_scale=200.0, seed=len(name))
        ok_json(cli, "adapter", "add", str(path), "--base", "b16", "--name", name)
    adapters = ("-a", "big1") if strategy == "simple" else ("-a", "big1", "-a", "big2")
    assert_refused(
        cli, adaptr_home, *adapters, "--strategy", strategy, "--name", "out", says=("NaN/Inf", "adapters")
    )
