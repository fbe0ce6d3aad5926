"""Metric conventions (ours vs CDDFuse's) and the functional-signal share "Kept", on hand cases."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from dicomnode.quality.basic import functional_kept
from dicomnode.quality.metrics import CONVENTIONS, MetricInputError, compute_metrics, convention_options


def _images(seed: int = 3, shape=(48, 40)):
    rng = np.random.default_rng(seed)
    a = np.round(rng.uniform(0, 255, shape))
    b = np.round(np.clip(0.4 * a + rng.normal(60, 30, shape), 0, 255))
    f = np.round(0.5 * a + 0.5 * b)
    return a, b, f


def test_mi_in_nats_is_bits_times_ln2_and_matches_sklearn():
    a, b, f = _images()
    ours = compute_metrics(a, b, f, ["MI"])["MI"]
    cdd = compute_metrics(a, b, f, ["MI"], **convention_options("cddfuse"))["MI"]
    assert cdd == pytest.approx(ours * math.log(2), rel=1e-12)
    # CDDFuse: sklearn's mutual_info_score (natural log) of the flattened 8-bit images, summed over A and B.
    reference = mutual_info_score(f.ravel(), a.ravel()) + mutual_info_score(f.ravel(), b.ravel())
    assert cdd == pytest.approx(reference, rel=1e-9)


def test_ssim_and_vif_summed_are_twice_the_mean():
    a, b, f = _images(seed=4)
    ours = compute_metrics(a, b, f, ["SSIM", "VIF"], vif_combine="mean")
    summed = compute_metrics(a, b, f, ["SSIM"], ssim_combine="sum")
    cdd = compute_metrics(a, b, f, ["SSIM", "VIF"], **convention_options("cddfuse"))
    assert summed["SSIM"] == pytest.approx(2 * ours["SSIM"], rel=1e-12)
    assert cdd["VIF"] == pytest.approx(2 * ours["VIF"], rel=1e-12)
    assert set(CONVENTIONS) == {"dicomnode", "cddfuse"}
    with pytest.raises(MetricInputError, match="unknown conventions"):
        convention_options("matlab")


def test_cddfuse_ssim_is_scikit_image_at_data_range_2_summed():
    """CDDFuse's evaluator: skimage's structural_similarity(F, X) with its defaults on 0..255 floats, where
    old releases took the float range (-1, 1): data range 2. Not our 11x11 Gaussian SSIM."""
    from skimage.metrics import structural_similarity

    a, b, f = _images(seed=5)
    cdd = compute_metrics(a, b, f, ["SSIM"], **convention_options("cddfuse"))["SSIM"]
    reference = structural_similarity(f, a, data_range=2.0) + structural_similarity(f, b, data_range=2.0)
    assert cdd == pytest.approx(reference, rel=1e-12)
    assert cdd != pytest.approx(compute_metrics(a, b, f, ["SSIM"], ssim_combine="sum")["SSIM"], rel=1e-3)
    # The whole-series path scores the same per slice.
    from dicomnode.quality.metrics import score_series

    stack = [np.stack([x, x[::-1]]) for x in (a, b, f)]
    series = score_series(*stack, ("SSIM",), max_slices=0, **convention_options("cddfuse"))
    assert series.per_slice[0]["SSIM"] == pytest.approx(cdd, rel=1e-12)


def test_kept_on_hand_cases():
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    b[:2] = 200.0  # half the image: B adds 200 over A
    b[2, 0] = 20.0  # below the 25.5 margin: not counted
    assert functional_kept(a, b, a) == 0.0
    assert functional_kept(a, b, b) == 1.0
    assert functional_kept(a, b, b + 50) == 1.0  # overshoot is clipped to B - A
    half = a + (b - a) / 2
    assert functional_kept(a, b, half) == pytest.approx(0.5)
    f = b.copy()
    f[0] = 0.0  # one of the two bright rows lost entirely
    assert functional_kept(a, b, f) == pytest.approx(0.5)
    # A ratio of sums: a big excess counts more than a small one.
    b2 = np.zeros((1, 2))
    b2[0] = (100.0, 200.0)
    f2 = np.array([[100.0, 0.0]])
    assert functional_kept(np.zeros((1, 2)), b2, f2) == pytest.approx(100 / 300)
    assert math.isnan(functional_kept(a, a, a))
    assert compute_metrics(a, b, half, ["Kept"])["Kept"] == pytest.approx(0.5)


def test_metrics_command_conventions_flag(tmp_path):
    from PIL import Image

    a, b, f = _images(seed=5)
    paths = []
    for name, img in (("a", a), ("b", b), ("f", f)):
        path = tmp_path / f"{name}.png"
        Image.fromarray(img.astype(np.uint8)).save(path)
        paths.append(str(path))

    def run(*extra):
        proc = subprocess.run([sys.executable, "-m", "dicomnode", "metrics", *paths, "--json", *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    ours, cdd = run(), run("--conventions", "cddfuse")
    assert cdd["MI"] == pytest.approx(ours["MI"] * math.log(2), rel=1e-6)
    assert cdd["SSIM"] == pytest.approx(compute_metrics(a, b, f, ["SSIM"], **convention_options("cddfuse"))["SSIM"],
                                        rel=1e-6)
    assert cdd["Qabf"] == pytest.approx(ours["Qabf"], rel=1e-9)  # conventions change MI/SSIM/VIF only
    assert ours["Kept"] == pytest.approx(functional_kept(a, b, f))
