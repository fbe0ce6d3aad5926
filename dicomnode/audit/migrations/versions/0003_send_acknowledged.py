"""sends.acked_count: how many files of a send the destination has acknowledged

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-04

A retry or a restart resumes a send after its acknowledged files instead of sending the whole
series again. (Another branch adds 0002 for the series table; when both are merged this one's
``down_revision`` becomes '0002', so the history stays one line.)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sends', schema=None) as batch_op:
        batch_op.add_column(sa.Column('acked_count', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('sends', schema=None) as batch_op:
        batch_op.drop_column('acked_count')
