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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.config import Config, PairingRule
from dicomnode.domain import CHROMA, FUNCTIONAL, READER_NAMES, luma, series_number
from dicomnode.log import event

if TYPE_CHECKING:
    from dicomnode.routing import SeriesRef
    from dicomnode.store.spool import Spool

log = logging.getLogger(__name__)


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


class Stopwatch:
    """Per-stage wall-clock seconds, in stage order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 4)


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
    """A SeriesDescription a reader understands: "PET on CT fusion, SUV 0-10", "MR on CT fusion, MR 12-845"."""
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
    what = "percentiles " if moving_range.kind == "percentile" else ""
    return (f"{colours}, {moving_modality} {what}{moving_range.describe()}; "
            f"{fixed_modality} {fixed_range.kind} {fixed_range.describe()}; {where}")


def in_body_scale(values, body):
    """``values`` zeroed outside ``body`` and divided by their series maximum inside it (one scale)."""
    import numpy as np

    inside = np.where(body, values, 0.0).astype(np.float32)
    peak = float(inside.max()) if inside.size else 0.0
    return inside / peak if peak > 0 else inside


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


def process_job(inputs: JobInputs) -> ProcessingOutput:
    """Fuse the moving series onto the fixed one and write the SC + Parametric Map series (see module)."""
    watch = Stopwatch()
    with watch.stage("setup"):  # imports: near zero once warm_up ran
        warm_up()
    import numpy as np
    import SimpleITK as sitk
    import torch

    from dicomnode.dicomio.derived import normalise_patient_sex
    from dicomnode.dicomio.parametric_map import build_parametric_map
    from dicomnode.dicomio.secondary_capture import build_fused_series
    from dicomnode.fusion.api import fuse
    from dicomnode.fusion.color import colorize
    from dicomnode.fusion.colorbar import bar_colours, burn_in, render_bar
    from dicomnode.fusion.prepare import intensity_range, prepare_intensities
    from dicomnode.imaging.body import body_mask
    from dicomnode.imaging.register import register_volumes
    from dicomnode.imaging.resample import field_of_view, resample_onto
    from dicomnode.imaging.volume import load_series
    from dicomnode.quality.metrics import score_series, threshold_failures

    cfg = inputs.config
    with watch.stage("load"):
        fixed = load_series(inputs.fixed_files, expect=series_identity(inputs.fixed))
        moving = load_series(inputs.moving_files, expect=series_identity(inputs.moving))
        input_changes = normalise_patient_sex([*fixed.headers, *moving.headers])
    with watch.stage("register"):
        reg = register_volumes(fixed, moving, cfg.registration)
    with watch.stage("resample"):
        moving_on_fixed = resample_onto(fixed, moving, reg.transform)
        fov = field_of_view(fixed, moving, reg.transform)
    with watch.stage("prepare"):
        fixed_arr = sitk.GetArrayFromImage(fixed.image).astype(np.float32)
        body = body_mask(fixed_arr, fixed.modality)
        body_part = str(fixed.headers[0].get("BodyPartExamined", "")) if fixed.headers else ""
        a = prepare_intensities(fixed_arr, fixed.modality, fixed.units, cfg.fusion, body_part=body_part)
        b = prepare_intensities(moving_on_fixed, moving.modality, moving.units, cfg.fusion, body_part=body_part)
        fixed_range = intensity_range(fixed_arr, fixed.modality, fixed.units, cfg.fusion, body_part=body_part)
        moving_range = intensity_range(moving_on_fixed, moving.modality, moving.units, cfg.fusion, body_part=body_part)
        a_t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        b_t = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
        coloured = moving.modality in FUNCTIONAL and inputs.method != CHROMA  # chroma brings its own colours
        moving_in = colorize(b_t, cfg.fusion.colormap) if coloured else b_t[:, None]
    with watch.stage("fuse"):
        result = fuse(a_t[:, None], moving_in, inputs.method, cfg.processing.device, fusion_config=cfg.fusion,
                      fov=torch.from_numpy(fov[:, None].astype(np.float32)), modality=moving.modality)
        fused = result.fused.detach().float().cpu().clamp(0, 1)
        if fused.shape[1] == 1:
            fused = fused.repeat(1, 3, 1, 1)
        # The maps explain the patient, not the air around them: zero outside the body.
        contribution = result.contribution.detach().float().cpu().numpy() * body
        saliency = None if result.saliency is None else in_body_scale(result.saliency.detach().float().cpu().numpy(), body)
    with watch.stage("quality"):
        # A colour-mapped moving image enters the blend by its colours: score it by their luminance.
        b_seen = _luma(moving_in).numpy() if moving_in.shape[1] == 3 else b
        quality = score_series(a * 255.0, b_seen * 255.0, _luma(fused).numpy() * 255.0, tuple(cfg.quality.metrics),
                               max_slices=cfg.quality.max_slices, round_fused=cfg.quality.round_fused)
        failures = threshold_failures(quality.summary, dict(cfg.quality.thresholds))
    with watch.stage("encode"):
        rgb = (fused.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        # One colour bar, one place, one scale for the whole series, beside the body on every slice.
        bar = render_bar(rgb.shape[1:3], body.any(axis=0),
                         bar_colours(inputs.method, moving.modality in FUNCTIONAL, cfg.fusion, moving.modality),
                         moving_range.low, moving_range.high, moving_range.unit)
        if bar is not None:
            burn_in(rgb, bar[0], bar[1])
        else:
            event(log, "colour_bar_omitted", job_id=inputs.job_id, reason="no_body_free_margin")
        scale = scale_text(inputs.method, cfg.fusion, moving.modality, moving_range, fixed.modality, fixed_range,
                           None if bar is None else bar[2])
        derivation = (
            f"{moving.modality} series resampled onto the {fixed.modality} grid "
            f"({reg.skipped_reason or 'registered: ' + ', '.join(s.name for s in reg.stages if s.kept)}) "
            f"and fused by method {result.method}; {scale}; series quality ({quality.scored} of {rgb.shape[0]} slices) "
            + ", ".join(f"{k}={v:.4g}" for k, v in quality.summary.items())
        )
        sc = build_fused_series(fixed, moving, rgb, method=result.method, derivation=derivation,
                                series_number=series_number(inputs.job_id, "fused", cfg.output.series_number_base),
                                series_description=reader_description(moving.modality, fixed.modality, moving_range))
        # (kind, values, HeatmapKind name for quantity + unit, content label, description)
        maps = [("heatmap", contribution, "contribution", "HEATMAP",
                 f"{moving.modality} contribution to fused image")]
        if saliency is not None:
            maps.append(("saliency", saliency, "saliency", "SALIENCY", "Fusion saliency"))
        if reg.displacement_mm is not None:
            maps.append(("displacement", sitk.GetArrayFromImage(reg.displacement_mm).astype(np.float32),
                         "displacement", "DISPLACEMENT", "Registration displacement mm"))
        pms = [
            (kind, build_parametric_map(fixed, values, content_label=label, quantity=quantity,
                                        series_number=series_number(inputs.job_id, kind, cfg.output.series_number_base), series_description=description,
                                        sources=[fixed, moving], method=result.method))
            for kind, values, quantity, label, description in maps
        ]
    with watch.stage("write"):
        series = [write_series(inputs.spool, inputs.job_id, sc, "fused")]
        series += [write_series(inputs.spool, inputs.job_id, [pm], kind) for kind, pm in pms]
    with watch.stage("registration_objects"):  # the registration itself, for planning systems and viewers
        from dicomnode.dicomio.registration import registration_objects

        series += [write_series(inputs.spool, inputs.job_id, [ds], kind) for kind, ds in registration_objects(
            fixed, moving, reg, grid_mm=cfg.registration.dicom_grid_mm,
            series_numbers={k: series_number(inputs.job_id, k, cfg.output.series_number_base) for k in ("registration", "deformable_registration")})]
    event(log, "job_processed", job_id=inputs.job_id, method=result.method, slices=rgb.shape[0], outputs=len(series),
          seconds=round(sum(watch.seconds.values()), 2))
    return ProcessingOutput(
        series=series,
        timings={**watch.seconds, "total_s": round(sum(watch.seconds.values()), 4)},
        registration=registration_report(reg),
        per_slice=[dict(d) for d in quality.per_slice],
        summary=dict(quality.summary),
        quality_failures=failures,
        input_changes=input_changes,
    )
