"""sends.acked_count: how many files of a send the destination has acknowledged

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

A retry or a restart resumes a send after its acknowledged files instead of sending the whole
series again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sends', schema=None) as batch_op:
        batch_op.add_column(sa.Column('acked_count', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('sends', schema=None) as batch_op:
        batch_op.drop_column('acked_count')
