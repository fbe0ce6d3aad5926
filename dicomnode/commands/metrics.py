"""``dicomnode metrics A B F [--json]``: every fusion metric of two sources and a fused image."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dicomnode.quality.metrics import (
    METRIC_NAMES,
    MetricInputError,
    compute_metrics,
    convention_options,
    round_half_away,
    to_luminance,
)

log = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An image file cannot be read as a 2-D grey or colour image."""


def load_for_scoring(path: Path) -> np.ndarray:
    """A 2-D image file as float (H, W) on 0..255: grey as stored; colour as 8-bit BT.601 luma.

    An RGB file whose three channels are equal counts as grey. 16-bit grey is scaled to 0..255.
    """
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                return arr * (255.0 / 65535.0) if arr.max() > 255 else arr
            if mode not in ("L", "RGB"):
                img = img.convert("RGB" if mode in ("P", "RGBA", "CMYK", "YCbCr", "LA", "PA") else "L")
            arr = np.asarray(img, dtype=np.float64)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read image ({exc})") from exc
    if arr.ndim == 2:
        return arr
    if np.all(arr[..., 0] == arr[..., 1]) and np.all(arr[..., 1] == arr[..., 2]):
        return arr[..., 0].copy()
    return round_half_away(to_luminance(arr))


def format_value(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.6g}"


def metrics_command(args) -> int:
    """Print every metric for sources args.a, args.b and fused args.f; exit 2 on unreadable or mismatched input."""
    try:
        a, b, f = (load_for_scoring(Path(p)) for p in (args.a, args.b, args.f))
        options = convention_options(getattr(args, "conventions", "dicomnode"))
        values = compute_metrics(a, b, f, METRIC_NAMES, **options)
    except (ImageReadError, MetricInputError) as exc:
        print(f"dicomnode metrics: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps({k: (None if math.isnan(v) else v) for k, v in values.items()}, indent=2))
    else:
        for name, value in values.items():
            print(f"{name} {format_value(value)}")
    return 0
