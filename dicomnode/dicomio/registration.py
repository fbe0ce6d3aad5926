"""DICOM Spatial Registration and Deformable Spatial Registration objects (PS3.3 A.39, C.20).

highdicom has no builder for these IODs, so they are built with pydicom from the module tables.
Both objects live in the fixed series' frame of reference (the Registered RCS) and reference
the fixed and the moving series. Directions (PS3.3 C.20.2.1.1, C.20.3.1.1):

- Spatial Registration: each item's 4x4 matrix maps points of the item's frame of reference
  (the moving one: Source RCS) into the Registered RCS (fixed). SimpleITK's transform maps fixed
  points to moving points, so the matrix is the inverse of the node's linear transform.
- Deformable Spatial Registration: the pre-deformation matrix, then the grid's offsets, are
  applied to Registered RCS coordinates and address the sample point in the Source RCS: the
  direction of SimpleITK's transform. The node's A(x + b(x)) is written as the pre-deformation
  matrix A plus offsets D(x) = A(x + b(x)) - A(x) sampled on a regular grid.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from dicomnode import __version__
from dicomnode.dicomio.derived import (
    MANUFACTURER,
    EncodingError,
    _instances,
    code_item,
    common_instance_references,
    copy_anatomy,
    derived_series_description,
)
from dicomnode.imaging.volume import Volume

SPATIAL_REGISTRATION = "1.2.840.10008.5.1.4.1.1.66.1"
DEFORMABLE_SPATIAL_REGISTRATION = "1.2.840.10008.5.1.4.1.1.66.3"
_PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")  # Type 2: copied, empty if absent
_STUDY = ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_ORTHONORMAL_TOL = 1e-6


def homogeneous(transform: sitk.Transform) -> np.ndarray:
    """4x4 matrix of a SimpleITK matrix-offset transform: y = M (x - c) + t + c."""
    tx = _matrix_offset(transform)
    m = np.array(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c, t = np.array(tx.GetCenter()), np.array(tx.GetTranslation())
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = m, t + c - m @ c
    return out


def affine_from_homogeneous(matrix: np.ndarray) -> sitk.AffineTransform:
    out = sitk.AffineTransform(3)
    out.SetMatrix(np.asarray(matrix[:3, :3], dtype=np.float64).ravel().tolist())
    out.SetTranslation(np.asarray(matrix[:3, 3], dtype=np.float64).tolist())
    return out


def _matrix_offset(transform: sitk.Transform) -> sitk.Transform:
    if transform.GetName() == "CompositeTransform" and sitk.CompositeTransform(transform).GetNumberOfTransforms() == 1:
        transform = sitk.CompositeTransform(transform).GetNthTransform(0)
    for kind in (sitk.Euler3DTransform, sitk.AffineTransform, sitk.VersorRigid3DTransform, sitk.Similarity3DTransform):
        if transform.GetName() == kind.__name__:
            return kind(transform)
    if transform.GetName() in ("IdentityTransform", "TranslationTransform"):
        affine = sitk.AffineTransform(3)
        affine.SetTranslation(transform.TransformPoint((0.0, 0.0, 0.0)))
        return affine
    raise EncodingError(f"a {transform.GetName()} is not a rigid or affine transform")


def _is_rigid(matrix: np.ndarray) -> bool:
    m = matrix[:3, :3]
    return bool(np.allclose(m @ m.T, np.eye(3), atol=_ORTHONORMAL_TOL) and np.linalg.det(m) > 0)


def _ds(values: np.ndarray) -> list[DSfloat]:
    return [DSfloat(float(v), auto_format=True) for v in np.asarray(values).ravel()]


def _matrix_item(matrix: np.ndarray) -> Dataset:
    item = Dataset()
    item.FrameOfReferenceTransformationMatrixType = "RIGID" if _is_rigid(matrix) else "AFFINE"
    item.FrameOfReferenceTransformationMatrix = _ds(matrix)
    return item


def _image_content_based() -> Dataset:
    return code_item("125024", "DCM", "Image Content-based Alignment")  # CID 7100


class _RegistrationObject:
    """What both IODs share: patient, study, series, frame of reference, equipment, references."""

    sop_class_uid = ""
    label = ""

    def __init__(self, fixed: Volume, moving: Volume, series_number: int, description: str):
        for vol, role in ((fixed, "fixed"), (moving, "moving")):
            if not vol.headers:
                raise EncodingError(f"{role} series {vol.series_uid} has no headers to reference")
            if not vol.frame_of_reference_uid:
                raise EncodingError(f"{role} series {vol.series_uid} has no FrameOfReferenceUID")
        self.fixed, self.moving = fixed, moving
        self.series_number, self.description = series_number, description

    def _base(self) -> Dataset:
        h = self.fixed.headers[0]
        now = datetime.datetime.now()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = self.sop_class_uid, generate_uid()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        if "SpecificCharacterSet" in h:
            ds.SpecificCharacterSet = h.SpecificCharacterSet
        ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        for keyword in _PATIENT + _STUDY:
            setattr(ds, keyword, h.get(keyword, ""))
        ds.StudyInstanceUID = self.fixed.study_uid
        ds.Modality = "REG"
        ds.SeriesInstanceUID = generate_uid()
        ds.SeriesNumber = self.series_number
        ds.SeriesDescription = derived_series_description(self.description)
        copy_anatomy(ds, h)
        ds.FrameOfReferenceUID = self.fixed.frame_of_reference_uid
        ds.PositionReferenceIndicator = h.get("PositionReferenceIndicator", "")
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = MANUFACTURER
        ds.DeviceSerialNumber = "0"
        ds.SoftwareVersions = f"dicomnode {__version__}"
        ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
        ds.InstanceNumber = 1
        ds.ContentLabel = self.label
        ds.ContentDescription = f"{self.moving.modality or 'moving'} series registered onto the " \
                                f"{self.fixed.modality or 'fixed'} series"[:64]
        ds.ContentCreatorName = ""
        ds.update(common_instance_references(self.fixed.study_uid, [(self.fixed, self.fixed.headers),
                                                                    (self.moving, self.moving.headers)]))
        return ds

    @staticmethod
    def _images(vol: Volume) -> DicomSequence:
        return DicomSequence(_instances(vol.headers))


class SpatialRegistration(_RegistrationObject):
    """A Spatial Registration object for the node's linear transform (fixed -> moving points)."""

    sop_class_uid = SPATIAL_REGISTRATION
    label = "REGISTRATION"

    def __init__(self, fixed: Volume, moving: Volume, linear: sitk.Transform, *, series_number: int,
                 description: str = "Spatial registration"):
        super().__init__(fixed, moving, series_number, description)
        forward = homogeneous(linear)
        if not np.all(np.isfinite(forward)) or abs(np.linalg.det(forward[:3, :3])) < 1e-6:
            raise EncodingError("the registration's linear transform is degenerate (not invertible)")
        self.moving_to_fixed = np.linalg.inv(forward)  # C.20.2.1.1: Source RCS -> Registered RCS

    def build(self) -> Dataset:
        ds = self._base()
        items = []
        # The fixed series is the Registered RCS itself (identity); the moving item carries the result.
        for vol, matrix, method in ((self.fixed, np.eye(4), []), (self.moving, self.moving_to_fixed,
                                                                   [_image_content_based()])):
            registration = Dataset()
            registration.RegistrationTypeCodeSequence = DicomSequence(method)
            registration.MatrixSequence = DicomSequence([_matrix_item(matrix)])
            item = Dataset()
            item.FrameOfReferenceUID = vol.frame_of_reference_uid
            item.ReferencedImageSequence = self._images(vol)
            item.MatrixRegistrationSequence = DicomSequence([registration])
            items.append(item)
        ds.RegistrationSequence = DicomSequence(items)
        return ds


