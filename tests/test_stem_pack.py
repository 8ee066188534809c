"""The int8 stem rewrite (pixels packed into channels) is bit-identical and applies only where it can."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemap.export.stem_pack import pack_stem_pixels
from edgemap.runtime.sessions import load


def stem_model(path: Path, h: int, w: int, kernel: int, stride: int, pads: list[int], cout: int = 8,
               seed: int = 0, per_channel: bool = True, bias: bool = True, channels: int = 3) -> Path:
    """uint8 NHWC image → Transpose → QLinearConv (RGB stem) → DequantizeLinear, as edgemap's fold leaves it."""
    rng = np.random.default_rng(seed)
    wq = rng.integers(-127, 128, (cout, channels, kernel, kernel), dtype=np.int8)
    w_scale = (rng.uniform(0.002, 0.02, cout) if per_channel else np.array(0.01)).astype(np.float32)
    w_zp = np.zeros(cout if per_channel else (), np.int8)
    inits = [
        numpy_helper.from_array(np.array(1 / 128, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(127, np.uint8), "x_zp"),
        numpy_helper.from_array(wq, "w"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(w_zp, "w_zp"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(3, np.uint8), "y_zp"),
    ]
    conv_inputs = ["nchw", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp"]
    if bias:
        inits.append(numpy_helper.from_array(rng.integers(-3000, 3000, cout).astype(np.int32), "b"))
        conv_inputs.append("b")
    nodes = [
        helper.make_node("Transpose", ["images"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("QLinearConv", conv_inputs, ["yq"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=pads, dilations=[1, 1], group=1),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", h, w, channels])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, None, None])], inits)
    graph = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).graph
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


CASES = [  # (h, w, kernel, stride, pads[top, left, bottom, right])
    (224, 224, 3, 2, [0, 0, 1, 1]),  # EfficientNet-Lite at 224 px (TF "same")
    (32, 32, 3, 2, [1, 1, 1, 1]),  # torch-style padding (the tiny backbone)
    (40, 36, 3, 2, [0, 0, 1, 1]),  # non-square
    (33, 64, 5, 2, [2, 2, 2, 2]),
    (16, 16, 3, 1, [1, 1, 1, 1]),  # stride 1: four output pixels per group
    (16, 20, 1, 1, [0, 0, 0, 0]),
    (24, 24, 7, 2, [3, 3, 3, 3]),
    (16, 16, 4, 4, [0, 0, 0, 0]),  # patchify stem
]


@pytest.mark.parametrize("h,w,kernel,stride,pads", CASES)
def test_packed_stem_is_bit_identical(tmp_path, h, w, kernel, stride, pads) -> None:  # noqa: ANN001
    src = stem_model(tmp_path / "a.onnx", h, w, kernel, stride, pads, seed=h + w + kernel)
    dst = tmp_path / "b.onnx"
    dst.write_bytes(src.read_bytes())
    assert pack_stem_pixels(dst) is True
    model = onnx.load(str(dst))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # shapes still add up
    out_shape = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim][1:]
    assert out_shape == [8, (h + pads[0] + pads[2] - kernel) // stride + 1, (w + pads[1] + pads[3] - kernel) // stride + 1]
    g = model.graph
    conv = next(n for n in g.node if n.op_type == "QLinearConv")
    assert numpy_helper.to_array(next(i for i in g.initializer if i.name == conv.input[3])).shape[1] == 12
    x = np.random.default_rng(1).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    x[0] = 255  # saturating inputs too
    a, b = load(src, "cpu").run(x), load(dst, "cpu").run(x)
    assert a.shape == b.shape and np.array_equal(a, b)
    assert np.array_equal(load(dst, "cpu").run(x[:1]), a[:1])  # dynamic batch still works


def test_per_tensor_weights_and_no_bias(tmp_path) -> None:  # noqa: ANN001
    src = stem_model(tmp_path / "a.onnx", 32, 32, 3, 2, [0, 0, 1, 1], per_channel=False, bias=False)
    dst = tmp_path / "b.onnx"
    dst.write_bytes(src.read_bytes())
    assert pack_stem_pixels(dst) is True
    x = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(load(src, "cpu").run(x), load(dst, "cpu").run(x))


@pytest.mark.parametrize("h,w,kernel,stride,pads,why", [
    (32, 30, 3, 2, [0, 0, 1, 1], "width not a multiple of 4"),
    (32, 36, 3, 2, [0, 0, 0, 0], "odd output width at stride 2"),
    (33, 36, 3, 3, [0, 0, 0, 0], "stride 3 does not divide the group"),
])
def test_left_alone_when_it_does_not_fit(tmp_path, h, w, kernel, stride, pads, why) -> None:  # noqa: ANN001
    src = stem_model(tmp_path / "a.onnx", h, w, kernel, stride, pads)
    before = src.read_bytes()
    assert pack_stem_pixels(src) is False, why
    assert src.read_bytes() == before


def test_grayscale_is_packed_and_four_channels_left_alone(tmp_path) -> None:  # noqa: ANN001
    src = stem_model(tmp_path / "g.onnx", 32, 32, 3, 2, [0, 0, 1, 1], channels=1)
    dst = tmp_path / "g4.onnx"
    dst.write_bytes(src.read_bytes())
    assert pack_stem_pixels(dst) is True  # 4 pixels x 1 channel
    x = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    assert np.array_equal(_run(src, x), _run(dst, x))  # edgemap's Session wants RGB; raw ORT here
    four = stem_model(tmp_path / "f.onnx", 32, 32, 3, 2, [0, 0, 1, 1], channels=4)
    before = four.read_bytes()
    assert pack_stem_pixels(four) is False and four.read_bytes() == before  # already aligned


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"images": x})[0]


def test_dynamic_spatial_input_is_left_alone(tmp_path) -> None:  # noqa: ANN001
    src = stem_model(tmp_path / "a.onnx", 32, 32, 3, 2, [0, 0, 1, 1])
    m = onnx.load(str(src))
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "W"
    onnx.save(m, str(src))
    before = src.read_bytes()
    assert pack_stem_pixels(src) is False and src.read_bytes() == before
