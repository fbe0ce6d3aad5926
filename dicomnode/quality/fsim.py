"""FSIM (Zhang, Zhang, Mou, Zhang 2011) on grey images, with Kovesi's phase congruency.

Phase congruency: log-Gabor filters, 4 scales (shortest wavelength 6 px, factor 2, sigmaOnf 0.55),
4 orientations (angular sigma pi/4/1.2), noise threshold k = 2, as the authors' reference code.
Gradient: Scharr operator /16. Constants T1 = 0.85, T2 = 160 (images on 0..255).
"""

from __future__ import annotations

import numpy as np
from scipy.signal import convolve2d

_NSCALE = 4
_NORIENT = 4
_MIN_WAVELENGTH = 6.0
_MULT = 2.0
_SIGMA_ON_F = 0.55
_D_THETA_ON_SIGMA = 1.2
_K = 2.0
_EPSILON = 1e-4


def _freq_range(n: int) -> np.ndarray:
    if n % 2:
        return np.arange(-(n - 1) / 2, (n - 1) / 2 + 1) / (n - 1)
    return np.arange(-n / 2, n / 2) / n


def phase_congruency(im: np.ndarray) -> np.ndarray:
    """Phase congruency map in [0, 1] (summed over orientations); 0 where the image has no energy."""
    rows, cols = im.shape
    imagefft = np.fft.fft2(im)
    x, y = np.meshgrid(_freq_range(cols), _freq_range(rows))
    radius = np.fft.ifftshift(np.sqrt(x**2 + y**2))
    theta = np.fft.ifftshift(np.arctan2(-y, x))
    radius[0, 0] = 1.0
    sintheta, costheta = np.sin(theta), np.cos(theta)
    lowpass = 1.0 / (1.0 + (radius / 0.45) ** (2 * 15))
    log_gabor = []
    for s in range(_NSCALE):
        fo = 1.0 / (_MIN_WAVELENGTH * _MULT**s)
        lg = np.exp(-(np.log(radius / fo) ** 2) / (2 * np.log(_SIGMA_ON_F) ** 2)) * lowpass
        lg[0, 0] = 0.0
        log_gabor.append(lg)
    theta_sigma = np.pi / _NORIENT / _D_THETA_ON_SIGMA
    energy_all = np.zeros((rows, cols))
    an_all = np.zeros((rows, cols))
    for o in range(_NORIENT):
        angl = o * np.pi / _NORIENT
        ds = sintheta * np.cos(angl) - costheta * np.sin(angl)
        dc = costheta * np.cos(angl) + sintheta * np.sin(angl)
        spread = np.exp(-(np.abs(np.arctan2(ds, dc)) ** 2) / (2 * theta_sigma**2))
        sum_e = np.zeros((rows, cols))
        sum_o = np.zeros((rows, cols))
        sum_an = np.zeros((rows, cols))
        eo_all, ifft_filters = [], []
        em_n = 0.0
        for s in range(_NSCALE):
            filt = log_gabor[s] * spread
            ifft_filters.append(np.real(np.fft.ifft2(filt)) * np.sqrt(rows * cols))
            eo = np.fft.ifft2(imagefft * filt)
            eo_all.append(eo)
            sum_an += np.abs(eo)
            sum_e += eo.real
            sum_o += eo.imag
            if s == 0:
                em_n = float((filt**2).sum())
        x_energy = np.sqrt(sum_e**2 + sum_o**2) + _EPSILON
        mean_e, mean_o = sum_e / x_energy, sum_o / x_energy
        energy = np.zeros((rows, cols))
        for eo in eo_all:
            e, od = eo.real, eo.imag
            energy += e * mean_e + od * mean_o - np.abs(e * mean_o - od * mean_e)
        # Noise estimated from the smallest scale's response (Rayleigh median), as Kovesi does.
        mean_e2n = -np.median(np.abs(eo_all[0]) ** 2) / np.log(0.5)
        noise_power = mean_e2n / em_n
        est_sum_an2 = sum(f**2 for f in ifft_filters).sum()
        est_sum_aiaj = sum(
            (ifft_filters[i] * ifft_filters[j]).sum() for i in range(_NSCALE - 1) for j in range(i + 1, _NSCALE)
        )
        est_noise_energy2 = 2 * noise_power * est_sum_an2 + 4 * noise_power * est_sum_aiaj
        tau = np.sqrt(est_noise_energy2 / 2)
        threshold = (tau * np.sqrt(np.pi / 2) + _K * np.sqrt((2 - np.pi / 2) * tau**2)) / 1.7
        energy_all += np.maximum(energy - threshold, 0)
        an_all += sum_an
    with np.errstate(invalid="ignore", divide="ignore"):
        pc = np.where(an_all > 0, energy_all / np.where(an_all > 0, an_all, 1), 0.0)
    return pc


_SCHARR_X = np.array([[3, 0, -3], [10, 0, -10], [3, 0, -3]]) / 16.0
_SCHARR_Y = np.array([[3, 10, 3], [0, 0, 0], [-3, -10, -3]]) / 16.0


def _prepare(im: np.ndarray) -> np.ndarray:
    """Average-filter and subsample by F = max(1, round(min(H, W) / 256)), as the reference code."""
    im = im.astype(np.float64)
    step = max(1, round(min(im.shape) / 256))
    if step > 1:
        im = convolve2d(im, np.ones((step, step)) / step**2, mode="same")[::step, ::step]
    return im


def fsim(ref: np.ndarray, dist: np.ndarray) -> float:
    """FSIM = sum(S_PC * S_G * PC_m) / sum(PC_m), PC_m = max(PC_ref, PC_dist); 1 for identical images."""
    y1, y2 = _prepare(ref), _prepare(dist)
    pc1, pc2 = phase_congruency(y1), phase_congruency(y2)
    g1 = np.hypot(convolve2d(y1, _SCHARR_X, mode="same"), convolve2d(y1, _SCHARR_Y, mode="same"))
    g2 = np.hypot(convolve2d(y2, _SCHARR_X, mode="same"), convolve2d(y2, _SCHARR_Y, mode="same"))
    t1, t2 = 0.85, 160.0
    s_pc = (2 * pc1 * pc2 + t1) / (pc1**2 + pc2**2 + t1)
    s_g = (2 * g1 * g2 + t2) / (g1**2 + g2**2 + t2)
    pcm = np.maximum(pc1, pc2)
    if pcm.sum() == 0:
        # No phase structure anywhere (flat images): fall back to the unweighted similarity.
        return float(np.mean(s_pc * s_g))
    return float((s_pc * s_g * pcm).sum() / pcm.sum())


