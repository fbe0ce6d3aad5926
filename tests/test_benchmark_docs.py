"""The registration benchmark rewrites only its generated block of docs/benchmarks.md."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "registration.py"


def _load():
    spec = importlib.util.spec_from_file_location("registration_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_write_docs_keeps_hand_written_text(tmp_path):
    bench = _load()
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n## Registration\n\nintro\n\n{bench.START}\nold table\n{bench.END}\n\n"
                   "hand-written analysis\n\n## Fusion\nfusion text\n")
    bench._write_docs(doc, "new table")
    text = doc.read_text()
    assert "new table" in text and "old table" not in text
    for kept in ("intro", "hand-written analysis", "## Fusion\nfusion text"):
        assert kept in text
    fresh = tmp_path / "fresh.md"
    bench._write_docs(fresh, "first table")
    assert fresh.read_text().count("## Registration") == 1 and "first table" in fresh.read_text()
