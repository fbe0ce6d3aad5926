"""Registration accuracy and speed on generated full-size cases: ours vs elastix and ANTs defaults.

Run: python benchmarks/registration.py [--size 192 192 128] [--cases CT,PT,MR] [--refs elastix,ants]
     [--seed N] [--skip-ours] [--write-docs]. elastix (itk-elastix) and ANTs (antspyx) are the `bench`
extra; a missing one is reported and skipped. --skip-ours runs only the reference tools (for an
environment that holds them but not the node's pins). Prints a markdown table and, for our runs, where
the time goes (stage, levels, samples, iterations, seconds, CPU seconds, load before/after); --write-docs
puts the table between the registration-table markers of docs/benchmarks.md (hand-written text around
them stays). --pet-table [--seeds 3,4] runs the PET-like cases instead (2/3/4 mm voxels, 6/7/8 mm FWHM,
CT-like and MR fixed) with the node's defaults, and --write-docs puts that table between the
registration-pet markers. TRE = |T(x) - G(x)| (mm) over points inside the fixed brain.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicomnode.config import RegistrationConfig
from dicomnode.imaging.register import Registration, register_volumes
from dicomnode.testing.deform import RegistrationCase, Score, best_affine_fit, make_case, mni_sources, phantom_sources, score

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DICOMNODE_SHARED_DATA", REPO.parent / "shared" / "data"))
MNI = SHARED_DATA / "nifti" / "mni152_icbm2009a_nilearn"
# PET-like cases of the PET table: (voxel mm, FWHM mm); coarser scanners blur more.
PET_GRIDS = ((2.0, 6.0), (3.0, 7.0), (4.0, 8.0))


NOTES = """Reproduce: `python benchmarks/registration.py --refs "" --write-docs` in the node's environment, and
the reference rows in a separate one (itk-elastix and antspyx pin their own numpy/scipy):
`python -m venv REF && REF/bin/pip install itk-elastix antspyx SimpleITK pydicom pydantic`, then
`PYTHONPATH=. REF/bin/python benchmarks/registration.py --skip-ours`. "seconds" for ours is
cumulative over the stages; for elastix and ANTs it is the whole run. The best affine fit is the
least-squares affine of the true mapping over the same points: the floor for any affine stage.
Defaults: CT clamped for mutual information to the 2nd-98th percentiles of its soft-tissue voxels;
rigid and affine stages on one thread with 12000 samples per level (bit-identical in every process);
B-spline grid 30 mm, optimised at a 1.5 mm level (20000 samples, 24 L-BFGS-B iterations, threaded)
when both modalities are in `registration.deformable_modalities` (CT, MR, PT) and the level, never
finer than the moving voxels, is not coarser than `registration.deformable_max_level_mm` (2.1 mm);
the "deformable forced" rows run it past that gate. A PET's rigid and affine stages run below its
voxels. The affine stage ends with Powell sweeps (`registration.affine_polish_iterations`) for
PET/NM, and for CT/MR only when no deformable stage follows; they are kept only when the held-out
metric improves.
"""


def _point_indices(case: RegistrationCase) -> np.ndarray:
    img = case.fixed.image
    return np.array([img.TransformPhysicalPointToIndex(tuple(float(v) for v in p)) for p in case.points])


def _score_mapped(case: RegistrationCase, mapped: np.ndarray) -> Score:
    truth = np.array([case.truth.TransformPoint(tuple(float(v) for v in p)) for p in case.points])
    err = np.linalg.norm(mapped - truth, axis=1)
    return Score(float(err.mean()), float(np.percentile(err, 95)), float(err.max()), float("nan"))


def run_ours_forced(case: RegistrationCase, breakdown: list[str] | None = None) -> list[tuple[str, float, Score]]:
    """Ours with the deformable stage run whatever the moving modality (breakdown rows say "forced")."""
    part: list[str] = []
    rows = run_ours(case, RegistrationConfig(mode="always", deformable_modalities=("CT", "PT", "NM", "MR", ""),
                                             deformable_max_level_mm=100.0), part)
    if breakdown is not None:
        breakdown.extend(r.replace(f"| {case.name} |", f"| {case.name}, forced |", 1) for r in part)
    return rows


def run_ours(case: RegistrationCase, config: RegistrationConfig | None = None,
             breakdown: list[str] | None = None) -> list[tuple[str, float, Score]]:
    """Rows (stage, cumulative seconds, score); ``breakdown`` gets where the time went, one row per stage."""
    load_before = os.getloadavg()[0]
    start_cpu = time.process_time()
    result = register_volumes(case.fixed, case.moving, config or RegistrationConfig(mode="always"))
    if breakdown is not None:
        breakdown.extend(_breakdown(case.name, result, time.process_time() - start_cpu, load_before))
    rows, elapsed = [], 0.0
    linear = result.transform.GetNthTransform(0)
    for s in result.stages:
        elapsed += s.seconds
        tx = result.transform if s.name == "deformable" else linear
        label = s.name if s.kept else f"{s.name} (not kept)"
        rows.append((label, elapsed, score(case, tx) if s.name != "rigid" else Score(*[float("nan")] * 4)))
    rows.append(("total", result.seconds, score(case, result.transform)))
    return rows


BREAKDOWN_HEAD = ["| case | stage | levels (mm) | samples per level | iterations | seconds | CPU seconds | "
                  "load before / after |", "|---|---|---|---|---|---|---|---|"]


def _breakdown(label: str, result: Registration, cpu: float, load_before: float) -> list[str]:
    """Where one registration's time went: per stage, then the setup (pyramid, masks, start, held-out checks)."""
    lines = []
    for s in result.stages:
        levels = ", ".join(f"{mm:g}" for mm in s.levels_mm) if s.iterations else "not run"
        lines.append(f"| {label} | {s.name}{'' if s.kept or not s.iterations else ' (not kept)'} | {levels} | "
                     f"{s.samples if s.iterations else '–'} | {s.iterations} | {s.seconds:.1f} | {s.cpu_seconds:.1f} | |")
    setup = result.seconds - sum(s.seconds for s in result.stages)
    setup_cpu = cpu - sum(s.cpu_seconds for s in result.stages)
    lines.append(f"| {label} | setup and checks | – | – | – | {setup:.1f} | {setup_cpu:.1f} | |")
    lines.append(f"| {label} | **total** | | | {sum(s.iterations for s in result.stages)} | **{result.seconds:.1f}** | "
                 f"{cpu:.1f} | {load_before:.1f} / {os.getloadavg()[0]:.1f} |")
    return lines


