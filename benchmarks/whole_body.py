"""Whole-body studies: memory and per-stage CPU of one job as the series grows.

For each N a synthetic study from the project's generator (CT N x 512 x 512, PET N/2 x 256 x 256,
``dicomnode.testing.study``) is written once; then ``process_job`` runs on those spooled files in
a fresh process per (method, N), so its peak RSS (``ru_maxrss``) is that job's alone. Prints a
Markdown table of peak RSS, CPU seconds (the process, all threads) and CPU milliseconds per slice
of each stage; ``--write-docs`` puts it under ``## Whole-body studies`` in docs/benchmarks.md.
CPU seconds hold up under load better than wall time; the load average is printed with each row.

    python benchmarks/whole_body.py [--sizes 50,150,300,700] [--methods network,chroma] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("load", "register", "resample", "prepare", "fuse", "quality", "explain", "encode", "write")


def child(folder: Path, method: str, slab_slices: int, threads: int = 0) -> None:
    """One job on the study in ``folder``; prints one JSON line."""
    import pydicom

    from dicomnode.config import Config, PairingRule
    from dicomnode.pipeline import JobInputs, process_job, warm_up
    from dicomnode.routing import SeriesRef
    from dicomnode.store.spool import Spool

    def ref(files):
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        return SeriesRef(series_uid=ds.SeriesInstanceUID, study_uid=ds.StudyInstanceUID, modality=ds.Modality,
                         patient_id=ds.PatientID, patient_name=str(ds.PatientName), birth_date=ds.PatientBirthDate,
                         study_date=ds.StudyDate, frame_of_reference_uid=ds.FrameOfReferenceUID, calling_ae="BENCH")

    warm_up()  # imports are not the job's
    files = {m: sorted((folder / m).glob("*.dcm")) for m in ("CT", "PT")}
    processing = {"slab_slices": slab_slices, "device": "cpu", "threads": threads} if slab_slices else {"device": "cpu"}
    config = Config(processing=processing)
    with tempfile.TemporaryDirectory(dir=folder.parent) as spool:
        inputs = JobInputs(job_id=1, rule=PairingRule(fixed="CT", moving="PT"), method=method, fixed=ref(files["CT"]),
                           moving=ref(files["PT"]), fixed_files=files["CT"], moving_files=files["PT"], config=config,
                           spool=Spool(Path(spool)))
        load, cpu, wall = os.getloadavg()[0], time.process_time(), time.perf_counter()
        out = process_job(inputs)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(json.dumps({"slices": len(files["CT"]), "cpu_s": cpu, "wall_s": wall, "stages_cpu": getattr(out, "cpu_seconds", {}),
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
                      "load_before": load, "load_after": os.getloadavg()[0]}))


def study(work: Path, n: int) -> Path:
    folder = work / f"study-{n}"
    if not (folder / "CT").exists():
        from dicomnode.testing.study import write_synthetic_study

        write_synthetic_study(folder, modalities=("CT", "PT"), shape=(n, 512, 512), seed=1)
    return folder


def row(method: str, r: dict) -> str:
    n = r["slices"]
    per = " | ".join(f"{1000 * r['stages_cpu'].get(s, 0.0) / n:.1f}" for s in STAGES)
    return (f"| {method} | {n} | **{r['peak_rss_gb']:.2f}** | {r['cpu_s']:.1f} | {r['wall_s']:.1f} | {per} "
            f"| {r['load_before']:.1f}-{r['load_after']:.1f} |")


def table(rows: list[str], slab_slices: int, threads: int) -> str:
    head = " | ".join(STAGES)
    return (f"`python benchmarks/whole_body.py --threads {threads}` (processing.slab_slices = {slab_slices}, "
            f"processing.threads = {threads}, fusion on the CPU, "
            "explanations on): one job's `process_job` on spooled files in a fresh process, CT N x 512 x 512 + PET "
            "N/2 x 256 x 256 (synthetic). Peak RSS is the process's maximum resident set (GiB); CPU is the "
            "process's, all threads; stage columns are CPU ms per fixed slice.\n\n"
            f"| method | N | peak RSS GiB | CPU s | wall s | {head} | load avg |\n"
            f"|---|---|---|---|---|{'---|' * len(STAGES)}---|\n" + "\n".join(rows))


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
    parser.add_argument("--slab-slices", type=int, default=None, help="default: the configured default")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="processing.threads (0: torch's default)")
    parser.add_argument("--child", nargs=4, metavar=("FOLDER", "METHOD", "SLAB", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], int(args.child[2]), int(args.child[3]))
        return 0
    from dicomnode.config import ProcessingConfig

    slab = args.slab_slices or ProcessingConfig().slab_slices
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dicomnode-wholebody-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        folder = study(work, n)
        for method in args.methods.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", str(folder), method, str(slab),
                                   str(args.threads)],
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row(method, result))
            print(rows[-1], flush=True)
    text = table(rows, slab, args.threads)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
