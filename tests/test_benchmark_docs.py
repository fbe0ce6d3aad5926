"""The benchmarks rewrite only their generated blocks of docs/benchmarks.md."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "registration.py"


def _load(script: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(script.stem + "_benchmark", script)
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


def test_pet_table_has_its_own_block(tmp_path):
    bench = _load()
    doc = tmp_path / "benchmarks.md"
    pet_start, pet_end = bench.PET
    doc.write_text(f"## Registration\n\n{bench.START}\nmain table\n{bench.END}\n\nanalysis\n\n"
                   f"{pet_start}\nold pet\n{pet_end}\n\nmore analysis\n")
    bench._write_docs(doc, "new pet", *bench.PET)
    text = doc.read_text()
    assert "new pet" in text and "old pet" not in text
    for kept in ("main table", "analysis", "more analysis"):
        assert kept in text


def test_whole_body_write_docs_keeps_hand_written_text(tmp_path):
    import pytest

    bench = _load(SCRIPT.with_name("whole_body.py"))
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"## Whole-body studies\n\n{bench.BEGIN}\nold table\n{bench.END}\n\nanalysis\n\n## Next\nnext text\n")
    bench.write_docs("new table", doc)
    text = doc.read_text()
    assert "new table" in text and "old table" not in text
    assert "analysis" in text and "## Next\nnext text" in text
    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("## Whole-body studies\n\nanalysis only\n")
    with pytest.raises(SystemExit, match="no <!-- whole-body:begin -->"):
        bench.write_docs("new table", unmarked)
    assert unmarked.read_text() == "## Whole-body studies\n\nanalysis only\n"
