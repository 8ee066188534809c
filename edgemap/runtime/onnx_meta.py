"""Read an ONNX model's ``metadata_props`` without onnx or onnxruntime.

The device wheel depends on numpy, Pillow and one runtime only, so it cannot import
``onnx``. An ONNX file is a protobuf ``ModelProto``; the few fields a loader needs are
read here with a minimal wire-format reader:

- ``ModelProto``: 1 ``ir_version``, 7 ``graph``, 8 ``opset_import``, 14 ``metadata_props``
  (``StringStringEntryProto``: 1 ``key``, 2 ``value``), 25 ``functions``.
- Every ``TensorProto`` reachable from the graph (initializers, sparse initializers,
  ``Constant``/attribute tensors, subgraphs of ``If``/``Loop``/``Scan``, functions) is checked
  for field 14 ``data_location == EXTERNAL`` and field 13 ``external_data``.

Models with external data are refused outright (:class:`ModelFormatError`): edgemap exports
single-file models, and a loader that followed ``external_data.location`` could be pointed at
any file on the device (the onnx CVE-2024-27318 class). The walk skips tensor payloads by
their length prefix, so it costs well under a millisecond per MB.

Anything that is not a well-formed protobuf (truncated, random bytes, a JPEG renamed to
.onnx) raises :class:`ModelFormatError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemap.runtime import metadata as K
from edgemap.runtime.errors import ModelFormatError
from edgemap.runtime.preprocess import DEFAULT_MAX_PIXELS, PreprocessContract
from edgemap.runtime.text import has_control_chars

# wire types
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_MAX_DEPTH = 32  # nested subgraphs; real models use a handful
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class _Malformed(Exception):
    """Internal: the bytes are not a valid protobuf message."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed("varint longer than 10 bytes")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value or payload start, payload end) of one message."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        num, wt = tag >> 3, tag & 7
        if num == 0:
            raise _Malformed("field number 0")
        if wt == _VARINT:
            val, pos = _varint(buf, pos, end)
            yield num, wt, val, pos
        elif wt == _I64:
            if pos + 8 > end:
                raise _Malformed("truncated fixed64")
            yield num, wt, pos, pos + 8
            pos += 8
        elif wt == _I32:
            if pos + 4 > end:
                raise _Malformed("truncated fixed32")
            yield num, wt, pos, pos + 4
            pos += 4
        elif wt == _LEN:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed("length-delimited field runs past the end")
            yield num, wt, pos, pos + n
            pos += n
        else:  # groups (3/4) are not used by ONNX; 6/7 do not exist
            raise _Malformed(f"unsupported wire type {wt}")
    if pos != end:
        raise _Malformed("message overruns its length")


