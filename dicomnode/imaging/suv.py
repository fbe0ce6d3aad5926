"""Units of a loaded series: HU for CT, and PET in Bq/ml converted to SUV body weight when the header allows.

SUVbw = activity concentration (Bq/ml) * body weight (g) / injected dose decayed to the
reference time (Bq), with 1 ml of tissue taken as 1 g.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from pydicom.dataset import Dataset

from dicomnode.domain import FUNCTIONAL
from dicomnode.log import event

log = logging.getLogger(__name__)


class SUVError(Exception):
    """PET values in Bq/ml cannot be converted to SUVbw (an attribute the formula needs is missing or unusable)."""


def volume_units(ds: Dataset, modality: str) -> tuple[str, str, float | None]:
    """(units, note, factor): factor multiplies stored values into the returned units (None: keep them).

    See ``Volume.units`` for the values; a PET series whose SUV cannot be computed stays "BQML"
    with the reason in the note.
    """
    if modality == "CT":
        return "HU", "", None
    if modality not in FUNCTIONAL:
        return "", "", None
    stored = str(ds.get("Units", "")).upper()
    if stored == "GML":
        return "SUVbw", "stored as SUV body weight (Units GML)", None
    if modality != "PT" or stored != "BQML":
        return stored, "", None
    try:
        return "SUVbw", *suv_bw_factor(ds)
    except SUVError as exc:
        event(log, "suv_not_computed", reason=str(exc))
        return "BQML", f"kept Bq/ml: {exc}", None


def suv_bw_factor(ds: Dataset) -> tuple[str, float]:
    """(note, factor): SUVbw factor in g/Bq from dose, half life, injection time, weight and decay correction."""
    info = (ds.get("RadiopharmaceuticalInformationSequence") or [None])[0]
    weight = float(ds.get("PatientWeight") or 0)
    if info is None or weight <= 0:
        raise SUVError("no RadiopharmaceuticalInformationSequence or PatientWeight")
    dose = float(info.get("RadionuclideTotalDose") or 0)
    half_life = float(info.get("RadionuclideHalfLife") or 0)
    if dose <= 0 or half_life <= 0:
        raise SUVError("RadionuclideTotalDose or RadionuclideHalfLife missing")
    decay = str(ds.get("DecayCorrection", "")).upper()
    if decay == "ADMIN":
        return "dose at administration (DecayCorrection ADMIN)", weight * 1000.0 / dose
    if decay != "START":
        raise SUVError(f"DecayCorrection {decay or 'absent'} is not START or ADMIN")
    start = _dicom_time(str(info.get("RadiopharmaceuticalStartDateTime", ""))[8:]) or _dicom_time(
        info.get("RadiopharmaceuticalStartTime"))
    scan = _dicom_time(ds.get("SeriesTime")) or _dicom_time(ds.get("AcquisitionTime"))
    if start is None or scan is None:
        raise SUVError("injection or series time missing")
    elapsed = (scan - start).total_seconds() % 86400  # a scan after midnight
    decayed = dose * 2.0 ** (-elapsed / half_life)
    return f"dose decayed {elapsed:.0f} s to series start (DecayCorrection START)", weight * 1000.0 / decayed


def _dicom_time(value) -> datetime | None:
    """A DICOM TM value on an arbitrary fixed day (only differences are used); None when absent or malformed."""
    text = str(value or "").strip()
    if not text:
        return None
    hh, mm, ss = text[0:2], text[2:4] or "00", text[4:] or "00"
    try:
        return datetime(2000, 1, 1, int(hh), int(mm)) + timedelta(seconds=float(ss))
    except ValueError:
        return None
