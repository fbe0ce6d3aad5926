"""Processing of one job: volumes -> registration -> resampling -> fusion -> quality -> encoding.

``process_job`` is the worker's default processing callable. It touches neither the network
nor the database: it reads spool files, writes the output series to the job's outbox and
returns a ``ProcessingOutput`` that the worker records (timings, registration report, metrics).
Heavy imports (torch, SimpleITK, highdicom) happen inside it, so the node starts fast.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.config import Config, PairingRule
from dicomnode.domain import CHROMA, FUNCTIONAL, READER_NAMES, luma, series_number
from dicomnode.log import event

if TYPE_CHECKING:
    from dicomnode.routing import SeriesRef
    from dicomnode.store.spool import Spool

log = logging.getLogger(__name__)

# Sampled slices prepared and scored at a time: quality memory stays bounded with max_slices = 0.
_QUALITY_SLICES = 16


@dataclass(frozen=True)
class JobInputs:
    """Everything processing needs for one job; files are spool paths of the received instances."""

    job_id: int
    rule: PairingRule
    method: str
    fixed: SeriesRef
    moving: SeriesRef
    fixed_files: list[Path]
    moving_files: list[Path]
    config: Config
    spool: Spool


@dataclass(frozen=True)
class OutputSeries:
    """One derived series written to the outbox, files in send order."""

    series_uid: str
    kind: str  # "fused" | "heatmap" | "saliency" | "displacement" | "registration" | "deformable_registration"
    files: list[Path]

    def describe(self) -> dict[str, Any]:
        return {"series_uid": self.series_uid, "kind": self.kind, "count": len(self.files), "files": [str(f) for f in self.files]}


@dataclass
class ProcessingOutput:
    """What a processed job produced. timings: stage -> seconds; per_slice/summary: metric values."""

    series: list[OutputSeries]
    timings: dict[str, float] = field(default_factory=dict)
    registration: dict[str, Any] = field(default_factory=dict)
    per_slice: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    quality_failures: list[str] = field(default_factory=list)  # metric names worse than their threshold
    # Source values the node had to change to encode legal outputs (e.g. a nonstandard PatientSex).
    input_changes: list[str] = field(default_factory=list)
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # stage -> process CPU seconds


class Stopwatch:
    """Per-stage wall-clock seconds, in stage order, and the process's CPU seconds (all threads) per stage.

    A stage entered inside another (resampling on demand inside fusion) is charged to itself
    alone: the outer stage's clock pauses meanwhile.
    """

    def __init__(self) -> None:
        self._wall: dict[str, float] = {}
        self._cpu: dict[str, float] = {}
        self._open: list[str] = []
        self._since = (0.0, 0.0)

    @property
    def seconds(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self._wall.items()}

    @property
    def cpu_seconds(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self._cpu.items()}

    def _charge(self) -> None:
        """The time since the last change goes to the innermost open stage."""
        now = (time.perf_counter(), time.process_time())
        if self._open:
            name = self._open[-1]
            self._wall[name] = self._wall.get(name, 0.0) + now[0] - self._since[0]
            self._cpu[name] = self._cpu.get(name, 0.0) + now[1] - self._since[1]
        self._since = now

    @contextmanager
    def stage(self, name: str):
        self._charge()
        self._open.append(name)
        try:
            yield
        finally:
            self._charge()
            self._open.pop()


def write_series(spool: Spool, job_id: int, datasets: list, kind: str) -> OutputSeries:
    """Write one derived series to the job's outbox; returns it with its files in instance order."""
    if not datasets:
        raise ValueError(f"{kind} series has no instances")
    series_uid = str(datasets[0].SeriesInstanceUID)
    folder = spool.outbox_dir(job_id, series_uid)
    files = [spool.write_dataset(ds, folder / f"{ds.SOPInstanceUID}.dcm") for ds in datasets]
    return OutputSeries(series_uid, kind, files)


def registration_report(reg) -> dict[str, Any]:
    """A JSON-able summary of a ``Registration`` for the Job row."""
    from dataclasses import asdict

    return {
        "skipped_reason": reg.skipped_reason,
        "initialization": getattr(reg, "initialization", ""),
        "seconds": round(float(getattr(reg, "seconds", 0.0)), 3),
        "transform": reg.transform.GetName() if reg.transform is not None else None,
        "stages": [asdict(s) for s in reg.stages],
        "deformable": reg.displacement_mm is not None,
    }


def _luma(rgb):
    """(N, 3, H, W) -> (N, H, W), BT.601 weights: the grey image metrics are computed on."""
    return luma(rgb[:, 0], rgb[:, 1], rgb[:, 2])


