"""The only image code outside the ONNX graph: decode, EXIF orientation, RGB, resize/crop.

This module is shared by training, ``edgemap eval`` and the device wheel (it is vendored
into the wheel), so an image becomes the same uint8 array everywhere, with the same Pillow release
series (Pillow's resampling changed between major releases; the device wheel asks for the series the
model was exported with, and the Classifier warns under another). It imports numpy and Pillow only.

The graph itself takes that ``(N, H, W, 3)`` uint8 RGB batch and normalises inside, so
mean/std live in the contract for the exporter, not here.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import threading
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from edgemap.runtime.errors import ImageError
from edgemap.runtime.text import printable

log = logging.getLogger(__name__)

#: Default limit on decoded pixels (Pillow's own default, ~89 Mpx). Configurable per call.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
RESIZE_RULES = ("shorter_center_crop", "stretch")
#: File name endings read as images when a folder is listed: by `edgemap datasets scan`, training,
#: eval and the device CLI alike (one list, so a device sees the images training saw).
# .jfif/.jpe: JPEGs as browsers on Windows save them (they were dropped as "non-image" files)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_HIDDEN_NAMES = frozenset({"__MACOSX"})


def is_hidden(name: str) -> bool:
    """Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``, ``._x.jpg``, ``__MACOSX``) are never data."""
    return name.startswith(".") or name in _HIDDEN_NAMES
_WHITE = (255, 255, 255)

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


LAYOUT = "NHWC uint8 RGB"  # what the graph takes: preprocessing (mean/std) happens inside it


@dataclass(frozen=True)
class PreprocessContract:
    """How a file becomes the model's input, recorded in edgemap.json, ONNX metadata and wheels.

    Attributes:
        height, width: the model input size in pixels.
        resize: ``shorter_center_crop`` (scale the shorter side to ``size / crop_pct``,
            then crop the centre) or ``stretch`` (resize to H×W ignoring aspect).
        crop_pct: fraction of the resized image kept by the centre crop (1.0 = no margin).
        interpolation: Pillow filter used for resizing.
        mean, std: per-channel normalisation on 0–255 pixels, applied *inside* the graph.
    """

    height: int
    width: int
    resize: str = "shorter_center_crop"
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    layout: str = field(default=LAYOUT)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, not {self.resize!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}")
        if not (0.0 < self.crop_pct <= 1.0):
            raise ValueError("crop_pct must be in (0, 1]")
        if self.height < 1 or self.width < 1:
            raise ValueError("height and width must be positive")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have 3 values (R, G, B)")
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("mean and std must be finite numbers")
        if not all(v > 0 for v in self.std):
            raise ValueError("std must be positive (the graph divides by it)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessContract:
        """The contract :meth:`to_dict` wrote, read strictly: every key present (a missing one fell back to a default
        that may not be what the model was trained with), no unknown key (a newer edgemap's rule this runtime would
        not apply), whole-number sizes (32.9 was read as 32) and the one layout the graph takes.

        Raises:
            ImageError: naming what is wrong.
        """
        def bad(why: str) -> ImageError:
            return ImageError(f"invalid preprocessing contract {printable(repr(d))[:300]}: {why}")

        if not isinstance(d, dict):
            raise bad("not a JSON object")
        keys = [f.name for f in fields(cls)]
        missing = [k for k in keys if k not in d]
        if missing:
            raise bad(f"missing {', '.join(map(repr, missing))} (`edgemap export` writes every key; export again)")
        unknown = sorted(str(k) for k in d if k not in keys)
        if unknown:
            raise bad(f"unknown key(s) {', '.join(map(repr, unknown))}: written by a newer edgemap? upgrade this runtime")
        for k in ("height", "width"):
            if type(d[k]) is not int:
                raise bad(f"{k} must be a whole number, not {d[k]!r}")
        if d["layout"] != LAYOUT:
            raise bad(f"layout {d['layout']!r}: this runtime feeds {LAYOUT!r} (the layout `edgemap export` writes)")
        for k in ("resize", "interpolation"):
            if not isinstance(d[k], str):
                raise bad(f"{k} must be a string, not {d[k]!r}")
        if not _number(d["crop_pct"]):
            raise bad(f"crop_pct must be a number, not {d['crop_pct']!r}")
        for k in ("mean", "std"):
            if not isinstance(d[k], list | tuple) or not all(_number(v) for v in d[k]):
                raise bad(f"{k} must be a list of 3 numbers, not {d[k]!r}")
        try:
            return cls(height=d["height"], width=d["width"], resize=d["resize"], crop_pct=float(d["crop_pct"]),
                       interpolation=d["interpolation"], mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
                       std=tuple(float(x) for x in d["std"]))  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError) as e:
            raise bad(str(e)) from e


def open_image(source: str | Path | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image fully, apply EXIF orientation and convert it to RGB.

    Raises ImageError naming the file for anything that is not a complete, decodable
    image, or whose pixel count exceeds ``max_pixels`` (decompression-bomb guard;
    ``None`` uses Pillow's global limit ``PIL.Image.MAX_IMAGE_PIXELS`` instead). A
    ``max_pixels`` above twice Pillow's limit (where Pillow refuses on its own) is honoured,
    without changing that global.
    """
    _decoding.name, _decoding.notes = _name(source), []
    try:
        im = _open_checked(source, max_pixels)
    finally:  # an image refused anyway is named by its error; its warnings are not reported as "used"
        notes, _decoding.name, _decoding.notes = _decoding.notes, None, []
    if notes:
        _report_metadata_warnings(_name(source), notes)
    return im


