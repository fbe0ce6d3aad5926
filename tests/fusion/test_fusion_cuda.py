"""The GPU path: runs only where torch sees a CUDA device (CI has none, so it skips there)."""

import pytest
import torch

from dicomnode.config import FusionConfig
from dicomnode.fusion import FusionEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device; the GPU path is checked on GPU machines")


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
