"""The GPU path: runs only where torch sees a CUDA device (CI has none: "not applicable" there, see conftest)."""

import pytest
import torch

from dicomnode.config import FusionConfig
from dicomnode.fusion import FusionEngine

pytestmark = pytest.mark.requires_cuda


@pytest.mark.parametrize("method", ["gff", "laplacian", "dwt", "pca", "network"])
def test_cuda_matches_cpu(method, grey_batch):
    fixed, moving = grey_batch
    cfg = FusionConfig(saliency=False)
    cpu = FusionEngine(method, cfg, "cpu").fuse(fixed, moving)
    gpu = FusionEngine(method, cfg, "cuda").fuse(fixed, moving)
    assert gpu.fused.device.type == "cpu"  # results come back to the host for encoding
    assert torch.allclose(cpu.fused, gpu.fused, atol=2e-3)


def test_auto_picks_cuda():
    assert FusionEngine("average", FusionConfig(), "auto").device.type == "cuda"