def _open_checked(source: str | Path | bytes, max_pixels: int | None) -> Image.Image:
    pillow = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and pillow is not None and max_pixels > 2 * pillow:
        # over Pillow's own refusal (2 x MAX_IMAGE_PIXELS): edgemap's check (in _open_image) stands in for Pillow's,
        # in this thread only; Pillow's global limit is never changed (other threads keep reading it)
        _own_limit.active = True
        try:
            return _open_image(source, max_pixels)
        finally:
            _own_limit.active = False
    try:
        return _open_image(source, max_pixels)
    except Image.DecompressionBombError:
        limit = pillow if max_pixels is None else max_pixels
        raise ImageError(f"{_name(source)}: over {2 * (pillow or 0):,} pixels exceeds the limit of {limit:,} "
                         "(decompression-bomb guard); raise --max-pixels if the image is genuine") from None


# One flag per thread, shared by every copy of this module in a process (edgemap.runtime and the copies vendored
# into device wheels), kept on Pillow's module.
_own_limit: threading.local = getattr(Image, "_edgemap_own_limit", None) or threading.local()
Image._edgemap_own_limit = _own_limit  # type: ignore[attr-defined]


def _bomb_check(*args: Any, **kwargs: Any) -> None:
    """Pillow's decompression-bomb check (any signature), skipped in a thread where open_image enforces a higher
    --max-pixels."""
    if not getattr(_own_limit, "active", False):
        _pillow_bomb_check(*args, **kwargs)


# Pillow calls Image._decompression_bomb_check (a module global) in open() and in some decoders; the wrapper behaves
# exactly as Pillow's own check except inside open_image's raised-limit branch above. Installed once per process.
_pillow_bomb_check = Image._decompression_bomb_check
if not hasattr(_pillow_bomb_check, "edgemap_wrapper"):
    _bomb_check.edgemap_wrapper = True  # type: ignore[attr-defined]
    Image._decompression_bomb_check = _bomb_check  # type: ignore[assignment]


# Pillow's warnings while an image is decoded ("Corrupt EXIF data", "Tag data larger than file. Skipping tag 274",
# "Truncated File Read"...) name neither the image nor whether it was used: open_image reports them itself, one
# line per image with its name (_report_metadata_warnings). Pillow's warnings are shown every time (not once per
# process) so each image gets its line; the filter is appended, so a filter the user set (-W ignore...) still wins.
# The decoding image is one per thread (shared by the vendored copies of this module, kept on Pillow's module).
_decoding: threading.local = getattr(Image, "_edgemap_decoding", None) or threading.local()
Image._edgemap_decoding = _decoding  # type: ignore[attr-defined]
_PILLOW_DIR = os.path.dirname(Image.__file__) + os.sep
#: at most this many images' warnings are reported per process (each image once: a scan and the training that
#: follows decode it twice); then one line says more were left out
_MAX_REPORTED = 20
if not hasattr(Image, "_edgemap_reported"):  # shared by the vendored copies too (each image named once)
    Image._edgemap_reported = (set(), threading.Lock())  # type: ignore[attr-defined]
_reported: set[str]
_reported, _reported_lock = Image._edgemap_reported  # type: ignore[attr-defined]


