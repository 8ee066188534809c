"""edgemap's torch-free runtime: preprocessing, runtime sessions and the Classifier.

Nothing here imports torch. This package is what the device wheel vendors.
"""

from edgemap.runtime.errors import EdgemapError, ImageError
from edgemap.runtime.preprocess import PreprocessContract, open_image, preprocess, preprocess_batch

__all__ = ["Classifier", "EdgemapError", "ImageError", "Prediction", "PreprocessContract", "open_image", "preprocess",
           "preprocess_batch"]


def __getattr__(name: str) -> object:
    """``from edgemap.runtime import Classifier`` (as the device wheel has it), imported when asked for."""
    if name in ("Classifier", "Prediction"):
        from edgemap.runtime import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'edgemap.runtime' has no attribute {name!r}")
