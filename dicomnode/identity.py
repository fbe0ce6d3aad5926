"""Patient and study identity of an instance or a series, and on which attributes two disagree.

Used where mixing patients would be a safety defect: at receive (each instance against its
series row), at pairing, and when a job reads its spool files. Only DICOM keywords leave this
module, never values, so callers can log the result above DEBUG.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pydicom import Dataset


def normalise_name(name: str) -> str:
    """A PersonName for comparison: "DOE^JOHN" and "doe^john^^" are one name (trailing components are padding)."""
    return name.strip().upper().rstrip("^ ")


@dataclass(frozen=True)
class Identity:
    """What ties an instance to one patient's study; field metadata names the DICOM keyword."""

    study_uid: str
    series_uid: str
    patient_id: str
    patient_name: str
    birth_date: str

    @classmethod
    def of_dataset(cls, ds: Dataset) -> Identity:
        def text(keyword: str) -> str:
            value = ds.get(keyword, "")
            return "" if value is None else str(value).strip()

        return cls(text("StudyInstanceUID"), text("SeriesInstanceUID"), text("PatientID"), text("PatientName"),
                   text("PatientBirthDate"))


KEYWORDS = {
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "birth_date": "PatientBirthDate",
}


def identity_differences(expected: Identity, actual: Identity) -> list[str]:
    """DICOM keywords on which ``actual`` differs from ``expected``; strict: a value against none differs."""
    out = []
    for f in fields(Identity):
        a, b = getattr(expected, f.name).strip(), getattr(actual, f.name).strip()
        if f.name == "patient_name":
            a, b = normalise_name(a), normalise_name(b)
        if a != b:
            out.append(KEYWORDS[f.name])
    return out
