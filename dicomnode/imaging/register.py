"""Align a moving volume onto a fixed one: rigid -> affine -> deformable (SimpleITK).

Speed comes from a shared image pyramid in millimetres (each stage picks its levels, none finer
than the moving image's voxels), a fixed number of random metric samples per level inside a fixed
body mask, and a coarse B-spline grid (optimised one level finer than the affine stage). Safety
comes from checking every stage on an independent random sample of voxels (another seed, at the
finest level used) and falling back to the previous transform when the stage did not improve
mutual information there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from dicomnode.config import RegistrationConfig
from dicomnode.domain import FUNCTIONAL
from dicomnode.imaging.prepare import body_mask, level_image, modality, prepare, split_heldout
from dicomnode.imaging.volume import Volume
from dicomnode.log import event

log = logging.getLogger(__name__)

_HELDOUT_SEED_OFFSET = 7919  # the held-out sample must not be the optimiser's sample
_UINT32 = 2**32 - 1  # SimpleITK seeds are uint32


class RegistrationFailed(Exception):
    """The volumes cannot be aligned reliably; the message is meant for a PACS administrator."""


@dataclass
class StageReport:
    name: str  # "rigid", "affine", "deformable"
    metric_before: float  # held-out Mattes MI (lower is better, SimpleITK sign)
    metric_after: float
    kept: bool  # False: the stage did not improve the held-out metric; previous transform used
    iterations: int
    seconds: float
    note: str = ""
    levels_mm: tuple[float, ...] = ()  # pyramid voxel sizes this stage ran at
    samples: int = 0  # metric samples per level (the optimiser's; 0: not run)
    cpu_seconds: float = 0.0  # the process's CPU time during the stage, all threads


@dataclass
class Registration:
    """``transform`` maps fixed-space points (LPS mm) to moving-space points, as sitk.Resample uses."""

    transform: sitk.Transform
    stages: list[StageReport] = field(default_factory=list)
    skipped_reason: str | None = None  # e.g. "same FrameOfReferenceUID"
    # |deformable part| in mm on the fixed grid; None when no deformable stage was kept.
    displacement_mm: sitk.Image | None = None
    initialization: str = ""  # "identity", "geometry" or "moments" (the start the rigid stage used)
    seconds: float = 0.0  # wall time of the whole registration
    modalities: tuple[str, str] = ("", "")  # (fixed, moving) as the stages saw them; "" = unknown
    # The whole mapping each stage that ran but was not kept proposed (benchmarks score what was refused).
    rejected: dict[str, sitk.Transform] = field(default_factory=dict)

    @property
    def fallbacks(self) -> list[str]:
        """Names of stages that ran but were not kept."""
        return [s.name for s in self.stages if not s.kept]


@dataclass
class _Level:
    mm: float
    fixed: sitk.Image
    moving: sitk.Image
    mask: sitk.Image  # where the optimiser samples: the body, less the held-out voxels
    mask_voxels: int
    body: sitk.Image  # the whole body mask (overlap checks)
    heldout: sitk.Image | None = None  # voxels set aside for the stage checks (finest level only)


def register_volumes(fixed: Volume, moving: Volume, config: RegistrationConfig) -> Registration:
    """Register ``moving`` onto ``fixed`` with the configured stages (auto: skip on shared frame).

    Raises RegistrationFailed (single slice, degenerate spacing, no or too little overlap).
    """
    start = time.perf_counter()
    skip = None
    if config.mode == "never" or not config.stages:
        skip = "registration disabled by configuration"
    elif (config.mode == "auto" and fixed.frame_of_reference_uid
            and fixed.frame_of_reference_uid == moving.frame_of_reference_uid):
        skip = "same FrameOfReferenceUID"
    for vol, role in ((fixed, "fixed"), (moving, "moving")):
        _check_geometry(vol, role, config, registering=skip is None)
    # Even when only resampling: disjoint fields of view can never make a valid fusion.
    _check_raw_overlap(fixed.image, moving.image)
    if skip is not None:
        event(log, "registration_skipped", reason=skip)
        return Registration(sitk.Transform(3, sitk.sitkIdentity), skipped_reason=skip,
                            seconds=time.perf_counter() - start)

    engine = _Engine(prepare(fixed, config), prepare(moving, config), fixed, moving, config)
    result = engine.run()
    if engine.same_frame:
        _hold_scanner_alignment(engine, result)
    result.seconds = time.perf_counter() - start
    event(log, "registration_done", seconds=round(result.seconds, 1),
          stages=",".join(s.name for s in result.stages if s.kept) or "none", fallbacks=",".join(result.fallbacks) or "none")
    return result


def _hold_scanner_alignment(engine: _Engine, result: Registration) -> None:
    """Series in one frame of reference are aligned by the scanner: keep the identity unless the
    registration gains clearly on the held-out voxels (MI's own optimum can lie mm away from the
    truth: the aligned STS_002 PET/CT drifted 5-6.5 mm for a 5-10 % gain)."""
    identity = engine.heldout(sitk.Euler3DTransform())
    final = engine.heldout(result.transform)
    gain = (identity - final) / abs(identity) if np.isfinite(final) and identity else 0.0
    need = engine.cfg.same_frame_min_improvement
    if gain > need:
        return
    result.transform = sitk.Transform(3, sitk.sitkIdentity)
    result.displacement_mm = None
    result.skipped_reason = (f"same FrameOfReferenceUID: held-out MI gain {100 * gain:.1f} % is not above "
                             f"registration.same_frame_min_improvement ({100 * need:g} %); scanner alignment kept")
    event(log, "registration_held", gain=round(gain, 4), threshold=need)


def _check_geometry(vol: Volume, role: str, config: RegistrationConfig, registering: bool) -> None:
    """Refuse volumes that cannot be fused; the size minimums apply only when the optimiser runs."""
    img = vol.image
    size, spacing = img.GetSize(), np.array(img.GetSpacing())
    if img.GetDimension() != 3:
        raise RegistrationFailed(f"the {role} series is not a 3-D volume")
    if size[2] < 2:
        raise RegistrationFailed(f"the {role} series has {size[2]} slice(s); fusion needs a 3-D volume")
    if registering and size[2] < config.min_slices:
        raise RegistrationFailed(f"the {role} series has {size[2]} slice(s); 3-D registration needs at least "
                                 f"{config.min_slices}")
    if not np.all(np.isfinite(spacing)) or spacing.min() <= 1e-3 or spacing.max() > 100:
        raise RegistrationFailed(f"the {role} series has degenerate voxel spacing {tuple(spacing.round(4))} mm")
    det = np.linalg.det(np.array(img.GetDirection()).reshape(3, 3))
    if abs(abs(det) - 1) > 1e-3:
        raise RegistrationFailed(f"the {role} series has a degenerate orientation (axes not orthonormal)")
    if registering and int(np.prod(size)) < 8 * config.min_overlap_voxels:
        raise RegistrationFailed(f"the {role} series has only {int(np.prod(size))} voxels, too few to register")


def _corners(img: sitk.Image) -> np.ndarray:
    size = np.array(img.GetSize()) - 1
    idx = [(i, j, k) for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])]
    return np.array([img.TransformContinuousIndexToPhysicalPoint([float(v) for v in c]) for c in idx])


def _check_raw_overlap(fixed: sitk.Image, moving: sitk.Image) -> None:
    """Same-patient series share roughly one patient coordinate system; disjoint boxes cannot be fused."""
    fa, ma = _corners(fixed), _corners(moving)
    lo, hi = np.maximum(fa.min(0), ma.min(0)), np.minimum(fa.max(0), ma.max(0))
    if np.any(hi <= lo):
        gap = float(np.linalg.norm(np.maximum(lo - hi, 0)))
        raise RegistrationFailed(f"the moving series does not overlap the fixed field of view ({gap:.0f} mm apart "
                                 "in patient coordinates): different body region or patient?")


class _Engine:
    """One registration run: pyramid cache, stage chain, held-out checks."""

    def __init__(self, fixed: sitk.Image, moving: sitk.Image, fixed_vol: Volume, moving_vol: Volume,
                 config: RegistrationConfig):
        self.fixed, self.moving, self.cfg = fixed, moving, config
        self.fixed_modality, self.moving_modality = modality(fixed_vol), modality(moving_vol)
        self.same_frame = bool(fixed_vol.frame_of_reference_uid) and \
            fixed_vol.frame_of_reference_uid == moving_vol.frame_of_reference_uid
        # The deformable stage (and an anatomical pair's every stage) runs no finer than the moving voxels
        # (geometric mean). A functional image's rigid and affine stages go below its voxels: the fixed
        # image keeps its edges, the blurred moving image is interpolated, and the samples cost the same.
        # Coarse PET-like affines ended 0.10-0.13 mm from the best affine fit that way, 0.07-0.36 mm at
        # the PET voxels (docs/benchmarks.md).
        self.floor_mm = float(np.prod(moving.GetSpacing()) ** (1 / 3))
        self.functional = self.moving_modality in FUNCTIONAL
        self._levels: dict[float, _Level] = {}
        used = [lv for st in config.stages for lv in self._stage_levels(st)]
        self.eval_level = self.level(min(used), heldout=True)
        self.deformable_skip = self._deformable_skip()

    def _deformable_skip(self) -> str:
        """Why the deformable stage will not run for this pair ("" when it will)."""
        pair = (self.fixed_modality, self.moving_modality)
        if "deformable" not in self.cfg.stages:
            return "not configured"
        if not all(m in self.cfg.deformable_modalities for m in pair):
            return (f"{pair[1] or 'unknown'} onto {pair[0] or 'unknown'} is not a pair of "
                    "registration.deformable_modalities")
        finest = min(self._stage_levels("deformable"))
        if finest > self.cfg.deformable_max_level_mm:
            return f"finest level {finest:g} mm is coarser than registration.deformable_max_level_mm"
        return ""

    def _stage_levels(self, stage: str) -> tuple[float, ...]:
        raw = getattr(self.cfg, f"{stage}_levels_mm")
        floor = 0.0 if self.functional and stage != "deformable" else self.floor_mm
        out: list[float] = []
        for mm in raw:
            mm = round(max(mm, floor), 3)
            if mm not in out:
                out.append(mm)
        return tuple(out)

    def level(self, mm: float, heldout: bool = False) -> _Level:
        if mm not in self._levels:
            f = level_image(self.fixed, mm)
            body = body_mask(f)
            mask, held, count = body, None, int(sitk.GetArrayViewFromImage(body).sum())
            if heldout:
                mask, held, count = split_heldout(body, self.cfg.heldout_samples,
                                                   sampler_seed(self.cfg.seed, _HELDOUT_SEED_OFFSET))
            self._levels[mm] = _Level(mm, f, level_image(self.moving, mm), mask, count, body, held)
        return self._levels[mm]

    def _metric(self, mask: sitk.Image, threaded: bool = False) -> sitk.ImageRegistrationMethod:
        """A registration method with our metric (Mattes MI inside ``mask``) and interpolator.

        Not ``threaded``: one work unit. ITK adds each thread's share of the Mattes MI gradient into one
        buffer in whatever order the threads take a lock, so a threaded run differs in the last digits
        from process to process, and the linear stages' line searches turn that into different optima
        (4e-5 of MI, 0.09 mm at the end of the chain). On one work unit they are bit-identical.
        """
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsMattesMutualInformation(self.cfg.histogram_bins)
        r.SetMetricFixedMask(mask)
        r.SetInterpolator(sitk.sitkLinear)
        threads = (self.cfg.threads or sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()) if threaded else 1
        r.SetNumberOfThreads(threads)
        r.SetNumberOfWorkUnits(threads)
        return r

    def _method(self, level: _Level, samples: int, seed: int, threaded: bool = False) -> sitk.ImageRegistrationMethod:
        r = self._metric(level.mask, threaded)
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(min(1.0, samples / max(1, level.mask_voxels)), seed)
        return r

    def heldout(self, transform: sitk.Transform) -> float:
        """Mattes MI of ``transform`` on the held-out voxels; +inf when too few of them overlap."""
        lv = self.eval_level
        r = self._metric(lv.heldout, threaded=True)  # a value alone: each work unit's histogram, summed in order
        # Every held-out voxel (MetricEvaluate ignores a sampling strategy: the mask is the sample).
        r.SetMetricSamplingStrategy(r.NONE)
        r.SetMovingInitialTransform(transform)
        r.SetInitialTransform(sitk.TranslationTransform(3), inPlace=False)
        try:
            return float(r.MetricEvaluate(lv.fixed, lv.moving))
        except RuntimeError:
            return float("inf")

    def overlap_voxels(self, transform: sitk.Transform) -> int:
        lv = self.eval_level
        ones = sitk.Image(lv.moving.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(lv.moving)
        inside = sitk.Resample(ones, lv.body, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        return int(sitk.GetArrayFromImage(inside * lv.body).sum())

    def initial(self) -> tuple[str, sitk.Euler3DTransform]:
        lv = self.level(self._stage_levels("rigid")[0] if "rigid" in self.cfg.stages else self.eval_level.mm)
        names = ("identity", "geometry", "moments") if self.cfg.initialization == "auto" else (self.cfg.initialization,)
        if self.same_frame:  # the scanner's alignment is the start
            names = ("identity",)
        best: tuple[float, str, sitk.Euler3DTransform] | None = None
        for name in names:
            tx = sitk.Euler3DTransform()
            if name != "identity":
                mode = sitk.CenteredTransformInitializerFilter.GEOMETRY if name == "geometry" else \
                    sitk.CenteredTransformInitializerFilter.MOMENTS
                tx = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(lv.fixed, lv.moving, tx, mode))
            else:
                tx.SetCenter(lv.fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in lv.fixed.GetSize()]))
            value = self.heldout(tx) if len(names) > 1 else 0.0
            if best is None or value < best[0]:
                best = (value, name, tx)
        assert best is not None
        return best[1], best[2]

    def _level_method(self, stage: str, lv: _Level, seed: int, n_iter: int) -> sitk.ImageRegistrationMethod:
        cfg = self.cfg
        deformable = stage == "deformable"
        r = self._method(lv, cfg.deformable_samples_per_level if deformable else cfg.samples_per_level, seed,
                         threaded=deformable)
        if deformable:
            r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=n_iter,
                                   maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=2 * n_iter,
                                   costFunctionConvergenceFactor=1e7,
                                   lowerBound=-cfg.bspline_max_displacement_mm,
                                   upperBound=cfg.bspline_max_displacement_mm)
        else:
            # Scales from physical shift make a unit step ~1 mm; each step is bounded by half a level
            # voxel (an unbounded descent once diverged on an affine stage).
            r.SetOptimizerAsConjugateGradientLineSearch(learningRate=1.0, numberOfIterations=n_iter,
                                                        convergenceMinimumValue=1e-6, convergenceWindowSize=10,
                                                        lineSearchUpperLimit=2.0,
                                                        maximumStepSizeInPhysicalUnits=lv.mm / 2)
            r.SetOptimizerScalesFromPhysicalShift()
        return r

    def optimise(self, stage: str, linear: sitk.Transform | None, tx: sitk.Transform) -> tuple[int, list[str]]:
        """Optimise ``tx`` in place over the stage's pyramid levels; returns total iterations and notes.

        A level whose optimiser stops far short of its budget without converging (L-BFGS-B's line
        search gives up after a few iterations) is restarted once from where it stopped, with the rest
        of the budget; the stage note says so, and says when the restart stopped early too.
        """
        cfg, iterations, notes = self.cfg, 0, []
        budget = getattr(cfg, f"{stage}_iterations")
        for i, mm in enumerate(self._stage_levels(stage)):
            lv, done = self.level(mm), 0
            for attempt in range(2):
                r = self._level_method(stage, lv, sampler_seed(cfg.seed, i + attempt * 101), budget - done)
                if linear is not None:
                    r.SetMovingInitialTransform(linear)
                r.SetInitialTransform(tx, inPlace=True)
                r.Execute(lv.fixed, lv.moving)
                ran, stop = r.GetOptimizerIteration(), r.GetOptimizerStopConditionDescription().strip()
                done += ran
                event(log, "registration_level", logging.DEBUG, stage=stage, mm=mm, iterations=ran, stop=stop)
                if not stopped_early(done, budget, stop):
                    if attempt:
                        notes.append(f"restarted at {mm:g} mm after an early stop; {done} of {budget} iterations")
                    break
                if attempt:
                    notes.append(f"optimiser stopped early at {mm:g} mm even after a restart: {done} of {budget} "
                                 f"iterations ({stop.split(':')[-1].strip()})")
            iterations += done
        # A following B-spline absorbs an anatomical pair's affine residual: there the polish is only worth
        # its time without one. A functional pair's deformable stage may be refused: its affine is polished.
        polish = self.deformable_skip or self.functional
        if stage == "affine" and cfg.affine_polish_iterations and polish:
            iterations += self._polish(tx, self._stage_levels(stage)[-1])
        return iterations, notes

    def _polish(self, tx: sitk.Transform, mm: float) -> int:
        """Powell (value-only) sweeps from the gradient optimum, on a fresh sample at the finest level.

        The conjugate gradient stops where the analytic MI gradient flattens, short of the optimum of MI
        itself (PET-like cases: 2.42 -> 2.19 mm, docs/benchmarks.md). Kept only if the held-out metric improves.
        """
        lv = self.level(mm)
        levels = len(self._stage_levels("affine"))
        r = self._method(lv, self.cfg.samples_per_level, sampler_seed(self.cfg.seed, levels))
        r.SetOptimizerAsPowell(numberOfIterations=self.cfg.affine_polish_iterations, maximumLineIterations=20,
                               stepLength=mm / 2, stepTolerance=0.01, valueTolerance=1e-6)
        r.SetOptimizerScalesFromPhysicalShift()
        start, before = tx.GetParameters(), self.heldout(tx)
        r.SetInitialTransform(tx, inPlace=True)
        r.Execute(lv.fixed, lv.moving)
        after = self.heldout(tx)
        if not after < before:  # it fitted its own sample only
            tx.SetParameters(start)
        event(log, "registration_polish", logging.DEBUG, mm=mm, iterations=r.GetOptimizerIteration(), kept=after < before,
              stop=r.GetOptimizerStopConditionDescription().strip())
        return r.GetOptimizerIteration()

    def bspline(self) -> sitk.BSplineTransform:
        spacing_mm = self.cfg.bspline_spacing_mm
        if self.moving_modality in FUNCTIONAL:  # noisy, blurred: a fine grid fits noise
            spacing_mm = max(spacing_mm, 8 * max(self.moving.GetSpacing()))
        extent = [n * s for n, s in zip(self.fixed.GetSize(), self.fixed.GetSpacing())]
        mesh = [max(1, int(round(e / spacing_mm))) for e in extent]
        return sitk.BSplineTransformInitializer(self.fixed, mesh, 3)

    def run(self) -> Registration:
        init_name, init_tx = self.initial()
        linear: sitk.Transform = init_tx
        current_metric = self.heldout(linear)
        if self.overlap_voxels(linear) < self.cfg.min_overlap_voxels:
            raise RegistrationFailed(f"too few overlapping voxels between the fixed and moving series "
                                     f"(< {self.cfg.min_overlap_voxels} at {self.eval_level.mm:g} mm)")
        result = Registration(linear, initialization=init_name,
                              modalities=(self.fixed_modality, self.moving_modality))
        bspline: sitk.Transform | None = None
        for stage in self.cfg.stages:
            t0, c0 = time.perf_counter(), time.process_time()
            if stage == "deformable" and self.deformable_skip:
                result.stages.append(StageReport(stage, current_metric, current_metric, False, 0, 0.0,
                                                 self.deformable_skip))
                continue
            if stage == "rigid":
                candidate = sitk.Euler3DTransform(linear if isinstance(linear, sitk.Euler3DTransform) else init_tx)
            elif stage == "affine":
                candidate = _affine_from(linear)
            else:
                candidate = self.bspline()
            note, iterations = "", 0
            try:
                iterations, notes = self.optimise(stage, linear if stage == "deformable" else None, candidate)
                note = "; ".join(notes)
                full = sitk.CompositeTransform([linear, candidate]) if stage == "deformable" else candidate
                after = self.heldout(full)
            except RuntimeError as exc:
                after, full, note = float("inf"), None, f"optimiser error: {str(exc).strip().splitlines()[-1][:160]}"
            kept = after < current_metric - self.cfg.min_improvement * abs(current_metric)
            if not kept and "optimiser error" not in note:
                note = "; ".join(n for n in ("no held-out improvement; previous transform kept", note) if n)
            samples = self.cfg.deformable_samples_per_level if stage == "deformable" else self.cfg.samples_per_level
            report = StageReport(stage, current_metric, after, kept, iterations, time.perf_counter() - t0, note,
                                 self._stage_levels(stage), samples, time.process_time() - c0)
            result.stages.append(report)
            event(log, "registration_stage", stage=stage, kept=kept, metric_before=round(report.metric_before, 4),
                  metric_after=round(report.metric_after, 4), iterations=iterations, samples=samples,
                  seconds=round(report.seconds, 1), cpu_seconds=round(report.cpu_seconds, 1))
            if not kept and full is not None:
                result.rejected[stage] = full
            if kept:
                current_metric = after
                if stage == "deformable":
                    bspline = candidate
                else:
                    linear = candidate
        final = sitk.CompositeTransform([linear, bspline]) if bspline is not None else sitk.CompositeTransform([linear])
        if self.overlap_voxels(final) < self.cfg.min_overlap_voxels:
            raise RegistrationFailed("too few overlapping voxels after registration: most of the fixed series maps "
                                     "outside the moving series")
        result.transform = final
        if bspline is not None:
            result.displacement_mm = displacement_magnitude(bspline, self.fixed)
        return result


def sampler_seed(seed: int, offset: int) -> int:
    """A SimpleITK sampling seed that is never 0: 0 means "seed from the wall clock" (irreproducible)."""
    value = (seed + offset) % _UINT32
    return value or _UINT32


def stopped_early(iterations: int, budget: int, stop: str) -> bool:
    """The optimiser ended under half its iteration budget without a convergence criterion being met
    (L-BFGS-B: "Failure" of the line search, or a function-tolerance stall of the sampled metric)."""
    converged = any(k in stop.lower() for k in ("convergence checker passed", "gradient tolerance"))
    return iterations < budget // 2 and not converged


def _affine_from(tx: sitk.Transform) -> sitk.AffineTransform:
    """An affine transform equal to a rigid (or affine) one, same centre."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tx.GetCenter())
    affine.SetMatrix(tx.GetMatrix())
    affine.SetTranslation(tx.GetTranslation())
    return affine


def displacement_magnitude(deformation: sitk.Transform, reference: sitk.Image, grid_mm: float = 4.0) -> sitk.Image:
    """|T(x) - x| in mm on ``reference``'s grid, float32 (computed on a coarse grid, then interpolated)."""
    coarse = level_image(reference, grid_mm)
    field_img = sitk.TransformToDisplacementField(deformation, sitk.sitkVectorFloat64, coarse.GetSize(),
                                                  coarse.GetOrigin(), coarse.GetSpacing(), coarse.GetDirection())
    magnitude = sitk.VectorMagnitude(field_img)
    return sitk.Resample(magnitude, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
