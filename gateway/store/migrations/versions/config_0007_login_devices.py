"""config: login_devices, the device cookies of browsers that logged in; login_addresses loses logged_in_at

Revision ID: config_0007_login_devices
Revises: config_0006_login_addresses

A browser that logs in gets a device cookie, and while the account refuses new clients (many failures from many
addresses) that cookie, not the address it logged in from, lets it in. An address that logged in no longer counts
for anything: DHCP or IPv6 gives it to another host (``gateway.accounts`` has why). So the rows that were only a
login (no failures, no lock) go with the column; no cookie exists yet, so the owner's browsers get theirs at their
next login.
"""

import sqlalchemy as sa
from alembic import op

revision = "config_0007_login_devices"
down_revision = "config_0006_login_addresses"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "login_devices",
        sa.Column("cookie_sha256", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("issued_at", sa.Float(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("cookie_sha256"),
    )
    op.create_index("ix_login_devices_username", "login_devices", ["username"])
    op.execute("DELETE FROM login_addresses WHERE failures = 0 AND locked_until IS NULL")
    with op.batch_alter_table("login_addresses", schema=None) as batch_op:
        batch_op.drop_column("logged_in_at")


def downgrade() -> None:
    with op.batch_alter_table("login_addresses", schema=None) as batch_op:
        batch_op.add_column(sa.Column("logged_in_at", sa.Float(), nullable=True))
    op.drop_index("ix_login_devices_username", table_name="login_devices")
    op.drop_table("login_devices")
