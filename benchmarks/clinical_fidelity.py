"""Clinical fidelity of the fused series, next to the standard viewer overlay, on the real path.

For each study (STS_002: CT + PET + MR with its tumour mask; a synthetic CT + PET + MR phantom with
a known lesion) it starts ``dicomnode serve`` as a subprocess, C-STOREs the study to it with
pynetdicom, lets the node C-STORE its outputs to a DCMTK ``storescp`` peer, and scores what the
peer received. In the same run it renders the standard viewer overlay from the same inputs:

* overlay: CT at window 40/400 in grey, the moving image in the hot colour map with alpha 0.5
  above 10 % of its display range (PET SUV 0..max(p99.9, 5); MR p1..p99 in its field of view);
* anatomy kept: I(F; CT) / H(CT) over the body (CT > -400 HU, holes filled; CT windowed 40/400 in
  16 bins, F's colours quantised 8x8x8), and mean SSIM(luma F, CT window) over tumour pixels;
* function kept: I(F; M) / H(M) over the body inside the moving field of view, and inside the
  tumour dilated by 10 px (M in 16 bins of its display range);
* seam: mean Sobel magnitude of luma F over that of the windowed CT on a 3-px band along the
  moving field-of-view edge, inside the body (n/a when the moving image covers the CT);
* maps: share of each map's value mass outside the body, and whether frames are rescaled one by one.

    python benchmarks/clinical_fidelity.py [--study sts|synthetic|both] [--write-docs] [--png DIR]

``--write-docs`` rewrites the marked block in docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicomnode.domain import luma as bt601_luma

CT_WINDOW = (40.0, 400.0)
OVERLAY_ALPHA = 0.5
OVERLAY_THRESHOLD = 0.1
BINS = 16


def ct_window(hu: np.ndarray, window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    center, width = window
    return np.clip((hu - (center - width / 2)) / width, 0.0, 1.0).astype(np.float32)


def display_range(values: np.ndarray, modality: str, fov: np.ndarray) -> tuple[float, float]:
    """The viewer's display range: PET SUV 0..max(p99.9, 5); others p1..p99 inside the field of view."""
    inside = values[fov]
    if modality == "PT":
        return 0.0, max(float(np.percentile(inside, 99.9)), 5.0)
    low, high = np.percentile(inside, [1.0, 99.0])
    return float(low), float(max(high, low + 1e-6))


def hot(values: np.ndarray) -> np.ndarray:
    """The hot colour map (black -> red -> yellow -> white) of values in [0, 1], (..., 3)."""
    import torch

    from dicomnode.fusion.color import colorize

    flat = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(1, -1, 1))
    return colorize(flat, "hot")[0, :, :, 0].permute(1, 0).numpy().reshape(*values.shape, 3)


def viewer_overlay(ct_w: np.ndarray, moving_display: np.ndarray) -> np.ndarray:
    """The standard overlay (see the module docstring), (z, y, x, 3) in [0, 1]."""
    grey = np.repeat(ct_w[..., None], 3, axis=-1)
    alpha = np.where(moving_display > OVERLAY_THRESHOLD, OVERLAY_ALPHA, 0.0)[..., None]
    return (1 - alpha) * grey + alpha * hot(moving_display)


def luma(rgb: np.ndarray) -> np.ndarray:
    return bt601_luma(rgb[..., 0], rgb[..., 1], rgb[..., 2])


def colour_labels(rgb: np.ndarray) -> np.ndarray:
    """F's colours quantised 8 x 8 x 8 -> one label 0..511 per pixel."""
    q = np.clip((rgb * 8).astype(np.int64), 0, 7)
    return q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]


def _bins(values: np.ndarray) -> np.ndarray:
    return np.clip((values * BINS).astype(np.int64), 0, BINS - 1)


def normalised_mi(labels: np.ndarray, reference: np.ndarray) -> float:
    """I(F; X) / H(X) in [0, 1] from integer labels of F and of X (bits cancel)."""
    if labels.size == 0:
        return float("nan")
    joint = np.zeros((int(labels.max()) + 1, int(reference.max()) + 1))
    np.add.at(joint, (labels, reference), 1.0)
    p = joint / joint.sum()
    pf, px = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pf[:, None] * px[None, :])[nz])).sum())
    hx = float(-(px[px > 0] * np.log(px[px > 0])).sum())
    return mi / hx if hx > 0 else float("nan")


