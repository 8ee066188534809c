"""edgemap's torch-free runtime: preprocessing, runtime sessions and the Classifier.

Nothing here imports torch. This package is what the device wheel vendors.
"""

from edgemap.runtime.errors import EdgemapError, ImageError
from edgemap.runtime.preprocess import PreprocessContract, open_image, preprocess, preprocess_batch

__all__ = ["EdgemapError", "ImageError", "PreprocessContract", "open_image", "preprocess", "preprocess_batch"]