def _text(buf: memoryview, a: int, b: int) -> str:
    try:
        return bytes(buf[a:b]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed("string field is not UTF-8") from e


@dataclass
class OnnxInfo:
    """What a loader needs to know about an ONNX file before handing it to a runtime."""

    ir_version: int = 0
    opsets: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    external_tensors: list[str] = field(default_factory=list)


def onnxruntime_floor(info: OnnxInfo) -> str:
    """The first onnxruntime release that loads a model of this IR version and default-domain opset. Measured on
    edgemap's own fp32, QOperator and QDQ models: opset 22 failed on 1.20.1 and loaded on 1.21.1; IR 11 (opset 23)
    failed on 1.21.1 and 1.22.0 and loaded on 1.23.2; opsets up to 21 (IR 10) load on 1.18. 1.18.1, not 1.18.0: pip
    pairs 1.18.0 with numpy 2, which it cannot import (1.18.1 is the first release built for numpy 2)."""
    opset = info.opsets.get("ai.onnx", 0)
    if info.ir_version >= 11 or opset >= 23:
        return "1.23"
    return "1.21" if opset >= 22 else "1.18.1"


class _Walker:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.external: list[str] = []

    # TensorProto: 8 name, 13 external_data, 14 data_location
    def tensor(self, a: int, b: int) -> None:
        name, external = "", False
        for num, wt, x, y in _fields(self.buf, a, b):
            if num == 8 and wt == _LEN:
                name = _text(self.buf, x, y)
            elif num == 13 and wt == _LEN:
                external = True
            elif num == 14 and wt == _VARINT and x == _EXTERNAL:
                external = True
        if external:
            self.external.append(name or "<unnamed tensor>")

    # SparseTensorProto: 1 values, 2 indices (TensorProto)
    def sparse(self, a: int, b: int) -> None:
        for num, wt, x, y in _fields(self.buf, a, b):
            if num in (1, 2) and wt == _LEN:
                self.tensor(x, y)

    # AttributeProto: 5 t, 6 g, 10 tensors, 11 graphs, 22 sparse_tensor, 23 sparse_tensors
    def attribute(self, a: int, b: int, depth: int) -> None:
        for num, wt, x, y in _fields(self.buf, a, b):
            if wt != _LEN:
                continue
            if num in (5, 10):
                self.tensor(x, y)
            elif num in (6, 11):
                self.graph(x, y, depth + 1)
            elif num in (22, 23):
                self.sparse(x, y)

    # NodeProto: 5 attribute
    def node(self, a: int, b: int, depth: int) -> None:
        for num, wt, x, y in _fields(self.buf, a, b):
            if num == 5 and wt == _LEN:
                self.attribute(x, y, depth)

    # GraphProto: 1 node, 5 initializer, 15 sparse_initializer
    def graph(self, a: int, b: int, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _Malformed(f"subgraphs nested deeper than {_MAX_DEPTH}")
        for num, wt, x, y in _fields(self.buf, a, b):
            if wt != _LEN:
                continue
            if num == 1:
                self.node(x, y, depth)
            elif num == 5:
                self.tensor(x, y)
            elif num == 15:
                self.sparse(x, y)

    # FunctionProto: 7 node
    def function(self, a: int, b: int) -> None:
        for num, wt, x, y in _fields(self.buf, a, b):
            if num == 7 and wt == _LEN:
                self.node(x, y, 1)


def parse_model_bytes(data: bytes | memoryview, name: str = "<bytes>") -> OnnxInfo:
    """Parse a serialized ``ModelProto``: IR version, opsets, metadata, external tensors.

    Raises:
        ModelFormatError: the bytes are not a well-formed ONNX protobuf.
    """
    buf = memoryview(data)
    info = OnnxInfo()
    walker = _Walker(buf)
    has_graph = False
    try:
        for num, wt, x, y in _fields(buf, 0, len(buf)):
            if num == 1 and wt == _VARINT:
                info.ir_version = x
            elif num == 7 and wt == _LEN:
                has_graph = True
                walker.graph(x, y, 0)
            elif num == 8 and wt == _LEN:  # OperatorSetIdProto: 1 domain, 2 version
                domain, version = "", 0
                for n2, w2, x2, y2 in _fields(buf, x, y):
                    if n2 == 1 and w2 == _LEN:
                        domain = _text(buf, x2, y2)
                    elif n2 == 2 and w2 == _VARINT:
                        version = x2
                info.opsets[domain or "ai.onnx"] = version
            elif num == 14 and wt == _LEN:
                key = value = ""
                for n2, w2, x2, y2 in _fields(buf, x, y):
                    if n2 == 1 and w2 == _LEN:
                        key = _text(buf, x2, y2)
                    elif n2 == 2 and w2 == _LEN:
                        value = _text(buf, x2, y2)
                info.metadata[key] = value
            elif num == 25 and wt == _LEN:
                walker.function(x, y)
    except _Malformed as e:
        raise ModelFormatError(f"{name}: not a valid ONNX model ({e}); re-export it with `edgemap export`") from e
    if not has_graph or info.ir_version == 0:
        raise ModelFormatError(f"{name}: not an ONNX model (no graph / IR version); re-export it with `edgemap export`")
    info.external_tensors = walker.external
    return info


def read_model_bytes(path: str | Path) -> bytes:
    """The bytes of a model file; ModelFormatError when it cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise ModelFormatError(f"{path}: model file not found") from e
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read the model ({e})") from e


def read_onnx_info(path: str | Path) -> OnnxInfo:
    """:func:`parse_model_bytes` on a file; refuses files that cannot be read."""
    return parse_model_bytes(read_model_bytes(path), str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict, without onnx or onnxruntime.

    Example:
        >>> read_metadata("models/digits/model.onnx")["edgemap.precision"]
        'fp32'
    """
    return read_onnx_info(path).metadata


@dataclass(frozen=True)
class ModelMeta:
    """The edgemap metadata of an exported model: enough to label and preprocess."""

    classes: tuple[str, ...]
    contract: PreprocessContract
    precision: str = ""
    format: str = ""
    backbone: str = ""
    run: str = ""
    input: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, str] = field(default_factory=dict, repr=False)
    #: the pixel limit images were decoded with in training (None: Pillow's own limit)
    max_pixels: int | None = DEFAULT_MAX_PIXELS


def _json(props: dict[str, str], key: str, name: str) -> Any:
    try:
        return json.loads(props[key])
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or a 5000-digit number
        raise ModelFormatError(f"{name}: metadata '{key}' is not valid JSON ({str(e)[:200]})") from None


def refuse_external_data(info: OnnxInfo, name: str) -> OnnxInfo:
    """Raise ModelFormatError when any tensor of the model lives in an external file."""
    if info.external_tensors:
        shown = ", ".join(info.external_tensors[:3])
        raise ModelFormatError(
            f"{name}: refusing a model with external data ({len(info.external_tensors)} tensors, e.g. {shown}); "
            "edgemap models are single files: re-export with `edgemap export`"
        )
    return info


def model_meta(info: OnnxInfo, name: str) -> ModelMeta:
    """Validate the edgemap keys of ``info.metadata`` and refuse external data."""
    refuse_external_data(info, name)
    props = info.metadata
    missing = [k for k in (K.CLASSES, K.PREPROCESS) if k not in props]
    if missing:
        raise ModelFormatError(
            f"{name}: no edgemap metadata ({', '.join(missing)} missing); only models written by "
            "`edgemap export` carry their classes and preprocessing"
        )
    schema = props.get(K.SCHEMA, K.METADATA_SCHEMA_VERSION)
    if not schema.isdigit() or len(schema) > 6 or int(schema) > int(K.METADATA_SCHEMA_VERSION):
        raise ModelFormatError(f"{name}: metadata schema {schema!r} is newer than this runtime understands; upgrade it")
    classes = _json(props, K.CLASSES, name)
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise ModelFormatError(f"{name}: metadata '{K.CLASSES}' must list at least two class names")
    if any(has_control_chars(c) for c in classes):
        raise ModelFormatError(f"{name}: metadata '{K.CLASSES}' has a class name with control characters "
                               "(tab, newline, escape...); re-export from a dataset without them")
    pre = _json(props, K.PREPROCESS, name)
    if not isinstance(pre, dict):
        raise ModelFormatError(f"{name}: metadata '{K.PREPROCESS}' must be a JSON object")
    try:
        contract = PreprocessContract.from_dict(pre)
    except Exception as e:  # noqa: BLE001 - ImageError or ValueError from the dataclass checks
        raise ModelFormatError(f"{name}: metadata '{K.PREPROCESS}' invalid ({e})") from e
    inp = _json(props, K.INPUT, name) if K.INPUT in props else {}
    max_pixels = _json(props, K.MAX_PIXELS, name) if K.MAX_PIXELS in props else DEFAULT_MAX_PIXELS
    if max_pixels is not None and (type(max_pixels) is not int or max_pixels < 1):
        raise ModelFormatError(f"{name}: metadata '{K.MAX_PIXELS}' must be a positive integer or null, not {max_pixels!r}")
    return ModelMeta(
        classes=tuple(classes),
        contract=contract,
        precision=props.get(K.PRECISION, ""),
        format=props.get(K.FORMAT, ""),
        backbone=props.get(K.BACKBONE, ""),
        run=props.get(K.RUN, ""),
        input=inp if isinstance(inp, dict) else {},
        raw=dict(props),
        max_pixels=max_pixels,
    )


def pillow_series(version: str) -> int | None:
    """The major release of a Pillow version string ("13.0.0" → 13)."""
    head = str(version).split(".")[0]
    return int(head) if head.isdigit() and len(head) < 6 else None


def exported_pillow(meta: ModelMeta) -> str | None:
    """The Pillow version the model was exported with (``edgemap.versions``), when it is recorded and readable."""
    try:
        versions = json.loads(meta.raw.get(K.VERSIONS, "{}"))
    except (ValueError, RecursionError):
        return None
    recorded = versions.get("pillow") if isinstance(versions, dict) else None
    return recorded if isinstance(recorded, str) and pillow_series(recorded) is not None else None


def pillow_mismatch(meta: ModelMeta, installed: str | None = None) -> str | None:
    """Why this Pillow may feed the model other pixels than export measured it with (None: same major release).

    Pillow decodes and resizes on the device. Its resampling has changed between major releases (13.0 rounds
    two-pass resizes differently from 12.x: ±1 level on ~20 % of images, logits off by up to 0.09 on Lite0), and
    XMP-only orientation is honoured only from 11.2 on; the device wheel asks for the exporting release series.
    """
    recorded = exported_pillow(meta)
    if recorded is None:
        return None
    if installed is None:
        import PIL

        installed = PIL.__version__
    if pillow_series(installed) == pillow_series(recorded):
        return None
    major = pillow_series(recorded)
    return (f"this model was exported (evaluated, calibrated) with Pillow {recorded}; Pillow {installed} here may decode "
            f"and resize some images differently (±1 pixel level, small logit changes): pip install "
            f"'pillow>={major}.0,<{major + 1}' for the same pixels")


def read_model_meta(path: str | Path) -> ModelMeta:
    """Read and validate an edgemap model's metadata from the file alone."""
    return model_meta(read_onnx_info(path), str(path))
