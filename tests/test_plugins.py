"""The plugin host: entry-point discovery, disabling, allowlists, strict registries and hooks."""

from __future__ import annotations

import json
import textwrap
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pluggy
import pytest

import adaptr
from adaptr.errors import DuplicateNameError, InvalidInputError, PluginError, UnknownNameError
from adaptr.plugins import get_host, get_reader, get_registry, get_strategy, reset_plugins


class Named:
    def __init__(self, name, kind: str = "adapter") -> None:
        self.name = name
        self.kind = kind


class ReaderPlugin:
    def __init__(self, *names) -> None:
        self.names = names

    @adaptr.hookimpl
    def register_readers(self, register) -> None:
        for n in self.names:
            register(Named(n))


class StrategyPlugin:
    def __init__(self, *names) -> None:
        self.names = names

    @adaptr.hookimpl
    def register_merge_strategies(self, register) -> None:
        for n in self.names:
            register(Named(n))


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, modules: dict[str, str]) -> None:
    """Make ``adaptr`` entry points for small modules written under tmp_path, next to the real ones."""
    for mod, source in modules.items():
        (tmp_path / f"{mod}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = [EntryPoint(name=mod.removeprefix("adaptr_test_"), value=mod, group="adaptr") for mod in modules]
    real = list(entry_points(group="adaptr"))
    monkeypatch.setattr(
        "adaptr.plugins.entry_points", lambda group: [*real, *extra] if group == "adaptr" else []
    )
    reset_plugins()


GOOD_PLUGIN = """
    import adaptr

    class Strategy:
        name = "avg-test"

    @adaptr.hookimpl
    def register_merge_strategies(register):
        register(Strategy())
"""


# --- discovery and disabling --------------------------------------------------------------------


def test_builtins_arrive_through_entry_points() -> None:
    eps = {ep.name: ep for ep in entry_points(group="adaptr")}
    assert eps["formats"].value == "adaptr_formats"
    assert eps["formats"].dist is not None and eps["formats"].dist.name == "adaptr"
    info = get_host().info["formats"]
    assert info.distribution == "adaptr" and info.version == adaptr.__version__
    assert info.module == "adaptr_formats"
    assert "register_readers" in info.hooks
    assert get_registry("reader").names() == ["hf-safetensors", "peft-lora"]
    assert get_registry("reader").plugin_of("peft-lora") == "formats"


def test_disable_builtin_by_name(cli, demo_set: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTR_DISABLE_PLUGINS", " other , formats")
    reset_plugins()
    assert "formats" not in get_host().info
    assert get_registry("reader").names() == []
    code, out, _ = cli("plugins", "--json")
    assert code == 0 and "formats" not in [p["name"] for p in json.loads(out)]
    code, out, err = cli("base", "add", demo_set["base"])
    assert code == 2 and out == ""
    assert "no base reader" in err and "disabled" in err and "Traceback" not in err
    monkeypatch.delenv("ADAPTR_DISABLE_PLUGINS")
    reset_plugins()
    assert "formats" in get_host().info


def test_disabled_name_also_blocks_direct_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTR_DISABLE_PLUGINS", "extra")
    reset_plugins()
    get_host().add(StrategyPlugin("zz-s1"), "extra")
    assert "extra" not in get_host().info and "zz-s1" not in get_registry("strategy")


def test_load_plugins_allowlist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_entry_points(monkeypatch, tmp_path, {"adaptr_test_good": GOOD_PLUGIN})
    assert {"formats", "good"} <= set(get_host().info)
    assert get_registry("strategy").plugin_of("avg-test") == "good"

    monkeypatch.setenv("ADAPTR_LOAD_PLUGINS", "good")
    reset_plugins()
    assert set(get_host().info) == {"good"}
    assert get_registry("reader").names() == []

    monkeypatch.setenv("ADAPTR_LOAD_PLUGINS", "formats")
    reset_plugins()
    assert set(get_host().info) == {"formats"}

    monkeypatch.setenv("ADAPTR_LOAD_PLUGINS", "formats,good")
    monkeypatch.setenv("ADAPTR_DISABLE_PLUGINS", "good")  # disabling wins over the allowlist
    reset_plugins()
    assert set(get_host().info) == {"formats"}


def test_third_party_plugin_is_listed(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_entry_points(monkeypatch, tmp_path, {"adaptr_test_good": GOOD_PLUGIN})
    code, out, err = cli("plugins", "--json")
    assert code == 0, err
    rows = {p["name"]: p for p in json.loads(out)}
    assert rows["good"]["registers"] == {"strategy": ["avg-test"]}
    assert rows["good"]["module"] == "adaptr_test_good"
    assert rows["formats"]["registers"] == {"reader": ["hf-safetensors", "peft-lora"]}
    code, out, _ = cli("plugins")
    assert code == 0 and "avg-test" in out and "good" in out


# --- strict registries ----------------------------------------------------------------------------


def test_duplicate_reader_names_both_plugins() -> None:
    get_host().add(ReaderPlugin("peft-lora"), "copycat")
    with pytest.raises(DuplicateNameError) as exc:
        get_registry("reader")
    msg = str(exc.value)
    assert "'peft-lora'" in msg and "'formats'" in msg and "'copycat'" in msg
    assert "ADAPTR_DISABLE_PLUGINS" in msg


def test_duplicate_strategy_names_both_plugins() -> None:
    host = get_host()
    host.add(StrategyPlugin("zz-same", "zz-other"), "first")
    host.add(StrategyPlugin("zz-same"), "second")
    with pytest.raises(DuplicateNameError) as exc:
        get_strategy("zz-other")
    msg = str(exc.value)
    assert "'zz-same'" in msg and "'first'" in msg and "'second'" in msg
    host.remove("second")
    assert {"zz-other", "zz-same"} <= set(get_registry("strategy").names())
    assert get_registry("strategy").plugin_of("zz-same") == "first"


def test_duplicate_fails_the_cli(cli) -> None:
    get_host().add(ReaderPlugin("hf-safetensors"), "copycat")
    code, _out, err = cli("plugins")
    assert code == 1 and "'copycat'" in err and "'formats'" in err and "Traceback" not in err


def test_unknown_names_list_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTR_LOAD_PLUGINS", "formats")  # built-in merge plugins stay out of the lists
    reset_plugins()
    with pytest.raises(UnknownNameError) as exc:
        get_reader("gguf")
    assert "'gguf'" in str(exc.value) and "hf-safetensors, peft-lora" in str(exc.value)
    assert isinstance(exc.value, InvalidInputError) and exc.value.exit_code == 2

    with pytest.raises(UnknownNameError, match="known: none"):
        get_strategy("ties")
    get_host().add(StrategyPlugin("task-arithmetic", "dare"), "merges")
    with pytest.raises(UnknownNameError) as exc:
        get_strategy("ties")
    assert "known: dare, task-arithmetic" in str(exc.value)


@pytest.mark.parametrize("bad", ["Linear", "TIES", "1st", "-x", "has space", "dotted.name", "", None, 7])
def test_invalid_names_are_rejected(bad) -> None:
    get_host().add(StrategyPlugin(bad), "badly")
    with pytest.raises(PluginError) as exc:
        get_registry("strategy")
    assert "'badly'" in str(exc.value) and "lowercase" in str(exc.value)


def test_valid_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTR_LOAD_PLUGINS", "formats")
    reset_plugins()
    get_host().add(StrategyPlugin("ties", "dare_ties", "della-2"), "fine")
    assert get_registry("strategy").names() == ["dare_ties", "della-2", "ties"]


# --- hooks ----------------------------------------------------------------------------------------


def test_register_commands_adds_a_cli_command(cli) -> None:
    import typer

    class Commands:
        @adaptr.hookimpl
        def register_commands(self, app: typer.Typer) -> None:
            @app.command("hello")
            def hello(who: str = typer.Option("world", "--who")) -> None:
                """Say hello (from a plugin)."""
                typer.echo(f"hello {who}")

    get_host().add(Commands(), "greeter")
    code, out, _ = cli("hello", "--who", "plugin")
    assert code == 0 and out.strip() == "hello plugin"
    code, out, _ = cli("--help")
    assert code == 0 and "hello" in out


def test_artifact_recorded_fires_with_the_show_payload(cli, demo_set: dict) -> None:
    seen: list[tuple[dict, str]] = []

    class Listener:
        @adaptr.hookimpl
        def artifact_recorded(self, artifact, operation) -> None:
            seen.append((json.loads(json.dumps(artifact)), operation))

    get_host().add(Listener(), "listener")
    code, _, err = cli("base", "add", demo_set["base"], "--name", "llama")
    assert code == 0, err
    code, _, err = cli("adapter", "add", demo_set["adapters"]["chat-r4"], "--base", "llama")
    assert code == 0, err
    assert [(a["ref"], op) for a, op in seen] == [("llama@1", "add"), ("chat-r4@1", "add")]
    for payload, _ in seen:
        code, out, _ = cli("show", payload["ref"], "--json")
        assert payload == json.loads(out)
    # a failed add fires nothing
    cli("adapter", "add", demo_set["adapters"]["chat-r4"], "--base", "llama")
    assert len(seen) == 2


def test_get_kernel_is_first_result() -> None:
    def fast(*args):
        return "fast"

    class Declines:
        @adaptr.hookimpl
        def get_kernel(self, op, device, dtype, params):
            return None

    class Claims:
        @adaptr.hookimpl
        def get_kernel(self, op, device, dtype, params):
            return fast if device.startswith("cuda") else None

    host = get_host()
    host.add(Declines(), "declines")
    host.add(Claims(), "claims")
    hook = host.pm.hook.get_kernel
    assert hook(op="merge_tensor", device="cuda:0", dtype="bfloat16", params={}) is fast
    assert hook(op="merge_tensor", device="cpu", dtype="float32", params={}) is None


def test_misspelled_hookimpl_is_caught() -> None:
    class Typo:
        @adaptr.hookimpl
        def register_reader(self, register) -> None:  # the spec is register_readers
            pass

    host = get_host()
    host.add(Typo(), "typo")
    with pytest.raises(pluggy.PluginValidationError, match="register_reader"):
        host.pm.check_pending()


def test_misspelled_hookimpl_in_an_entry_point(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    typo = """
        import adaptr

        @adaptr.hookimpl
        def register_merge_strategy(register):
            pass
    """
    fake_entry_points(monkeypatch, tmp_path, {"adaptr_test_typo": typo})
    with pytest.raises(PluginError) as exc:
        get_host()
    msg = str(exc.value)
    assert "'typo'" in msg and "register_merge_strategy" in msg and "ADAPTR_DISABLE_PLUGINS=typo" in msg

    from adaptr.cli import main

    reset_plugins()
    with pytest.raises(SystemExit) as ex:
        main(["ls"])
    assert ex.value.code == 1
    err = capsys.readouterr().err
    assert "register_merge_strategy" in err and "Traceback" not in err

    monkeypatch.setenv("ADAPTR_DISABLE_PLUGINS", "typo")  # disabling it by name lets adaptr run again
    reset_plugins()
    assert "typo" not in get_host().info


def test_plugin_that_fails_to_import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_entry_points(monkeypatch, tmp_path, {"adaptr_test_broken": "raise RuntimeError('boom')\n"})
    with pytest.raises(PluginError, match=r"'broken'.*failed to load: boom"):
        get_host()
    monkeypatch.setenv("ADAPTR_DISABLE_PLUGINS", "broken")
    reset_plugins()
    assert "formats" in get_host().info