class DeformableSpatialRegistration(_RegistrationObject):
    """A Deformable Spatial Registration object for A(x + b(x)): pre-deformation matrix A, offsets on a grid."""

    sop_class_uid = DEFORMABLE_SPATIAL_REGISTRATION
    label = "DEFORMABLE"

    def __init__(self, fixed: Volume, moving: Volume, linear: sitk.Transform, deformation: sitk.Transform, *,
                 series_number: int, grid_mm: float, description: str = "Deformable spatial registration"):
        super().__init__(fixed, moving, series_number, description)
        if not grid_mm > 0:
            raise EncodingError(f"deformation grid spacing must be positive, not {grid_mm}")
        self.pre = homogeneous(linear)
        if not np.all(np.isfinite(self.pre)):
            raise EncodingError("the registration's linear transform is not finite")
        self.grid = deformation_grid(fixed.image, grid_mm)
        full = sitk.CompositeTransform([affine_from_homogeneous(self.pre), deformation])  # A(x + b(x))
        g = self.grid
        moved = sitk.TransformToDisplacementField(full, sitk.sitkVectorFloat64, g.GetSize(), g.GetOrigin(),
                                                  g.GetSpacing(), g.GetDirection())
        points = _grid_points(g)
        mapped = points + sitk.GetArrayFromImage(moved).reshape(-1, 3)
        linear_part = points @ self.pre[:3, :3].T + self.pre[:3, 3]
        self.offsets = (mapped - linear_part).astype(np.float32)  # (n, 3), x fastest, then y, then z
        if not np.all(np.isfinite(self.offsets)):
            raise EncodingError("the deformation has non-finite offsets")

    def build(self) -> Dataset:
        ds = self._base()
        fixed_item = Dataset()
        fixed_item.SourceFrameOfReferenceUID = self.fixed.frame_of_reference_uid
        fixed_item.ReferencedImageSequence = self._images(self.fixed)
        fixed_item.RegistrationTypeCodeSequence = DicomSequence([])
        moving_item = Dataset()
        moving_item.SourceFrameOfReferenceUID = self.moving.frame_of_reference_uid
        moving_item.ReferencedImageSequence = self._images(self.moving)
        moving_item.RegistrationTypeCodeSequence = DicomSequence([_image_content_based()])
        moving_item.PreDeformationMatrixRegistrationSequence = DicomSequence([_matrix_item(self.pre)])
        grid = Dataset()
        direction = np.array(self.grid.GetDirection()).reshape(3, 3)
        grid.ImagePositionPatient = _ds(self.grid.GetOrigin())
        grid.ImageOrientationPatient = _ds(np.concatenate([direction[:, 0], direction[:, 1]]))
        grid.GridDimensions = list(self.grid.GetSize())
        grid.GridResolution = [float(s) for s in self.grid.GetSpacing()]
        grid.VectorGridData = self.offsets.astype("<f4").tobytes()
        moving_item.DeformableRegistrationGridSequence = DicomSequence([grid])
        ds.DeformableRegistrationSequence = DicomSequence([fixed_item, moving_item])
        return ds


