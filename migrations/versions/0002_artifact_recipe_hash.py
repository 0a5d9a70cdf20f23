"""artifact recipe hash

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 10:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("artifact") as batch:
        batch.add_column(sa.Column("recipe_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.create_index(batch.f("ix_artifact_recipe_hash"), ["recipe_hash"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("artifact") as batch:
        batch.drop_index(batch.f("ix_artifact_recipe_hash"))
        batch.drop_column("recipe_hash")
