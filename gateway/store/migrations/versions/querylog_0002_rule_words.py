"""querylog: queries.rule_words, the rule that decided in the owner's words

Revision ID: querylog_0002_rule_words
Revises: querylog_0001

The words were parsed back out of ``rule`` (the engine's key) when shown, and an owner-given name (a device type
or category with " block " in it, a list category with "schedule=") made them raw or wrong; the engine now says
them when it decides. Rows written before stay NULL here, and the query log shows their key: nothing can say
their words surely.
"""

import sqlalchemy as sa
from alembic import op

revision = "querylog_0002_rule_words"
down_revision = "querylog_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: SQLite and PostgreSQL add it without rewriting the rows (a query log of
    # two million rows upgrades at once).
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rule_words", sa.String(length=1000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_column("rule_words")
