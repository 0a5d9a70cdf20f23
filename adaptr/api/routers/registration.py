"""Register bases and adapters from server-side folders (inside the import roots) or uploads."""

from __future__ import annotations

import shutil
import tarfile
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from adaptr.api import models
from adaptr.api.auth import require
from adaptr.api.errors import ERRORS, PathRefusedError, TooLargeError
from adaptr.errors import InvalidInputError
from adaptr.services.catalog import Catalog
from adaptr.settings import get_settings

router = APIRouter(
    tags=["registration"],
    dependencies=[Depends(require("write"))],
    responses={k: ERRORS[k] for k in (401, 403, 404, 409, 422)},
)
_CHUNK = 1 << 20


def confine(path: str) -> Path:
    """A folder inside one of the configured import roots (symlinks resolved), else refused."""
    roots = get_settings().import_roots
    if not roots:
        raise PathRefusedError(
            "this server registers no server-side paths",
            hint="set ADAPTR_IMPORT_ROOTS, or upload the adapter",
        )
    if "\x00" in path:
        raise InvalidInputError("path: contains a NUL byte")
    full = Path(path).expanduser()
    full = full.resolve() if full.is_absolute() else (roots[0] / full).resolve()
    if not any(full.is_relative_to(r) for r in roots):
        raise PathRefusedError(
            f"path: {path!r} is outside the server's import roots",
            hint="ask the operator for ADAPTR_IMPORT_ROOTS, or upload the adapter",
        )
    return full


@router.post("/bases", response_model=models.Artifact, status_code=201)
def register_base(body: models.BaseFromPath) -> dict[str, Any]:
    """`adaptr base add` from a server-side folder inside an import root."""
    return Catalog().add_base(
        confine(body.path), name=body.name, copy=body.copy_files, tags=body.tags, new_version=body.new_version
    )


@router.post("/adapters", response_model=models.Artifact, status_code=201)
def register_adapter(body: models.AdapterFromPath) -> dict[str, Any]:
    """`adaptr adapter add` from a server-side folder inside an import root."""
    return Catalog().add_adapter(
        confine(body.path),
        base=body.base,
        name=body.name,
        tags=body.tags,
        new_version=body.new_version,
        trained_on=body.trained_on,
        trained_on_params=body.trained_on_params,
    )


def _relative(name: str | None) -> PurePosixPath:
    p = PurePosixPath((name or "").replace("\\", "/"))
    if not name or p.is_absolute() or ".." in p.parts or p.parts[:1] == ("",) or "\x00" in name:
        raise InvalidInputError(f"files: {name!r} is not a relative file name inside the adapter folder")
    return p


def _limit_check(request: Request) -> int:
    limit = get_settings().max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + (1 << 16):
        raise TooLargeError(f"the upload is {int(length)} bytes; this server takes at most {limit}")
    return limit


def _unpack(archive: Path, dest: Path, limit: int) -> None:
    """A .zip or .tar(.gz) of an adapter folder; no links, nothing outside ``dest``, size-limited."""
    total = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                rel = _relative(info.filename)
                total += info.file_size
                if total > limit:
                    raise TooLargeError(f"the archive unpacks to more than {limit} bytes; refused")
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f, _CHUNK)
        return
    try:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isdir():
                    continue
                if not m.isfile():
                    raise InvalidInputError(f"files: archive member {m.name!r} is a link or device; refused")
                _relative(m.name)
                total += m.size
                if total > limit:
                    raise TooLargeError(f"the archive unpacks to more than {limit} bytes; refused")
            t.extractall(dest, filter="data")
    except tarfile.TarError:
        raise InvalidInputError("files: not a .zip or .tar(.gz) archive, nor adapter files") from None


@router.post(
    "/adapters/uploads",
    response_model=models.Artifact,
    status_code=201,
    responses={413: {"model": ERRORS[422]["model"], "description": "The upload is over the size limit"}},
)
def upload_adapter(
    request: Request,
    files: list[UploadFile] = File(
        ..., description="The adapter's files (adapter_config.json, weights), or one .zip/.tar.gz of them."
    ),
    base: str = Form(..., description="Catalog base model it was trained on (NAME[@N])."),
    name: str = Form(..., description="Catalog name of the adapter."),
    tags: list[str] = Form([], description="Tags to attach."),
    new_version: bool = Form(False),
) -> dict[str, Any]:
    """Register an uploaded adapter (size-limited by ADAPTR_MAX_UPLOAD_BYTES); it is copied into the
    store and the upload deleted."""
    limit = _limit_check(request)
    work = get_settings().home / "uploads" / uuid.uuid4().hex
    folder = work / name.replace("/", "_")
    try:
        folder.mkdir(parents=True)
        total = 0
        for up in files:
            rel = _relative(up.filename)
            out = folder / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "wb") as f:
                while chunk := up.file.read(_CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise TooLargeError(f"the upload is over {limit} bytes; refused")
                    f.write(chunk)
        if len(files) == 1 and not (folder / "adapter_config.json").exists():
            archive = folder / _relative(files[0].filename)
            unpacked = work / "unpacked"
            _unpack(archive, unpacked, limit)
            inner = [p for p in unpacked.rglob("adapter_config.json")]
            if len(inner) != 1:
                raise InvalidInputError("files: the archive holds no single adapter_config.json")
            folder = inner[0].parent
        return Catalog().add_adapter(folder, base=base, name=name, tags=tags, new_version=new_version)
    finally:
        shutil.rmtree(work, ignore_errors=True)
