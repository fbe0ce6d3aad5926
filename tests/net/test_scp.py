"""StoreSCP with real associations on 127.0.0.1: echo, store, idempotency, compressed input."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicomnode.audit.models import Association, Instance, Rejection, Series

from tests.backends import BACKENDS, open_test_db
from tests.net.conftest import make_ct, start_node


def associate(node, *contexts, ae_title: str = "TESTSCU"):
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.config.node.ae_title)
    assert assoc.is_established
    return assoc


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_echo_records_association_and_sets_nodelay(node):
    assoc = associate(node)
    assert assoc.send_c_echo().Status == 0x0000
    server_side = node.scp._server.active_associations[0]
    raw = server_side.dul.socket.socket
    assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assoc.release()

    def ended():
        with node.db.session() as s:
            row = s.scalars(select(Association)).one()
            return row.ended_at is not None and row.accepted and row.calling_ae == "TESTSCU"

    wait_for(ended)


def _series_dirs(sts_dir: Path) -> dict[str, list[Path]]:
    return {
        "CT": sorted((sts_dir / "CT" / "dicom" / "image").glob("*.dcm")),
        "PT": sorted((sts_dir / "PET" / "dicom" / "image").glob("*.dcm")),
        "MR": sorted((sts_dir / "MR_T1" / "dicom" / "image").glob("*.dcm")),
    }


def test_store_real_ct_pet_mr_then_repeat_is_idempotent(node, sts_dir):
    series = _series_dirs(sts_dir)
    picks = {m: files[:4] for m, files in series.items()}
    datasets = [dcmread(f) for files in picks.values() for f in files]
    contexts = {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}
    assoc = associate(node, *contexts)
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    # The same instances again: success, no new rows, counts unchanged.
    for ds in datasets[:3]:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()

    with node.db.session() as s:
        instances = s.scalars(select(Instance)).all()
        assert len(instances) == len(datasets)
        rows = {r.modality: r for r in s.scalars(select(Series)).all()}
    assert set(rows) == {"CT", "PT", "MR"}
    for modality, files in picks.items():
        assert rows[modality].received_count == len(files)
        assert rows[modality].calling_ae == "TESTSCU"
        assert rows[modality].frame_of_reference_uid
    pet = dcmread(series["PT"][0], stop_before_pixels=True)
    assert rows["PT"].expected_count == int(pet.NumberOfSlices)
    assert rows["CT"].expected_count is None
    for inst in instances:
        path = Path(inst.spool_path)
        assert path.is_file() and path.stat().st_size == inst.size_bytes
        assert path.is_relative_to(node.spool.incoming)
        assert len(inst.sha256) == 64
        assert dcmread(path).SOPInstanceUID == inst.sop_instance_uid
    assert len(node.nudges) == len(datasets)  # one per stored instance, none for repeats
    assert not list(node.spool.root.rglob(".tmp-*"))


COMPRESSED_SAMPLES = [
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "JPGExtended.dcm",
    "JPEG2000.dcm",
    "693_J2KI.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
]


def test_compressed_samples_are_decoded_and_accepted(node, shared_data):
    folder = shared_data / "dicom" / "pydicom_samples"
    datasets = [dcmread(folder / name) for name in COMPRESSED_SAMPLES]
    for ds in datasets:  # several samples share one SOP Instance UID; keep them distinct here
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    contexts = {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}
    assoc = associate(node, *contexts)
    statuses = {name: assoc.send_c_store(ds).Status for name, ds in zip(COMPRESSED_SAMPLES, datasets)}
    assoc.release()
    assert statuses == {name: 0x0000 for name in COMPRESSED_SAMPLES}
    with node.db.session() as s:
        syntaxes = set(s.scalars(select(Instance.transfer_syntax_uid)).all())
        assert s.scalar(select(Rejection.id)) is None
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in datasets} <= syntaxes


def test_undecodable_compressed_pixels_are_rejected(node, shared_data):
    ds = dcmread(shared_data / "dicom" / "pydicom_samples" / "MR_small_jp2klossless.dcm")
    frame = bytearray(ds.PixelData)
    # Keep the encapsulation (item tags) but destroy the JPEG 2000 codestream inside.
    frame[40:] = b"\x00" * (len(frame) - 40)
    ds.PixelData = bytes(frame)
    assoc = associate(node, (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert rsp.Status == 0xC001  # understood as a data set; its pixel data cannot be decoded
    assert str(rsp.ErrorComment).startswith("pixel data cannot be decoded")
    with node.db.session() as s:
        assert s.scalar(select(Instance.id)) is None
        assert s.scalars(select(Rejection)).one().status == rsp.Status


def test_synthetic_series_counts_and_nudges(node):
    series_uid = "1.2.3.4.5.6"
    datasets = [make_ct(series_uid=series_uid, study_uid="1.2.3.4", index=i) for i in range(1, 6)]
    assoc = associate(node, (datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID))
    assert [assoc.send_c_store(ds).Status for ds in datasets] == [0] * 5
    assoc.release()
    assert node.nudges == [series_uid] * 5
    with node.db.session() as s:
        row = s.scalars(select(Series)).one()
        assert (row.received_count, row.study_uid, row.patient_id) == (5, "1.2.3.4", "TEST001")
        assert row.last_received_at >= row.first_received_at


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_nudge_carries_its_series_progress_from_the_instance_transaction(tmp_path, backend):
    """Completion reads no series row per instance: the grown counts come with the nudge."""
    with open_test_db(backend, tmp_path) as db:
        node = start_node(tmp_path, db)
        try:
            _send_and_check_progress(node)
        finally:
            node.scp.stop()


def _send_and_check_progress(node):
    from dicomnode.audit.models import SeriesState

    datasets = [make_ct(series_uid="1.2.3.4.5.7", study_uid="1.2.3.4", index=i) for i in range(1, 5)]
    assoc = associate(node, (datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID))
    assert [assoc.send_c_store(ds).Status for ds in datasets] == [0] * 4
    assert assoc.send_c_store(datasets[0]).Status == 0  # a repeat: no nudge, no progress
    assoc.release()
    assert [p.received_count for p in node.progress] == [1, 2, 3, 4]
    assert all(p.state == SeriesState.receiving for p in node.progress)
    with node.db.session() as s:
        row = s.scalars(select(Series)).one()
    assert (node.progress[-1].received_count, node.progress[-1].expected_count) == (row.received_count,
                                                                                    row.expected_count)


def test_allowed_callers_reject_unknown_ae_and_wrong_host(tmp_path):
    node = start_node(
        tmp_path,
        node={"allowed_callers": [{"ae_title": "GOODSCU"}, {"ae_title": "PINNED", "host": "10.9.9.9"}]},
    )
    try:
        for title in ("BADSCU", "PINNED"):
            ae = AE(ae_title=title)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", node.port)
            assert assoc.is_rejected
            assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.diagnostic) == (0x01, 0x03)
        good = associate(node, ae_title="GOODSCU")
        assert good.send_c_echo().Status == 0
        good.release()
        with node.db.session() as s:
            rows = s.scalars(select(Association).order_by(Association.id)).all()
        refused = [r for r in rows if not r.accepted]
        assert [r.calling_ae for r in refused] == ["BADSCU", "PINNED"]
        assert all(r.reason and "not an allowed caller" in r.reason and r.ended_at for r in refused)
        assert [r.calling_ae for r in rows if r.accepted] == ["GOODSCU"]
    finally:
        node.scp.stop()
        node.db.close()


def test_wrong_called_ae_is_rejected_and_audited(tmp_path):
    node = start_node(tmp_path)
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ANY-SCP")
        assert assoc.is_rejected
        primitive = assoc.acceptor.primitive
        # rejected-permanent, service-user, called-AE-title-not-recognized (PS3.8 9.3.4)
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (0x01, 0x01, 0x07)
        good = associate(node)
        assert good.send_c_echo().Status == 0
        good.release()
        with node.db.session() as s:
            rows = s.scalars(select(Association).order_by(Association.id)).all()
        assert [(r.called_ae, r.accepted) for r in rows] == [("ANY-SCP", False), ("DICOMNODE", True)]
        assert "called AE 'ANY-SCP'" in rows[0].reason and rows[0].ended_at is not None
    finally:
        node.scp.stop()
        node.db.close()


def test_called_ae_is_not_checked_when_not_required(tmp_path):
    node = start_node(tmp_path, node={"require_called_ae": False})
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ANY-SCP")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        node.scp.stop()
        node.db.close()
