"""The device-side ``Classifier``: load an edgemap model once, classify images.

Labels and preprocessing come from the model's own metadata (read without onnx by
:mod:`edgemap.runtime.onnx_meta`), images go through :mod:`edgemap.runtime.preprocess`, and
the model runs in a :mod:`edgemap.runtime.sessions` session: the very code ``edgemap eval``
uses, vendored unchanged into the device wheel. No torch import here.

Example:
    >>> clf = Classifier.from_path("model.int8.qoperator.onnx")
    >>> clf.predict("cat.jpg", top_k=3)[0].label
    'cat'
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemap.runtime.errors import (
    EdgemapError,
    ImageError,
    ModelFormatError,
    ModelIntegrityError,
    OptionError,
    RuntimeUnavailableError,
)
from edgemap.runtime.onnx_meta import ModelMeta, model_meta, parse_model_bytes, pillow_mismatch, read_model_bytes
from edgemap.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageInput, PreprocessContract, new_warning_scope, preprocess
from edgemap.runtime.sessions import Session, SessionOptions, available, check_precision, load, parse_runtime

#: Names a user may give for a runtime → the session runtime spec (see sessions.RUNTIMES).
RUNTIME_ALIASES = {"onnxruntime": "cpu", "ort": "cpu", "onnxruntime-gpu": "cuda"}
MODEL_JSON = "model.json"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
#: ``max_pixels`` default of the loaders: the limit in the model's metadata (the run's ``--max-pixels``)
FROM_MODEL = "model"


class PillowVersionWarning(UserWarning):
    """The installed Pillow is another major release than the one the model was exported with (see
    :func:`edgemap.runtime.onnx_meta.pillow_mismatch`): some images may reach the model with other pixels."""


#: What the device side calls its runtimes (``cpu`` is accepted too: edgemap's name for ONNX Runtime CPU).
DEVICE_RUNTIMES = ("onnxruntime", "openvino[:DEVICE]", "cuda", "tensorrt")


def runtime_spec(runtime: str) -> str:
    """``"onnxruntime"`` → ``"cpu"``; session specs (cpu, cuda, tensorrt, openvino[:DEV]) pass through."""
    r = runtime.strip()
    return RUNTIME_ALIASES.get(r.lower(), r)


def runtimes_for(precision: str, fmt: str) -> tuple[str, ...]:
    """The device runtimes that can run a model of this precision and int8 format (model.json / metadata)."""
    if precision != "int8":
        return DEVICE_RUNTIMES
    return {"qoperator": ("onnxruntime",), "qdq": ("openvino[:DEVICE]", "onnxruntime"),
            "qdq_s8": ("tensorrt", "onnxruntime", "openvino[:DEVICE]")}.get(fmt, ("onnxruntime", "openvino[:DEVICE]"))


@dataclass(frozen=True)
class Prediction:
    """One image's result: the top-1 class, its probability and the top-k list."""

    label: str
    index: int
    prob: float
    topk: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "index": self.index,
            "prob": self.prob,
            "topk": [{"label": lab, "prob": p} for lab, p in self.topk],
        }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: max subtracted), returned as float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)  # an (N, H, W, C) batch
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, dict) or (isinstance(images, set | frozenset) and len(images) > 1):  # keys / no order:
        # results could not be "one per input, in order"
        raise ImageError(f"a {type(images).__name__} is not an image or a sequence of images: give a path, bytes, a "
                         "PIL image, an array, or a list of them")
    if isinstance(images, (str, bytes, bytearray, memoryview, Path, np.ndarray)) or hasattr(images, "getpixel") \
            or hasattr(images, "read") \
            or not isinstance(images, Iterable):
        return [images]  # type: ignore[list-item]  # one image (a PIL image, a file object...)
    return list(images)  # a generator, a map...


