"""End-to-end job timings: Orthanc routes STS_002 CT+PET to the node and gets the fused series back.

Runs the demo loop (``dicomnode demo``) ``--reps`` times per registration setting and prints a
Markdown table of median seconds per processing stage and per audit milestone (seconds after
Orthanc was asked to send the study), and the quality stage's share of the processing time (the
sum of the stages). ``auto`` skips registration (STS_002's series share one
frame of reference); ``always`` runs rigid -> affine -> deformable anyway.

    python benchmarks/end_to_end.py --reps 3 [--synthetic] [--method alpha]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from dicomnode.demo import DemoError, run_demo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--method", default=None, help="fusion method (default: the configured default)")
    parser.add_argument("--modes", default="auto,always", help="registration modes to time")
    args = parser.parse_args()
    rows: dict[str, dict[str, list[float]]] = {}
    failures: dict[str, list[str]] = {}
    study = ""
    for mode in args.modes.split(","):
        overrides: dict = {"registration": {"mode": mode}}
        if args.method:
            overrides["fusion"] = {"default_method": args.method}
        for rep in range(args.reps):
            cells = rows.setdefault(mode, {})
            with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
                try:
                    run = run_demo(Path(tmp), args.synthetic, overrides, summary=False)
                except DemoError as exc:  # a failed job is a result too: count it, keep timing the rest
                    failures.setdefault(mode, []).append(str(exc))
                    print(f"[bench] mode={mode} rep={rep + 1} FAILED: {exc}", flush=True)
                    continue
            study = run.study
            for name, seconds in run.timings.items():
                cells.setdefault(f"stage {name}", []).append(seconds)
            if run.timings.get("total_s"):  # per run, so the median share is not a ratio of medians
                share = 100.0 * run.timings.get("quality", 0.0) / run.timings["total_s"]
                cells.setdefault("quality share of processing (%)", []).append(share)
            for name, seconds in run.timeline:
                cells.setdefault(name, []).append(seconds)
            share_text = f", quality {cells['quality share of processing (%)'][-1]:.1f}%" if run.timings.get("total_s") else ""
            print(f"[bench] mode={mode} rep={rep + 1} done in {dict(run.timeline)['job done']:.2f} s{share_text}", flush=True)
    keys = list(dict.fromkeys(k for cells in rows.values() for k in cells))
    print(f"\nStudy: {study}; method: {args.method or 'configured default'}; "
          f"machine load average at end: {os.getloadavg()[0]:.1f}\n")
    modes = list(rows)
    print("| | " + " | ".join(f"registration {m} (median s)" for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for key in keys:
        cells = [f"{statistics.median(rows[m][key]):.2f}" if key in rows[m] else "-" for m in modes]
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("| failed jobs | " + " | ".join(f"{len(failures.get(m, []))}/{args.reps}" for m in modes) + " |")
    for mode, reasons in failures.items():
        for reason in reasons:
            print(f"\n{mode}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
