"""The [quality] section: defaults and validation of metric names."""

from __future__ import annotations

import pytest

from dicomnode.config import ConfigError, load_config


def test_quality_defaults_and_unknown_names():
    q = load_config().quality
    assert q.metrics == ("EN", "MI", "SSIM", "Qabf", "VIF") and q.round_fused and q.thresholds == {}
    assert load_config(overrides={"quality": {"thresholds": {"Qcv": 500.0}}}).quality.thresholds == {"Qcv": 500.0}
    with pytest.raises(ConfigError, match="quality.metrics"):
        load_config(overrides={"quality": {"metrics": ["EN", "QABF"]}})
    with pytest.raises(ConfigError, match="quality.thresholds"):
        load_config(overrides={"quality": {"thresholds": {"ssim": 0.5}}})
