"""Metric names and their direction, importable without numpy (the configuration validates against it)."""

from __future__ import annotations

# name -> True when a higher value means a better fusion. Order is the reporting order.
DIRECTIONS: dict[str, bool] = {
    "EN": True,
    "SD": True,
    "SF": True,
    "AG": True,
    "MI": True,
    "SSIM": True,
    "SSIM_A": True,
    "SSIM_B": True,
    "MSE": False,
    "PSNR": True,
    "CC": True,
    "SCD": True,
    "Qabf": True,
    "VIF": True,
    "VIFF": True,
    "FMI_pixel": True,
    "FMI_dct": True,
    "FMI_w": True,
    "FMI_gradient": True,
    "Qcb": True,
    "Qcv": False,
    "QNCIE": True,
    "EPI": True,
    "FSIM": True,
    "DFRS": True,
    "Kept": True,
}

METRIC_NAMES: tuple[str, ...] = tuple(DIRECTIONS)
DEFAULT_SERIES_METRICS: tuple[str, ...] = ("EN", "MI", "SSIM", "Qabf", "VIF")