def _whole(name: str, value: Any, none_ok: bool) -> None:
    """OptionError unless ``value`` is a whole number >= 1 (or None when ``none_ok``): a bad value failed later, on
    every image ("exceeds the limit of 0") or inside the runtime (a pybind TypeError for threads="2")."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise OptionError(f"{name} must be a whole number >= 1{' or None' if none_ok else ''}, not {value!r}")


class Classifier:
    """A loaded edgemap model: classes, preprocessing contract and one runtime session."""

    def __init__(self, session: Session, meta: ModelMeta, sha256: str, top_k: int = 5,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        _whole("top_k", top_k, none_ok=False)
        _whole("max_pixels", max_pixels, none_ok=True)
        self.session = session
        self.meta = meta
        self.sha256 = sha256
        self.top_k = top_k
        self.max_pixels = max_pixels

    # ---- loading --------------------------------------------------------------------
    @classmethod
    def from_path(
        cls,
        model_file: str | Path,
        runtime: str = "onnxruntime",
        expected_sha256: str | None = None,
        *,
        threads: int | None = None,
        exact: bool | None = None,
        top_k: int = 5,
        max_pixels: int | None | str = FROM_MODEL,
    ) -> Classifier:
        """Load an edgemap-exported ONNX model; classes and preprocessing come from its metadata.

        Args:
            model_file: the ``.onnx`` file (fp32 or int8) written by ``edgemap export``.
            runtime: ``onnxruntime`` (CPU), ``openvino`` (``openvino:GPU`` ...), ``cuda``, ``tensorrt``.
            expected_sha256: when known (the wheel's model.json, the run's edgemap.json), the
                file must hash to it or loading is refused with ModelIntegrityError.
            threads: intra-op threads (default: physical cores).
            exact: OpenVINO only (see SessionOptions.exact): None = f32 for fp32 models, its
                default for int8 models; False = its bf16 default (faster, less exact).
            top_k: default number of classes in each Prediction's ``topk``.
            max_pixels: decompression-bomb guard for decoded images (None: Pillow's own limit);
                by default the limit the model was trained with (its metadata; `finetune --max-pixels`).

        Raises:
            ModelIntegrityError: sha256 mismatch. ModelFormatError: not an edgemap model or
            external data. RuntimeUnavailableError: the runtime cannot run here. OptionError: an unknown
            runtime name. (Predicting raises ImageError for an image it refuses, InferenceError when the runtime
            fails while running, e.g. out of memory.)

        Example:
            >>> clf = Classifier.from_path("model.onnx", runtime="openvino")
        """
        _whole("threads", threads, none_ok=True)
        _whole("top_k", top_k, none_ok=False)
        if max_pixels != FROM_MODEL:
            _whole("max_pixels", max_pixels, none_ok=True)
        path = Path(model_file)
        data = read_model_bytes(path)
        import hashlib

        actual = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None:
            # also a pasted `sha256sum` line "HASH  FILE" ("\\HASH  FILE" when the file name holds a backslash)
            expected = (expected_sha256.split() or [""])[0].removeprefix("\\").lower()
            if not _SHA_RE.match(expected):
                raise ModelIntegrityError(f"{path}: expected sha256 {expected_sha256!r} is not 64 hex characters")
            if actual != expected:  # in full: two 16-character prefixes could be equal and still "not match"
                raise ModelIntegrityError(
                    f"{path}: sha256 {actual} is not the expected {expected}: this is not the file that sha256 was "
                    "taken of (changed, corrupted or another model), or the expected value is mistyped. Use the "
                    "original model file (for a model package: reinstall it)."
                )
        meta = model_meta(parse_model_bytes(data, str(path)), str(path))
        spec = runtime_spec(runtime)
        try:
            info, _ = parse_runtime(spec)
        except OptionError:
            raise OptionError(f"unknown runtime {runtime!r}; choose from {', '.join(DEVICE_RUNTIMES)}") from None
        if meta.precision:
            ok, why = check_precision(info, meta.precision)
            if not ok:
                raise ModelFormatError(f"{path}: {'an' if meta.precision[:1] in 'aeiou' else 'a'} {meta.precision} "
                                       f"model cannot run on {spec}: {why}")
        if meta.format == "qoperator" and info.engine == "openvino":
            raise ModelFormatError(f"{path}: this is the ONNX Runtime int8 model (QOperator: QLinearConv), which OpenVINO "
                                   "cannot read; run it with --runtime onnxruntime, or use the QDQ int8 model on OpenVINO "
                                   "(`edgemap export` writes model.int8.qdq.onnx; `edgemap package --runtime openvino` ships it)")
        ok, why = available(spec)
        if not ok:  # named as the user asked for it ("onnxruntime", not edgemap's "cpu")
            raise RuntimeUnavailableError(f"runtime {runtime!r} unavailable: {why}")
        session = load(path, spec, SessionOptions(threads=threads, exact=exact), data=data)  # the bytes hashed above
        del data
        _check_input(session, meta, path)
        note = pillow_mismatch(meta)
        if note:  # the device wheel asks for the exporting Pillow series; the runtime-only wheel and --no-deps do not
            import warnings

            warnings.warn(PillowVersionWarning(f"{path}: {note}"), stacklevel=2)
        return cls(session, meta, actual, top_k=top_k, max_pixels=meta.max_pixels if max_pixels == FROM_MODEL else max_pixels)

    @classmethod
    def from_package_dir(cls, folder: str | Path, runtime: str | None = None, **kwargs: Any) -> Classifier:
        """Load the model a device wheel embeds, checked against the sha256 in its model.json."""
        folder = Path(folder)
        info = read_model_json(folder)
        if "max_pixels" in info and kwargs.get("max_pixels", FROM_MODEL) == FROM_MODEL:
            kwargs["max_pixels"] = info["max_pixels"]  # the limit the model was trained with (also for models without it)
        return cls.from_path(folder / info["file"], runtime or info.get("runtime", "onnxruntime"),
                             expected_sha256=info["sha256"], **kwargs)

    # ---- accessors ------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def contract(self) -> PreprocessContract:
        return self.meta.contract

    @property
    def precision(self) -> str:
        return self.meta.precision

    @property
    def providers(self) -> list[str]:
        return list(self.session.providers_in_use)

    def __repr__(self) -> str:
        return (f"Classifier({len(self.meta.classes)} classes, {self.contract.height}x{self.contract.width}, "
                f"{self.meta.precision or '?'} on {self.session.provider})")

    # ---- inference ------------------------------------------------------------------
    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Inputs → the contract's (N, H, W, 3) uint8 batch (the shared preprocessing)."""
        items = _as_list(images)
        c = self.contract
        if not items:
            return np.zeros((0, c.height, c.width, 3), dtype=np.uint8)
        return np.stack([preprocess(x, c, self.max_pixels) for x in items])

    def logits(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """Raw float32 logits (N, num_classes), run in batches of ``batch_size``."""
        items = _as_list(images)
        if any(isinstance(x, str | Path | bytes) for x in items):  # decoded here: this call's warnings are reported
            new_warning_scope()
        n_cls = len(self.meta.classes)
        if not items:
            return np.zeros((0, n_cls), dtype=np.float32)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        out = []
        for i in range(0, len(items), batch_size):
            out.append(self.run_batch(self.preprocess(items[i:i + batch_size])))
        return np.concatenate(out)

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        """Run an already preprocessed (N, H, W, 3) uint8 batch; returns logits."""
        c = self.contract
        if batch.ndim != 4 or batch.shape[1:] != (c.height, c.width, 3):
            raise ImageError(f"batch must be (N, {c.height}, {c.width}, 3) uint8, got {batch.dtype} {batch.shape}")
        logits = self.session.run(batch)
        if logits.ndim != 2 or logits.shape[1] != len(self.meta.classes):
            raise ModelFormatError(f"{self.session.path}: model output {logits.shape} does not match "
                                   f"{len(self.meta.classes)} classes in its metadata")
        return logits

    def probabilities(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """Softmax probabilities (N, num_classes), float64."""
        return softmax(self.logits(images, batch_size))

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int | None = None,
                batch_size: int = 32) -> list[Prediction]:
        """Classify one input or many: paths, bytes, PIL images, uint8 arrays (one or an N-batch).

        Returns one :class:`Prediction` per input, in order, with ``top_k`` classes
        (default: the classifier's ``top_k``, capped at the number of classes).

        Example:
            >>> [p.label for p in clf.predict(["a.jpg", "b.png"])]
        """
        k = self.top_k if top_k is None else top_k
        _whole("top_k", k, none_ok=False)  # top_k="3" was a bare TypeError from inside numpy
        return self.decode(self.probabilities(images, batch_size), k)

    def predict_one(self, image: ImageInput, top_k: int | None = None) -> Prediction:
        """Classify a single input."""
        return self.predict([image], top_k=top_k)[0]

    __call__ = predict

    def decode(self, probs: np.ndarray, top_k: int) -> list[Prediction]:
        """Probabilities (N, C) → Predictions (ties broken by the lower class index)."""
        classes = self.meta.classes
        k = min(top_k, len(classes))
        out = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            top = [(classes[i], float(row[i])) for i in order]
            out.append(Prediction(label=top[0][0], index=int(order[0]), prob=top[0][1], topk=top))
        return out


def read_model_json(folder: str | Path) -> dict[str, Any]:
    """The model.json a device wheel carries beside its model (file, sha256, runtime...)."""
    p = Path(folder) / MODEL_JSON
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelFormatError(f"{p}: missing; this package embeds no model (use Classifier.from_path)") from e
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFormatError(f"{p}: unreadable ({str(e)[:200]}); reinstall the package") from None
    if not isinstance(info, dict) or not isinstance(info.get("file"), str) or not _SHA_RE.match(str(info.get("sha256", ""))):
        raise ModelFormatError(f"{p}: needs 'file' and a 64-hex 'sha256'; reinstall the package")
    if "/" in info["file"] or "\\" in info["file"] or info["file"] in ("", ".", ".."):
        raise ModelFormatError(f"{p}: 'file' must be a plain file name, got {info['file']!r}")
    limit = info.get("max_pixels", 1)
    if limit is not None and (type(limit) is not int or limit < 1):  # "x", [1], or 1e400 (inf: the guard off)
        raise ModelFormatError(f"{p}: 'max_pixels' must be a positive integer or null, got {str(limit)[:40]}; "
                               "reinstall the package")
    for key in ("runtime", "precision", "format"):  # 5 or null: an AttributeError traceback where it was used
        if key in info and not isinstance(info[key], str):
            raise ModelFormatError(f"{p}: '{key}' must be a string, got {str(info[key])[:40]}; reinstall the package")
    return info


__all__ = ["Classifier", "Prediction", "EdgemapError", "PillowVersionWarning", "read_model_json", "runtime_spec", "softmax"]


def _input_dims(session: Any) -> list[Any]:
    """The model input's (N, H, W, C) as the runtime sees it: ints, or None/str where dynamic."""
    native = session.native
    if hasattr(native, "get_inputs"):  # onnxruntime
        return list(native.get_inputs()[0].shape)
    shape = native.input(0).get_partial_shape()  # openvino
    return [d.get_length() if d.is_static else None for d in shape]


def _check_input(session: Any, meta: ModelMeta, path: Path) -> None:
    """Refuse a model whose graph does not take the image its metadata describes (one clear line, not a crash)."""
    try:
        dims = _input_dims(session)
    except Exception:  # noqa: BLE001 - a runtime without shape introspection: the first prediction will tell
        return
    c = meta.contract
    want = [None, c.height, c.width, 3]
    bad = len(dims) != 4 or any(isinstance(d, int) and w is not None and d != w for d, w in zip(dims, want))
    if bad:
        raise ModelFormatError(f"{path}: the graph takes input {dims}, but its metadata describes (N, {c.height}, "
                               f"{c.width}, 3) uint8 images; the file was not written by `edgemap export` as it is")
