"""Alembic migrations of the server's database (run by afinar.serve.database.migrate)."""
