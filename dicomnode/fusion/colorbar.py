"""A colour bar with ticks in the moving image's unit, burned into the fused slices beside the body.

One bar, at one place, for the whole series (the scale is the series' fixed display range). It
goes into the widest margin that holds no body pixel on any slice, 1 px clear of the body and of
the image edge; ticks are labelled when the margin has room for the text, else drawn alone, with
neighbouring labels at least a label apart. Marks carry a 1-px black halo, so a table or tube in
the margin cannot run into them. Where no margin is at least ``MIN_MARGIN_PX`` wide the bar is left
out and the caller says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dicomnode.domain import CHROMA

MIN_MARGIN_PX = 3
# Below this size the scalable font's digits are 5 px tall and blur into each other (its "16.7" read
# "10.7" on a 143 px CT): Pillow's bitmap font, drawn for small pixel sizes (7 px digits), is used instead.
SCALABLE_FONT_MIN_PX = 10


@dataclass(frozen=True)
class BarPlacement:
    """Where the bar went: ``side`` (left|right|top|bottom), pixel box (row0, col0, row1, col1), labelled."""

    side: str
    box: tuple[int, int, int, int]
    labelled: bool


def margins(footprint: np.ndarray) -> dict[str, int]:
    """Body-free rows/columns at each image edge of a (rows, cols) footprint (True = body on some slice)."""
    rows, cols = footprint.shape
    if not footprint.any():
        return {"right": cols, "left": cols, "top": rows, "bottom": rows}
    used_cols = np.flatnonzero(footprint.any(axis=0))
    used_rows = np.flatnonzero(footprint.any(axis=1))
    return {"right": cols - 1 - int(used_cols[-1]), "left": int(used_cols[0]),
            "top": int(used_rows[0]), "bottom": rows - 1 - int(used_rows[-1])}


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round tick values inside [low, high], the ends included (matplotlib's MaxNLocator)."""
    from matplotlib.ticker import MaxNLocator

    inner = [float(v) for v in MaxNLocator(nbins=count).tick_values(low, high) if low <= v <= high]
    ticks = sorted({*inner, float(low), float(high)})
    # Drop inner ticks crowding an end: the ends carry the range, they must stay.
    span = max(high - low, 1e-12)
    return [t for t in ticks if t in (low, high) or min(t - low, high - t) > 0.08 * span]


def tick_labels(ticks: list[float]) -> list[str]:
    """Tick values to three significant digits of the bar's span (0.000717 beside 1038 reads "0")."""
    import math

    span = max(ticks) - min(ticks) if len(ticks) > 1 else abs(ticks[0]) or 1.0
    decimals = max(0, 2 - math.floor(math.log10(max(span, 1e-12))))
    return [f"{round(t, decimals):g}" for t in ticks]


def fit_ticks(low: float, high: float, length: int, along: Callable[[str], int]) -> list[float]:
    """The ticks to label on a bar ``length`` px long: as many as leave the wider of two neighbouring
    labels' size free between them (labels are centred on their ticks; ``along(text)``: a label's size
    in px along the bar). An inner tick crowding an end goes first, then fewer ticks are tried.
    """
    span = max(high - low, 1e-12)

    def crowded(ticks: list[float], i: int) -> bool:  # labels i and i + 1
        a, b = (along(t) for t in tick_labels(ticks)[i:i + 2])
        return (ticks[i + 1] - ticks[i]) / span * (length - 1) - (a + b) / 2 < max(a, b)

    for count in (4, 3, 2, 1):
        ticks = nice_ticks(low, high, count)
        while len(ticks) > 2 and crowded(ticks, len(ticks) - 2):  # an irregular end value ("1038")
            del ticks[-2]
        while len(ticks) > 2 and crowded(ticks, 0):
            del ticks[1]
        if not any(crowded(ticks, i) for i in range(len(ticks) - 1)):
            return ticks
    return [float(low), float(high)]


