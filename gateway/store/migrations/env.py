"""Alembic environment: the caller (``gateway.store.db.Store.migrate``) hands in the connection and metadata,
so one script directory serves both databases (branch ``config`` and branch ``querylog``)."""

from alembic import context

config = context.config
context.configure(
    connection=config.attributes["connection"],
    target_metadata=config.attributes["metadata"],
    render_as_batch=True,  # SQLite can only ALTER through table copies
)
with context.begin_transaction():
    context.run_migrations()
