"""Projects own files, jobs and ratings; jobs carry the lease of the worker training them.

Rows from before belong to the project "default" (the project of `api_keys`).

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _project() -> sa.Column:
    return sa.Column("project", sa.Text, nullable=False, server_default="default")


def upgrade() -> None:
    for table in ("files", "jobs", "ratings"):
        op.add_column(table, _project())
    op.add_column("jobs", sa.Column("worker", sa.Text))
    op.add_column("jobs", sa.Column("lease_until", sa.Float))
    op.add_column("jobs", sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    op.create_index("jobs_by_status", "jobs", ["status", "seq"])
    op.create_index("files_by_project", "files", ["project", "seq"])


def downgrade() -> None:
    op.drop_index("files_by_project", "files")
    op.drop_index("jobs_by_status", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("attempts", "lease_until", "worker", "project"):
            batch.drop_column(column)
    for table in ("files", "ratings"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("project")
