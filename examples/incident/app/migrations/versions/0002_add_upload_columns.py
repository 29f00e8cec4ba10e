"""add upload columns

The two columns the admin dashboard v2 reads. In the incident, v2 went live before
this migration ran, and every request to /admin/documents failed with UndefinedColumn.

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-28 09:30:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("documents", sa.Column("uploaded_by_user_id", sa.Integer, nullable=True))
    op.add_column("documents", sa.Column("upload_notes", sa.Text, nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("documents", "upload_notes")
    op.drop_column("documents", "uploaded_by_user_id")