def _to_itk(img: sitk.Image):
    import itk

    out = itk.GetImageFromArray(sitk.GetArrayFromImage(img).astype(np.float32))
    out.SetOrigin(img.GetOrigin())
    out.SetSpacing(img.GetSpacing())
    out.SetDirection(itk.matrix_from_array(np.array(img.GetDirection()).reshape(3, 3)))
    return out


def run_elastix(case: RegistrationCase) -> list[tuple[str, float, Score]]:
    import itk

    fixed, moving = _to_itk(case.fixed.image), _to_itk(case.moving.image)
    params = itk.ParameterObject.New()
    for name in ("rigid", "affine", "bspline"):
        params.AddParameterMap(params.GetDefaultParameterMap(name))
    t0 = time.perf_counter()
    _, result = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False)
    seconds = time.perf_counter() - t0
    idx = _point_indices(case)
    rows = []
    for label, n in (("affine", 2), ("bspline", 3)):
        partial = itk.ParameterObject.New()
        for i in range(n):
            partial.AddParameterMap(result.GetParameterMap(i))
        with tempfile.TemporaryDirectory() as scratch:  # transformix writes its field file there
            field = itk.GetArrayFromImage(itk.transformix_deformation_field(
                moving, partial, output_directory=scratch, log_to_console=False))  # (z, y, x, 3), mm
        mapped = case.points + field[idx[:, 2], idx[:, 1], idx[:, 0]]
        rows.append((label, seconds if n == 3 else float("nan"), _score_mapped(case, mapped)))
    return rows


