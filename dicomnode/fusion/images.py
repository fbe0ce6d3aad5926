"""2-D image files for fusion: reading (grey or colour), writing, and folders of named pairs.

Pairs are named ``<id>_<MOD>.<ext>`` with MOD among CT, MR/MRI, T1, T2, PET/PT, SPECT/NM.
Arrays are float32 in [0, 1]: grey (H, W), colour (3, H, W) RGB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dicomnode.domain import luma

# File-name modality -> (DICOM modality, anatomical?)
MODALITY_ALIASES = {
    "CT": ("CT", True), "MR": ("MR", True), "MRI": ("MR", True), "T1": ("MR", True), "T2": ("MR", True),
    "PET": ("PT", False), "PT": ("PT", False), "SPECT": ("NM", False), "NM": ("NM", False),
}
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_PAIR_NAME = re.compile(r"^(?P<id>.+)_(?P<mod>[A-Za-z0-9]+)$")


class PairError(ValueError):
    """A pair of images that cannot be fused (missing partner, size mismatch, unknown modality)."""


@dataclass(frozen=True)
class LoadedImage:
    """grey: (H, W) float32 [0, 1], the luminance for colour images; rgb: (3, H, W) or None if grey."""

    grey: np.ndarray
    rgb: np.ndarray | None


@dataclass(frozen=True)
class ImagePair:
    """fixed = the anatomical image, moving = the other (functional when there is one)."""

    pair_id: str
    fixed: Path
    moving: Path
    fixed_modality: str
    moving_modality: str


def load_image(path: Path) -> LoadedImage:
    """Read a 2-D image; an RGB image with equal channels counts as grey."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I"):
            arr = np.asarray(img, dtype=np.float32)
            return LoadedImage(arr / (65535.0 if arr.max() > 255 else 255.0), None)
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB" if "A" in img.mode or img.mode in ("P", "CMYK", "YCbCr") else "L")
        arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        return LoadedImage(arr, None)
    rgb = arr.transpose(2, 0, 1).copy()
    if np.abs(rgb.max(axis=0) - rgb.min(axis=0)).max() <= 1.0 / 255.0:
        return LoadedImage(rgb.mean(axis=0), None)
    grey = luma(rgb[0], rgb[1], rgb[2]).astype(np.float32)
    return LoadedImage(grey, rgb)


def save_image(path: Path, array: np.ndarray) -> None:
    """Write (H, W) or (3, H, W) float [0, 1] as 8-bit PNG/TIFF, rounding half up."""
    data = np.floor(np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if data.ndim == 3:
        data = data[0] if data.shape[0] == 1 else data.transpose(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data).save(path)


def parse_pair_name(path: Path) -> tuple[str, str, bool] | None:
    """``<id>_<MOD>.png`` -> (id, DICOM modality, anatomical?) or None when not a pair name."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    match = _PAIR_NAME.match(path.stem)
    if not match:
        return None
    known = MODALITY_ALIASES.get(match["mod"].upper())
    if known is None:
        return None
    return match["id"], known[0], known[1]


def order_pair(pair_id: str, first: tuple[Path, str, bool], second: tuple[Path, str, bool]) -> ImagePair:
    """Choose fixed/moving: anatomical is fixed; of two anatomical images MR is fixed."""
    def rank(item: tuple[Path, str, bool]) -> int:
        return 0 if item[2] and item[1] == "MR" else 1 if item[2] else 2

    fixed, moving = sorted([first, second], key=rank)
    if not fixed[2]:
        raise PairError(f"pair {pair_id}: two functional images ({fixed[1]}, {moving[1]}); one must be anatomical")
    if fixed[1] == moving[1]:
        raise PairError(f"pair {pair_id}: both images are {fixed[1]}; fusion needs two modalities")
    return ImagePair(pair_id, fixed[0], moving[0], fixed[1], moving[1])


def find_pairs(folder: Path) -> tuple[list[ImagePair], list[str]]:
    """All ``<id>_<MOD>`` pairs in a folder, sorted by id; plus one problem line per unfusable id."""
    groups: dict[str, list[tuple[Path, str, bool]]] = {}
    for path in sorted(folder.iterdir()):
        parsed = parse_pair_name(path)
        if parsed is not None and path.is_file():
            groups.setdefault(parsed[0], []).append((path, parsed[1], parsed[2]))
    pairs, problems = [], []
    for pair_id in sorted(groups):
        items = groups[pair_id]
        if len(items) != 2:
            names = ", ".join(p.name for p, _, _ in items)
            problems.append(f"pair {pair_id}: expected 2 images, found {len(items)} ({names})")
            continue
        try:
            pairs.append(order_pair(pair_id, items[0], items[1]))
        except PairError as exc:
            problems.append(str(exc))
    return pairs, problems
