"""What the node knows about the images it handles: modalities, which are functional, luma, series numbers.

Plain constants and two tiny functions, no imports, so the configuration, the pipeline, the fusion
engine and the quality metrics can share them without importing each other.
"""

from __future__ import annotations

from typing import Literal

# The modalities the node pairs and fuses (DICOM Modality, C.7.3.1.1.1).
MODALITIES = ("CT", "MR", "PT", "NM")
Modality = Literal["CT", "MR", "PT", "NM"]

# Functional images (PET, NM/SPECT): colour-mapped, fused on luminance, SUV where the headers allow.
FUNCTIONAL = frozenset({"PT", "NM"})

# The names a reader knows, for series descriptions ("PET on CT fusion, SUV 0-8").
READER_NAMES = {"PT": "PET", "NM": "SPECT", "MR": "MR", "CT": "CT"}

# The colour fusion method (fixed image as luminance, moving image as hue): it brings its own
# colours, so the pipeline does not colour-map its moving image first.
CHROMA = "chroma"

# ITU-R BT.601 luma weights (R, G, B): every grey image the node derives from colour uses them.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Derived series are numbered base + 10 * job id + the kind's offset (base: output.series_number_base),
# so two jobs of one study (PT->CT and MR->CT) never share a number and a re-sent job keeps its own.
SERIES_OFFSETS = {"fused": 1, "heatmap": 2, "saliency": 3, "displacement": 4, "registration": 5,
                  "deformable_registration": 6}


def is_functional(modality: str) -> bool:
    """PET and NM/SPECT are colour-mapped and fused on luminance."""
    return modality.upper() in FUNCTIONAL


def luma(r, g, b):
    """BT.601 luma of three channels (numpy arrays or torch tensors), on the scale of the input."""
    wr, wg, wb = LUMA_WEIGHTS
    return wr * r + wg * g + wb * b


def series_number(job_id: int, kind: str, base: int) -> int:
    """The SeriesNumber of one derived series of one job; ``base`` is ``output.series_number_base``."""
    return base + 10 * int(job_id) + SERIES_OFFSETS[kind]
