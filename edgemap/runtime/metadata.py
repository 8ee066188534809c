"""Keys of the edgemap metadata stored in every exported ONNX model's ``metadata_props``.

A loader (``edgemap eval``, the device wheel, ``edgemap-runtime``) rebuilds labels and
preprocessing from these alone. JSON-valued keys are noted.
"""

from __future__ import annotations

SCHEMA = "edgemap.schema"  # "1"
CLASSES = "edgemap.classes"  # JSON list of class names in index order
PREPROCESS = "edgemap.preprocess"  # JSON PreprocessContract.to_dict()
BACKBONE = "edgemap.backbone"  # backbone name
RUN = "edgemap.run"  # run directory name
PRECISION = "edgemap.precision"  # "fp32" | "int8"
FORMAT = "edgemap.format"  # "fp32" | "qoperator" | "qdq"
VERSIONS = "edgemap.versions"  # JSON {package: version}
INPUT = "edgemap.input"  # JSON {"name": "images", "layout": "NHWC", "dtype": "uint8", "shape": [-1, H, W, 3]}
OUTPUT = "edgemap.output"  # JSON {"name": "logits", ...}
MAX_PIXELS = "edgemap.max_pixels"  # JSON int: the run's decompression-bomb limit (null: Pillow's own); absent: the default
METADATA_SCHEMA_VERSION = "1"
