"""Pipeline files for ``adaptr run``: parse, validate with file and line, and resolve step references.

A pipeline is ``version: 1`` and an ordered list of ``steps``; each step has an ``id`` and
exactly one step type key (``merge``, ``quantize``, ``export`` or a plugin's) whose body uses
the same keys as that command's flags and validates through the same spec model. Every
mistake is reported before anything is computed, as ``FILE:LINE: steps[i] (id).type.field:
what is wrong``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adaptr.errors import InvalidInputError, NotFoundError

ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
VERSION = 1


@dataclass
class Step:
    """One validated step; ``needs`` are the earlier steps it names."""

    index: int
    id: str
    kind: Any  # the StepType
    body: dict[str, Any]
    line: int
    lines: dict[tuple[Any, ...], int]
    needs: list[str] = field(default_factory=list)

    def where(self, *path: Any) -> str:
        inner = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
        return f"steps[{self.index}] ({self.id}).{self.kind.name}{inner}"

    def line_of(self, *path: Any) -> int:
        for n in range(len(path), -1, -1):
            line = self.lines.get(path[:n])
            if line is not None:
                return line
        return self.line


@dataclass
class Pipeline:
    path: Path
    steps: list[Step]

    @property
    def root(self) -> Path:
        """Relative paths in the file (``out``, folders to register) are relative to the file."""
        return self.path.parent

    def error(self, line: int, where: str, message: str) -> InvalidInputError:
        return InvalidInputError(f"{self.path}:{line}: {where}: {message}")


def _lines(node: Any, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    """Line (1-based) of every mapping key and list item, by its path in the document."""
    import yaml

    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value
            out[(*path, name)] = key.start_mark.line + 1
            _lines(value, (*path, name), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _lines(item, (*path, i), out)


def load(path: str | Path, *, force: bool = False) -> Pipeline:
    """Read and validate a pipeline file; raises InvalidInputError naming file, line and field."""
    import yaml

    from adaptr.plugins import get_registry

    path = Path(path).expanduser().absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such pipeline file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{path}: cannot read the pipeline file ({e})") from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InvalidInputError(f"{path}:{line} invalid YAML ({problem}); fix the file") from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _lines(node, (), lines)
    pipe = Pipeline(path, [])
    if not isinstance(data, dict):
        raise pipe.error(1, "pipeline", "expected a mapping with `version: 1` and `steps:`")
    unknown = sorted(set(data) - {"version", "steps"})
    if unknown:
        raise pipe.error(
            lines.get((unknown[0],), 1), unknown[0], "unknown key; a pipeline has version and steps"
        )
    if data.get("version") != VERSION:
        raise pipe.error(
            lines.get(("version",), 1), "version", f"expected version: {VERSION}, got {data.get('version')!r}"
        )
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise pipe.error(lines.get(("steps",), 1), "steps", "expected a non-empty list of steps")

    registry = get_registry("step")
    ids = [s.get("id") if isinstance(s, dict) else None for s in steps]
    for i, raw in enumerate(steps):
        line = lines.get(("steps", i), 1)
        where = f"steps[{i}]"
        if not isinstance(raw, dict):
            raise pipe.error(line, where, "expected a mapping with an id and one step type")
        sid = raw.get("id")
        if not isinstance(sid, str) or not ID_RE.match(sid):
            raise pipe.error(
                lines.get(("steps", i, "id"), line), f"{where}.id", f"expected an identifier, got {sid!r}"
            )
        if sid in ids[:i]:
            raise pipe.error(
                lines.get(("steps", i, "id"), line), f"{where}.id", f"step id {sid!r} is used twice"
            )
        kinds = [k for k in raw if k != "id"]
        if len(kinds) != 1:
            raise pipe.error(
                line, f"{where} ({sid})", f"expected exactly one step type ({', '.join(registry.names())})"
            )
        name = kinds[0]
        if name not in registry:
            raise pipe.error(
                lines.get(("steps", i, name), line),
                f"{where} ({sid}).{name}",
                f"unknown step type; known: {', '.join(registry.names())}",
            )
        body = raw[name]
        if not isinstance(body, dict):
            raise pipe.error(
                lines.get(("steps", i, name), line),
                f"{where} ({sid}).{name}",
                "expected a mapping of options",
            )
        prefix = ("steps", i, name)
        step_lines = {key[3:]: v for key, v in lines.items() if key[:3] == prefix}
        step = Step(i, sid, registry.get(name), body, lines.get(prefix, line), step_lines)
        spec = validate_body(pipe, step, _relative_to(pipe, body))
        _check_refs(pipe, step, ids)
        check = getattr(step.kind, "check", None)
        problem = check(spec, force=force) if check is not None else None
        if problem:
            key = next((k for k in ("out", "input") if k in body), None)
            raise pipe.error(
                step.line_of(key) if key else step.line, step.where(*([key] if key else [])), problem
            )
        pipe.steps.append(step)
    return pipe


def _relative_to(pipe: Pipeline, body: dict[str, Any]) -> dict[str, Any]:
    """``out`` paths in a pipeline are relative to the pipeline file, not to the caller's cwd."""
    out = body.get("out")
    if isinstance(out, str) and not Path(out).expanduser().is_absolute():
        return {**body, "out": str(pipe.root / out)}
    return body


