"""A job that registers writes the registration objects with its outputs, ready to send."""

from __future__ import annotations

import pydicom
from pydicom.uid import generate_uid

from dicomnode.config import PairingRule, load_config
from dicomnode.dicomio.registration import DEFORMABLE_SPATIAL_REGISTRATION, SPATIAL_REGISTRATION
from dicomnode.dicomio.validate import validate_file
from dicomnode.routing import SeriesRef
from dicomnode.store.spool import Spool
from tests.conftest import require_tool
from tests.e2e.dcmtk_peers import StoreSCPPeer


def _ref(ds) -> SeriesRef:
    return SeriesRef(series_uid=ds.SeriesInstanceUID, study_uid=ds.StudyInstanceUID, modality=ds.Modality,
                     patient_id=str(ds.PatientID), patient_name=str(ds.PatientName),
                     birth_date=str(ds.get("PatientBirthDate", "")),
                     study_date=str(ds.get("StudyDate", "")), frame_of_reference_uid=ds.FrameOfReferenceUID,
                     calling_ae="MODALITY1")


def test_registered_job_writes_spatial_registration_objects(tmp_path):
    from dicomnode.pipeline import JobInputs, process_job
    from dicomnode.testing.study import write_synthetic_study

    paths = write_synthetic_study(tmp_path / "study", modalities=("CT", "MR"), shape=(16, 48, 48), seed=2)
    # The MR arrives in its own frame of reference, 4 mm off: the node must register it.
    frame = generate_uid()
    for p in paths["MR"]:
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = frame
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 4.0, *ds.ImagePositionPatient[1:]]
        ds.save_as(p)
    ct, mr = pydicom.dcmread(paths["CT"][0]), pydicom.dcmread(paths["MR"][0])
    config = load_config(overrides={
        "storage": {"spool_dir": str(tmp_path / "spool")},
        "registration": {"mode": "always", "samples_per_level": 5000,
                         "deformable_samples_per_level": 4000, "heldout_samples": 8000, "deformable_iterations": 5,
                         "deformable_max_level_mm": 10.0},
        "processing": {"device": "cpu"}, "quality": {"max_slices": 2},
    })
    inputs = JobInputs(job_id=7, rule=PairingRule(fixed="CT", moving="MR"), method="alpha", fixed=_ref(ct),
                       moving=_ref(mr), fixed_files=paths["CT"], moving_files=paths["MR"], config=config,
                       spool=Spool(tmp_path / "spool"))
    out = process_job(inputs)
    kinds = {s.kind: s for s in out.series}
    assert out.registration["skipped_reason"] is None
    kept_deformable = out.registration["deformable"]
    expected = {"registration"} | ({"deformable_registration"} if kept_deformable else set())
    assert expected <= set(kinds) and ("deformable_registration" in kinds) == kept_deformable
    classes = {"registration": SPATIAL_REGISTRATION, "deformable_registration": DEFORMABLE_SPATIAL_REGISTRATION}
    require_tool("dciodvfy")
    for kind in expected:
        (path,) = kinds[kind].files
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == classes[kind] and ds.FrameOfReferenceUID == ct.FrameOfReferenceUID
        assert {s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence} == {ct.SeriesInstanceUID,
                                                                             mr.SeriesInstanceUID}
        assert validate_file(path).errors == []
    # A real peer (DCMTK storescp) accepts them through the node's own SCU.
    from dicomnode.config import Destination
    from dicomnode.net.scu import send_files

    files = [f for kind in expected for f in kinds[kind].files]
    with StoreSCPPeer(require_tool("storescp"), tmp_path / "peer") as peer:
        send_files(Destination(name="peer", ae_title=peer.ae_title, host="127.0.0.1", port=peer.port), files,
                   calling_ae="DICOMNODE", timeout_s=30)
        assert sorted(peer.received_uids()) == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
