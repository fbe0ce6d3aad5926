"""``dicomnode demo``: the whole loop against a local Orthanc PACS (see ``dicomnode.demo``)."""

from __future__ import annotations

import warnings
from pathlib import Path


def demo_command(args) -> int:
    """Run the demo (see the module docstring); 0 when the fused series came back to the PACS."""
    from dicomnode.config import LoggingConfig
    from dicomnode.demo import DemoError, run_demo, say
    from dicomnode.log import setup_logging

    setup_logging(LoggingConfig(level="WARNING"))
    # Real data carries harmless standard deviations (e.g. over-long SH values) that pydicom and
    # highdicom also report as Python warnings on every read; they would drown the demo's own lines.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(pydicom|highdicom)\b")
    try:
        run_demo(Path(args.workdir).resolve(), bool(args.synthetic))
        return 0
    except DemoError as exc:
        say(f"FAILED: {exc}")
        return 1
