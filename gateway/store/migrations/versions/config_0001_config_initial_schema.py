"""config: initial schema

Revision ID: config_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "config_0001"
down_revision = None
branch_labels = ("config",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("mac", sa.String(length=48), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("vendor", sa.String(length=200), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("name_source", sa.String(length=16), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("manufacturer", sa.String(length=100), nullable=True),
        sa.Column("device_type", sa.String(length=100), nullable=True),
        sa.Column("category", sa.String(length=50), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("known", sa.Boolean(), nullable=True),
        sa.Column("decided_after_s", sa.Float(), nullable=True),
        sa.Column("label_manufacturer", sa.String(length=100), nullable=True),
        sa.Column("label_device_type", sa.String(length=100), nullable=True),
        sa.Column("label_category", sa.String(length=50), nullable=True),
        sa.Column("labelled_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("mac"),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "addresses",
        sa.Column("ip", sa.String(length=45), nullable=False),
        sa.Column("mac", sa.String(length=48), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["mac"], ["devices.mac"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("ip"),
    )
    with op.batch_alter_table("addresses", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_addresses_mac"), ["mac"], unique=False)

    op.create_table(
        "device_names",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("mac", sa.String(length=48), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["mac"], ["devices.mac"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("mac", "source", "name"),
    )
    with op.batch_alter_table("device_names", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_names_mac"), ["mac"], unique=False)

    op.create_table(
        "dhcp_fingerprints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("mac", sa.String(length=48), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=True),
        sa.Column("param_list", sa.String(length=255), nullable=False),
        sa.Column("vendor_class", sa.String(length=255), nullable=True),
        sa.Column("client_id", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(["mac"], ["devices.mac"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("mac", "param_list", "vendor_class", "hostname"),
    )
    with op.batch_alter_table("dhcp_fingerprints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dhcp_fingerprints_mac"), ["mac"], unique=False)

    op.create_table(
        "identifications",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("mac", sa.String(length=48), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("manufacturer", sa.String(length=100), nullable=True),
        sa.Column("device_type", sa.String(length=100), nullable=True),
        sa.Column("category", sa.String(length=50), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("known", sa.Boolean(), nullable=False),
        sa.Column("decided_after_s", sa.Float(), nullable=True),
        sa.Column("alternatives", sa.JSON(), nullable=False),
        sa.Column("signals", sa.JSON(), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["mac"], ["devices.mac"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("identifications", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_identifications_mac"), ["mac"], unique=False)

    op.create_table(
        "mdns_services",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("mac", sa.String(length=48), nullable=False),
        sa.Column("service", sa.String(length=255), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["mac"], ["devices.mac"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("mac", "service"),
    )
    with op.batch_alter_table("mdns_services", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_mdns_services_mac"), ["mac"], unique=False)

    op.create_table(
        "observation_windows",
        sa.Column("mac", sa.String(length=48), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("observations", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["mac"], ["devices.mac"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("mac"),
    )


def downgrade() -> None:
    op.drop_table("observation_windows")
    with op.batch_alter_table("mdns_services", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mdns_services_mac"))

    op.drop_table("mdns_services")
    with op.batch_alter_table("identifications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_identifications_mac"))

    op.drop_table("identifications")
    with op.batch_alter_table("dhcp_fingerprints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dhcp_fingerprints_mac"))

    op.drop_table("dhcp_fingerprints")
    with op.batch_alter_table("device_names", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_names_mac"))

    op.drop_table("device_names")
    with op.batch_alter_table("addresses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_addresses_mac"))

    op.drop_table("addresses")
    op.drop_table("settings")
    op.drop_table("devices")