def tumour_ssim(f_luma: np.ndarray, ct_w: np.ndarray, tumour: np.ndarray) -> float:
    """Mean SSIM (7x7 window, data range 1) of luma F against the windowed CT over tumour pixels."""
    from skimage.metrics import structural_similarity

    values = []
    for k in np.flatnonzero(tumour.reshape(tumour.shape[0], -1).any(axis=1)):
        _, ssim_map = structural_similarity(f_luma[k], ct_w[k], data_range=1.0, full=True)
        values.append(ssim_map[tumour[k]])
    return float(np.concatenate(values).mean()) if values else float("nan")


def dilate_slices(mask: np.ndarray, pixels: int) -> np.ndarray:
    structure = ndimage.generate_binary_structure(2, 1)
    return np.stack([ndimage.binary_dilation(m, structure, iterations=pixels) if m.any() else m for m in mask])


def sobel(x: np.ndarray) -> np.ndarray:
    return np.hypot(ndimage.sobel(x, axis=-1), ndimage.sobel(x, axis=-2))


def seam_band(fov: np.ndarray, body: np.ndarray) -> np.ndarray:
    """3-px band along the moving field-of-view edge inside the CT image and the body, per slice."""
    band = np.zeros_like(fov)
    for k, plane in enumerate(fov):
        if not plane.any() or plane.all():
            continue
        edge = plane ^ ndimage.binary_erosion(plane, border_value=1)
        band[k] = ndimage.binary_dilation(edge, iterations=1)
    # A field of view that ends with the slices leaves no in-plane seam; a slice just beyond it is not one either.
    return band & body


def seam_ratio(f_luma: np.ndarray, ct_w: np.ndarray, band: np.ndarray) -> float:
    if not band.any():
        return float("nan")
    gf = np.stack([sobel(p) for p in f_luma])
    gc = np.stack([sobel(p) for p in ct_w])
    return float(gf[band].mean() / max(gc[band].mean(), 1e-9))


def figures(fused: np.ndarray, hu: np.ndarray, moving_display: np.ndarray, body: np.ndarray,
            tumour: np.ndarray, fov: np.ndarray) -> dict[str, float]:
    """The fidelity figures of one fused volume (z, y, x, 3) in [0, 1] (see the module docstring)."""
    ct_w = ct_window(hu)
    labels = colour_labels(fused)
    f_luma = luma(fused)
    in_fov = body & fov
    near_tumour = dilate_slices(tumour, 10) & fov
    return {
        "anatomy_mi": normalised_mi(labels[body], _bins(ct_w[body])),
        "anatomy_ssim_tumour": tumour_ssim(f_luma, ct_w, tumour),
        "function_mi": normalised_mi(labels[in_fov], _bins(moving_display[in_fov])),
        "function_mi_tumour": normalised_mi(labels[near_tumour], _bins(moving_display[near_tumour])),
        "seam": seam_ratio(f_luma, ct_w, seam_band(fov, body)),
    }


def map_air_share(values: np.ndarray, body: np.ndarray) -> float:
    """Share of a map's value mass (sum of |values|) outside the body."""
    total = float(np.abs(values).sum())
    return float(np.abs(values[~body]).sum()) / total if total > 0 else 0.0


def rescaled_per_frame(values: np.ndarray) -> bool:
    """True when every frame with signal peaks at the same value (each scaled to its own maximum)."""
    peaks = values.reshape(values.shape[0], -1).max(axis=1)
    peaks = peaks[peaks > 0]
    return bool(peaks.size > 1 and np.allclose(peaks, peaks.max(), rtol=1e-3))


# ---------------------------------------------------------------------------------------------
# The real path: dicomnode serve <- storescu (the study); dicomnode serve -> storescp (the outputs)

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serving.py beside this file

from serving import REPO, dicomnode_serve, free_port, node_config, storescp, storescu, wait_until  # noqa: E402

SHARED = Path(os.environ.get("DICOMNODE_SHARED_DATA", REPO.parent / "shared" / "data"))
STS = SHARED / "dicom" / "sts" / "STS_002"
NAMES = {"PT": "PET", "MR": "MR", "NM": "SPECT"}
DOCS_BEGIN = "<!-- clinical-fidelity:begin -->"
DOCS_END = "<!-- clinical-fidelity:end -->"


@dataclass
class Study:
    name: str
    files: dict[str, list[Path]]  # modality -> instance files
    tumour: np.ndarray | None = None  # on the CT grid (z increasing), filled in by load_study


@dataclass
class Row:
    study: str
    pair: str
    method: str
    figures: dict[str, float]
    maps: dict[str, tuple[float, bool]] = field(default_factory=dict)  # kind -> (air share, per-frame)


