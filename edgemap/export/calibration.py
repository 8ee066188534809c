"""Calibration data: stratified training images through the training-time eval preprocessing.

Calibration uses training images only (never validation or test), picked round-robin
across classes with a seeded shuffle inside each class, so a few hundred images cover
every class evenly. Images are decoded lazily, one per ``get_next`` call, and ranges are
collected in chunks (``chunk`` images at a time): ONNX Runtime's histogram calibrators
keep every intermediate tensor of everything fed to one ``collect_data`` call, so feeding
the whole set at once would need memory proportional to ``calib_size``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemap.errors import QuantizationError
from edgemap.runtime.preprocess import DEFAULT_MAX_PIXELS, PreprocessContract, preprocess

#: Fewer images than this cannot give stable activation ranges.
MIN_CALIB_IMAGES = 16
METHODS = ("minmax", "entropy", "percentile")


def select_calibration(samples: Sequence[Any], size: int, seed: int = 0) -> list[Any]:
    """Up to ``size`` training samples, stratified across classes (round-robin, seeded).

    Raises:
        QuantizationError: ``size`` below the minimum, or too few training images.
    """
    if size < MIN_CALIB_IMAGES:
        raise QuantizationError(
            f"--calib-size {size} is too small: int8 calibration needs at least {MIN_CALIB_IMAGES} images "
            "(a few hundred is the default); raise --calib-size"
        )
    if len(samples) < MIN_CALIB_IMAGES:
        raise QuantizationError(
            f"the calibration set is {'empty' if not samples else f'only {len(samples)} image(s)'}: int8 "
            f"calibration needs at least {MIN_CALIB_IMAGES} training images; add training images, or stay fp32 "
            "(`edgemap export` without --int8, `edgemap run --no-int8`)"
        )
    return stratified(samples, size, seed)


def stratified(samples: Sequence[Any], size: int, seed: int = 0) -> list[Any]:
    """Up to ``size`` samples picked round-robin across classes (seeded shuffle inside each)."""
    by_class: dict[int, list[Any]] = {}
    for s in samples:
        by_class.setdefault(int(s.label), []).append(s)
    rng = random.Random(seed)
    queues = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(items)
        queues.append(items)
    out: list[Any] = []
    i = 0
    while len(out) < size and any(queues):
        q = queues[i % len(queues)]
        if q:
            out.append(q.pop())
        i += 1
    return out


def load_images(samples: Sequence[Any], contract: PreprocessContract,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Preprocess samples (``.path``) into one uint8 (N, H, W, 3) array (``max_pixels``: the run's limit)."""
    if not samples:
        return np.zeros((0, contract.height, contract.width, 3), np.uint8)
    return np.stack([preprocess(s.path, contract, max_pixels) for s in samples])