def run_ants(case: RegistrationCase) -> list[tuple[str, float, Score]]:
    import ants

    def to_ants(img: sitk.Image):
        arr = sitk.GetArrayFromImage(img).astype(np.float32).transpose(2, 1, 0)  # ANTs arrays are (x, y, z)
        return ants.from_numpy(arr, origin=img.GetOrigin(), spacing=img.GetSpacing(),
                               direction=np.array(img.GetDirection()).reshape(3, 3))

    fixed, moving = to_ants(case.fixed.image), to_ants(case.moving.image)
    t0 = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform="SyN")
    seconds = time.perf_counter() - t0
    # Warp images of moving-space coordinates: the warped value at a fixed voxel is T(x), whatever
    # the transform file conventions.
    # The coordinate grid extends 16 voxels past the moving image so that fixed points mapped just
    # outside it get their coordinate rather than the default 0.
    pad, moving_grid = 16, case.moving.image
    d = np.array(moving_grid.GetDirection()).reshape(3, 3)
    spacing = np.array(moving_grid.GetSpacing())
    origin = np.array(moving_grid.GetOrigin()) - d @ (pad * spacing)
    size = [n + 2 * pad for n in moving_grid.GetSize()]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetOrigin(origin.tolist())
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(moving_grid.GetDirection())
    phys = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    points = (d @ (phys * spacing).T).T + origin
    idx = _point_indices(case)
    rows = []
    for label, transforms in (("affine", [t for t in reg["fwdtransforms"] if t.endswith(".mat")]),
                              ("SyN", reg["fwdtransforms"])):
        mapped = []
        for axis in range(3):
            arr = points[:, axis].reshape(grid.GetSize()).astype(np.float32)  # (x, y, z)
            img = ants.from_numpy(arr, origin=grid.GetOrigin(), spacing=grid.GetSpacing(), direction=d)
            warped = ants.apply_transforms(fixed, img, transforms, interpolator="linear").numpy()
            mapped.append(warped[idx[:, 0], idx[:, 1], idx[:, 2]])
        rows.append((label, seconds if label == "SyN" else float("nan"), _score_mapped(case, np.stack(mapped, 1))))
    return rows


def _fmt(v: float, digits: int = 2) -> str:
    return "–" if not np.isfinite(v) else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(192, 192, 128))
    parser.add_argument("--cases", default="CT,PT,MR",
                        help="moving modalities: CT, PT onto the MR; MR onto a CT-like fixed image")
    parser.add_argument("--refs", default="elastix,ants")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-ours", action="store_true", help="only the reference tools")
    parser.add_argument("--pet-table", action="store_true", help="the PET-like cases (ours only)")
    parser.add_argument("--seeds", default="3,4", help="--pet-table: case seeds")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)

    sources = mni_sources(MNI) if MNI.is_dir() else phantom_sources(1.2)
    source_name = "MNI152 2009a" if MNI.is_dir() else "synthetic phantom"
    if args.pet_table:
        table, markers = pet_table(sources, source_name, tuple(args.size), [int(v) for v in args.seeds.split(",")]), PET
    else:
        table, markers = main_table(sources, source_name, args), (START, END)
    print("\n" + table)
    if args.write_docs:
        _write_docs(REPO / "docs" / "benchmarks.md", table, *markers)
    return 0


def _machine() -> str:
    load = os.getloadavg()
    return (f"Machine: {platform.machine()}, nproc {os.cpu_count()}, load average {load[0]:.1f}/{load[1]:.1f}/"
            f"{load[2]:.1f} at the end (a shared machine: timings are contended above 2), "
            f"{datetime.now(timezone.utc):%Y-%m-%d}.")


def main_table(sources, source_name: str, args: argparse.Namespace) -> str:
    breakdown: list[str] = []
    runners = {"ours": lambda c: run_ours(c, breakdown=breakdown),
               "ours, deformable forced": lambda c: run_ours_forced(c, breakdown),
               "elastix": run_elastix, "ants": run_ants}
    lines = ["| case | method | stage | seconds (cumulative) | TRE mean | TRE p95 | TRE max | Dice |",
             "|---|---|---|---|---|---|---|---|"]
    for moving in args.cases.split(","):
        fixed_modality = "CT" if moving == "MR" else "MR"
        label = "CT-like <- MR" if moving == "MR" else f"MR <- {moving}-like"
        case = make_case(sources, moving, fixed_size=tuple(args.size), deformation_mm=4.0, seed=args.seed,
                         fixed_modality=fixed_modality, name=label)
        fit = score(case, best_affine_fit(case))
        start = score(case, sitk.Transform(3, sitk.sitkIdentity))
        lines.append(f"| {label} | (start) | identity | – | {_fmt(start.mean_mm)} | {_fmt(start.p95_mm)} | "
                     f"{_fmt(start.max_mm)} | {_fmt(start.dice)} |")
        lines.append(f"| {label} | (bound) | best affine fit | – | {_fmt(fit.mean_mm)} | {_fmt(fit.p95_mm)} | "
                     f"{_fmt(fit.max_mm)} | {_fmt(fit.dice)} |")
        gate = RegistrationConfig().deformable_modalities
        forced = [] if fixed_modality in gate and moving in gate else ["ours, deformable forced"]
        ours = [] if args.skip_ours else ["ours"] + forced
        for name in ours + [r for r in args.refs.split(",") if r]:
            try:
                rows = runners[name](case)
            except ImportError as exc:
                lines.append(f"| {label} | {name} | not installed ({exc.name}) | | | | | |")
                continue
            for stage, seconds, s in rows:
                lines.append(f"| {label} | {name} | {stage} | {_fmt(seconds, 1)} | {_fmt(s.mean_mm)} | "
                             f"{_fmt(s.p95_mm)} | {_fmt(s.max_mm)} | {_fmt(s.dice)} |")
            print(lines[-1], flush=True)
    header = (f"Cases: {source_name} T1 as fixed MR ({'x'.join(map(str, args.size))}), moving CT-like / PET-like "
              f"(CT-like on the same grid size; PET-like 4 mm, blurred, noisy), and the MR moving onto a CT-like "
              f"fixed image (the default pairing's direction), known rigid + affine + smooth "
              f"deformation (p95 4 mm), seed {args.seed}. {_machine()} Reference tools with their default settings "
              "(elastix: default rigid, affine, bspline maps; ANTs: `SyN`).")
    where = ("Where our time went (CPU seconds are the process's, all threads; setup = pyramid levels, body "
             "masks, the start and the held-out checks):\n\n" + "\n".join(BREAKDOWN_HEAD + breakdown)) if breakdown else ""
    return header + "\n\n" + "\n".join(lines) + "\n\n" + where + "\n\n" + NOTES


