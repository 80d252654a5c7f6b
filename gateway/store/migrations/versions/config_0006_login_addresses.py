"""config: login_addresses, so that failed logins lock out the client address instead of the account

Revision ID: config_0006_login_addresses
Revises: config_0005_token_expiry

The account-wide count and lock (users.failed_logins, users.locked_until) are dropped, not carried over: they
cannot be given to an address, and a lock left over from before the upgrade would shut the owner out once more.
"""

import sqlalchemy as sa
from alembic import op

revision = "config_0006_login_addresses"
down_revision = "config_0005_token_expiry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "login_addresses",
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=45), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure_at", sa.Float(), nullable=True),
        sa.Column("locked_until", sa.Float(), nullable=True),
        sa.Column("logged_in_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("username", "address"),
    )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("failed_logins")
        batch_op.drop_column("locked_until")
        batch_op.add_column(sa.Column("failures_since", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("recent_failures", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("new_addresses_locked_until", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("new_addresses_locked_until")
        batch_op.drop_column("recent_failures")
        batch_op.drop_column("failures_since")
        batch_op.add_column(sa.Column("failed_logins", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("locked_until", sa.Float(), nullable=True))
    op.drop_table("login_addresses")
