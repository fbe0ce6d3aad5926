"""Fusion engine: classical baselines, the attention fusion network, colour handling, explanations."""

from dicomnode.fusion.api import (
    FusionEngine,
    FusionResult,
    UnknownMethod,
    available_methods,
    check_method_available,
    fuse,
    get_method,
)

__all__ = ["FusionEngine", "FusionResult", "UnknownMethod", "available_methods", "check_method_available", "fuse", "get_method"]
