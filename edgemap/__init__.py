"""edgemap: map a pretrained backbone to a small, fast, verified model on an edge device."""

__version__ = "0.1.0"