def validate_body(pipe: Pipeline, step: Step, body: dict[str, Any]) -> Any:
    """The step body as its spec model, or one line naming the field and its line."""
    try:
        return step.kind.spec.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise pipe.error(step.line_of(*loc), step.where(*loc), msg) from None


def _values(body: dict[str, Any], key: str) -> list[tuple[tuple[Any, ...], str]]:
    value = body.get(key)
    if isinstance(value, str):
        return [((key,), value)]
    if isinstance(value, list):
        return [((key, j), v) for j, v in enumerate(value) if isinstance(v, str)]
    return []


def _check_refs(pipe: Pipeline, step: Step, ids: list[Any]) -> None:
    """Forward and self references are errors; earlier steps become ``needs``."""
    earlier = {s.id: s for s in pipe.steps}
    for key in step.kind.refs:
        for where, value in _values(step.body, key):
            if value == step.id:
                raise pipe.error(
                    step.line_of(*where), step.where(*where), f"refers to its own step {value!r}"
                )
            if value in ids[step.index + 1 :]:
                raise pipe.error(
                    step.line_of(*where),
                    step.where(*where),
                    f"refers to step {value!r}, which comes later; steps run in order and use earlier ones",
                )
            if value in earlier:
                if not earlier[value].kind.produces:
                    raise pipe.error(
                        step.line_of(*where),
                        step.where(*where),
                        f"step {value!r} ({earlier[value].kind.name}) registers no artifact to use",
                    )
                step.needs.append(value)


def resolve_ref(
    pipe: Pipeline,
    step: Step,
    where: tuple[Any, ...],
    value: str,
    role: str,
    *,
    produced: dict[str, str | None],
    catalog: Any,
    register_missing: bool,
    dry_run: bool,
    base: str | None,
) -> tuple[str | None, str | None]:
    """``(catalog ref, note)`` for one reference: an earlier step's output, a catalog artifact, or
    a folder registered on the fly. ``None`` as ref: not known yet (a dry run of a computed step)."""
    if value in produced:
        return produced[value], None
    try:
        art = catalog.show(value)
        return art["ref"], None
    except NotFoundError:
        pass
    except InvalidInputError:  # not even a valid name: maybe a path
        pass
    folder = Path(value).expanduser()
    folder = folder if folder.is_absolute() else pipe.root / folder
    line, at = step.line_of(*where), step.where(*where)
    if not folder.exists():
        raise pipe.error(
            line, at, f"{value!r} is neither an earlier step, a catalog artifact nor an existing folder"
        )
    if not register_missing:
        raise pipe.error(
            line, at, f"{value!r} is not in the catalog; pass --register-missing to register {folder}"
        )
    if role not in ("base", "adapter"):
        raise pipe.error(
            line, at, f"{value!r} is a folder; only bases and adapters are registered on the fly"
        )
    known = _registered_from(catalog, folder)
    if known:
        return known, None
    if dry_run:
        return None, f"would register {folder} as a {role}"
    if role == "base":
        return catalog.add_base(folder)["ref"], f"registered {folder}"
    if base is None:
        raise pipe.error(line, at, "registering an adapter folder needs the step's base (a catalog name)")
    return catalog.add_adapter(folder, base=base)["ref"], f"registered {folder}"


def _registered_from(catalog: Any, folder: Path) -> str | None:
    """An artifact registered from this very folder (``metadata.source``), so reruns register nothing."""
    source = str(folder.resolve())
    found = [a["ref"] for a in catalog.ls() if a["metadata"].get("source") == source]
    return found[-1] if found else None  # ls is by name and version: the latest