def sts_study() -> Study:
    files = {"CT": sorted((STS / "CT" / "dicom" / "image").glob("*.dcm")),
             "PT": sorted((STS / "PET" / "dicom" / "image").glob("*.dcm")),
             "MR": sorted((STS / "MR_T1" / "dicom" / "image").glob("*.dcm"))}
    if not all(files.values()):
        raise SystemExit(f"STS_002 not found under {STS}")
    return Study("STS_002", files)


def synthetic_study(folder: Path) -> Study:
    from dicomnode.testing.study import write_synthetic_study

    if (folder / "CT").is_dir():  # a kept --workdir: the same study again (its UIDs are in the outputs)
        return Study("synthetic", {m.name: sorted(m.glob("*.dcm")) for m in sorted(folder.iterdir()) if m.is_dir()})
    return Study("synthetic", write_synthetic_study(folder, modalities=("CT", "PT", "MR", "NM"), seed=11,
                                                    shape=(48, 128, 128)))


def tumour_mask(study: Study, ct) -> np.ndarray:
    """The tumour on the CT grid: STS_002's CT contour (NIfTI copy), or the phantom's known lesion."""
    import SimpleITK as sitk

    if study.name == "STS_002":
        mask = sitk.ReadImage(str(STS / "CT" / "nifti" / "mask" / "mask.nii.gz"))
        return sitk.GetArrayFromImage(sitk.Resample(mask, ct.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    from dicomnode.testing.study import PhantomSpec

    spec = PhantomSpec()
    size = ct.image.GetSize()
    idx = np.stack(np.meshgrid(np.arange(size[0]), np.arange(size[1]), np.arange(size[2]), indexing="ij"), -1)
    origin, spacing = np.array(ct.image.GetOrigin()), np.array(ct.image.GetSpacing())
    direction = np.array(ct.image.GetDirection()).reshape(3, 3)
    points = origin + (idx * spacing) @ direction.T  # (x, y, z, 3) LPS mm
    inside = np.linalg.norm(points - np.array(spec.lesion_center_mm), axis=-1) <= spec.lesion_radius_mm
    return inside.transpose(2, 1, 0)


def run_node(study: Study, method: str, work: Path, timeout_s: float = 900.0) -> list[Path]:
    """The study through ``dicomnode serve``; returns the files the storescp peer received."""
    import pydicom

    received = work / "peer"
    port, peer_port = free_port(), free_port()
    config = node_config(work, port, peer_port, method, ("PT", "MR", "NM"))
    with storescp(received, peer_port, "PEER", ("--unique-filenames",)), \
            dicomnode_serve(config, port, log=work / "serve.log") as node:
        pairs = [m for m in ("PT", "MR", "NM") if m in study.files]
        maps = 2 if method == "network" else 1
        expected = sum(len(study.files["CT"]) + maps for _ in pairs)
        for files in study.files.values():
            storescu(files, port, "DICOMNODE")
        # Count distinct instances: a send retried after a DIMSE timeout leaves duplicates at the peer.
        seen: dict[Path, str] = {}

        def arrived() -> bool:
            for path in received.iterdir():
                if path.is_file() and path not in seen and not path.name.startswith("."):
                    try:
                        seen[path] = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                    except Exception:  # still being written
                        continue
            if node.poll() is not None:
                raise RuntimeError(f"dicomnode serve exited with {node.returncode}; see {work / 'serve.log'}")
            return len(set(seen.values())) >= expected

        wait_until(arrived, timeout_s, f"{expected} outputs at the peer; see {work / 'serve.log'}", every_s=1.0)
        return sorted(p for p in received.iterdir() if p.is_file())


def outputs_by_pair(files: list[Path], study: Study) -> dict[str, dict[str, list]]:
    """{moving modality: {"fused": [SC datasets], "heatmap": [PM], "saliency": [PM]}} from the peer's files."""
    import pydicom

    series_modality = {}
    for modality, paths in study.files.items():
        series_modality[pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID] = modality
    # An SC instance references only the moving slices that overlap it (none beyond the moving field
    # of view), so the pair is known per output series: the moving series any of its instances names.
    by_series: dict[str, list] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    out: dict[str, dict[str, list]] = {}
    for datasets in by_series.values():
        moving = {series_modality.get(item.SeriesInstanceUID)
                  for ds in datasets for item in ds.get("ReferencedSeriesSequence", [])} - {"CT", None}
        if len(moving) != 1:
            continue
        ds = datasets[0]
        kind = str(ds.ContentLabel).lower() if "ContentLabel" in ds else "fused"  # Parametric Maps are labelled
        out.setdefault(moving.pop(), {}).setdefault(kind, []).extend(datasets)
    return out


def fused_volume(datasets: list, ct) -> np.ndarray:
    """(z, y, x, 3) float in [0, 1], slices matched to the CT grid (z increasing) by position."""
    z_ct = [float(h.ImagePositionPatient[2]) for h in ct.headers]
    volume = np.zeros((len(z_ct), *datasets[0].pixel_array.shape), dtype=np.float32)
    for ds in datasets:
        k = int(np.argmin(np.abs(np.asarray(z_ct) - float(ds.ImagePositionPatient[2]))))
        volume[k] = ds.pixel_array.astype(np.float32) / 255.0
    return volume


def map_volume(pm, ct) -> tuple[np.ndarray, np.ndarray]:
    """(values on the CT grid z increasing, values in stored frame order)."""
    from dicomnode.dicomio.parametric_map import decode_parametric_map

    values, positions = decode_parametric_map(pm)
    z_ct = np.asarray([float(h.ImagePositionPatient[2]) for h in ct.headers])
    order = [int(np.argmin(np.abs(z_ct - p[2]))) for p in positions]
    grid = np.zeros((len(z_ct), *values.shape[1:]))
    grid[order] = values
    return grid, values


def score_study(study: Study, received: dict[str, list[Path]], png: Path | None) -> list[Row]:
    """Figures of each method's outputs and of the viewer overlay, per moving modality."""
    import SimpleITK as sitk

    from dicomnode.imaging.body import body_mask
    from dicomnode.imaging.resample import field_of_view, resample_onto
    from dicomnode.imaging.volume import load_series

    ct = load_series(study.files["CT"])
    hu = sitk.GetArrayFromImage(ct.image).astype(np.float32)
    body = body_mask(hu, "CT")
    tumour = tumour_mask(study, ct)
    rows = []
    per_method = {method: outputs_by_pair(files, study) for method, files in received.items()}
    for modality in [m for m in ("PT", "MR", "NM") if m in study.files]:
        moving = load_series(study.files[modality])
        values = resample_onto(ct, moving)
        fov = np.array(field_of_view(ct, moving))  # identity: one frame of reference
        low, high = display_range(values, modality, fov)
        shown = np.clip((values - low) / (high - low), 0, 1)
        pair = f"{modality}->CT"
        overlay = viewer_overlay(ct_window(hu), shown)
        rows.append(Row(study.name, pair, "viewer overlay", figures(overlay, hu, shown, body, tumour, fov)))
        pictures = {"viewer overlay": overlay}
        for method, outputs in per_method.items():
            got = outputs.get(modality)
            if not got or "fused" not in got:
                print(f"[fidelity] {study.name} {pair} {method}: no fused series received", flush=True)
                continue
            fused = fused_volume(got["fused"], ct)
            row = Row(study.name, pair, method, figures(fused, hu, shown, body, tumour, fov))
            for kind in ("heatmap", "saliency"):
                if kind in got:
                    grid, stored = map_volume(got[kind][0], ct)
                    # A contribution share has a fixed 0..1 scale (a frame peaking at 1 is no rescale).
                    row.maps[kind] = (map_air_share(grid, body), kind == "saliency" and rescaled_per_frame(stored))
            rows.append(row)
            pictures[method] = fused
        if png is not None:
            write_comparison(pictures, tumour, png / f"{study.name}_{modality}.png")
    return rows


def write_comparison(pictures: dict[str, np.ndarray], tumour: np.ndarray, target: Path) -> None:
    """Rows: overlay and each method; columns: three slices through the tumour."""
    from PIL import Image, ImageDraw

    per_slice = tumour.reshape(tumour.shape[0], -1).sum(axis=1)
    centre = int(np.argmax(per_slice))
    picks = [max(0, min(len(per_slice) - 1, centre + d)) for d in (-3, 0, 3)]
    first = next(iter(pictures.values()))
    h, w = first.shape[1:3]
    scale = max(1, 256 // max(h, w))
    sheet = Image.new("RGB", (w * scale * len(picks), (h * scale + 14) * len(pictures)))
    draw = ImageDraw.Draw(sheet)
    for r, (name, volume) in enumerate(pictures.items()):
        y = r * (h * scale + 14)
        draw.text((2, y + 1), name, fill=(255, 255, 255))
        for c, k in enumerate(picks):
            tile = Image.fromarray((np.clip(volume[k], 0, 1) * 255 + 0.5).astype(np.uint8))
            sheet.paste(tile.resize((w * scale, h * scale), Image.NEAREST), (c * w * scale, y + 14))
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target)


FIGURES = (("anatomy_mi", "I(F;CT)/H(CT)"), ("anatomy_ssim_tumour", "SSIM tumour"),
           ("function_mi", "I(F;M)/H(M)"), ("function_mi_tumour", "I(F;M)/H(M) tumour"), ("seam", "seam"))


def _cell(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def table(rows: list[Row]) -> str:
    head = ["study", "pair", "output", *[label for _, label in FIGURES], "contribution map in air", "saliency map in air"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        maps = []
        for kind in ("heatmap", "saliency"):
            if kind in row.maps:
                share, per_frame = row.maps[kind]
                maps.append(f"{100 * share:.2f} %{' (per-frame scale)' if per_frame else ''}")
            else:
                maps.append("—")
        cells = [row.study, row.pair, row.method, *[_cell(row.figures[k]) for k, _ in FIGURES], *maps]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[Row], default: str) -> list[str]:
    """The targets of the issue for the default method: >= overlay on the four kept figures, seam, maps."""
    out = []
    for key in sorted({(r.study, r.pair) for r in rows}):
        overlay = next(r for r in rows if (r.study, r.pair) == key and r.method == "viewer overlay")
        mine = next((r for r in rows if (r.study, r.pair) == key and r.method == default), None)
        if mine is None:
            continue
        kept = [k for k, _ in FIGURES[:4] if mine.figures[k] >= overlay.figures[k]]
        seam = mine.figures["seam"]
        air = max((s for s, _ in mine.maps.values()), default=0.0)
        ok = len(kept) == 4 and (seam != seam or seam <= 1.2) and air <= 0.02
        margin = min(mine.figures[k] - overlay.figures[k] for k, _ in FIGURES[:4])
        out.append(f"{key[0]} {key[1]} {default}: {'meets' if ok else 'MISSES'} the targets "
                   f"({len(kept)}/4 kept figures >= overlay, smallest margin {margin:+.3f}; seam {_cell(seam)}; "
                   f"maps in air <= {100 * air:.2f} %)")
    return out


def write_docs(text: str) -> None:
    docs = REPO / "docs" / "benchmarks.md"
    body = docs.read_text()
    block = f"{DOCS_BEGIN}\n{text}\n{DOCS_END}"
    if DOCS_BEGIN in body:
        start, end = body.index(DOCS_BEGIN), body.index(DOCS_END) + len(DOCS_END)
        body = body[:start] + block + body[end:]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    docs.write_text(body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=["sts", "synthetic", "both"], default="both")
    parser.add_argument("--methods", default="chroma,network", help="fusion methods to run the node with")
    parser.add_argument("--png", type=Path, help="write overlay-vs-method comparison PNGs here")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--workdir", type=Path, help="keep runs here and score the outputs already there again")
    args = parser.parse_args()
    methods = args.methods.split(",")
    rows: list[Row] = []
    runs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fidelity-") as scratch:
        tmp = args.workdir or Path(scratch)
        studies = []
        if args.study in ("sts", "both"):
            studies.append(sts_study())
        if args.study in ("synthetic", "both"):
            studies.append(synthetic_study(Path(tmp) / "synthetic"))
        for study in studies:
            received = {}
            for method in methods:
                t0 = time.monotonic()
                work = Path(tmp) / f"{study.name}-{method}"
                if args.workdir and (work / "peer").is_dir():
                    received[method] = sorted((work / "peer").iterdir())
                    runs.append(f"{study.name}/{method}: outputs of a kept run scored again")
                    continue
                received[method] = run_node(study, method, work)
                runs.append(f"{study.name}/{method}: {len(received[method])} outputs back in "
                            f"{time.monotonic() - t0:.0f} s at load {os.getloadavg()[0]:.1f}")
                print(f"[fidelity] {runs[-1]}", flush=True)
            rows += score_study(study, received, args.png)
    text = table(rows)
    notes = verdicts(rows, methods[0])
    load = os.getloadavg()[0]
    footer = (f"\nMethods run through `dicomnode serve` (C-STORE in from storescu, outputs C-STORE'd to storescp); "
              f"default = `{methods[0]}`; {'; '.join(runs)}; load average {load:.1f} at the end. Maps are "
              f"zeroed outside the body by the node, hence 0 % in air.\n\n"
              + "\n".join(f"- {n}" for n in notes))
    print(text + "\n" + footer)
    if args.write_docs:
        write_docs(text + "\n" + footer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
