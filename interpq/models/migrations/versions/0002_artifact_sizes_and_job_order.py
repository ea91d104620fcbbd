"""artifacts.size_bytes as a 64-bit integer; jobs.seq, a job's position in its batch

``size_bytes`` was a 32-bit ``INTEGER`` on PostgreSQL: an artifact of 2 GiB or more could not
be recorded. ``seq`` gives ``Batch.results()`` the submission order (every job of a batch has
the same ``created_at``); jobs stored before this revision get 0 and keep their old order.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 07:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.alter_column(
            "size_bytes", existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=True
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("seq")
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.alter_column(
            "size_bytes", existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=True
        )
