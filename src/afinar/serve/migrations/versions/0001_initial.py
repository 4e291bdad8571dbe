"""The schema as afinar wrote it by hand before Alembic (serve.db of earlier releases).

An existing database already has these tables: they are left as they are, and the one column
added by hand after a release (jobs.settings) is added when missing. So a state folder from an
earlier afinar upgrades in place.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _tables() -> list[sa.Table]:
    meta = sa.MetaData()

    def seq():
        return sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True)

    return [
        sa.Table("files", meta, seq(), sa.Column("id", sa.Text, unique=True, nullable=False),
                 sa.Column("filename", sa.Text), sa.Column("bytes", sa.Integer),
                 sa.Column("purpose", sa.Text), sa.Column("created_at", sa.Integer),
                 sa.Column("status", sa.Text), sa.Column("status_details", sa.Text),
                 sa.Column("deleted", sa.Integer, nullable=False, server_default="0"),
                 sqlite_autoincrement=True),
        sa.Table("jobs", meta, seq(), sa.Column("id", sa.Text, unique=True, nullable=False),
                 *[sa.Column(name, sa.Integer if name in (
                     "created_at", "seed", "finished_at", "trained_tokens", "estimated_finish",
                     "worker_pid") else sa.Text) for name in (
                     "created_at", "model", "base_spec", "training_file", "validation_file",
                     "hyperparameters", "method", "suffix", "seed", "metadata", "status",
                     "error", "fine_tuned_model", "model_name", "finished_at",
                     "trained_tokens", "estimated_finish")],
                 sa.Column("result_files", sa.Text, server_default="[]"),
                 sa.Column("run_dir", sa.Text), sa.Column("requested", sa.Text),
                 sa.Column("resume", sa.Integer, nullable=False, server_default="0"),
                 sa.Column("worker_pid", sa.Integer),
                 sa.Column("model_deleted", sa.Integer, nullable=False, server_default="0"),
                 sa.Column("settings", sa.Text), sqlite_autoincrement=True),
        sa.Table("events", meta, seq(), sa.Column("id", sa.Text, unique=True, nullable=False),
                 sa.Column("job_id", sa.Text), sa.Column("created_at", sa.Integer),
                 sa.Column("level", sa.Text), sa.Column("message", sa.Text),
                 sa.Column("type", sa.Text), sa.Column("data", sa.Text),
                 sqlite_autoincrement=True),
        sa.Table("checkpoints", meta, seq(),
                 sa.Column("id", sa.Text, unique=True, nullable=False),
                 sa.Column("job_id", sa.Text), sa.Column("created_at", sa.Integer),
                 sa.Column("step_number", sa.Integer), sa.Column("metrics", sa.Text),
                 sa.Column("model_name", sa.Text, unique=True), sa.Column("path", sa.Text),
                 sqlite_autoincrement=True),
        sa.Table("ratings", meta, seq(), sa.Column("id", sa.Text, unique=True, nullable=False),
                 sa.Column("created_at", sa.Integer),
                 *[sa.Column(name, sa.Text) for name in (
                     "messages", "model_a", "model_b", "answer_a", "answer_b", "left",
                     "verdict", "ideal", "source")], sqlite_autoincrement=True),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    have = set(inspector.get_table_names())
    for table in _tables():
        if table.name not in have:
            table.create(bind)
    if "events" not in have:
        op.create_index("events_by_job", "events", ["job_id", "seq"])
    if "jobs" in have and "settings" not in {c["name"] for c in inspector.get_columns("jobs")}:
        op.add_column("jobs", sa.Column("settings", sa.Text))


def downgrade() -> None:
    for name in ("ratings", "checkpoints", "events", "jobs", "files"):
        op.drop_table(name)
