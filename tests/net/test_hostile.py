"""Hostile and broken input at the SCP, each with real associations on 127.0.0.1 and the exact status.

Malformed UIDs (spool-path collisions, NUL on PostgreSQL), impossible image headers, deflate bombs,
concurrent duplicates, non-image objects, and the statuses of the conformance statement that
need a broken spool, a broken database or a full association table.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode as encode_dataset
from pynetdicom.sop_class import Verification
from sqlalchemy import select, text

from dicomnode.audit.models import Association, Instance, Rejection, Series

from tests.backends import BACKENDS, open_test_db
from tests.net.conftest import make_ct, start_node
from tests.net.test_bad_input import rejections, still_serving
from tests.net.test_scp import associate, wait_for


@pytest.fixture(params=BACKENDS)
def any_node(request, tmp_path):
    """A node on SQLite and on PostgreSQL (a throw-away schema)."""
    with open_test_db(request.param, tmp_path) as db:
        running = start_node(tmp_path, db=db)
        try:
            yield running
        finally:
            running.scp.stop()


def instances(node) -> list[Instance]:
    with node.db.session() as s:
        return s.scalars(select(Instance).order_by(Instance.id)).all()


def stored_files(node) -> list[Path]:
    return [p for p in node.spool.incoming.rglob("*") if p.is_file()]


def part10(path: Path, sop_class: str, sop_uid: str, syntax: str, body: bytes) -> Path:
    """A Part 10 file whose data set bytes are ``body`` exactly (sent unparsed, chunked)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + body)
    return path


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # PS3.5 A.5: raw deflate
    return packer.compress(data) + packer.flush()


# -- malformed UIDs (issue 13 items 6 and 11) ---------------------------------------------------

BAD_UIDS = {
    # "...7/1" and "...7_1" both got 0x0000 and were written to one spool file.
    "slash": ("SOPInstanceUID", "1.2.826.0.1.3680043.7/1"),
    "underscore": ("SOPInstanceUID", "1.2.826.0.1.3680043.7_1"),
    # On PostgreSQL a NUL became 0xA701 (database unavailable), so senders retried forever.
    "nul": ("SOPInstanceUID", "1.2.826.0.1.3680043.7\x00.1"),
    "leading zero": ("SeriesInstanceUID", "1.2.826.0.01.7"),
    "letters": ("StudyInstanceUID", "1.2.826.abc"),
    "frame of reference": ("FrameOfReferenceUID", "1.2..3"),
    "over 64": ("StudyInstanceUID", "1.2." + "3" * 62),
}


def test_malformed_uids_are_refused_and_never_reach_the_spool(any_node, caplog):
    caplog.set_level(logging.WARNING)
    node = any_node
    assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian))
    answers = {}
    for case, (keyword, value) in BAD_UIDS.items():
        ds = make_ct()
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
        rsp = assoc.send_c_store(ds)
        answers[case] = (rsp.Status, str(rsp.ErrorComment))
    assert assoc.send_c_store(make_ct()).Status == 0x0000  # a valid one on the same association
    assoc.release()
    assert {case: status for case, (status, _) in answers.items()} == {case: 0xA900 for case in BAD_UIDS}
    assert answers["over 64"][1] == "UIDs longer than 64 characters: StudyInstanceUID"
    assert answers["slash"][1].startswith("invalid UIDs (PS3.5 9.1): Affected SOP Instance UID")
    assert "SeriesInstanceUID not digits and dots" in answers["leading zero"][1]
    rows = rejections(node)
    assert [r.status for r in rows] == [0xA900] * len(BAD_UIDS)
    assert all(r.quarantine_path and Path(node.spool.root / r.quarantine_path).is_file() for r in rows)
    assert rows[2].sop_instance_uid == "1.2.826.0.1.3680043.7\\x00.1"  # recorded, escaped
    assert len(instances(node)) == 1 and len(stored_files(node)) == 1
    assert len([r for r in caplog.records if "event=instance_rejected" in r.getMessage()]) == len(BAD_UIDS)


# -- impossible image headers (issue 13 item 13) ------------------------------------------------

def _frames(value):
    def change(ds):
        ds.NumberOfFrames = value
    return change


def _no_bits(ds):
    ds.BitsAllocated = 0


def _empty_image(ds):
    ds.Rows = ds.Columns = 0
    ds.PixelData = b""


@pytest.mark.parametrize(
    "change, expected",
    [(_frames(0), "NumberOfFrames=0"), (_frames(-3), "NumberOfFrames=-3"), (_no_bits, "BitsAllocated=0"),
     (_empty_image, "Rows=0,Columns=0")],
    ids=["frames 0", "frames negative", "bits allocated 0", "empty image"],
)
def test_impossible_image_headers_are_refused_at_receive(node, change, expected):
    ds = make_ct()
    change(ds)
    assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian))
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert (rsp.Status, str(rsp.ErrorComment)) == (0xA900, f"impossible image pixel attributes: {expected}")
    assert [r.status for r in rejections(node)] == [0xA900]
    assert instances(node) == [] and stored_files(node) == []