def reader_description(moving_modality: str, fixed_modality: str, moving_range) -> str:
    """A SeriesDescription a reader understands: "PET on CT fusion, SUV 0-16.7", "MR on CT fusion, MR 12-845"."""
    name = READER_NAMES.get(moving_modality, moving_modality)
    values = moving_range.describe() if moving_range.unit else f"{name} {moving_range.describe()}"
    return f"{name} on {READER_NAMES.get(fixed_modality, fixed_modality)} fusion, {values}"


def scale_text(method: str, fusion_config, moving_modality: str, moving_range, fixed_modality: str, fixed_range,
               placement) -> str:
    """The display scale for DerivationDescription: colour map, moving range, fixed window, colour bar."""
    if method == CHROMA:
        colours = f"colour map {fusion_config.chroma_colormap} as chroma on {fixed_modality} luminance"
    elif moving_modality in FUNCTIONAL:
        colours = f"colour map {fusion_config.colormap}"
    else:
        colours = "grey"
    where = f"colour bar in the {placement.side} margin" if placement else "no colour bar (no body-free margin)"
    what = "percentiles " if moving_range.kind == "percentile" and not moving_range.rule else ""
    rule = f" ({moving_range.rule})" if moving_range.rule else ""
    return (f"{colours}, {moving_modality} {what}{moving_range.describe()}{rule}; "
            f"{fixed_modality} {fixed_range.kind} {fixed_range.describe()}; {where}")


def warm_up() -> None:
    """Import the imaging, fusion and encoding stacks (seconds on a cold start) before a job waits on them."""
    import highdicom  # noqa: F401
    import SimpleITK  # noqa: F401
    import torch  # noqa: F401

    import dicomnode.dicomio.parametric_map  # noqa: F401
    import dicomnode.dicomio.secondary_capture  # noqa: F401
    import dicomnode.fusion.api  # noqa: F401
    import dicomnode.imaging.register  # noqa: F401
    import dicomnode.quality.metrics  # noqa: F401


def series_identity(ref: SeriesRef):
    """The identity every file of a job's series must carry (``dicomnode.identity.Identity``)."""
    from dicomnode.identity import Identity

    return Identity(ref.study_uid, ref.series_uid, ref.patient_id, ref.patient_name, ref.birth_date)


def write_stream(spool: Spool, job_id: int, datasets, kind: str) -> OutputSeries:
    """Write instances to the job's outbox as they come (each is let go once on disk)."""
    files, series_uid = [], ""
    for ds in datasets:
        series_uid = series_uid or str(ds.SeriesInstanceUID)
        files.append(spool.write_dataset(ds, spool.outbox_dir(job_id, series_uid) / f"{ds.SOPInstanceUID}.dcm"))
    if not files:
        raise ValueError(f"{kind} series has no instances")
    return OutputSeries(series_uid, kind, files)


