"""Spool layout and atomic writes."""

from __future__ import annotations

import os
import time

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomnode.store.spool import Spool, SpoolError, atomic_write, safe_name


def test_incoming_layout_and_content(tmp_path):
    spool = Spool(tmp_path)
    path = spool.write_incoming(b"abc", study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4")
    assert path == tmp_path / "incoming" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert path.read_bytes() == b"abc"
    # Rewriting replaces atomically and leaves no temporary file behind.
    spool.write_incoming(b"xyz", study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4")
    assert path.read_bytes() == b"xyz"
    assert [p.name for p in path.parent.iterdir()] == ["1.2.3.4.dcm"]


def test_unsafe_uids_cannot_escape(tmp_path):
    spool = Spool(tmp_path)
    path = spool.write_incoming(b"x", study_uid="../..", series_uid="a/b", sop_uid="..")
    assert spool.incoming in path.parents
    assert safe_name("..") == "_2E." and safe_name("1.2/3") == "1.2_2F3" and safe_name("") == "_"


def test_spool_names_are_injective(tmp_path):
    # "...7/1" and "...7_1" once shared one file: the second patient's bytes replaced the first's.
    uids = ["1.2.7/1", "1.2.7_1", "1.2.7_2F1", ".tmp-x", "_2Etmp-x", "1" * 200, "1" * 199 + "2", "", "_", "é", "_C3_A9"]
    names = [safe_name(u) for u in uids]
    assert len(set(names)) == len(uids)
    assert all(0 < len(n) <= 128 and not n.startswith(".") and "/" not in n for n in names)
    spool = Spool(tmp_path)
    first = spool.write_incoming(b"first", study_uid="1", series_uid="2", sop_uid="1.2.7/1")
    second = spool.write_incoming(b"second", study_uid="1", series_uid="2", sop_uid="1.2.7_1")
    assert first != second and first.read_bytes() == b"first" and second.read_bytes() == b"second"


def test_quarantine_keeps_bytes_and_reason(tmp_path):
    spool = Spool(tmp_path)
    path = spool.quarantine(b"\x00garbage", "status=0xC000 not DICOM")
    assert path.parent.parent == spool.quarantine_dir and len(path.parent.name) == 8
    assert path.read_bytes() == b"\x00garbage"
    assert path.with_name(path.stem + ".reason.txt").read_text() == "status=0xC000 not DICOM\n"


def test_outbox_and_write_dataset_round_trip(tmp_path):
    spool = Spool(tmp_path)
    folder = spool.outbox_dir(7, "1.2.3")
    assert folder == tmp_path / "outbox" / "7" / "1.2.3" and folder.is_dir()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "OT"
    path = spool.write_dataset(ds, folder / "a.dcm")
    back = dcmread(path)
    assert back.SOPInstanceUID == ds.SOPInstanceUID and back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_failed_write_raises_spool_error_and_leaves_nothing(tmp_path):
    target_dir = tmp_path / "ro"
    target_dir.mkdir()
    (target_dir / "blocker").write_text("a file where a folder is needed")
    with pytest.raises(SpoolError):
        atomic_write(target_dir / "blocker" / "x.dcm", b"data")
    assert sorted(p.name for p in target_dir.iterdir()) == ["blocker"]


def test_purge_removes_only_old_files(tmp_path):
    spool = Spool(tmp_path)
    old = spool.write_incoming(b"old", study_uid="1", series_uid="2", sop_uid="3")
    new = spool.write_incoming(b"new", study_uid="1", series_uid="5", sop_uid="6")
    ten_days_ago = time.time() - 10 * 86400
    os.utime(old, (ten_days_ago, ten_days_ago))
    os.utime(old.parent, (ten_days_ago, ten_days_ago))
    report = spool.purge_older_than(7)
    assert (report.files, report.bytes) == (1, 3)
    assert not old.exists() and not old.parent.exists() and new.exists()
    assert spool.purge_older_than(0).files == 0 and new.exists()


def test_part10_header_matches_pydicom_and_chunks_are_written_in_order(tmp_path):
    from io import BytesIO

    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    from dicomnode.store.spool import part10_header

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.345"  # odd length: padded with NUL
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.3.4"
    meta.ImplementationVersionName = "NODE_1"
    expected = BytesIO()
    write_file_meta_info(expected, meta)
    header = part10_header(CTImageStorage, "1.2.345", ExplicitVRLittleEndian, "1.2.3.4", "NODE_1")
    assert header == b"\0" * 128 + b"DICM" + expected.getvalue()
    path = atomic_write(tmp_path / "x.dcm", (header, b"\x10\x00\x10\x00PN\x04\x00A^B "))
    assert str(dcmread(path).PatientName) == "A^B" and dcmread(path).file_meta.MediaStorageSOPInstanceUID == "1.2.345"


def _image(pixels: bytes) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.BitsAllocated = 8
    ds.PixelData = pixels
    return ds


def test_write_dataset_streams_into_the_file(tmp_path):
    """A large object is encoded straight into its file, not first into a second copy in memory."""
    import tracemalloc

    pixels = bytes(range(256)) * (32 * 1024)  # 8 MiB, like a Parametric Map's frames
    ds = _image(pixels)
    tracemalloc.start()
    try:
        path = Spool(tmp_path).write_dataset(ds, tmp_path / "out" / "big.dcm")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dcmread(path).PixelData == pixels
    assert peak < 1.5 * len(pixels)  # pydicom encodes each element once; the file is not built in memory


def test_failed_encoding_leaves_no_file(tmp_path):
    ds = _image(b"\0\0")
    ds.add_new(0x00280010, "US", "not a number")  # Rows: fails while the file is being written
    folder = tmp_path / "out"
    with pytest.raises(Exception):
        Spool(tmp_path).write_dataset(ds, folder / "bad.dcm")
    assert not folder.exists() or list(folder.iterdir()) == []
