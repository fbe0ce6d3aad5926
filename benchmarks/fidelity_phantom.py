"""Where the default fusion keeps or loses the fidelity figures on the synthetic phantom, and why.

Offline: the default method runs through ``FusionEngine`` on the inputs the node prepares (same
ranges, field of view, 8-bit output), next to the viewer overlay, both scored with the figures of
``clinical_fidelity.py`` (the served figures are the same). It prints, as markdown:

* the figures on both studies, then on the phantom with other CT noise (``PhantomSpec.ct_noise_hu``)
  and with PET on a fixed SUV 0-10 (``fusion.pet_suv_max = 10``) instead of the series' display range;
* the phantom's kept figures against its noise-free truth (what is structure, not noise);
* anatomy on the phantom: how much of H(CT) over the body is noise inside its tissue classes, the
  H(CT | F) each image leaves per tissue, and I(F; tissue) / H(tissue), its anatomy by construction;
* CT noise (SD in 5 x 5 px over soft tissue) of the phantom and of STS_002;
* PET function: the H(M | F) each image leaves per SUV band.

    python benchmarks/fidelity_phantom.py [--noise 8,12,20,25]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

import clinical_fidelity as cf

PAIRS = ("PT", "MR", "NM")
SUV_BANDS = (0.5, 0.94, 1.25, 2.5, 5.0)


@dataclasses.dataclass
class Inputs:
    """One study on the CT grid (z increasing): what the overlay, the node and the figures read."""

    name: str
    ct: object
    hu: np.ndarray
    body: np.ndarray
    tumour: np.ndarray
    moving: dict  # modality -> (Volume, values on the CT grid, field of view)


def load(study: cf.Study) -> Inputs:
    import SimpleITK as sitk

    from dicomnode.imaging.body import body_mask
    from dicomnode.imaging.resample import field_of_view, resample_onto
    from dicomnode.imaging.volume import load_series

    ct = load_series(study.files["CT"])
    hu = sitk.GetArrayFromImage(ct.image).astype(np.float32)
    moving = {}
    for modality in (m for m in PAIRS if m in study.files):
        volume = load_series(study.files[modality])
        moving[modality] = (volume, resample_onto(ct, volume), np.array(field_of_view(ct, volume)))
    return Inputs(study.name, ct, hu, body_mask(hu, "CT"), cf.tumour_mask(study, ct), moving)


def node_fused(inputs: Inputs, modality: str, fusion) -> np.ndarray:
    """The default method's fused volume (z, y, x, 3) in [0, 1], 8-bit as sent, colour bar aside."""
    import torch

    from dicomnode.domain import CHROMA, is_functional
    from dicomnode.fusion.api import FusionEngine
    from dicomnode.fusion.prepare import apply_range, intensity_range

    volume, values, fov = inputs.moving[modality]
    part = str(inputs.ct.headers[0].get("BodyPartExamined", ""))
    fixed = apply_range(inputs.hu, intensity_range(inputs.hu, "CT", inputs.ct.units, fusion, body_part=part))
    moving = apply_range(values, intensity_range(values, modality, volume.units, fusion, body_part=part, inside=fov))
    method = fusion.default_method
    colormap = fusion.colormap if is_functional(modality) and method != CHROMA else None
    result = FusionEngine(method, fusion, "cpu").fuse(
        torch.from_numpy(fixed)[:, None], torch.from_numpy(moving)[:, None], colormap=colormap,
        fov=torch.from_numpy(fov[:, None].astype(np.float32)), modality=modality)
    rgb = result.fused.float().clamp(0, 1).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    return np.floor(rgb * 255.0 + 0.5) / 255.0


def overlay_and_shown(inputs: Inputs, modality: str) -> tuple[np.ndarray, np.ndarray]:
    _, values, fov = inputs.moving[modality]
    low, high = cf.display_range(values, modality, fov)
    shown = np.clip((values - low) / (high - low), 0, 1)
    return cf.viewer_overlay(cf.ct_window(inputs.hu), shown), shown


