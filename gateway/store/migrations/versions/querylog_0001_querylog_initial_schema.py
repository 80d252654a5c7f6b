"""querylog: initial schema

Revision ID: querylog_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "querylog_0001"
down_revision = None
branch_labels = ("querylog",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "queries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("client", sa.String(length=45), nullable=False),
        sa.Column("mac", sa.String(length=48), nullable=True),
        sa.Column("qname", sa.String(length=255), nullable=False),
        sa.Column("qtype", sa.Integer(), nullable=False),
        sa.Column("sld", sa.String(length=255), nullable=False),
        sa.Column("rcode", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("rule", sa.String(length=255), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.create_index("ix_queries_mac_ts", ["mac", "ts"], unique=False)
        batch_op.create_index(batch_op.f("ix_queries_sld"), ["sld"], unique=False)
        batch_op.create_index(batch_op.f("ix_queries_ts"), ["ts"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_queries_ts"))
        batch_op.drop_index(batch_op.f("ix_queries_sld"))
        batch_op.drop_index("ix_queries_mac_ts")

    op.drop_table("queries")
