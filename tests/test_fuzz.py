"""Property-based fuzzing (hypothesis) of the paths that read untrusted bytes.

- image decode + preprocessing: random bytes, and real images of random size, mode and
  format (PNG, JPEG, BMP, GIF, TIFF, WebP), whole or truncated, with random contracts,
  as a path, bytes or a PIL image: the only error is ImageError, and every output has the
  contract's (H, W, 3) uint8 shape;
- the manifest loader on random JSON and on valid manifests with one value replaced: the
  only error is ManifestError;
- the torch-free ONNX metadata reader on random bytes and on mutated real models: the only
  error is ModelFormatError.
Each property stays within a few seconds (bounded max_examples, deadline=None).
"""

from __future__ import annotations

import io
import json
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgemap.errors import ImageError, ManifestError, ModelFormatError, ModelIntegrityError
from edgemap.manifest import MANIFEST_NAME, RunDir, validate_manifest
from edgemap.runtime.onnx_meta import model_meta, parse_model_bytes
from edgemap.runtime.preprocess import PreprocessContract, preprocess

# Pillow warns about the corrupt EXIF/TIFF tags fuzzing makes; the property is about errors, not warnings.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

# ---- images -----------------------------------------------------------------------------------
contracts = st.builds(
    PreprocessContract,
    height=st.integers(1, 48),
    width=st.integers(1, 48),
    resize=st.sampled_from(["shorter_center_crop", "stretch"]),
    crop_pct=st.floats(0.2, 1.0),
    interpolation=st.sampled_from(["nearest", "bilinear", "bicubic", "lanczos"]),
)

# (mode, formats that can store it)
_MODES = {
    "RGB": ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"),
    "L": ("PNG", "JPEG", "BMP", "TIFF", "GIF"),
    "1": ("PNG", "BMP", "TIFF"),
    "P": ("PNG", "BMP", "GIF", "TIFF"),
    "RGBA": ("PNG", "TIFF", "WEBP"),
    "LA": ("PNG",),
    "I;16": ("PNG", "TIFF"),
    "I": ("TIFF",),
    "F": ("TIFF",),
    "CMYK": ("JPEG", "TIFF"),
    "YCbCr": ("JPEG",),
}


@st.composite
def encoded_images(draw: st.DrawFn) -> tuple[bytes, str, str]:
    mode = draw(st.sampled_from(sorted(_MODES)))
    fmt = draw(st.sampled_from(_MODES[mode]))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode in ("I;16", "I"):
        im = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16).astype(np.uint16 if mode == "I;16" else np.int32))
        im = im.convert(mode) if im.mode != mode else im
    elif mode == "F":
        im = Image.fromarray(rng.normal(128, 200, (h, w)).astype(np.float32), "F")
    elif mode == "P":
        im = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=draw(st.integers(2, 256)))
    else:
        im = base.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    data = buf.getvalue()
    cut = draw(st.one_of(st.none(), st.integers(0, max(0, len(data) - 1))))  # None: whole file
    if cut is not None:
        data = data[:cut]
    return data, mode, fmt


def _check(out: np.ndarray, c: PreprocessContract) -> None:
    assert out.shape == (c.height, c.width, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


@FAST
@given(data=st.binary(max_size=2048), c=contracts)
def test_random_bytes_decode_or_image_error(data: bytes, c: PreprocessContract) -> None:
    try:
        out = preprocess(data, c)
    except ImageError:
        return
    _check(out, c)


@FAST
@given(img=encoded_images(), c=contracts, as_path=st.booleans())
def test_random_images_any_mode_any_format(img: tuple[bytes, str, str], c: PreprocessContract, as_path: bool,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    data, _mode, fmt = img
    src: bytes | Path = data
    if as_path:
        src = tmp_path_factory.mktemp("fz") / f"image é.{fmt.lower()}"
        src.write_bytes(data)
    try:
        out = preprocess(src, c)
    except ImageError as e:
        assert str(e)  # a message, naming the source when it is a path
        if as_path:
            assert "image é" in str(e)
        return
    _check(out, c)


@FAST
@given(img=encoded_images(), c=contracts)
def test_pil_inputs_of_any_mode(img: tuple[bytes, str, str], c: PreprocessContract) -> None:
    """A (lazily decoded, maybe truncated) PIL image given directly: same guarantee."""
    data, _, _ = img
    try:
        im = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not an image at all: nothing to hand to preprocess
        return
    try:
        out = preprocess(im, c)
    except ImageError:
        return
    _check(out, c)


@FAST
@given(h=st.integers(1, 40), w=st.integers(1, 40), ch=st.sampled_from([None, 1, 2, 3, 4, 5]),
       dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.int8]), c=contracts)
