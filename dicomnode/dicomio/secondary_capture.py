"""The fused series: one RGB Secondary Capture instance per fixed slice (highdicom)."""