class ImageReader:
    """A CalibrationDataReader over image files: one preprocessed image per call."""

    def __init__(self, paths: Sequence[Path], contract: PreprocessContract, input_name: str = "images",
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.paths = list(paths)
        self.contract = contract
        self.max_pixels = max_pixels
        self.input_name = input_name
        self._it: Iterator[Path] = iter(self.paths)

    def get_next(self) -> dict[str, np.ndarray] | None:
        p = next(self._it, None)
        if p is None:
            return None
        return {self.input_name: preprocess(p, self.contract, self.max_pixels)[None]}

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:  # qdq_loss_debug iterates readers
        for p in self.paths:
            yield {self.input_name: preprocess(p, self.contract, self.max_pixels)[None]}

    def rewind(self) -> None:
        self._it = iter(self.paths)


class _FromQuantizer(logging.Filter):
    """Drops the records onnxruntime.quantization logs on the root logger (``logging.warning(...)``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname.replace("\\", "/").split("/")


class _QuietThreads:
    """sys.stdout while some threads quantize: their prints (onnxruntime.quantization's) are dropped, every other
    thread's go to the real stream, which it otherwise is in every respect (encoding, isatty, fileno...).

    One per process, installed with the logging filters by the first thread into :func:`quiet` and removed by the
    last one out (contextlib.redirect_stdout dropped a whole application's output, and per-call wrappers restored
    in the wrong order when two threads quantized at once).
    """

    _lock = threading.Lock()
    _active: _QuietThreads | None = None
    _filter = _FromQuantizer()
    _guard = logging.NullHandler()

    def __init__(self, real: Any):
        self.real = real
        self.muted: dict[int, int] = {}  # thread id -> depth (quiet() nests)
        self.ort_level = logging.getLogger("onnxruntime").level

    def write(self, text: str) -> int:
        return len(text) if threading.get_ident() in self.muted else self.real.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @classmethod
    def enter(cls) -> None:
        with cls._lock:
            if cls._active is None:  # the first thread in: the quantizer's loggers quiet, stdout filtered
                cls._active = active = _QuietThreads(sys.stdout)
                sys.stdout = active  # type: ignore[assignment]
                logging.getLogger("onnxruntime").setLevel(logging.ERROR)
                root = logging.getLogger()
                root.addFilter(cls._filter)
                if not root.handlers:  # no handlers: the quantizer's logging.warning() would call basicConfig
                    root.addHandler(cls._guard)
            me = threading.get_ident()
            cls._active.muted[me] = cls._active.muted.get(me, 0) + 1

    @classmethod
    def leave(cls) -> None:
        with cls._lock:
            active = cls._active
            if active is None:
                return
            me = threading.get_ident()
            depth = active.muted.pop(me, 1) - 1
            if depth > 0:
                active.muted[me] = depth
            if active.muted:
                return
            if sys.stdout is active:  # the last thread out: everything as it was (stdout unless replaced since)
                sys.stdout = active.real
            logging.getLogger("onnxruntime").setLevel(active.ort_level)
            root = logging.getLogger()
            root.removeFilter(cls._filter)
            if cls._guard in root.handlers:
                root.removeHandler(cls._guard)
            cls._active = None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence onnxruntime.quantization's prints and log warnings, and nothing else: the caller's logging keeps its
    level and handlers (the quantizer's ``logging.warning`` would add a root handler when there is none, after which
    an application's ``logging.basicConfig`` did nothing), and other threads keep their stdout. Thread-safe and
    re-entrant (:class:`_QuietThreads`)."""
    _QuietThreads.enter()
    try:
        yield
    finally:
        _QuietThreads.leave()


#: histogram bins of the entropy method (as ORT's percentile method uses): the KL search needs many more bins than
#: the 128 quantized levels it tries thresholds for
ENTROPY_BINS = 2048


def calibrate(
    model_path: Path,
    paths: Sequence[Path],
    contract: PreprocessContract,
    method: str,
    symmetric: bool,
    cache_path: Path,
    chunk: int = 16,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Path:
    """Collect activation ranges of ``model_path`` on ``paths``; save ORT's JSON range cache.

    Returns ``cache_path``, usable as ``quantize_static(..., calibration_cache_path=...)``.
    """
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    if method not in METHODS:
        raise QuantizationError(f"--calib-method {method!r} is not one of {', '.join(METHODS)}")
    if not paths:
        raise QuantizationError("the calibration set is empty; add training images or export without --int8")
    ort_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]
    extra: dict[str, Any] = {"symmetric": symmetric}
    if method == "entropy":  # ORT's default 128 bins = its 128 quantized bins: one candidate threshold, the full range,
        extra["num_bins"] = ENTROPY_BINS  # so "entropy" gave minmax's ranges (97 of 97 tensors on Lite0)
    with tempfile.TemporaryDirectory(prefix=".calib-", dir=cache_path.parent) as tmp, quiet():
        try:
            calibrator = create_calibrator(
                model_path, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=ort_method, providers=["CPUExecutionProvider"], extra_options=extra,
            )
        except Exception as e:  # noqa: BLE001 - a truncated augmented model (full disk) fails as a protobuf error
            from edgemap.export.quantize import tool_failed

            raise tool_failed(f"{model_path}: calibration", e, cache_path.parent) from e
        for start in range(0, len(paths), max(1, chunk)):
            calibrator.collect_data(ImageReader(paths[start : start + chunk], contract, max_pixels=max_pixels))
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache_path)
    return cache_path