def test_arrays_of_any_shape_and_dtype(h: int, w: int, ch: int | None, dtype: type, c: PreprocessContract) -> None:
    shape = (h, w) if ch is None else (h, w, ch)
    arr = np.zeros(shape, dtype)
    try:
        out = preprocess(arr, c)
    except ImageError:
        assert dtype is not np.uint8 or ch not in (None, 3, 4)
        return
    _check(out, c)


# ---- manifests ----------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _valid() -> dict:
    return {"schema": 1, "backbone": {"name": "tiny"}, "classes": ["a", "b"],
            "preprocess": PreprocessContract(32, 32).to_dict(),
            "artifacts": {"onnx_fp32": {"path": "model.onnx", "sha256": "0" * 64}}, "stages": {}}


def _paths(d: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, prefix + (i,))
    return out


def _load_all(folder: Path) -> None:
    """What later stages do with a manifest: load, read every accessor, resolve every artifact."""
    run = RunDir.load(folder)
    run.classes, run.contract, run.backbone  # noqa: B018
    for key in list(run.artifacts):
        try:
            run.artifact_path(key)
        except (ManifestError, ModelIntegrityError):  # the fake sha256: refused as it should be
            pass


@FAST
@given(doc=json_values)
def test_random_json_is_refused_with_manifest_error(doc: object, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("mf")
    (folder / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ManifestError):
        validate_manifest(doc)
    with pytest.raises(ManifestError):
        RunDir.load(folder)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=json_values)
def test_valid_manifest_with_one_value_replaced(data: st.DataObject, value: object,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    doc = _valid()
    path = data.draw(st.sampled_from(_paths(doc)[1:]))
    node = doc
    for k in path[:-1]:
        node = node[k]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    folder = tmp_path_factory.mktemp("mf")
    (folder / "model.onnx").write_bytes(b"x")
    (folder / MANIFEST_NAME).write_text(json.dumps(doc))
    try:
        _load_all(folder)
    except ManifestError:
        pass


@FAST
@given(raw=st.binary(max_size=512) | st.text(alphabet=string.printable, max_size=200).map(str.encode))
def test_random_manifest_bytes(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("mf")
    (folder / MANIFEST_NAME).write_bytes(raw)
    with pytest.raises(ManifestError):
        RunDir.load(folder)


# ---- ONNX metadata reader -------------------------------------------------------------------------
def _model_bytes() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["m", "W"], ["logits"])],
        "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.helper.set_model_props(m, {"edgemap.classes": '["a", "b"]',
                                    "edgemap.preprocess": json.dumps(PreprocessContract(32, 32).to_dict())})
    return m.SerializeToString()


MODEL = _model_bytes()


def _read(data: bytes) -> None:
    try:
        info = parse_model_bytes(data, "fuzz.onnx")
    except ModelFormatError as e:
        assert "fuzz.onnx" in str(e)
        return
    try:
        model_meta(info, "fuzz.onnx")
    except ModelFormatError:
        pass


def test_the_unmutated_model_reads() -> None:
    meta = model_meta(parse_model_bytes(MODEL, "m.onnx"), "m.onnx")
    assert meta.classes == ("a", "b")


@FAST
@given(data=st.binary(max_size=4096))
def test_onnx_reader_on_random_bytes(data: bytes) -> None:
    _read(data)


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(MODEL) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(MODEL))))
def test_onnx_reader_on_mutated_models(edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(MODEL)
    for pos, val in edits:
        data[pos] = val
    _read(bytes(data[:cut] if cut is not None else data))