def _font(size: int):
    from PIL import ImageFont

    if size < SCALABLE_FONT_MIN_PX:
        return ImageFont.load_default_imagefont()
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default_imagefont()


def render_bar(shape: tuple[int, int], footprint: np.ndarray, colours: np.ndarray, low: float, high: float,
               unit: str) -> tuple[np.ndarray, np.ndarray, BarPlacement] | None:
    """The bar as an RGB layer and its 0/1 mask, both (rows, cols[, 3]) uint8, or None without room.

    colours: (L, 3) floats in [0, 1], the fused colour of values low..high in order.
    """
    from PIL import Image, ImageDraw

    rows, cols = shape
    free = margins(footprint)
    side = max(("right", "left", "top", "bottom"), key=lambda s: free[s])
    usable = free[side] - 2  # 1 px clear of the body and 1 px of the image edge
    if usable < MIN_MARGIN_PX - 2 or usable < 1:
        return None
    vertical = side in ("left", "right")
    length = int(round(0.7 * (rows if vertical else cols)))
    if length < 8:
        return None
    thick = int(np.clip(usable // 3, 1, max(2, (cols if vertical else rows) // 24)))
    font = _font(max(7, min(rows, cols) // 28))
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def along(text: str) -> int:  # a label's size along the bar
        box = _box(draw_probe, text, font)
        return box[3] - box[1] if vertical else box[2] - box[0]

    # A horizontal bar and its unit, written before the low end, are centred together: the unit never
    # runs into the bar ("counts" is wider than the 15 % of the edge left of a centred bar).
    lead = along(unit) + 3 if unit and not vertical else 0
    if lead and cols - 2 - lead < length // 2:  # no room: the unit is left to the SeriesDescription
        unit, lead = "", 0
    length = min(length, cols - 2 - lead)
    start = (cols - lead - length) // 2 + lead if lead else (rows if vertical else cols) // 2 - length // 2
    ticks = fit_ticks(low, high, length, along)
    texts = tick_labels(ticks)
    sizes = [_box(draw_probe, t, font) for t in texts]
    text_w = max(b[2] - b[0] for b in sizes)
    text_h = max(b[3] - b[1] for b in sizes)
    labelled = usable >= thick + 4 + (text_w if vertical else text_h)
    layer = Image.new("RGB", (cols, rows))
    mask = Image.new("L", (cols, rows))
    draw, mdraw = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    ramp = (np.clip(colours, 0, 1) * 255 + 0.5).astype(np.uint8)
    if vertical:
        c0 = cols - 1 - thick if side == "right" else 1
        r_box = (start, c0, start + length, c0 + thick)
    else:
        r0 = 1 if side == "top" else rows - 1 - thick
        r_box = (r0, start, r0 + thick, start + length)
    for i in range(length):
        colour = tuple(int(v) for v in ramp[int(round(i / max(length - 1, 1) * (len(ramp) - 1)))])
        if vertical:  # high values at the top
            row = start + length - 1 - i
            draw.line([(r_box[1], row), (r_box[3] - 1, row)], fill=colour)
        else:
            col = start + i
            draw.line([(col, r_box[0]), (col, r_box[2] - 1)], fill=colour)
    mdraw.rectangle([(r_box[1], r_box[0]), (r_box[3] - 1, r_box[2] - 1)], fill=1)
    span = max(high - low, 1e-12)
    for value, text, bbox in zip(ticks, texts, sizes):
        frac = (value - low) / span
        tick_len = 2 if labelled else 0
        if vertical:
            row = start + length - 1 - int(round(frac * (length - 1)))
            x_in = r_box[1] - 1 - tick_len if side == "right" else r_box[3]
            draw.line([(x_in, row), (x_in + tick_len, row)], fill=(255, 255, 255))
            mdraw.line([(x_in, row), (x_in + tick_len, row)], fill=1)
            if labelled:
                w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
                x = r_box[1] - 2 - tick_len - w if side == "right" else r_box[3] + tick_len + 2
                y = int(np.clip(row - h // 2, 0, rows - h))
                _text(draw, mdraw, (x - bbox[0], y - bbox[1]), text, font)
        else:
            col = start + int(round(frac * (length - 1)))
            y_in = r_box[2] if side == "top" else r_box[0] - 1 - tick_len
            draw.line([(col, y_in), (col, y_in + tick_len)], fill=(255, 255, 255))
            mdraw.line([(col, y_in), (col, y_in + tick_len)], fill=1)
            if labelled:
                w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
                y = r_box[2] + tick_len + 1 if side == "top" else r_box[0] - 2 - tick_len - h
                x = int(np.clip(col - w // 2, 0, cols - w))
                _text(draw, mdraw, (x - bbox[0], y - bbox[1]), text, font)
    if labelled and unit:  # the unit before the low end (horizontal) or above the high end (vertical)
        ub = _box(draw_probe, unit, font)
        uw, uh = ub[2] - ub[0], ub[3] - ub[1]
        if vertical:
            x = r_box[1] + thick // 2 - uw // 2 if side == "left" else r_box[3] - uw
            xy = (int(np.clip(x, 0, cols - uw)), max(0, start - uh - 3))
        else:
            xy = (start - lead, int(np.clip((r_box[0] + r_box[2]) // 2 - uh // 2, 0, rows - uh)))
        _text(draw, mdraw, (xy[0] - ub[0], xy[1] - ub[1]), unit, font)
    bar = np.array(layer, dtype=np.uint8)
    drawn = np.asarray(mask, dtype=np.uint8) > 0
    keep = _grow(drawn)  # a 1-px black halo: labels stay legible over a bright table or tube in the margin
    bar[keep & ~drawn] = 0
    keep &= ~_grow(footprint)  # never over the body, whatever the font did
    return bar, keep.astype(np.uint8), BarPlacement(side, r_box, labelled)


def _box(draw, text: str, font) -> tuple[int, int, int, int]:
    """The ink box of ``text`` drawn at (0, 0): a bitmap font's own box is its whole cell, blank rows included."""
    from PIL import ImageFont

    box = draw.textbbox((0, 0), text, font=font)
    ink = font.getmask(text).getbbox() if isinstance(font, ImageFont.ImageFont) else None
    return (box[0] + ink[0], box[1] + ink[1], box[0] + ink[2], box[1] + ink[3]) if ink else box


def _text(draw, mdraw, xy, text, font) -> None:
    draw.text(xy, text, fill=(255, 255, 255), font=font)
    mdraw.text(xy, text, fill=1, font=font)


def _grow(footprint: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(footprint, iterations=1) if footprint.any() else footprint


def bar_colours(method: str, functional: bool, fusion_config, modality: str, steps: int = 128) -> np.ndarray:
    """(steps, 3) fused colours of the moving values 0..1, as the method shows them on mid-grey anatomy."""
    import torch

    from dicomnode.fusion.chroma import chroma_fusion
    from dicomnode.fusion.color import colorize

    cfg = fusion_config
    ramp = torch.linspace(0, 1, steps).view(1, 1, 1, steps)
    if method == CHROMA:
        lift = dict(cfg.chroma_lift).get(modality.upper(), 0.0)
        rgb = chroma_fusion(torch.full_like(ramp, 0.5), ramp, saturation=cfg.chroma_saturation,
                            colormap=cfg.chroma_colormap, lift=lift)
    elif functional:
        rgb = colorize(ramp[:, 0], cfg.colormap)
    else:
        rgb = ramp.expand(-1, 3, -1, -1)
    return rgb[0, :, 0].permute(1, 0).numpy()


def burn_in(rgb: np.ndarray, bar: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The (N, rows, cols, 3) uint8 slices with the bar layer where its mask is set (in place)."""
    rgb[:, mask.astype(bool)] = bar[mask.astype(bool)]
    return rgb
