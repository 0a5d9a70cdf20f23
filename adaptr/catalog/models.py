"""Catalog tables. One artifact row per (name, version); lineage edges link versions.

Everything here must work on SQLite and PostgreSQL alike: portable column types only,
JSON through SQLAlchemy's generic ``JSON``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class Artifact(SQLModel, table=True):
    """A base model, adapter, or anything derived from them, at one version."""

    __tablename__ = "artifact"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_artifact_name_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=200)
    version: int
    kind: str = Field(index=True, max_length=32)
    content_hash: str = Field(max_length=64)
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    path: str = Field(max_length=4096)
    storage: str = Field(max_length=16)  # "link": files stay where they are; "store": content-addressed copy
    base_id: int | None = Field(default=None, foreign_key="artifact.id", index=True)
    rank: int | None = Field(default=None, index=True)
    # What produced it (inputs' hashes, operation, resolved parameters, plugins, seed): an equal
    # recipe is reused before any tensor is read. None for imported artifacts.
    recipe_hash: str | None = Field(default=None, index=True, max_length=64)
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    manifest: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    flags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )


class ArtifactFile(SQLModel, table=True):
    """One file of an artifact version; ``sha256`` doubles as its object id in the store."""

    __tablename__ = "artifact_file"
    __table_args__ = (UniqueConstraint("artifact_id", "relpath", name="uq_artifact_file_relpath"),)

    id: int | None = Field(default=None, primary_key=True)
    artifact_id: int = Field(foreign_key="artifact.id", index=True)
    relpath: str = Field(max_length=1024)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(index=True, max_length=64)


class Tag(SQLModel, table=True):
    __tablename__ = "tag"
    __table_args__ = (UniqueConstraint("artifact_id", "tag", name="uq_tag_artifact_tag"),)

    id: int | None = Field(default=None, primary_key=True)
    artifact_id: int = Field(foreign_key="artifact.id", index=True)
    tag: str = Field(index=True, max_length=200)


class LineageEdge(SQLModel, table=True):
    """``child`` was produced from ``parent`` by ``operation`` with these parameters."""

    __tablename__ = "lineage_edge"

    id: int | None = Field(default=None, primary_key=True)
    parent_id: int = Field(foreign_key="artifact.id", index=True)
    child_id: int = Field(foreign_key="artifact.id", index=True)
    operation: str = Field(max_length=64)
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    plugin: str | None = Field(default=None, max_length=200)
    plugin_version: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )


class ApiToken(SQLModel, table=True):
    """A REST API bearer token. Only a hash of its secret is stored; ``token_id`` names it."""

    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    token_id: str = Field(max_length=32, unique=True, index=True)
    secret_hash: str = Field(max_length=64)
    scope: str = Field(max_length=16)  # read, write or admin
    name: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    expires_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class Job(SQLModel, table=True):
    """A merge, quantization, export or pipeline run requested through the REST API."""

    __tablename__ = "job"

    id: str = Field(primary_key=True, max_length=32)
    kind: str = Field(max_length=32)  # merge, quantize, export, run
    state: str = Field(index=True, max_length=16)  # queued, running, succeeded, failed, cancelled
    request: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    progress: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    server: str | None = Field(default=None, max_length=200)  # host:pid of the server that ran it
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    started_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    finished_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