# -- deflate bombs (issue 13 item 3) ------------------------------------------------------------

def test_deflated_syntax_is_not_negotiated_by_default(node):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    rejected = {str(c.transfer_syntax[0]) for c in assoc.rejected_contexts}
    assoc.release()
    assert accepted == {ExplicitVRLittleEndian} and rejected == {DeflatedExplicitVRLittleEndian}


@pytest.fixture
def deflate_node(tmp_path):
    running = start_node(tmp_path, node={"accept_deflated": True})
    yield running
    running.scp.stop()
    running.db.close()


def test_deflated_instance_is_stored_as_received(deflate_node, tmp_path, monkeypatch):
    ds = make_ct(rows=64, cols=64)
    body = deflate(encode_dataset(ds, False, True))
    path = part10(tmp_path / "deflated.dcm", CTImageStorage, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian, body)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(deflate_node, (CTImageStorage, DeflatedExplicitVRLittleEndian))
    assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    (row,) = instances(deflate_node)
    stored = Path(row.spool_path).read_bytes()
    assert stored.endswith(body) and row.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert np.array_equal(dcmread(row.spool_path).pixel_array, ds.pixel_array)


def test_deflate_bomb_is_refused_without_inflating_it(deflate_node, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    # The header declares 64x64 int16 (8 KiB); the pixel data element holds 256 MiB of zeros,
    # which deflate to about 250 KB on the wire.
    ds = make_ct(rows=64, cols=64)
    ds.PixelData = bytes(256 * 1024 * 1024)
    body = deflate(encode_dataset(ds, False, True))
    del ds.PixelData
    assert len(body) < 1024 * 1024
    path = part10(tmp_path / "bomb.dcm", CTImageStorage, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian, body)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(deflate_node, (CTImageStorage, DeflatedExplicitVRLittleEndian))
    rsp = assoc.send_c_store(path)
    assoc.release()
    assert rsp.Status == 0xA900
    assert str(rsp.ErrorComment).startswith("deflated data set inflates beyond")
    (row,) = rejections(deflate_node)
    assert row.status == 0xA900 and "its header declares less" in row.reason
    assert (deflate_node.spool.root / row.quarantine_path).read_bytes().endswith(body)
    assert instances(deflate_node) == []
    still_serving(deflate_node)


# -- concurrent duplicates (issue 16 item 4) ----------------------------------------------------

def test_concurrent_copies_of_one_instance_keep_the_first_byte_for_byte(node):
    # Two senders store the same SOP Instance UIDs at the same moment, with different bytes. The
    # conformance statement: 0x0000 for both (idempotent), the first copy kept, counted once.
    count = 24
    uids = [generate_uid() for _ in range(count)]
    series_uid, study_uid = generate_uid(), generate_uid()
    copies = []
    for variant in range(2):
        datasets = []
        for index, uid in enumerate(uids):
            ds = make_ct(rows=256, cols=256, series_uid=series_uid, study_uid=study_uid, index=index)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.PixelData = np.full(256 * 256, variant * 1000 + index, dtype=np.int16).tobytes()
            datasets.append(ds)
        copies.append(datasets)
    barrier = threading.Barrier(2)
    statuses: list[list[int]] = [[], []]

    def sender(variant: int) -> None:
        assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian), ae_title=f"SENDER{variant}")
        try:
            for ds in copies[variant]:
                barrier.wait(timeout=60)
                statuses[variant].append(int(assoc.send_c_store(ds).Status))
        finally:
            assoc.release()

    threads = [threading.Thread(target=sender, args=(v,)) for v in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert statuses == [[0x0000] * count, [0x0000] * count]
    rows = instances(node)
    assert len(rows) == count
    for row in rows:
        assert hashlib.sha256(Path(row.spool_path).read_bytes()).hexdigest() == row.sha256
    with node.db.session() as s:
        assert s.scalars(select(Series)).one().received_count == count
    assert len(stored_files(node)) == count


# -- non-image objects (issue 13 item 16) -------------------------------------------------------

def _non_image(sop_class: str, modality: str, study_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality = modality
    ds.PatientID, ds.PatientName = "TEST001", "Test^Patient"
    ds.InstanceNumber = 1
    return ds


def test_non_image_objects_are_stored_and_audited(node, sts_dir):
    rtstruct = dcmread(sts_dir / "CT" / "dicom" / "mask" / "RS.dcm")
    study = str(rtstruct.StudyInstanceUID)
    objects = [
        rtstruct,
        _non_image(BasicTextSRStorage, "SR", study),
        _non_image(KeyObjectSelectionDocumentStorage, "KO", study),
        _non_image(GrayscaleSoftcopyPresentationStateStorage, "PR", study),
    ]
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in objects}
    assoc = associate(node, *contexts)
    assert not assoc.rejected_contexts
    assert [assoc.send_c_store(ds).Status for ds in objects] == [0x0000] * 4
    assoc.release()
    with node.db.session() as s:
        modalities = sorted(s.scalars(select(Series.modality)).all())
        classes = {r.sop_class_uid for r in s.scalars(select(Instance)).all()}
    assert modalities == ["KO", "PR", "RTSTRUCT", "SR"]
    assert classes == {str(ds.SOPClassUID) for ds in objects}
    assert rejections(node) == []


def test_image_classes_still_need_pixel_data(node):
    # Accepting every storage class must not relax the image IODs the node fuses.
    ds = make_ct()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    del ds.PixelData
    assoc = associate(node, (MRImageStorage, ExplicitVRLittleEndian))
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert (rsp.Status, str(rsp.ErrorComment)) == (0xA900, "no pixel data")


# -- statuses of the conformance statement (issue 16 item 3) ------------------------------------

def test_unwritable_spool_is_out_of_resources(node):
    # The spool's incoming folder is replaced by a file: no instance folder can be made (root
    # ignores permission bits, so chmod would not do).
    moved = node.spool.incoming.with_name("incoming.away")
    node.spool.incoming.rename(moved)
    node.spool.incoming.write_bytes(b"not a folder")
    assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian))
    ds = make_ct()
    rsp = assoc.send_c_store(ds)
    assert rsp.Status == 0xA700 and str(rsp.ErrorComment).startswith("cannot write to the spool")
    node.spool.incoming.unlink()
    moved.rename(node.spool.incoming)
    assert assoc.send_c_store(ds).Status == 0x0000  # the sender's retry is stored
    assoc.release()
    (row,) = rejections(node)
    assert row.status == 0xA700 and row.quarantine_path
    assert len(instances(node)) == 1


