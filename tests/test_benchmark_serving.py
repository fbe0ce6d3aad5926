"""benchmarks/serving.py measures what it claims."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SERVING = Path(__file__).resolve().parents[1] / "benchmarks" / "serving.py"


def _serving():
    spec = importlib.util.spec_from_file_location("serving_benchmark", SERVING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_rss_is_the_process_own_not_its_parents():
    """A child started after its parent held 400 MB reports its own peak (ru_maxrss would say 400 MB:
    vfork + exec hands the parent's high-water mark to the child, which made whole-body rows report
    the study generator's memory)."""
    held = np.ones(50_000_000)  # 400 MB, touched
    del held
    code = (f"import importlib.util, os; spec = importlib.util.spec_from_file_location('s', {str(SERVING)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.peak_rss_bytes(os.getpid()))")
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < 100e6
    assert _serving().peak_rss_bytes(os.getpid()) > 400e6  # the parent's own peak is its own
