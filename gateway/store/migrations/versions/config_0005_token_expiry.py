"""config: api_tokens.expires_at, so that a token can be made to stop working by itself

Revision ID: config_0005_token_expiry
Revises: config_0004_session_generation

Tokens made before this have no expiry (NULL): they keep working until revoked, as they were promised.
"""

import sqlalchemy as sa
from alembic import op

revision = "config_0005_token_expiry"
down_revision = "config_0004_session_generation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_column("expires_at")
