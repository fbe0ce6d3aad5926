"""series identity conflicts and revisions, jobs per series revision, purged instances

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

OLD_PAIR = ('rule', 'fixed_series_uid', 'moving_series_uid')
NEW_PAIR = (*OLD_PAIR, 'fixed_revision', 'moving_revision')
# SQLite reflects the initial schema's unnamed unique constraint; this names it so batch mode can drop it.
SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_N_name)s"}


def _old_pair_name() -> str:
    if op.get_bind().dialect.name == 'sqlite':
        return 'uq_jobs_rule_fixed_series_uid_moving_series_uid'
    uniques = sa.inspect(op.get_bind()).get_unique_constraints('jobs')
    return next(u['name'] for u in uniques if tuple(u['column_names']) == OLD_PAIR)


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revision', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('identity_conflict', sa.Text(), nullable=True))
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True))
    old = _old_pair_name()
    with op.batch_alter_table('jobs', schema=None, naming_convention=SQLITE_NAMES) as batch_op:
        batch_op.add_column(sa.Column('fixed_revision', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('moving_revision', sa.Integer(), server_default='0', nullable=False))
        batch_op.drop_constraint(old, type_='unique')
        batch_op.create_unique_constraint('uq_jobs_pair_revision', list(NEW_PAIR))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('uq_jobs_pair_revision', type_='unique')
        batch_op.create_unique_constraint('uq_jobs_rule_fixed_series_uid_moving_series_uid', list(OLD_PAIR))
        batch_op.drop_column('moving_revision')
        batch_op.drop_column('fixed_revision')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('purged_at')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('identity_conflict')
        batch_op.drop_column('revision')
