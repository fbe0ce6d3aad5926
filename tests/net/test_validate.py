"""The header-only read of received data sets: same answers as a full decode, without the pixels."""

from __future__ import annotations

import pytest
from pynetdicom.dsutils import encode as encode_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from dicomnode.net.validate import RejectedInstance, check_instance, read_header
from tests.net.conftest import make_ct


def encode(ds, implicit: bool) -> bytes:
    return encode_dataset(ds, implicit, True)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_header_read_stops_before_pixels_and_measures_them(syntax):
    ds = make_ct(rows=8, cols=8)
    stream = encode(ds, syntax == ImplicitVRLittleEndian)
    header, pixels = read_header(stream, syntax)
    assert "PixelData" not in header and header.SOPInstanceUID == ds.SOPInstanceUID
    assert pixels.keyword == "PixelData" and pixels.declared == pixels.available == 8 * 8 * 2
    info = check_instance(header, CTImageStorage, ds.SOPInstanceUID, syntax, header_only=True, pixels=pixels)
    assert info.series_uid == ds.SeriesInstanceUID and info.modality == "CT"


def test_header_read_sees_a_cut_stream_and_missing_pixels():
    ds = make_ct(rows=8, cols=8)
    stream = encode(ds, False)
    header, pixels = read_header(stream[:-10], ExplicitVRLittleEndian)
    assert pixels.available == pixels.declared - 10
    with pytest.raises(RejectedInstance, match="pixel data has 118 bytes, header needs 128"):
        check_instance(header, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, header_only=True, pixels=pixels)
    del ds.PixelData
    header, pixels = read_header(encode(ds, False), ExplicitVRLittleEndian)
    assert pixels is None
    with pytest.raises(RejectedInstance, match="no pixel data"):
        check_instance(header, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, header_only=True, pixels=pixels)


def test_compressed_syntaxes_are_left_to_the_full_decode():
    assert read_header(b"\x00" * 16, JPEGBaseline8Bit) is None
