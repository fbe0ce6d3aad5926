"""Alembic migrations of the audit schema; run programmatically by ``dicomnode.audit.db.upgrade``."""
