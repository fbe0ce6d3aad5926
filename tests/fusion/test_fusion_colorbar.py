"""Colour bar layout: tick labels a reader can tell apart, and a unit that stays off the bar."""

from __future__ import annotations

import numpy as np

from dicomnode.fusion.colorbar import fit_ticks, render_bar

RAMP = np.linspace(0, 1, 64)[:, None].repeat(3, axis=1)


def _footprint(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    body = np.zeros(shape, bool)
    body[rows[0]:rows[1], cols[0]:cols[1]] = True
    return body


def _white(layer: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The bar's white marks (ticks, labels, unit), without the black halo around them."""
    return mask.astype(bool) & (layer.min(axis=-1) > 127)


def _labels_along_bottom_bar(white: np.ndarray, box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """(first, last) label column of each tick of a bottom bar, left to right, from its white marks alone."""
    row0 = box[0]
    ticks = np.flatnonzero(white[row0 - 2])  # the tick marks stand on the bar
    band = white[:row0 - 3].any(axis=0)  # the labels above them
    cols = np.flatnonzero(band)
    owner = np.argmin(np.abs(cols[:, None] - ticks[None, :]), axis=1)
    return [(int(cols[owner == k].min()), int(cols[owner == k].max())) for k in range(len(ticks))]


def test_an_irregular_end_label_stands_clear_of_its_neighbour():
    # STS_002's MR on its CT (143 x 161, a bottom margin): the range ends at 1038, not on a round
    # tick. The old layout put "800" 12 px from "1038", closer than a label is wide.
    shape = (143, 161)
    bar = render_bar(shape, _footprint(shape, (5, 115), (10, 150)), RAMP, 0.000717, 1037.99, "")
    assert bar is not None
    layer, mask, placement = bar
    assert placement.side == "bottom" and placement.labelled
    labels = _labels_along_bottom_bar(_white(layer, mask), placement.box)
    assert len(labels) >= 3  # the two ends and at least one round value between them
    for (a0, a1), (b0, b1) in zip(labels, labels[1:]):
        wider = max(a1 - a0 + 1, b1 - b0 + 1)
        assert b0 - a1 - 1 >= wider, labels


def test_fit_ticks_keeps_the_ends_and_drops_the_inner_tick_that_crowds_one():
    digits = lambda text: 4 * len(text)  # noqa: E731 -- a 4-px-wide digit, as the bar's font at 7 px
    ticks = fit_ticks(0.000717, 1037.99, 113, digits)
    assert ticks[0] == 0.000717 and ticks[-1] == 1037.99
    assert 900.0 not in ticks and 600.0 in ticks  # 900 crowds "1038"; 0, 300, 600 stay evenly spaced
    assert fit_ticks(0.0, 10.0, 113, digits) == [0.0, 2.5, 5.0, 7.5, 10.0]  # a round range keeps them all


def test_the_unit_before_a_horizontal_bar_does_not_run_into_it():
    # The synthetic NM on its CT (128 x 128, a top margin): "counts" is wider than the space left
    # of a centred bar, so the old layout wrote it over the bar's low end.
    shape = (128, 128)
    bar = render_bar(shape, _footprint(shape, (20, 120), (5, 123)), RAMP, 0.0, 518.6, "counts")
    assert bar is not None
    layer, mask, placement = bar
    row0, col0, row1, _ = placement.box
    assert placement.side == "top" and placement.labelled
    white = _white(layer, mask)
    assert white[row0:row1, :col0 - 2].any(), "the unit is written before the bar"
    assert not white[row0:row1, col0 - 2:col0].any(), "clear columns between the unit and the bar"
    assert not mask[row0:row1, col0 - 1].any() or (layer[row0:row1, col0 - 1] == 0).all()  # at most a black halo


def test_marks_carry_a_black_halo_that_stays_off_the_body():
    from scipy import ndimage

    shape = (143, 161)
    body = _footprint(shape, (5, 115), (10, 150))
    layer, mask, placement = render_bar(shape, body, RAMP, 0.0, 10.0, "SUV")
    white, kept = _white(layer, mask), mask.astype(bool)
    ramp = np.zeros(shape, bool)
    row0, col0, row1, col1 = placement.box
    ramp[row0:row1, col0:col1] = True
    around = ndimage.binary_dilation(white) & ~white & ~ramp & ~ndimage.binary_dilation(body)
    assert around.any() and kept[around].all() and (layer[around] == 0).all()
    assert not (kept & body).any()


def test_labels_on_a_small_image_are_large_enough_to_tell_digits_apart():
    # STS_002's PET on its CT (143 x 161, a bottom margin) ends at SUV 16.7: in the scalable font's
    # 5 px digits the burned "16.7" read "10.7" (the strokes of the 6 and the 0 differed in 2 pixels).
    shape = (143, 161)
    body = _footprint(shape, (5, 115), (10, 150))

    def end_label(high: float) -> np.ndarray:
        layer, mask, placement = render_bar(shape, body, RAMP, 0.0, high, "SUV")
        assert placement.side == "bottom" and placement.labelled
        row0, _, _, col1 = placement.box
        return _white(layer, mask)[:row0 - 3, col1 - 20:]

    six, zero = end_label(16.7), end_label(10.7)
    rows = np.flatnonzero(six.any(axis=1))
    assert rows.max() - rows.min() + 1 >= 7, "digits at least 7 px tall"
    assert (six ^ zero).sum() >= 4
