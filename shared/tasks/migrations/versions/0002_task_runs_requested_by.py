"""task_runs.requested_by: who triggered a task (an API token's name, beat, the CLI)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 14:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requested_by", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.drop_column("requested_by")
