"""DICOM series -> volume: geometry, ordering, rescale, units, multi-frame, errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.imaging.volume import VolumeError, load_series, volume_from_datasets

CT_SOP = "1.2.840.10008.5.1.4.1.1.2"


def _slice(pixels: np.ndarray, position, orientation=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.6), instance=1,
           series_uid="1.2.3.4", modality="CT", slope=1.0, intercept=0.0) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT_SOP
    ds.SOPClassUID = CT_SOP
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3", series_uid, "1.2.3.9"
    ds.Modality, ds.InstanceNumber = modality, instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = list(spacing)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def _stack(n=5, dz=2.5, orientation=(1, 0, 0, 0, 1, 0), origin=(10.0, -20.0, 30.0), **kw) -> list[Dataset]:
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    return [_slice(np.full((4, 6), 100 + k, np.uint16) + np.arange(6, dtype=np.uint16), np.array(origin) + k * dz * normal,
                   orientation, instance=n - k, **kw) for k in range(n)]


def _write(datasets, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
    return folder


def test_oblique_orientation_gives_direction_and_origin(tmp_path):
    c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
    iop = (c, s, 0.0, 0.0, 0.0, -1.0)  # oblique coronal-ish plane
    vol = load_series([_write(_stack(orientation=iop), tmp_path / "s")])
    direction = np.array(vol.image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction[:, 0], iop[:3]) and np.allclose(direction[:, 1], iop[3:])
    assert np.allclose(direction[:, 2], np.cross(iop[:3], iop[3:]))
    assert np.allclose(vol.image.GetSpacing(), (0.6, 0.8, 2.5))  # PixelSpacing is (row, column)
    assert np.allclose(vol.image.GetOrigin(), (10, -20, 30))
    # A voxel's physical point is the DICOM position of that slice/row/column.
    p = vol.image.TransformIndexToPhysicalPoint((2, 1, 3))
    expected = np.array([10, -20, 30]) + 2 * 0.6 * np.array(iop[:3]) + 1 * 0.8 * np.array(iop[3:]) + 3 * 2.5 * direction[:, 2]
    assert np.allclose(p, expected)


def test_sorted_by_position_not_instance_number_and_reversed_files(tmp_path):
    stack = _stack(n=6)  # InstanceNumber runs opposite to position
    vol = load_series([_write(stack[::-1], tmp_path / "s")])
    arr = vol.array
    assert [int(arr[k, 0, 0]) for k in range(6)] == [100 + k for k in range(6)]
    assert [float(h.ImagePositionPatient[2]) for h in vol.headers] == sorted(float(h.ImagePositionPatient[2]) for h in vol.headers)
    assert all("PixelData" not in h for h in vol.headers)


def test_negative_normal_stack_sorts_along_normal():
    # Positions decreasing in z while the normal is +z: order must still follow the normal.
    stack = _stack(n=4, dz=-3.0)
    vol = volume_from_datasets(stack)
    assert vol.image.GetSpacing()[2] == pytest.approx(3.0)
    assert vol.image.GetOrigin()[2] == pytest.approx(30 - 9.0)


def test_rescale_slope_intercept_applied():
    vol = volume_from_datasets(_stack(n=3, slope=2.0, intercept=-1024.0))
    assert vol.array[0, 0, 0] == pytest.approx(2 * 100 - 1024)
    assert vol.units == "HU" and vol.array.dtype == np.float32


def test_gap_and_uneven_spacing_are_errors():
    stack = _stack(n=6)
    with pytest.raises(VolumeError, match="gap"):
        volume_from_datasets(stack[:2] + stack[3:])
    uneven = _stack(n=5)
    uneven[3].ImagePositionPatient = [10.0, -20.0, 30 + 3 * 2.5 + 0.6]
    with pytest.raises(VolumeError, match="uneven"):
        volume_from_datasets(uneven)
    dup = _stack(n=3)
    with pytest.raises(VolumeError, match="share the position"):
        volume_from_datasets(dup + [copy.deepcopy(dup[1])])


def test_mixed_series_is_an_error():
    with pytest.raises(VolumeError, match="different series"):
        volume_from_datasets(_stack(n=2) + _stack(n=2, series_uid="9.9"))


def test_pet_bqml_converted_to_suv_bw():
    stack = _stack(n=3, modality="PT", slope=0.5)
    for ds in stack:
        ds.Units, ds.DecayCorrection, ds.PatientWeight, ds.SeriesTime = "BQML", "START", 80, "110000"
        info = Dataset()
        info.RadionuclideTotalDose, info.RadionuclideHalfLife, info.RadiopharmaceuticalStartTime = 400e6, 6586.2, "100000"
        ds.RadiopharmaceuticalInformationSequence = Sequence([info])
    vol = volume_from_datasets(stack)
    decayed = 400e6 * 2 ** (-3600 / 6586.2)
    assert vol.units == "SUVbw"
    assert vol.suv_factor == pytest.approx(80_000 / decayed)
    assert vol.array[0, 0, 0] == pytest.approx(0.5 * 100 * 80_000 / decayed, rel=1e-5)
    fresh = _stack(n=3, modality="PT")  # no dose or weight: stays Bq/ml, and says so
    for ds in fresh:
        ds.Units = "BQML"
    vol = volume_from_datasets(fresh)
    assert vol.units == "BQML" and "kept Bq/ml" in vol.units_note


def _emri(shared_data: Path) -> Path:
    path = shared_data / "dicom" / "pydicom_samples" / "emri_small.dcm"
    assert path.is_file()
    return path


def test_multiframe_without_functional_groups_is_a_clear_error(shared_data):
    with pytest.raises(VolumeError, match="functional groups"):
        load_series([_emri(shared_data)])


def test_multiframe_enhanced_with_functional_groups(shared_data, tmp_path):
    ds = pydicom.dcmread(_emri(shared_data))
    n = int(ds.NumberOfFrames)
    shared = Dataset()
    ori, meas = Dataset(), Dataset()
    ori.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    meas.PixelSpacing, meas.SliceThickness = [0.9, 0.7], 4.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([ori]), Sequence([meas])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i in range(n):
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 50.0 - 4.0 * ((i * 3) % n), 0.0]  # frames stored out of order
        item.PlanePositionSequence = Sequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.save_as(tmp_path / "mf.dcm")
    vol = load_series([tmp_path / "mf.dcm"])
    assert vol.image.GetSize() == (int(ds.Columns), int(ds.Rows), n)
    assert np.allclose(vol.image.GetSpacing(), (0.7, 0.9, 4.0))
    assert np.allclose(np.array(vol.image.GetDirection()).reshape(3, 3)[:, 2], (0, 1, 0))  # row x column = +y
    frames_in_z = [int(h.ReferencedFrameNumber) for h in vol.headers]
    assert sorted(frames_in_z) == list(range(1, n + 1)) and frames_in_z != list(range(1, n + 1))
    assert {h.SOPInstanceUID for h in vol.headers} == {ds.SOPInstanceUID}
    ys = [float(h.ImagePositionPatient[1]) for h in vol.headers]
    assert ys == sorted(ys)
    # Each z slice carries its own frame's pixels.
    first = int(vol.headers[0].ReferencedFrameNumber) - 1
    assert np.array_equal(vol.array[0], ds.pixel_array[first].astype(np.float32))


def test_sts_ct_pet_mr_load(sts_dir):
    vols = {m: load_series([sts_dir / m / "dicom" / "image"]) for m in ("CT", "PET", "MR_T1")}
    ct, pet, mr = vols["CT"], vols["PET"], vols["MR_T1"]
    assert ct.image.GetSize() == (161, 143, 48) and ct.units == "HU" and ct.array.min() == pytest.approx(-1000)
    assert pet.image.GetSize() == (30, 27, 48) and pet.units == "SUVbw"  # stored as GML
    assert 15 < float(pet.array.max()) < 30
    assert mr.image.GetSize() == (115, 90, 35) and mr.units == ""
    assert np.allclose(ct.image.GetSpacing(), (0.976562, 0.976562, 3.27), atol=1e-3)
    assert len({v.frame_of_reference_uid for v in vols.values()}) == 1
    assert len(ct.headers) == 48 and all("PixelData" not in h for h in ct.headers)
    # The PET and CT fields of view overlap in patient space (same scanner frame).
    assert abs(ct.image.GetOrigin()[2] - pet.image.GetOrigin()[2]) < 1.0


def _nm_recon(shape=(16, 48, 48)) -> Dataset:
    from dicomnode.testing.study import synthetic_datasets

    return synthetic_datasets(modalities=("NM",), shape=shape, seed=3)["NM"][0]


def test_nm_reconstruction_frames_placed_from_detector_geometry(tmp_path):
    from dicomnode.testing.study import PhantomSpec, write_synthetic_study

    paths = write_synthetic_study(tmp_path, modalities=("MR", "NM"), shape=(16, 48, 48), seed=3)
    nm, mr = load_series(paths["NM"]), load_series(paths["MR"])
    ds = pydicom.dcmread(paths["NM"][0])
    n = int(ds.NumberOfFrames)
    assert nm.image.GetSize() == (24, 24, n) == (24, 24, 8) and nm.modality == "NM"
    assert np.allclose(nm.image.GetSpacing(), (200 / 24, 200 / 24, 6.0))
    # The generator's coarse grid: first voxel centre at (-100 + px/2, -100 + px/2, fine z0 + 1.5 mm).
    assert np.allclose(nm.image.GetOrigin(), (-100 + 100 / 24, -100 + 100 / 24, -22.5 + 1.5), atol=1e-3)
    assert np.allclose(nm.image.GetDirection(), np.eye(3).ravel())
    assert [int(h.ReferencedFrameNumber) for h in nm.headers] == list(range(1, n + 1))
    assert {h.SOPInstanceUID for h in nm.headers} == {ds.SOPInstanceUID}
    assert all("PixelData" not in h and "NumberOfFrames" not in h for h in nm.headers)
    assert [float(h.ImagePositionPatient[2]) for h in nm.headers] == pytest.approx([-21.0 + 6.0 * k for k in range(n)])
    assert np.array_equal(nm.array, ds.pixel_array.astype(np.float32))
    # Physical check, independent of the grid arithmetic: the hot lesion sits where the phantom put it.
    arr = nm.array
    hot = np.argwhere(arr >= 0.6 * arr.max())
    centre = np.mean([nm.image.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]]) for idx in hot], axis=0)
    assert np.linalg.norm(centre - np.array(PhantomSpec().lesion_center_mm)) < 6.0
    # Same frame of reference as the MR, and the two fields of view coincide in z.
    assert nm.frame_of_reference_uid == mr.frame_of_reference_uid
    assert abs(nm.image.TransformIndexToPhysicalPoint((0, 0, n - 1))[2] - mr.image.TransformIndexToPhysicalPoint(
        (0, 0, mr.image.GetSize()[2] - 1))[2]) < 6.0


def test_nm_negative_spacing_and_slice_vector_give_the_same_volume():
    ref_ds = _nm_recon()
    reference = volume_from_datasets([copy.deepcopy(ref_ds)])
    n = int(ref_ds.NumberOfFrames)
    frames = ref_ds.pixel_array
    # Stacked from the last slice backwards: negative SpacingBetweenSlices, first plane at the top.
    flipped = copy.deepcopy(ref_ds)
    top = np.array(reference.headers[-1].ImagePositionPatient, float)
    flipped.DetectorInformationSequence[0].ImagePositionPatient = [float(v) for v in top]
    flipped.SpacingBetweenSlices = -float(ref_ds.SpacingBetweenSlices)
    flipped.PixelData = frames[::-1].astype(np.uint16).tobytes()
    vol = volume_from_datasets([flipped])
    assert np.array_equal(vol.array, reference.array)
    assert np.allclose(vol.image.GetOrigin(), reference.image.GetOrigin())
    assert [int(h.ReferencedFrameNumber) for h in vol.headers] == list(range(n, 0, -1))
    # Frames stored out of order, SliceVector says which slice each frame is.
    order = [(3 * i) % n for i in range(n)] if n % 3 else list(range(n))[::-1]
    shuffled = copy.deepcopy(ref_ds)
    shuffled.SliceVector = [k + 1 for k in order]
    shuffled.PixelData = frames[order].astype(np.uint16).tobytes()
    vol = volume_from_datasets([shuffled])
    assert np.array_equal(vol.array, reference.array)


def test_nm_without_reconstruction_geometry_is_a_clear_error():
    planar = _nm_recon()
    del planar.DetectorInformationSequence[0].ImagePositionPatient
    with pytest.raises(VolumeError, match="no plane position"):
        volume_from_datasets([planar])
    no_spacing = _nm_recon()
    del no_spacing.SpacingBetweenSlices, no_spacing.SliceThickness
    with pytest.raises(VolumeError, match="SpacingBetweenSlices"):
        volume_from_datasets([no_spacing])


def test_an_instance_without_rows_or_columns_is_named(tmp_path):
    """Its shape is read from the header before any slice is decoded: a clear error, not a KeyError."""
    for key in ("Rows", "Columns"):
        datasets = _stack(n=4)
        delattr(datasets[2], key)
        with pytest.raises(VolumeError, match=f"instance {datasets[2].InstanceNumber} has no {key}"):
            load_series([_write(datasets, tmp_path / key)])


def test_missing_unreadable_and_non_dicom_paths_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "0001.dcm"
    with pytest.raises(VolumeError, match="0001.dcm does not exist"):
        load_series([missing])
    folder = _write(_stack(n=4), tmp_path / "s")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(VolumeError, match="notes.txt is not a DICOM file"):
        load_series([*sorted(folder.iterdir()), text])
    whole = (folder / "000.dcm").read_bytes()
    pixel_tag = whole.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, little endian
    for cut in (pixel_tag, len(whole) - 10):  # before the pixel data; inside it
        truncated = tmp_path / f"cut{cut}.dcm"
        truncated.write_bytes(whole[:cut])
        with pytest.raises(VolumeError, match=f"cut{cut}.dcm"):
            load_series([*sorted(folder.iterdir())[1:], truncated])
    # A stray non-DICOM file inside a series folder is skipped (exports carry README files).
    (folder / "README").write_text("export notes")
    assert load_series([folder]).image.GetSize()[2] == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("x")
    with pytest.raises(VolumeError, match="no DICOM image instances in .*empty .*1 non-DICOM file"):
        load_series([empty])


def test_a_file_of_another_patient_or_study_is_refused_on_read(tmp_path):
    from dicomnode.identity import Identity

    files = []
    for k in range(3):
        ds = _slice(np.zeros((4, 4)), (0, 0, k), instance=k + 1)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = "DN-G", "Doe^Jane", "19600101"
        files.append(tmp_path / f"{k}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    expect = Identity("1.2.3", "1.2.3.4", "DN-G", "DOE^JANE^^", "19600101")  # name case and padding do not matter
    assert load_series(files, expect=expect).image.GetSize() == (4, 4, 3)
    ds = pydicom.dcmread(files[1])
    ds.PatientID, ds.StudyInstanceUID = "DN-H", "1.2.3.7"
    ds.save_as(files[1])
    with pytest.raises(VolumeError, match=r"1\.dcm: StudyInstanceUID, PatientID differ") as err:
        load_series(files, expect=expect)
    assert "DN-H" not in str(err.value) and "DN-G" not in str(err.value)


def _traced_load(folder: Path):
    import tracemalloc

    tracemalloc.start()
    try:
        vol = load_series([folder])
        return vol, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_loading_holds_a_few_slices_whatever_the_series_length(tmp_path):
    """Slices are decoded one at a time into the volume: never all encoded, nor as a second stack."""
    rng = np.random.default_rng(4)
    folders, expected = {}, {}
    for n in (3, 10, 40):
        slices = [_slice(rng.integers(0, 4000, (256, 256), dtype=np.uint16), (0.0, 0.0, 2.5 * k), instance=n - k,
                         slope=0.5, intercept=-1024.0) for k in range(n)]
        expected[n] = np.stack([s.pixel_array.astype(np.float32) * np.float32(0.5) + np.float32(-1024.0)
                                for s in slices])
        folders[n] = _write(slices, tmp_path / str(n))
    load_series([folders[3]])  # first-use allocations (decoders, caches) are not the series'
    peaks = {}
    for n in (10, 40):
        vol, peaks[n] = _traced_load(folders[n])
        assert np.array_equal(vol.array, expected[n])
        assert all("PixelData" not in h for h in vol.headers)
    # Python and NumPy memory at the peak (the volume itself lives in SimpleITK's) grows by a header
    # per slice, not by slices: it grew by 2.5 float slices per slice when all were decoded, then stacked.
    per_slice = (peaks[40] - peaks[10]) / 30
    assert per_slice < expected[10][0].nbytes / 4, f"{per_slice / 1024:.0f} KiB per slice"