def deformation_grid(reference: sitk.Image, grid_mm: float) -> sitk.Image:
    """A grid covering ``reference``'s voxel centres, ``grid_mm`` apart (at most the voxel size finer),
    on axes row, column, row x column (the DICOM grid convention)."""
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    axes = np.column_stack([direction[:, 0], direction[:, 1], np.cross(direction[:, 0], direction[:, 1])])
    size = np.array(reference.GetSize()) - 1
    corners = np.array([reference.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)])
                        for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])])
    local = corners @ axes  # coordinates along the grid axes
    lo, hi = local.min(0), local.max(0)
    spacing = np.maximum(np.array(reference.GetSpacing()), grid_mm)
    dims = np.maximum(2, np.ceil((hi - lo) / spacing - 1e-9).astype(int) + 1)
    grid = sitk.Image([int(d) for d in dims], sitk.sitkUInt8)
    grid.SetOrigin((axes @ lo).tolist())
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(axes.ravel().tolist())
    return grid


def _grid_points(grid: sitk.Image) -> np.ndarray:
    nx, ny, nz = grid.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    index = np.column_stack([i.ravel(), j.ravel(), k.ravel()]) * np.array(grid.GetSpacing())
    return np.array(grid.GetOrigin()) + index @ np.array(grid.GetDirection()).reshape(3, 3).T