#: per image: at most this many distinct warnings, each cut to this length (a PNG with 65,535 bad EXIF tags made
#: 65,535 warnings: a quadratic de-duplication took 14 s per decode and printed a 3 MB line)
_MAX_NOTES, _NOTE_CHARS = 5, 200


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    notes = getattr(_decoding, "notes", None)
    if getattr(_decoding, "name", None) is not None and notes is not None and str(filename).startswith(_PILLOW_DIR):
        # open_image checks the pixel count itself against the caller's limit: Pillow's warning between 1x and 2x
        # its own limit is redundant there. Dropped here, inside edgemap's decode only: a process-wide "ignore"
        # filter turned off the bomb refusal of an app that imported a device wheel and set "error" for it.
        if isinstance(category, type) and issubclass(category, Image.DecompressionBombWarning):
            return
        if len(notes) <= _MAX_NOTES:  # one more slot says "…": the rest of this image's warnings are dropped
            text = str(message)[:_NOTE_CHARS]
            if len(notes) == _MAX_NOTES:
                notes.append("… (more warnings)")
            elif text not in notes:
                notes.append(text)
        return
    _show_warning.previous(message, category, filename, lineno, file, line)  # type: ignore[attr-defined]


def _report_metadata_warnings(name: str, notes: list[str]) -> None:
    with _reported_lock:
        if name in _reported or len(_reported) > _MAX_REPORTED:
            return
        # a file once; every image given as bytes (no name to tell them apart) counts on its own
        _reported.add(name if name != "<bytes>" else f"<bytes {len(_reported)}>")
        n = len(_reported)
    if n <= _MAX_REPORTED:
        log.warning("%s: %s (Pillow's warning; the image is used as decoded)", printable(name),
                    printable("; ".join(notes)))
    else:
        log.warning("more images have Pillow warnings; not listed (%d shown)", _MAX_REPORTED)


def new_warning_scope() -> None:
    """Start a new budget of reported images (one ``Classifier`` call that decodes images): a long-running server
    that met 20 images with Pillow warnings in its first requests logged none for any request after."""
    with _reported_lock:
        _reported.clear()


if not getattr(warnings.showwarning, "edgemap_wrapper", False):
    _show_warning.previous = warnings.showwarning  # type: ignore[attr-defined]
    _show_warning.edgemap_wrapper = True  # type: ignore[attr-defined]
    warnings.showwarning = _show_warning
    warnings.filterwarnings("always", category=UserWarning, module=r"PIL\.", append=True)


def _name(source: str | Path | bytes) -> str:
    return "<bytes>" if isinstance(source, bytes) else str(source)


def _open_image(source: str | Path | bytes, max_pixels: int | None) -> Image.Image:
    name = _name(source)
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(fp) as im:
            w, h = im.size
            if limit is not None and w * h > limit:
                raise ImageError(
                    f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {limit:,} "
                    "(decompression-bomb guard); raise --max-pixels if the image is genuine"
                )
            im.load()  # decode everything now: truncated files fail here, not mid-training
            im = ImageOps.exif_transpose(im)
            return to_rgb(im, name)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise  # open_image decides: refused, or decoded again with Pillow's limit raised to --max-pixels
    except Image.DecompressionBombWarning as e:  # the caller turned warnings into errors
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from e
    except FileNotFoundError as e:
        raise ImageError(f"{name}: file not found") from e
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as e:
        if _empty(source):  # a copy cut short at 0 bytes: "cannot identify image file" did not say so
            raise ImageError(f"{name}: empty file (0 bytes)") from e
        why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(bytes)", str(e))  # no object address in the message
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {why})") from e
    except Warning as e:  # a Pillow warning the user's filters turn into an error (-W error): this image only
        raise ImageError(f"{name}: refused: Pillow warned ({type(e).__name__}: {e}) and the warning filters make "
                         "warnings errors") from e


def _empty(source: object) -> bool:
    """Whether ``source`` (a path or bytes) holds no bytes at all."""
    if isinstance(source, bytes | bytearray | memoryview):
        return len(source) == 0
    try:
        return isinstance(source, str | os.PathLike) and os.stat(source).st_size == 0
    except OSError:
        return False


