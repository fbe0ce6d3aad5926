"""The header-only read of received data sets: same answers as a full decode, without the pixels."""

from __future__ import annotations

import dataclasses
from io import BytesIO

import pytest
from pydicom.filereader import read_dataset
from pynetdicom.dsutils import encode as encode_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from dicomnode.net.validate import RejectedInstance, check_instance, read_header
from tests.net.conftest import make_ct


def encode(ds, implicit: bool) -> bytes:
    return encode_dataset(ds, implicit, True)


def _answer(ds, sop_uid: str, syntax: str, **kw):
    """What check_instance says: the recorded attributes, or the status and reason of the refusal."""
    try:
        return dataclasses.asdict(check_instance(ds, CTImageStorage, sop_uid, syntax, **kw))
    except RejectedInstance as exc:
        return (hex(exc.status), exc.reason)


def header_and_full_answers(stream: bytes, sop_uid: str, syntax: str):
    """(header-only answer, full-decode answer) for one received stream."""
    header, pixels = read_header(stream, syntax)
    full = read_dataset(BytesIO(stream), syntax == ImplicitVRLittleEndian, True)
    assert [e.tag for e in header] == [e.tag for e in full if e.tag < 0x7FE00008]  # the same elements, less pixels
    return (_answer(header, sop_uid, syntax, header_only=True, pixels=pixels), _answer(full, sop_uid, syntax))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_header_read_stops_before_pixels_and_measures_them(syntax):
    ds = make_ct(rows=8, cols=8)
    stream = encode(ds, syntax == ImplicitVRLittleEndian)
    header, pixels = read_header(stream, syntax)
    assert "PixelData" not in header and header.SOPInstanceUID == ds.SOPInstanceUID
    assert pixels.keyword == "PixelData" and pixels.declared == pixels.available == 8 * 8 * 2
    info = check_instance(header, CTImageStorage, ds.SOPInstanceUID, syntax, header_only=True, pixels=pixels)
    assert info.series_uid == ds.SeriesInstanceUID and info.modality == "CT"
    quick, full = header_and_full_answers(stream, ds.SOPInstanceUID, syntax)
    assert quick == full and full["series_uid"] == ds.SeriesInstanceUID


def _no_modality(ds):
    del ds.Modality


def _short_pixels(ds):
    ds.PixelData = ds.PixelData[:-4]


def _other_sop(ds):
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"


def _long_uid(ds):
    ds.SeriesInstanceUID = "1." + "2" * 70


def _no_pixels(ds):
    del ds.PixelData


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("damage", [_no_modality, _short_pixels, _other_sop, _long_uid, _no_pixels])
def test_header_read_gives_the_full_decodes_answer(syntax, damage):
    ds = make_ct(rows=8, cols=8)
    sop_uid = ds.SOPInstanceUID
    damage(ds)
    quick, full = header_and_full_answers(encode(ds, syntax == ImplicitVRLittleEndian), sop_uid, syntax)
    assert isinstance(full, tuple) and full[0] in ("0xa900", "0xc000", "0xc001"), full  # every case is refused
    assert quick == full


def test_header_read_sees_a_cut_stream_and_missing_pixels():
    ds = make_ct(rows=8, cols=8)
    stream = encode(ds, False)
    header, pixels = read_header(stream[:-10], ExplicitVRLittleEndian)
    assert pixels.available == pixels.declared - 10
    with pytest.raises(RejectedInstance, match="pixel data has 118 bytes, header needs 128"):
        check_instance(header, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, header_only=True, pixels=pixels)
    assert header_and_full_answers(stream[:-10], ds.SOPInstanceUID, ExplicitVRLittleEndian) == (
        (hex(0xC001), "pixel data has 118 bytes, header needs 128"),) * 2
    del ds.PixelData
    header, pixels = read_header(encode(ds, False), ExplicitVRLittleEndian)
    assert pixels is None
    with pytest.raises(RejectedInstance, match="no pixel data"):
        check_instance(header, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, header_only=True, pixels=pixels)


def test_compressed_syntaxes_are_left_to_the_full_decode():
    assert read_header(b"\x00" * 16, JPEGBaseline8Bit) is None


def test_every_status_the_node_refuses_with_is_a_storage_failure():
    # The node names the statuses it chooses; their meaning is pynetdicom's table (PS3.4 B.2.3),
    # and a refusal must never be a warning status (a warning tells the sender it was stored).
    from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STORAGE_SERVICE_CLASS_STATUS

    from dicomnode.net import validate

    chosen = {name: code for name, code in vars(validate).items() if name.startswith("STATUS_")}
    assert chosen.pop("STATUS_SUCCESS") == 0x0000 and STORAGE_SERVICE_CLASS_STATUS[0x0000][0] == STATUS_SUCCESS
    assert chosen, "no refusal statuses found"
    for name, code in chosen.items():
        assert STORAGE_SERVICE_CLASS_STATUS[code][0] == STATUS_FAILURE, (name, hex(code))
