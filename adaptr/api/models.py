"""Response bodies. Artifacts have the fields of ``adaptr show --json`` (lists: without files)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ParentRef(BaseModel):
    ref: str
    operation: str


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str


class ArtifactSummary(BaseModel):
    name: str
    version: int
    ref: str
    kind: str
    content_hash: str
    recipe_hash: str | None
    size_bytes: int
    path: str
    storage: str
    base: str | None
    parents: list[ParentRef]
    tags: list[str]
    flags: list[str]
    metadata: dict[str, Any]
    created_at: str


class Artifact(ArtifactSummary):
    files: list[FileEntry]


class ArtifactPage(BaseModel):
    items: list[ArtifactSummary]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


class Edge(BaseModel):
    parent: str
    child: str
    operation: str
    params: dict[str, Any]
    plugin: str | None
    plugin_version: str | None
    seed: int | None


class Lineage(BaseModel):
    root: str
    nodes: list[ArtifactSummary]
    edges: list[Edge]


class Removed(BaseModel):
    removed: list[str]


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    schema_revision: str | None
    jobs_running: int


class JobError(BaseModel):
    code: str
    message: str
    hint: str | None = None


class Job(BaseModel):
    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    request: dict[str, Any]
    progress: dict[str, Any] = Field(
        description="stage, bytes_done, bytes_total, tensors_done, tensors_total, detail"
    )
    result: dict[str, Any] | None
    error: JobError | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class BaseFromPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="Server-side model folder, inside an import root.")
    name: str | None = Field(None, description="Catalog name (default: the folder name).")
    copy_files: bool = Field(False, alias="copy", description="Copy into the store instead of linking.")
    tags: list[str] = Field(default_factory=list)
    new_version: bool = False


class AdapterFromPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="Server-side PEFT adapter folder, inside an import root.")
    base: str = Field(..., description="Catalog base model it was trained on (NAME[@N]).")
    name: str | None = Field(None, description="Catalog name (default: the folder name).")
    tags: list[str] = Field(default_factory=list)
    new_version: bool = False
    trained_on: str | None = Field(None, description="Quantizer of the QLoRA base it was trained on.")
    trained_on_params: dict[str, Any] = Field(default_factory=dict)


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: dict[str, Any] = Field(
        ..., description="A pipeline document (`version: 1`, `steps`), as in a PIPELINE.yaml file."
    )
    force: bool = Field(False, description="Recompute every step and replace export outputs.")
