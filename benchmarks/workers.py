"""Worker throughput: the same jobs processed by 1 and by 2 ``dicomnode worker`` processes on PostgreSQL.

For each worker count: a fresh schema and spool; N worker processes are started and waited for
(imports, weights), then ``--jobs`` synthetic CT+PT studies are sent to the node
(``worker.in_serve = false``: only the N workers process). Throughput is jobs / (last
``processing -> encoded`` - first ``paired -> processing``), read from the job events, so process
start-up is not counted; the median seconds per job are read from the same events. Sends go to a
closed port and are not part of the figure. Prints one line per worker count with ``uptime``'s
load, because on a shared machine the figure depends on what else runs.

    python benchmarks/workers.py --database-url postgresql+psycopg://USER@HOST/DB [--jobs 6] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serving.py beside this file

from serving import REPO, free_port, wait_until  # noqa: E402

sys.path.insert(0, str(REPO))


def _config(path: Path, workdir: Path, url: str, method: str) -> Path:
    path.write_text(f"""
[node]
port = {free_port()}
[storage]
spool_dir = "{workdir / 'spool'}"
database_url = "{url}"
[completion]
stable_age_s = 3.0
check_interval_s = 0.25
[[destinations]]
name = "nowhere"
ae_title = "BENCH"
host = "127.0.0.1"
port = {free_port()}
[fusion]
default_method = "{method}"
[processing]
device = "cpu"
[worker]
in_serve = false
[logging]
level = "INFO"
""")
    return path


def run_once(n_workers: int, studies: list[dict], base_url: str, method: str, workdir: Path) -> dict:
    from sqlalchemy import create_engine, select, text

    from dicomnode.audit.db import AuditDB
    from dicomnode.audit.models import Job, JobEvent, JobState
    from dicomnode.config import Destination, load_config
    from dicomnode.net.scu import send_files
    from dicomnode.node import Node

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{base_url}{'&' if '?' in base_url else '?'}options={quote(f'-csearch_path={schema}')}"
    procs: list[subprocess.Popen] = []
    try:
        cfg_file = _config(workdir / "node.toml", workdir, url, method)
        cfg = load_config(cfg_file)
        db = AuditDB.open(url)  # migrates the schema before the workers race to do it
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        logs = [workdir / f"worker-{i}.log" for i in range(n_workers)]
        for log in logs:
            with open(log, "wb") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "dicomnode", "worker", "--config", str(cfg_file)],
                                              env=env, stdout=out, stderr=subprocess.STDOUT))
        for log in logs:
            wait_until(lambda: "event=worker_started" in log.read_text(), 600, f"{log.name} started")

        def jobs_in(states) -> int:
            with db.session() as s:
                return len(s.scalars(select(Job.id).where(Job.state.in_(states))).all())

        node = Node(cfg)
        node.start()
        try:
            me = Destination(name="node", ae_title=cfg.node.ae_title, host="127.0.0.1", port=cfg.node.port)
            for study in studies:
                send_files(me, study["CT"] + study["PT"], calling_ae="BENCH", timeout_s=60)
            wait_until(lambda: jobs_in([JobState.sending, JobState.failed]) == len(studies), 1800, "jobs processed")
        finally:
            node.stop()
        load = os.getloadavg()
        with db.session() as s:
            events = s.scalars(select(JobEvent)).all()
            failed = jobs_in([JobState.failed])
        started = min(e.at for e in events if e.to_state == "processing")
        ended = max(e.at for e in events if e.to_state == "encoded")
        db.close()
        # Jobs are made as series complete while the studies arrive; the figure is only about
        # processing when the last job was made early in the window.
        last_made = max(e.at for e in events if e.from_state is None)
        per_job = sorted(float(e.detail.split("seconds=")[1]) for e in events if e.to_state == "encoded")
        seconds = (ended - started).total_seconds()
        return {"workers": n_workers, "jobs": len(studies), "failed": failed, "seconds": seconds,
                "jobs_per_min": 60 * len(studies) / seconds, "job_s": per_job[len(per_job) // 2],
                "last_made_s": (last_made - started).total_seconds(), "load": load}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True, help="PostgreSQL URL (a schema is made and dropped per run)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--shape", default="48,96,96", help="CT slices,rows,columns of each synthetic study")
    parser.add_argument("--method", default="alpha", help="fusion method of the jobs")
    args = parser.parse_args(argv)
    logging.getLogger("dicomnode").setLevel(logging.ERROR)  # the sends to the closed port retry, as they should
    from dicomnode.testing.study import write_synthetic_study

    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        studies = [write_synthetic_study(root / f"study{i}", modalities=("CT", "PT"), shape=shape, seed=i)
                   for i in range(args.jobs)]
        print(f"cores={os.cpu_count()} jobs={args.jobs} shape={args.shape} method={args.method}")
        for run, n in enumerate(int(v) for v in args.workers.split(",")):
            workdir = root / f"run{run}-w{n}"
            workdir.mkdir()
            r = run_once(n, studies, args.database_url, args.method, workdir)
            print(f"workers={r['workers']} jobs={r['jobs']} failed={r['failed']} seconds={r['seconds']:.1f} "
                  f"jobs_per_min={r['jobs_per_min']:.2f} median_job_s={r['job_s']:.2f} "
                  f"last_job_made_at_s={r['last_made_s']:.1f} load={r['load'][0]:.1f},{r['load'][1]:.1f},{r['load'][2]:.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
