"""config: users.session_generation, so that logging out ends the session server-side

Revision ID: config_0004_session_generation
Revises: config_0003_alerts
"""

import sqlalchemy as sa
from alembic import op

revision = "config_0004_session_generation"
down_revision = "config_0003_alerts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_generation", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("session_generation")