def to_rgb(im: Image.Image, name: str = "<image>") -> Image.Image:
    """Deterministic conversion of any Pillow mode to 8-bit RGB.

    Alpha (and a PNG's transparent colour key, in any mode) is composited over white; 16/32-bit integer images keep their top 8 bits
    (``v >> 8``); float images are clipped to 0–255; CMYK/YCbCr/LAB use Pillow's converters.
    """
    mode = im.mode
    keyed = mode in ("P", "RGB", "L") and "transparency" in im.info  # a PNG tRNS colour key (optipng makes these)
    if mode == "RGB" and not keyed:
        return im.copy() if im.readonly else im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or keyed:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)  # uint16 (I;16, I;16B...) or int32 (I): never widened (int64 temporaries cost 1.7 GB
        if arr.dtype.kind != "u":  # for a 9000x9000 16-bit PNG of 157 KB)
            arr = np.clip(arr, 0, 65535)
        arr = (arr >> 8).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float32)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    raise ImageError(f"{name}: unsupported image mode {mode!r}")


#: Above this many times the output's pixels, resize_crop resizes only the kept window (memory bound).
_WHOLE_RESIZE_FACTOR = 16


def resize_crop(im: Image.Image, contract: PreprocessContract) -> np.ndarray:
    """Resize/crop an RGB image by the contract's rule; returns uint8 (H, W, 3)."""
    resample = _RESAMPLE[contract.interpolation]
    H, W = contract.height, contract.width
    if contract.resize == "stretch":
        out = im.resize((W, H), resample=resample, reducing_gap=None)
    else:
        w, h = im.size
        scale = max(H / h, W / w) / contract.crop_pct
        nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
        left, top = (nw - W) // 2, (nh - H) // 2
        if nw * nh > _WHOLE_RESIZE_FACTOR * W * H:
            # a strip (e.g. 20000x1): resizing it whole would take gigabytes; resize only the window that
            # is kept (the same rule; values may differ from a whole resize by rounding, on every path alike)
            sx, sy = w / nw, h / nh
            box = (left * sx, top * sy, (left + W) * sx, (top + H) * sy)
            out = im.resize((W, H), resample=resample, box=box, reducing_gap=None)
        else:
            out = im.resize((nw, nh), resample=resample, reducing_gap=None) if (nw, nh) != (w, h) else im
            out = out.crop((left, top, left + W, top + H))
    arr = np.asarray(out, dtype=np.uint8)
    return np.ascontiguousarray(arr)


def preprocess(
    image: ImageInput, contract: PreprocessContract, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Any supported input → the contract's uint8 RGB array of shape (H, W, 3).

    Accepts a path, encoded bytes, a PIL image, or a uint8 array (H, W), (H, W, 3) or
    (H, W, 4). An array already of the contract's size passes through unchanged.

    An array is taken as it is: gray, RGB or RGBA pixels, already upright. ``np.asarray(Image.open(f))`` of a
    CMYK JPEG is (H, W, 4) CMYK (read here as RGBA: wrong colours), and of an EXIF-rotated photo is not rotated;
    give the path, the bytes or the PIL image instead: they convert and rotate exactly as training did.

    Example:
        >>> x = preprocess("cat.jpg", PreprocessContract(224, 224, crop_pct=0.875))
        >>> x.shape, x.dtype
        ((224, 224, 3), dtype('uint8'))
    """
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ImageError(f"array input must be uint8, got {arr.dtype}")
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ImageError(f"array input must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
        if arr.shape[2] == 4:
            arr = np.asarray(to_rgb(Image.fromarray(arr, mode="RGBA")))
        if arr.shape[:2] == (contract.height, contract.width):
            return np.ascontiguousarray(arr)
        im = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    elif isinstance(image, Image.Image):
        try:  # a lazily opened image decodes here: truncated/corrupt data surfaces now
            im = to_rgb(ImageOps.exif_transpose(image))
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            name = getattr(image, "filename", "") or "<PIL image>"
            raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(image, "read"):
        im = open_image(bytes(image) if isinstance(image, (bytearray, memoryview)) else image, max_pixels=max_pixels)
    else:  # 5, None, a dict: said as such, not "'int' object has no attribute 'read'"
        raise ImageError(f"{type(image).__name__} is not an image: give a path, bytes, a file object, a PIL image "
                         "or a uint8 array")
    return resize_crop(im, contract)


def preprocess_batch(
    images: list[ImageInput], contract: PreprocessContract, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Preprocess several inputs into one (N, H, W, 3) uint8 batch."""
    if not images:
        return np.zeros((0, contract.height, contract.width, 3), dtype=np.uint8)
    return np.stack([preprocess(x, contract, max_pixels) for x in images])
