"""add upload columns (broken build)

The same revision as app/migrations/versions/0002_add_upload_columns.py, as a broken
build would ship it: a typo in the column type makes the SQL invalid, so
`alembic upgrade head` fails and the database stays at 0001. The failure scenario:
schemagate reports the migration Failed and keeps the v2 Deployment held while v1
goes on serving.

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-28 09:30:00

"""
from typing import Sequence, Union

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # "INTEGR": the typo. PostgreSQL: type "integr" does not exist; MySQL/MariaDB: syntax error.
    op.execute("ALTER TABLE documents ADD COLUMN uploaded_by_user_id INTEGR NULL")
    op.execute("ALTER TABLE documents ADD COLUMN upload_notes TEXT NULL")


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("documents", "upload_notes")
    op.drop_column("documents", "uploaded_by_user_id")
