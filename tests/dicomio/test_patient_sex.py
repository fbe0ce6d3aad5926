"""PatientSex of source headers is made legal for the output builders (M, F, O or empty)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomnode.dicomio.derived import normalise_patient_sex


def _header(sex: str | None) -> Dataset:
    ds = Dataset()
    if sex is not None:
        ds.PatientSex = sex
    return ds


def test_values_are_mapped_or_emptied_and_changes_reported_once():
    headers = [_header(v) for v in ("Male", "Male", "m", "female", "U", "unknown", "O", "", None)]
    changes = normalise_patient_sex(headers)
    assert [h.get("PatientSex") for h in headers] == ["M", "M", "M", "F", "", "", "O", "", None]
    assert changes == ["PatientSex 'Male' -> 'M'", "PatientSex 'm' -> 'M'", "PatientSex 'female' -> 'F'",
                       "PatientSex 'U' -> ''", "PatientSex 'unknown' -> ''"]
    assert normalise_patient_sex(headers) == []  # legal values are left alone