def figure_rows(inputs: Inputs, label: str, fusion) -> list[str]:
    rows = []
    for modality in inputs.moving:
        overlay, shown = overlay_and_shown(inputs, modality)
        fov = inputs.moving[modality][2]
        for name, image in (("viewer overlay", overlay), (fusion.default_method, node_fused(inputs, modality, fusion))):
            got = cf.figures(image, inputs.hu, shown, inputs.body, inputs.tumour, fov)
            rows.append(f"| {label} | {modality}->CT | {name} | " + " | ".join(cf._cell(got[k]) for k, _ in cf.FIGURES[:4]) + " |")
    return rows


def entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / labels.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def left_per_group(f_labels: np.ndarray, x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """H(X | F) in bits split over ``groups``: each pixel's -log2 p(x | f), summed per group over N."""
    pair = f_labels * (int(x.max()) + 1) + x
    _, pair_idx, pair_n = np.unique(pair, return_inverse=True, return_counts=True)
    _, f_idx, f_n = np.unique(f_labels, return_inverse=True, return_counts=True)
    surprise = -np.log2(pair_n[pair_idx] / f_n[f_idx])
    return np.bincount(groups, weights=surprise, minlength=int(groups.max()) + 1) / f_labels.size


def against_truth(noisy: Inputs, clean: Inputs, fusion) -> list[str]:
    """The kept figures scored against the noise-free phantom (CT and PET/NM noise 0, same seed)."""
    body, near = noisy.body, cf.dilate_slices(noisy.tumour, 10)
    truth_ct = cf._bins(cf.ct_window(clean.hu))
    out = ["| pair | output | I(F;CT)/H(CT) | I(F;M)/H(M) | I(F;M)/H(M) tumour |", "|---|---|---|---|---|"]
    for modality in noisy.moving:
        _, values, fov = noisy.moving[modality]
        low, high = cf.display_range(values, modality, fov)  # the noisy study's range, as the overlay shows it
        truth_m = cf._bins(np.clip((clean.moving[modality][1] - low) / (high - low), 0, 1))
        overlay, _ = overlay_and_shown(noisy, modality)
        for name, image in (("viewer overlay", overlay), (fusion.default_method, node_fused(noisy, modality, fusion))):
            f = cf.colour_labels(image)
            kept = [cf.normalised_mi(f[mask], truth[mask]) for truth, mask in
                    ((truth_ct, body), (truth_m, body & fov), (truth_m, near & fov))]
            out.append(f"| {modality}->CT | {name} | " + " | ".join(f"{v:.3f}" for v in kept) + " |")
    return out


def ct_noise(inputs: Inputs) -> float:
    """Median SD (HU) in 5 x 5 px windows whose mean is soft tissue (0..100 HU) inside the body."""
    from scipy import ndimage

    mean = ndimage.uniform_filter(inputs.hu, (1, 5, 5))
    sd = np.sqrt(np.clip(ndimage.uniform_filter(inputs.hu ** 2, (1, 5, 5)) - mean ** 2, 0, None))
    return float(np.median(sd[(mean > 0) & (mean < 100) & inputs.body]))


def anatomy_by_tissue(inputs: Inputs, shape: tuple[int, int, int], fusion) -> list[str]:
    from dicomnode.testing.study import TISSUES, tissue_labels

    body = inputs.body
    tissue = tissue_labels(shape)[body]
    ct_bins = cf._bins(cf.ct_window(inputs.hu))[body]
    h_ct, noise = entropy(ct_bins), entropy(tissue * 16 + ct_bins) - entropy(tissue)
    out = [f"H(CT) over the body {h_ct:.3f} bits, of which noise inside the tissue classes (H(CT | tissue)) "
           f"{noise:.3f} ({100 * noise / h_ct:.0f} %)", "",
           "| pair | image | H(CT \\| F) left in " + " | ".join(TISSUES[1:]) + " | I(F;CT)/H(CT) | I(F;tissue)/H(tissue) |",
           "|" + "---|" * (len(TISSUES) + 3)]
    for modality in inputs.moving:
        overlay, _ = overlay_and_shown(inputs, modality)
        for name, image in (("viewer overlay", overlay), (fusion.default_method, node_fused(inputs, modality, fusion))):
            f = cf.colour_labels(image)[body]
            left = left_per_group(f, ct_bins, tissue)
            out.append(f"| {modality}->CT | {name} | " + " | ".join(f"{v:.3f}" for v in left[1:len(TISSUES)])
                       + f" | {cf.normalised_mi(f, ct_bins):.3f} | {cf.normalised_mi(f, tissue):.3f} |")
    return out


def function_by_band(inputs: Inputs, fusion) -> list[str]:
    _, values, fov = inputs.moving["PT"]
    overlay, shown = overlay_and_shown(inputs, "PT")
    inside = inputs.body & fov
    bands = np.digitize(values[inside], SUV_BANDS)
    m_bins = cf._bins(shown[inside])
    edges = ["<0.5", *[f"{a:g}-{b:g}" for a, b in zip(SUV_BANDS, SUV_BANDS[1:])], f">{SUV_BANDS[-1]:g}"]
    out = [f"| {inputs.name} PT->CT | " + " | ".join(f"SUV {e}" for e in edges) + " | H(M) |", "|" + "---|" * (len(edges) + 2),
           f"| share of pixels | " + " | ".join(f"{100 * np.mean(bands == k):.0f} %" for k in range(len(edges))) + " | |"]
    for name, image in (("viewer overlay", overlay), (fusion.default_method, node_fused(inputs, "PT", fusion))):
        left = left_per_group(cf.colour_labels(image)[inside], m_bins, bands)
        out.append(f"| H(M \\| F) left, {name} | " + " | ".join(f"{v:.3f}" for v in left)
                   + f" | {entropy(m_bins):.3f} |")
    return out


def main() -> int:
    from dicomnode.config import FusionConfig
    from dicomnode.testing.study import PhantomSpec, write_synthetic_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", default="8,12,20,25", help="phantom CT noise SDs (HU) to score")
    args = parser.parse_args()
    fusion = FusionConfig()
    shape = (48, 128, 128)  # as clinical_fidelity.py writes it
    head = "| study | pair | output | " + " | ".join(label for _, label in cf.FIGURES[:4]) + " |"
    with tempfile.TemporaryDirectory(prefix="phantom-") as tmp:
        phantom = load(cf.synthetic_study(Path(tmp) / "synthetic"))
        sts = load(cf.sts_study())
        print("## Figures (offline, as served)\n\n" + head + "\n|" + "---|" * 7)
        print("\n".join(figure_rows(sts, "STS_002", fusion) + figure_rows(phantom, "synthetic", fusion)))
        print(f"\n## The phantom with other CT noise (it has {PhantomSpec().ct_noise_hu:g} HU)\n\n" + head + "\n|" + "---|" * 7)
        for sd in (float(v) for v in args.noise.split(",")):
            folder = Path(tmp) / f"noise-{sd:g}"
            files = write_synthetic_study(folder, modalities=("CT", "PT", "MR", "NM"), seed=11, shape=shape,
                                          spec=PhantomSpec(ct_noise_hu=sd))
            print("\n".join(figure_rows(load(cf.Study("synthetic", files)), f"synthetic, CT noise {sd:g} HU", fusion)))
        print("\n## PET on a fixed SUV 0-10 (`fusion.pet_suv_max = 10`)\n\n" + head + "\n|" + "---|" * 7)
        for inputs in (sts, phantom):
            only_pt = dataclasses.replace(inputs, moving={"PT": inputs.moving["PT"]})
            print("\n".join(figure_rows(only_pt, f"{inputs.name}, SUV 0-10",
                                        fusion.model_copy(update={"pet_suv_max": 10.0}))))
        files = write_synthetic_study(Path(tmp) / "noise-free", modalities=("CT", "PT", "MR", "NM"), seed=11,
                                      shape=shape, spec=PhantomSpec(ct_noise_hu=0.0, pet_noise=0.0))
        print("\n## The phantom's figures against its noise-free truth (CT, PET and NM noise 0; the MR as it is)\n\n"
              + "\n".join(against_truth(phantom, load(cf.Study("synthetic", files)), fusion)))
        print("\n## Anatomy on the phantom, by tissue\n\n" + "\n".join(anatomy_by_tissue(phantom, shape, fusion)))
        print(f"\nCT noise, SD in 5 x 5 px over soft tissue: phantom {ct_noise(phantom):.1f} HU at "
              f"{phantom.ct.image.GetSpacing()[0]:.2f} mm, STS_002 {ct_noise(sts):.1f} HU at {sts.ct.image.GetSpacing()[0]:.2f} mm")
        print("\n## PET function, by SUV band\n")
        for inputs in (phantom, sts):
            print("\n".join(function_by_band(inputs, fusion)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
