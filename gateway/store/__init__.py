"""The database: SQLAlchemy 2.x, SQLite in WAL mode by default, PostgreSQL by URL; migrations with Alembic."""
