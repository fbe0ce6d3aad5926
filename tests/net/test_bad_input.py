"""Bad input: each answered with a failure status (never a warning), a Rejection row, one log line,
and the node still answers C-ECHO afterwards."""

from __future__ import annotations

import logging
import time
from io import BytesIO

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicomnode.audit.models import Association, Instance, Rejection

from tests.net.conftest import make_ct
from tests.net.test_scp import associate, wait_for


def still_serving(node) -> None:
    assoc = associate(node)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def rejections(node) -> list[Rejection]:
    with node.db.session() as s:
        return s.scalars(select(Rejection).order_by(Rejection.id)).all()


def assert_refused(node, caplog, status: int, expected: int, reason_part: str) -> Rejection:
    assert status == expected, hex(status)
    rows = rejections(node)
    assert len(rows) == 1
    assert rows[0].status == status and reason_part in rows[0].reason
    quarantined = node.spool.root / rows[0].quarantine_path
    assert quarantined.is_file()
    assert reason_part in quarantined.with_name(quarantined.stem + ".reason.txt").read_text()
    lines = [r for r in caplog.records if "event=instance_rejected" in r.getMessage()]
    assert len(lines) == 1 and f"status=0x{status:04X}" in lines[0].getMessage()
    with node.db.session() as s:
        assert s.scalar(select(Instance.id)) is None
    assert not list(node.spool.incoming.rglob("*.dcm"))
    still_serving(node)
    return rows[0]


def test_not_dicom_bytes_cannot_be_understood(node, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING)
    # Valid file meta (so the SCU can pick a context) followed by plain text as the "data set";
    # chunked sending puts the file's bytes on the wire without parsing them.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path = tmp_path / "notdicom.dcm"
    path.write_bytes(buffer.getvalue() + b"This is a text file that a misconfigured sender forwarded.\n" * 30)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian))
    status = assoc.send_c_store(path).Status
    assoc.release()
    assert_refused(node, caplog, status, 0xC000, "not a DICOM data set")


def test_missing_pixel_data_is_a_dataset_mismatch(node, caplog):
    caplog.set_level(logging.WARNING)
    ds = make_ct()
    del ds.PixelData
    assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian))
    rsp = assoc.send_c_store(ds)
    assoc.release()
    row = assert_refused(node, caplog, rsp.Status, 0xA900, "no pixel data")
    assert row.sop_instance_uid == ds.SOPInstanceUID and row.calling_ae == "TESTSCU"
    assert rsp.ErrorComment == "no pixel data"


def test_modality_not_matching_sop_class_is_a_dataset_mismatch(node, caplog):
    caplog.set_level(logging.WARNING)
    ds = make_ct()
    ds.Modality = "MR"  # a CT Image IOD must say CT
    assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian))
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert_refused(node, caplog, rsp.Status, 0xA900, "does not match the SOP class")


def test_missing_series_uid_is_a_dataset_mismatch(node, caplog):
    caplog.set_level(logging.WARNING)
    ds = make_ct()
    del ds.SeriesInstanceUID
    assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian))
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert_refused(node, caplog, rsp.Status, 0xA900, "SeriesInstanceUID")


def test_short_pixel_data_cannot_be_understood(node, caplog):
    caplog.set_level(logging.WARNING)
    ds = make_ct()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian))
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert_refused(node, caplog, rsp.Status, 0xC001, "pixel data has")


# Every Storage SOP class is accepted; a private one is not.
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.999.1"


def test_unsupported_sop_class_context_is_rejected_and_audited(node, caplog):
    caplog.set_level(logging.WARNING)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert [str(c.abstract_syntax) for c in assoc.rejected_contexts] == [PRIVATE_SOP_CLASS]
    with pytest.raises(ValueError, match="presentation context"):
        assoc.send_c_store(make_ct_with_class(PRIVATE_SOP_CLASS))
    assoc.release()
    rows = rejections(node)
    assert len(rows) == 1 and rows[0].sop_class_uid == PRIVATE_SOP_CLASS and "not supported" in rows[0].reason
    assert any("event=contexts_rejected" in r.getMessage() for r in caplog.records)
    still_serving(node)


def make_ct_with_class(sop_class: str):
    ds = make_ct()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


@pytest.mark.parametrize("how", ["abort", "drop"])
def test_truncated_transfer_leaves_nothing_behind(node, how):
    ds = make_ct(rows=256, cols=256)  # 128 KiB of pixels: several P-DATA PDUs at 16 KiB
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", max_pdu=16384)
    assert assoc.is_established
    context = assoc.accepted_contexts[0]
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    encoded = BytesIO()
    ds.save_as(encoded, enforce_file_format=False, implicit_vr=False, little_endian=True)
    request.DataSet = BytesIO(encoded.getvalue())
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = list(message.encode_msg(context.context_id, 16384))
    assert len(pdus) > 4
    for pdu in pdus[: len(pdus) // 2]:  # command set and the first half of the data set
        assoc.dul.send_pdu(pdu)
    time.sleep(0.3)  # let the node read them
    if how == "abort":
        assoc.abort()
    else:
        assoc.dul.socket.socket.close()  # the cable is pulled: no A-ABORT, just a closed connection
        assoc.kill()

    def ended():
        with node.db.session() as s:
            row = s.scalars(select(Association)).one()
            return row.ended_at is not None

    wait_for(ended)
    with node.db.session() as s:
        assert s.scalar(select(Instance.id)) is None
        assoc_row = s.scalars(select(Association)).one()
    assert assoc_row.accepted and assoc_row.reason in ("aborted", "connection closed")
    assert not [p for p in node.spool.incoming.rglob("*") if p.is_file()]
    still_serving(node)