def process_job(inputs: JobInputs) -> ProcessingOutput:
    """Fuse the moving series onto the fixed one and write the SC + Parametric Map series (see module).

    Resample, prepare, fuse and explain run slab by slab (``processing.slab_slices``,
    ``dicomnode.slabs``): no full-series float copy beyond the fixed volume.
    """
    watch = Stopwatch()
    with watch.stage("setup"):  # imports: near zero once warm_up ran
        warm_up()
    import numpy as np
    import SimpleITK as sitk
    import torch

    from dicomnode.dicomio.derived import normalise_patient_sex
    from dicomnode.dicomio.parametric_map import STORED_MAX, Quantised, build_parametric_map
    from dicomnode.dicomio.secondary_capture import FusedSeries
    from dicomnode.fusion.api import FusionEngine
    from dicomnode.fusion.color import colorize, luma
    from dicomnode.fusion.colorbar import bar_colours, render_bar
    from dicomnode.fusion.prepare import apply_range, intensity_range
    from dicomnode.imaging.body import body_mask
    from dicomnode.imaging.register import register_volumes
    from dicomnode.imaging.resample import field_of_view, moving_on_fixed
    from dicomnode.imaging.volume import load_series
    from dicomnode.quality.metrics import joined_quality, score_series, slices_per_call, threshold_failures
    from dicomnode.quality.sampling import select_from_profile
    from dicomnode.slabs import run_slabs, scaled_saliency, scratch_folder, slab_bounds

    cfg = inputs.config
    if cfg.processing.threads:
        torch.set_num_threads(cfg.processing.threads)
    with watch.stage("load"):
        fixed = load_series(inputs.fixed_files, expect=series_identity(inputs.fixed))
        moving = load_series(inputs.moving_files, expect=series_identity(inputs.moving))
        input_changes = normalise_patient_sex([*fixed.headers, *moving.headers])
    with watch.stage("register"):
        reg = register_volumes(fixed, moving, cfg.registration)
    with watch.stage("prepare"):
        fixed_arr = sitk.GetArrayViewFromImage(fixed.image)  # float32 (z, y, x), a view: no copy
        body = body_mask(fixed_arr, fixed.modality)
    with watch.stage("resample"):
        # Read slab by slab where needed, never held on the whole fixed grid. Chroma fades its colour
        # at the field-of-view edge; PET's display range is taken inside it.
        resampling = partial(watch.stage, "resample")
        needs_fov = inputs.method == CHROMA or moving.modality == "PT"
        fov = field_of_view(fixed, moving, reg.transform, stage=resampling) if needs_fov else None
        moving_on_grid = moving_on_fixed(fixed, moving, reg.transform, stage=resampling)
    with watch.stage("prepare"):
        body_part = str(fixed.headers[0].get("BodyPartExamined", "")) if fixed.headers else ""
        fixed_range = intensity_range(fixed_arr, fixed.modality, fixed.units, cfg.fusion, body_part=body_part)
        moving_range = intensity_range(moving_on_grid, moving.modality, moving.units, cfg.fusion, body_part=body_part,
                                       inside=fov)
        fov = fov if inputs.method == CHROMA else None  # only chroma reads it from here on
        coloured = moving.modality in FUNCTIONAL and inputs.method != CHROMA  # chroma brings its own colours
        colormap = cfg.fusion.colormap if coloured else None
        batch, slabs = slab_bounds(fixed_arr.shape[0], cfg.processing.slab_slices, cfg.fusion.batch_size)
        engine = FusionEngine(inputs.method, cfg.fusion.model_copy(update={"batch_size": batch}),
                              cfg.processing.device)
        # One colour bar, one place, one scale for the whole series, beside the body on every slice.
        bar = render_bar(fixed_arr.shape[1:3], body.any(axis=0),
                         bar_colours(inputs.method, moving.modality in FUNCTIONAL, cfg.fusion, moving.modality),
                         moving_range.low, moving_range.high, moving_range.unit)
        if bar is None:
            event(log, "colour_bar_omitted", job_id=inputs.job_id, reason="no_body_free_margin")
    with scratch_folder(inputs.spool.outbox / str(int(inputs.job_id))) as scratch:
        with watch.stage("fuse"):  # prepare -> fuse -> explain, slab by slab
            done = run_slabs(engine, fixed_arr, moving_on_grid, fov, body, fixed_range, moving_range,
                             colormap=colormap, modality=moving.modality, slabs=slabs, folder=Path(scratch),
                             bar=bar)
        with watch.stage("quality"):
            # Sampled as the whole series would be, then only the sampled slices are prepared again,
            # a few at a time (max_slices = 0 samples every slice with content).
            selection = select_from_profile(done.flat, done.signal, cfg.quality.max_slices)
            per_call = slices_per_call(fixed_arr.shape[1:])
            step = per_call * -(-_QUALITY_SLICES // per_call)  # whole calls: the values of one call
            parts = []
            for lo in range(0, max(1, len(selection.scored)), step):  # once when nothing is scored
                idx = np.asarray(selection.scored[lo:lo + step], dtype=np.intp)
                b_k = apply_range(moving_on_grid[idx], moving_range)
                b_seen = luma(colorize(torch.from_numpy(b_k), colormap))[:, 0].numpy() if colormap else b_k
                parts.append(score_series(apply_range(fixed_arr[idx], fixed_range) * 255.0, b_seen * 255.0,
                                          done.fused_luma.slices(idx), tuple(cfg.quality.metrics), max_slices=0,
                                          round_fused=cfg.quality.round_fused))
            sample = joined_quality(parts)
            quality = spread_quality(sample, selection, fixed_arr.shape[0])
            failures = threshold_failures(quality.summary, dict(cfg.quality.thresholds))
        with watch.stage("explain"):  # the saliency's series scale needs the body mask, encoding does not
            scaled_saliency(done, body, slabs)
        count = fixed_arr.shape[0]
        # Encoding needs the fixed grid's geometry, not its voxels: a whole-body float volume less.
        del moving_on_grid, fov, fixed_arr, body
        fixed = geometry_only(fixed)
        with watch.stage("encode"):
            scale = scale_text(inputs.method, cfg.fusion, moving.modality, moving_range, fixed.modality,
                               fixed_range, None if bar is None else bar[2])
            derivation = (
                f"{moving.modality} series resampled onto the {fixed.modality} grid "
                f"({reg.skipped_reason or 'registered: ' + ', '.join(s.name for s in reg.stages if s.kept)}) "
                f"and fused by method {done.method}; {scale}; series quality ({quality.scored} of "
                f"{count} slices) " + ", ".join(f"{k}={v:.4g}" for k, v in quality.summary.items())
            )
        with watch.stage("write"):  # SC instances are encoded and written one at a time
            sc = FusedSeries(fixed, moving, done.rgb, method=done.method, derivation=derivation,
                             series_number=series_number(inputs.job_id, "fused", cfg.output.series_number_base),
                             series_description=reader_description(moving.modality, fixed.modality, moving_range))
            series = [write_stream(inputs.spool, inputs.job_id, sc, "fused")]
        unit = 1.0 / STORED_MAX  # quantise's slope on the 0..1 range the maps were stored on
        # (kind, stage, values when needed, HeatmapKind name for quantity + unit, content label, description):
        # one map in memory at a time.
        maps = [("heatmap", "encode", lambda: Quantised(done.contribution.read(0, done.contribution.count), unit, 0.0),
                 "contribution", "HEATMAP", f"{moving.modality} contribution to fused image")]
        if done.peak is not None:
            maps.append(("saliency", "encode", lambda: Quantised(done.saliency.read(0, done.saliency.count), unit, 0.0),
                         "saliency", "SALIENCY", "Fusion saliency"))
        if reg.displacement_mm is not None:
            maps.append(("displacement", "encode", lambda: sitk.GetArrayViewFromImage(reg.displacement_mm),
                         "displacement", "DISPLACEMENT", "Registration displacement mm"))
        for kind, stage, values, quantity, label, description in maps:
            with watch.stage(stage):
                values = values()
            with watch.stage("encode"):
                pm = build_parametric_map(fixed, values, content_label=label, quantity=quantity,
                                          series_number=series_number(inputs.job_id, kind,
                                                                      cfg.output.series_number_base),
                                          series_description=description, sources=[fixed, moving],
                                          method=done.method)
            del values
            with watch.stage("write"):
                series.append(write_series(inputs.spool, inputs.job_id, [pm], kind))
            del pm
        method = done.method
        done.close()
    with watch.stage("registration_objects"):  # the registration itself, for planning systems and viewers
        from dicomnode.dicomio.registration import registration_objects

        numbers = {k: series_number(inputs.job_id, k, cfg.output.series_number_base)
                   for k in ("registration", "deformable_registration")}
        series += [write_series(inputs.spool, inputs.job_id, [ds], kind) for kind, ds in registration_objects(
            fixed, moving, reg, grid_mm=cfg.registration.dicom_grid_mm, series_numbers=numbers)]
    event(log, "job_processed", job_id=inputs.job_id, method=method, slices=count,
          slab_slices=slabs[0][1] - slabs[0][0], outputs=len(series), seconds=round(sum(watch.seconds.values()), 2))
    return ProcessingOutput(
        series=series,
        timings={**watch.seconds, "total_s": round(sum(watch.seconds.values()), 4)},
        registration=registration_report(reg),
        per_slice=[dict(d) for d in quality.per_slice],
        summary=dict(quality.summary),
        quality_failures=failures,
        input_changes=input_changes,
        cpu_seconds=dict(watch.cpu_seconds),
    )


def geometry_only(volume):
    """``volume`` with its voxels replaced by an empty image of the same grid (size, spacing, origin,
    direction): what encoding reads. A label image, which SimpleITK stores as runs: no voxel memory."""
    import dataclasses

    import SimpleITK as sitk

    shell = sitk.Image(volume.image.GetSize(), sitk.sitkLabelUInt8)
    shell.CopyInformation(volume.image)
    return dataclasses.replace(volume, image=shell)


def spread_quality(sample, selection, count: int):
    """The quality of the sampled slices as the whole series' quality: NaN rows for the others."""
    from dataclasses import replace

    nan = {name: float("nan") for name in sample.names}
    per_slice = [dict(nan) for _ in range(count)]
    for row, i in zip(sample.per_slice, selection.scored, strict=True):
        per_slice[i] = row
    return replace(sample, per_slice=per_slice, skipped=list(selection.blank), scored_slices=list(selection.scored))