def registration_objects(fixed: Volume, moving: Volume, registration, *, series_numbers: dict[str, int],
                         grid_mm: float) -> list[tuple[str, Dataset]]:
    """(kind, dataset) for a job that registered: "registration" always, "deformable_registration" when
    a deformable stage was kept; none when registration was skipped or held to the identity."""
    if registration.skipped_reason is not None:
        return []
    composite = sitk.CompositeTransform(registration.transform)
    linear = composite.GetNthTransform(0)
    out = [("registration", SpatialRegistration(fixed, moving, linear,
                                                series_number=series_numbers["registration"]).build())]
    if registration.displacement_mm is not None and composite.GetNumberOfTransforms() > 1:
        deformable = DeformableSpatialRegistration(fixed, moving, linear, composite.GetNthTransform(1),
                                                   series_number=series_numbers["deformable_registration"],
                                                   grid_mm=grid_mm)
        out.append(("deformable_registration", deformable.build()))
    return out


def read_spatial_registration(ds: Dataset, item: int = -1) -> sitk.AffineTransform:
    """The fixed -> moving transform (SimpleITK direction) of one Registration Sequence item."""
    matrix = ds.RegistrationSequence[item].MatrixRegistrationSequence[0].MatrixSequence[0]
    to_registered = np.array([float(v) for v in matrix.FrameOfReferenceTransformationMatrix]).reshape(4, 4)
    return affine_from_homogeneous(np.linalg.inv(to_registered))


def read_deformable_registration(ds: Dataset, item: int = -1) -> sitk.Transform:
    """Registered -> source transform of one Deformable Registration Sequence item, as SimpleITK applies it:
    post(pre(x) + D(x)), with D linearly interpolated on the grid (exact for pre(x) - x, an affine map)."""
    reg = ds.DeformableRegistrationSequence[item]
    pre = _read_matrix(reg, "PreDeformationMatrixRegistrationSequence")
    post = _read_matrix(reg, "PostDeformationMatrixRegistrationSequence")
    g = reg.DeformableRegistrationGridSequence[0]
    dims = [int(v) for v in g.GridDimensions]
    iop = np.array([float(v) for v in g.ImageOrientationPatient])
    axes = np.column_stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])])
    offsets = np.frombuffer(g.VectorGridData, dtype="<f4").astype(np.float64).reshape(dims[2], dims[1], dims[0], 3)
    grid = sitk.Image(dims, sitk.sitkUInt8)
    grid.SetOrigin([float(v) for v in g.ImagePositionPatient])
    grid.SetSpacing([float(v) for v in g.GridResolution])
    grid.SetDirection(axes.ravel().tolist())
    points = _grid_points(grid).reshape(dims[2], dims[1], dims[0], 3)
    field = points @ pre[:3, :3].T + pre[:3, 3] + offsets - points  # T(x) = x + field(x)
    image = sitk.GetImageFromArray(field, isVector=True)
    image.CopyInformation(grid)
    displacement = sitk.DisplacementFieldTransform(image)
    if np.allclose(post, np.eye(4)):
        return displacement
    return sitk.CompositeTransform([affine_from_homogeneous(post), displacement])


def _read_matrix(item: Dataset, keyword: str) -> np.ndarray:
    if keyword not in item or not item[keyword].value:
        return np.eye(4)
    values = item[keyword].value[0].FrameOfReferenceTransformationMatrix
    return np.array([float(v) for v in values]).reshape(4, 4)


__all__: Sequence[str] = (
    "DEFORMABLE_SPATIAL_REGISTRATION", "SPATIAL_REGISTRATION", "DeformableSpatialRegistration",
    "SpatialRegistration", "read_deformable_registration", "read_spatial_registration", "registration_objects",
)
