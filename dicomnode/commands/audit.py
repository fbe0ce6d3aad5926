"""``dicomnode audit``: recent jobs, series, sends and rejections, or one job in detail, from the audit database."""

from __future__ import annotations

import json

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import JobState
from dicomnode.audit.queries import AuditFilter, job_record, job_text, summary_text
from dicomnode.commands import load_config_or_exit


def audit_command(args) -> int:
    """``dicomnode audit [--config F] [--database-url U] [--limit N] [--job N [--json] | --study UID --patient ID --state S]``."""
    config = load_config_or_exit(getattr(args, "config", None))
    state = getattr(args, "state", None)
    if state is not None and state not in JobState.__members__:
        print(f"unknown job state {state!r}; one of: {', '.join(JobState.__members__)}")
        return 2
    if getattr(args, "json", False) and getattr(args, "job", None) is None:
        print("--json needs --job N (the summary is text only)")
        return 2
    where = AuditFilter(getattr(args, "study", None), getattr(args, "patient", None), state and JobState(state))
    url = getattr(args, "database_url", None) or config.storage.database_url
    db = AuditDB.open(url)
    try:
        if getattr(args, "job", None) is not None and getattr(args, "json", False):
            record = job_record(db, args.job)
            if record is None:
                print(f"no job {args.job}")
                return 1
            print(json.dumps(record, indent=2, default=str))
        elif getattr(args, "job", None) is not None:
            print(job_text(db, args.job), end="")
        else:
            print(summary_text(db, limit=getattr(args, "limit", 20), where=where), end="")
    finally:
        db.close()
    return 0
