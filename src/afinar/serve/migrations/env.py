"""Alembic's entry point for afinar's migrations. afinar runs them itself (database.migrate)
inside a transaction that it holds a lock in, and hands the connection over here; there is no
alembic.ini and no offline (SQL script) mode."""

from alembic import context

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot ALTER most things in place; batch mode copies the table.
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
