"""dicomnode: a DICOM node that registers and fuses multimodal medical images."""

__version__ = "0.1.0"