def test_database_that_cannot_record_is_out_of_resources(any_node):
    node = any_node
    with node.db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE instances RENAME TO instances_away"))
    assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian))
    ds = make_ct()
    rsp = assoc.send_c_store(ds)
    assert rsp.Status == 0xA701 and str(rsp.ErrorComment).startswith("audit database unavailable")
    with node.db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE instances_away RENAME TO instances"))
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert [r.status for r in rejections(node)] == [0xA701]
    assert len(instances(node)) == 1 and len(stored_files(node)) == 1


@pytest.mark.parametrize("field", ["SOPInstanceUID", "SOPClassUID"])
def test_data_set_uids_that_differ_from_the_request(node, tmp_path, monkeypatch, field):
    ds = make_ct()
    request_class, request_uid = CTImageStorage, ds.SOPInstanceUID
    if field == "SOPInstanceUID":
        request_uid = generate_uid()
        expected = "SOPInstanceUID differs from the request's Affected SOP Instance UID"[:64].rstrip()
    else:
        ds.SOPClassUID = MRImageStorage  # the data set says MR, the request CT
        expected = f"SOPClassUID {MRImageStorage} differs from the request's {CTImageStorage}"[:64]
    path = part10(tmp_path / "differs.dcm", request_class, request_uid, ExplicitVRLittleEndian, encode_dataset(ds, False, True))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(node, (CTImageStorage, ExplicitVRLittleEndian))
    rsp = assoc.send_c_store(path)
    assoc.release()
    assert (rsp.Status, str(rsp.ErrorComment)) == (0xA900, expected)
    assert [r.status for r in rejections(node)] == [0xA900] and instances(node) == []


def test_association_beyond_max_associations_is_rejected_and_audited(tmp_path):
    node = start_node(tmp_path, node={"max_associations": 1})
    try:
        first = associate(node)
        ae = AE(ae_title="SECOND")
        ae.add_requested_context(Verification)
        second = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert second.is_rejected
        primitive = second.acceptor.primitive
        # rejected-transient, service-provider (presentation), local-limit-exceeded (PS3.8 9.3.4)
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (0x02, 0x03, 0x02)
        first.release()

        def audited() -> bool:
            with node.db.session() as s:
                return any(not r.accepted for r in s.scalars(select(Association)).all())

        wait_for(audited, timeout=30)
        with node.db.session() as s:
            refused = [r for r in s.scalars(select(Association)).all() if not r.accepted]
        assert len(refused) == 1 and "result=2 source=3 diagnostic=2" in refused[0].reason
        still_serving(node)
    finally:
        node.scp.stop()
        node.db.close()
