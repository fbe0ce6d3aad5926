"""Whole-body studies: memory, CPU and turnaround of one job as the series grows.

For each N a synthetic study from the project's generator (CT N x 512 x 512, PET N/2 x 256 x 256,
``dicomnode.testing.study``) is written once. Two modes:

* ``serve`` (the default, what docs/benchmarks.md reports): the product as deployed. A fresh
  ``dicomnode serve`` (SQLite audit, its in-process worker) per (method, N); DCMTK storescu sends
  the study (``TCP_NODELAY=1``), the node sends its outputs to a DCMTK storescp peer. Reported:
  the serve process's peak resident set (VmHWM), its CPU seconds (all threads, after its warm-up),
  the turnaround (storescu's start -> the last output series acknowledged, ``sends.sent_at``), the
  job's processing seconds, and its CPU milliseconds per fixed slice per stage as the job recorded
  them in the audit DB (``jobs.timings.cpu_s``).
* ``job``: ``process_job`` alone on the spooled files in a fresh process, for profiling: the
  process's peak and the stage where it was reached (the high-water mark is reset at every stage
  boundary through /proc/self/clear_refs), and the same per-stage CPU.

Peak RSS is the process's own VmHWM, never ``ru_maxrss``: a child started by vfork + exec inherits
its parent's ``ru_maxrss``, and this script's parent process held the study generator's memory.
CPU seconds hold up under load better than wall time; the load average is printed with each row.

    python benchmarks/whole_body.py [--sizes 50,150,300,700] [--methods network,chroma] [--threads 1]
                                    [--mode serve|job] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serving.py beside this file

from serving import (  # noqa: E402
    REPO,
    dicomnode_serve,
    free_port,
    node_config,
    peak_rss_bytes,
    process_cpu_s,
    storescp,
    storescu,
    wait_idle,
    wait_until,
)

STAGES = ("load", "register", "resample", "prepare", "fuse", "quality", "explain", "encode", "write")
GIB = 1024 ** 3


def study(work: Path, n: int) -> Path:
    folder = work / f"study-{n}"
    if not (folder / "CT").exists():
        from dicomnode.testing.study import write_synthetic_study

        write_synthetic_study(folder, modalities=("CT", "PT"), shape=(n, 512, 512), seed=1)
    return folder


def _files(folder: Path) -> dict[str, list[Path]]:
    return {m: sorted((folder / m).glob("*.dcm")) for m in ("CT", "PT")}


# ------------------------------------------------------------------------------------- serve mode
def _finished_job(db):
    from sqlalchemy import select

    from dicomnode.audit.models import Job, JobState

    with db.session() as s:
        job = s.scalars(select(Job).where(Job.state.in_([JobState.done, JobState.failed]))).first()
        if job is not None:
            s.expunge(job)
        return job


def serve_run(folder: Path, method: str, slab_slices: int, threads: int, work: Path, timeout_s: float = 3600.0) -> dict:
    """The study through a fresh ``dicomnode serve`` to a storescp peer; one result row."""
    from sqlalchemy import func, select

    from dicomnode.audit.db import AuditDB
    from dicomnode.audit.models import Send

    run = Path(tempfile.mkdtemp(prefix=f"{method}-", dir=work))
    port, peer_port = free_port(), free_port()
    config = node_config(run, port, peer_port, method, extra=f"\n[processing]\ndevice = \"cpu\"\n"
                         f"slab_slices = {slab_slices}\nthreads = {threads}\n")
    files = _files(folder)
    with storescp(run / "peer", peer_port), dicomnode_serve(config, port, log=run / "serve.log", cwd=run) as node:
        wait_idle(node.pid)  # imports and the worker's warm-up are not the job's
        db = AuditDB.open(f"sqlite:///{run / 'audit.db'}")
        load, cpu = os.getloadavg()[0], process_cpu_s(node.pid)
        sent_from = datetime.now(timezone.utc)
        storescu(files["CT"] + files["PT"], port, "DICOMNODE")
        job = wait_until(lambda: _finished_job(db), timeout_s, "the job to finish", every_s=0.5)
        peak, cpu = peak_rss_bytes(node.pid), process_cpu_s(node.pid) - cpu
        with db.session() as s:
            last_ack = s.scalar(select(func.max(Send.sent_at)).where(Send.job_id == job.id))
    if job.state.value != "done" or last_ack is None:
        raise SystemExit(f"job {job.id} ended {job.state.value}: {job.reason}; see {run / 'serve.log'}")
    timings = dict(job.timings)
    return {"slices": len(files["CT"]), "peak_rss_gib": peak / GIB, "cpu_s": cpu,
            "turnaround_s": (last_ack - sent_from).total_seconds(), "processing_s": timings.get("total_s", 0.0),
            "stages_cpu": timings.get("cpu_s", {}), "load_before": load, "load_after": os.getloadavg()[0]}


def serve_row(method: str, r: dict) -> str:
    n = r["slices"]
    per = " | ".join(f"{1000 * r['stages_cpu'].get(s, 0.0) / n:.1f}" for s in STAGES)
    return (f"| {method} | {n} | **{r['peak_rss_gib']:.2f}** | {r['cpu_s']:.1f} | {r['turnaround_s']:.1f} "
            f"| {r['processing_s']:.1f} | {per} | {r['load_before']:.1f}-{r['load_after']:.1f} |")


def serve_table(rows: list[str], slab_slices: int, threads: int, sizes: str, methods: str) -> str:
    head = " | ".join(STAGES)
    return (f"`python benchmarks/whole_body.py --sizes {sizes} --methods {methods} --threads {threads}` "
            f"(processing.slab_slices = {slab_slices}, processing.threads = {threads}, fusion on the CPU, "
            "explanations on): a fresh `dicomnode serve` per row (SQLite audit, the worker inside serve) receives "
            "CT N x 512 x 512 + PET N/2 x 256 x 256 (synthetic) from DCMTK storescu and sends its outputs to a "
            "storescp peer. Peak RSS: the serve process's VmHWM (GiB); serve CPU: its CPU seconds, all threads, "
            "from the first instance on; turnaround: storescu's start to the last output acknowledged (stable "
            "age 3 s); processing: the job's stages; stage columns: CPU ms per fixed slice, as the job recorded "
            "them in the audit DB.\n\n"
            f"| method | N | peak RSS GiB | serve CPU s | turnaround s | processing s | {head} | load avg |\n"
            f"|---|---|---|---|---|---|{'---|' * len(STAGES)}---|\n" + "\n".join(rows))


# --------------------------------------------------------------------------------------- job mode
def _status_gib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024 / GIB
    return 0.0


def _peak_per_stage(pipeline) -> dict[str, float]:
    """Wrap the pipeline's stage timer so each stage's own peak RSS is kept (stage -> GiB)."""
    from contextlib import contextmanager

    peaks: dict[str, float] = {}
    timed = pipeline.Stopwatch.stage

    def boundary(stage: str) -> None:
        peaks[stage] = max(peaks.get(stage, 0.0), _status_gib("VmHWM"))
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here

    @contextmanager
    def stage(self, name):
        outer = self._open[-1] if self._open else "(between stages)"
        boundary(outer)
        with timed(self, name):
            try:
                yield
            finally:
                boundary(name)

    pipeline.Stopwatch.stage = stage
    return peaks


def child(folder: Path, method: str, slab_slices: int, threads: int = 0) -> None:
    """One job on the study in ``folder``; prints one JSON line."""
    import pydicom

    from dicomnode import pipeline
    from dicomnode.config import Config, PairingRule
    from dicomnode.routing import SeriesRef
    from dicomnode.store.spool import Spool

    def ref(files):
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        return SeriesRef(series_uid=ds.SeriesInstanceUID, study_uid=ds.StudyInstanceUID, modality=ds.Modality,
                         patient_id=ds.PatientID, patient_name=str(ds.PatientName), birth_date=ds.PatientBirthDate,
                         study_date=ds.StudyDate, frame_of_reference_uid=ds.FrameOfReferenceUID, calling_ae="BENCH")

    pipeline.warm_up()  # imports are not the job's
    peaks = _peak_per_stage(pipeline)
    files = _files(folder)
    config = Config(processing={"slab_slices": slab_slices, "device": "cpu", "threads": threads})
    with tempfile.TemporaryDirectory(dir=folder.parent) as spool:
        inputs = pipeline.JobInputs(job_id=1, rule=PairingRule(fixed="CT", moving="PT"), method=method,
                                    fixed=ref(files["CT"]), moving=ref(files["PT"]), fixed_files=files["CT"],
                                    moving_files=files["PT"], config=config, spool=Spool(Path(spool)))
        load, cpu, wall = os.getloadavg()[0], time.process_time(), time.perf_counter()
        out = pipeline.process_job(inputs)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    at = max(peaks, key=peaks.get)
    print(json.dumps({"slices": len(files["CT"]), "cpu_s": cpu, "wall_s": wall, "stages_cpu": out.cpu_seconds,
                      "peak_rss_gib": peaks[at], "peak_stage": at, "stage_peaks_gib": peaks,
                      "load_before": load, "load_after": os.getloadavg()[0]}))


def job_row(method: str, r: dict) -> str:
    n = r["slices"]
    per = " | ".join(f"{1000 * r['stages_cpu'].get(s, 0.0) / n:.1f}" for s in STAGES)
    peaks = " ".join(f"{k}={v:.2f}" for k, v in sorted(r["stage_peaks_gib"].items(), key=lambda kv: -kv[1])[:4])
    return (f"| {method} | {n} | **{r['peak_rss_gib']:.2f}** | {r['peak_stage']} | {r['cpu_s']:.1f} | "
            f"{r['wall_s']:.1f} | {per} | {r['load_before']:.1f}-{r['load_after']:.1f} | {peaks} |")


def job_table(rows: list[str]) -> str:
    head = " | ".join(STAGES)
    return ("`process_job` alone in a fresh process (profiling). Peak RSS: the process's VmHWM (GiB), reset at "
            "each stage boundary; the last column is the highest stage peaks.\n\n"
            f"| method | N | peak RSS GiB | peak in | CPU s | wall s | {head} | load avg | stage peaks GiB |\n"
            f"|---|---|---|---|---|---|{'---|' * len(STAGES)}---|---|\n" + "\n".join(rows))


# --------------------------------------------------------------------------------------------- docs
BEGIN, END = "<!-- whole-body:begin -->", "<!-- whole-body:end -->"


def write_docs(text: str, doc: Path | None = None) -> None:
    """Replace only the marked table block of docs/benchmarks.md; the hand-written analysis stays."""
    doc = doc or REPO / "docs" / "benchmarks.md"
    content = doc.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"docs/benchmarks.md has no {BEGIN} ... {END} block to rewrite")
    start, end = content.index(BEGIN) + len(BEGIN), content.index(END)
    doc.write_text(content[:start] + "\n" + text.strip() + "\n" + content[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,150,300,700")
    parser.add_argument("--methods", default="network,chroma")
    parser.add_argument("--mode", choices=("serve", "job"), default="serve")
    parser.add_argument("--slab-slices", type=int, default=None, help="default: the configured default")
    parser.add_argument("--workdir", type=Path, default=None, help="kept studies are reused (default: a temp dir)")
    parser.add_argument("--write-docs", action="store_true", help="serve mode: rewrite the table in docs/benchmarks.md")
    parser.add_argument("--threads", type=int, default=0, help="processing.threads (0: torch's default)")
    parser.add_argument("--child", nargs=4, metavar=("FOLDER", "METHOD", "SLAB", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], int(args.child[2]), int(args.child[3]))
        return 0
    if args.write_docs and args.mode != "serve":
        parser.error("--write-docs reports the serve mode (the product as deployed)")
    from dicomnode.config import ProcessingConfig

    slab = args.slab_slices or ProcessingConfig().slab_slices
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dicomnode-wholebody-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        folder = study(work, n)
        for method in args.methods.split(","):
            if args.mode == "serve":
                rows.append(serve_row(method, serve_run(folder, method, slab, args.threads, work)))
            else:
                proc = subprocess.run([sys.executable, __file__, "--child", str(folder), method, str(slab),
                                       str(args.threads)], capture_output=True, text=True,
                                      env=dict(os.environ, PYTHONPATH=str(REPO)))
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                rows.append(job_row(method, json.loads(proc.stdout.strip().splitlines()[-1])))
            print(rows[-1], flush=True)
    text = (serve_table(rows, slab, args.threads, args.sizes, args.methods) if args.mode == "serve"
            else job_table(rows))
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
