"""The dciodvfy wrapper tells errors from warnings, so tests that demand no errors can fail."""

from __future__ import annotations

from dicomnode.dicomio.validate import parse_dciodvfy_output, validate_dataset
from dicomnode.testing.study import synthetic_datasets
from tests.conftest import require_tool

SAMPLE = """CTImage
Error - </KVP(0018,0060)> - Missing attribute for Type 2 Required - Module=<CTImage>
Warning - </Laterality(0020,0060)> - is only permitted to be empty when actually unknown
Warning - Missing attribute or value that would be needed to build DICOMDIR - Study ID
"""


def test_parse_splits_errors_and_warnings():
    report = parse_dciodvfy_output(SAMPLE)
    assert report.iod == "CTImage"
    assert report.errors == ["</KVP(0018,0060)> - Missing attribute for Type 2 Required - Module=<CTImage>"]
    assert len(report.warnings) == 2
    assert not report.ok


def test_a_broken_object_is_reported():
    require_tool("dciodvfy")
    ds = synthetic_datasets(modalities=("CT",), shape=(2, 8, 8))["CT"][0]
    assert validate_dataset(ds).ok
    del ds.KVP  # Type 2 in the CT Image module
    report = validate_dataset(ds)
    assert not report.ok
    assert any("KVP" in e for e in report.errors)