def pet_table(sources, source_name: str, size: tuple[int, int, int], seeds: list[int]) -> str:
    """PET-like cases with the node's defaults. Where the defaults leave the deformable stage off, it is
    run past its gate as well (the same rigid and affine result: they are deterministic) to score it."""
    defaults = RegistrationConfig(mode="always")
    forced = RegistrationConfig(mode="always", deformable_modalities=tuple(set(defaults.deformable_modalities) | {"PT"}),
                                deformable_max_level_mm=100.0)
    lines = ["| case | seed | best affine fit | affine TRE | deformable TRE | the node | node TRE | "
             "seconds (node; deformable) |", "|---|---|---|---|---|---|---|---|"]
    breakdown: list[str] = []
    for fixed_modality in ("CT", "MR"):
        for voxel_mm, fwhm_mm in PET_GRIDS:
            for seed in seeds:
                label = f"{'CT-like' if fixed_modality == 'CT' else 'MR'} <- PET {voxel_mm:g} mm / {fwhm_mm:g} mm FWHM"
                case = make_case(sources, "PT", fixed_size=size, moving_spacing_mm=voxel_mm, pet_fwhm_mm=fwhm_mm,
                                 seed=seed, fixed_modality=fixed_modality, name=f"{label}, seed {seed}")
                load_before, cpu = os.getloadavg()[0], time.process_time()
                node = register_volumes(case.fixed, case.moving, defaults)
                breakdown.extend(_breakdown(case.name, node, time.process_time() - cpu, load_before))
                stage = node.stages[-1]
                ran = node if stage.iterations else register_volumes(case.fixed, case.moving, forced)
                ran_stage = ran.stages[-1]
                candidate = ran.transform if ran_stage.kept else ran.rejected.get("deformable")
                verdict = ("kept" if stage.kept else "refused (held-out MI)") if stage.iterations else \
                    f"not run: {stage.note}"
                lines.append(f"| {label} | {seed} | {_fmt(score(case, best_affine_fit(case)).mean_mm)} | "
                             f"{_fmt(score(case, node.transform.GetNthTransform(0)).mean_mm)} | "
                             f"{_fmt(score(case, candidate).mean_mm) if candidate else 'optimiser error'} | {verdict} | "
                             f"{_fmt(score(case, node.transform).mean_mm)} | {node.seconds:.1f}; {ran_stage.seconds:.1f} |")
                print(lines[-1], flush=True)
    header = (f"PET-like cases: {source_name}, fixed CT-like or MR ({'x'.join(map(str, size))}), moving PET-like "
              f"(voxels and FWHM per row, signal-dependent noise), known rigid + affine + smooth deformation "
              f"(p95 4 mm), seeds {', '.join(map(str, seeds))}. 'the node' is what the defaults do with the "
              f"deformable stage (its gate, or its held-out check); 'deformable TRE' is the stage's own result, run "
              f"past the gate where the node does not run it. {_machine()}")
    return header + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(BREAKDOWN_HEAD + breakdown)


START, END = "<!-- registration-table: start -->", "<!-- registration-table: end -->"
PET = ("<!-- registration-pet-table: start -->", "<!-- registration-pet-table: end -->")


def _write_docs(path: Path, table: str, start: str = START, end: str = END) -> None:
    """Replace the text between the markers (a new '## Registration' section when there are none)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n## Registration\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
