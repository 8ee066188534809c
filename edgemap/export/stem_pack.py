"""Pack the uint8 image's pixels into channels for ONNX Runtime's int8 stem conv (lossless).

ONNX Runtime's fast int8 convolution (MLAS "ConvSym", U8S8 with symmetric weights) needs a
multiple of 4 input channels; an RGB stem conv (3 channels) falls back to im2col + a generic
int8 GEMM and was the one int8 layer *slower* than its fp32 version (Lite0 224 px, 2 threads:
~155 µs int8 vs ~80 µs fp32). Padding the image to 4 channels in the graph costs more than it
saves (Pad/Gather/Concat on a uint8 NHWC tensor: 100–500 µs).

What costs nothing is a reshape: an NHWC row of ``W`` pixels × 3 channels is also a row of
``W/4`` groups × 12 channels. A stride-``s`` conv on pixels is a stride-1 conv on groups that
produces ``R = 4/s`` output pixels per group, each from its own copy of the weights placed at
the group offsets that its pixels fall on (zeros elsewhere); its ``R × O`` output channels,
read back in NHWC, are exactly ``R`` neighbouring output pixels of ``O`` channels each — one
more free reshape. Padded pixels hold the input zero point in both forms and groups tile the
row exactly (``W % 4 == 0``), so the outputs are bit-identical. Measured on Lite0 224 px
(ORT 1.32, 2 threads): stem 155 → 59 µs, whole int8 model 1.12 → 1.05 ms.

:func:`pack_stem_pixels` rewrites a QOperator model in place and returns whether it applied;
the shapes it needs are checked first and anything it does not recognise is left alone (as is
an input whose channel count is already a multiple of 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PIXELS = 4  # pixels per group: 4 × 3 channels = 12, a multiple of ConvSym's 4-channel alignment


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _static_hw(g: Any) -> tuple[int, int, int] | None:
    """(H, W, C) of the NHWC uint8 image input when all three are fixed."""
    dims = g.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]):
        return None
    return dims[1].dim_value, dims[2].dim_value, dims[3].dim_value


def pack_weights(w: np.ndarray, stride: int, pad_left: int) -> tuple[np.ndarray, int, int]:
    """Weights (O, C, kh, kw) of a stride-``stride`` conv on pixels → weights of the conv on groups.

    Returns ``(w_groups, groups_kernel_width, groups_pad_left)``; ``w_groups`` has shape
    ``(R·O, PIXELS·C, kh, KWg)`` with output channel ``r·O + o`` for the ``r``-th pixel of a group.
    """
    o, c, kh, kw = w.shape
    per = PIXELS // stride
    offsets = [stride * r - pad_left + k for r in range(per) for k in range(kw)]
    gmin = min(p // PIXELS for p in offsets)
    gmax = max(p // PIXELS for p in offsets)
    out = np.zeros((per * o, PIXELS * c, kh, gmax - gmin + 1), w.dtype)
    for r in range(per):
        for k in range(kw):
            p = stride * r - pad_left + k
            g, q = p // PIXELS - gmin, p % PIXELS
            out[r * o : (r + 1) * o, q * c : (q + 1) * c, :, g] = w[:, :, :, k]
    return out, gmax - gmin + 1, -gmin


def pack_stem_pixels(path: Path) -> bool:
    """Rewrite the stem QLinearConv that reads the (transposed) uint8 NHWC image; see the module doc."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    hwc = _static_hw(g)
    if hwc is None or g.input[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        return False
    h, w, c = hwc
    image = g.input[0].name
    transpose = next((n for n in g.node if n.op_type == "Transpose" and list(n.input) == [image]
                      and list(_attr(n, "perm", [])) == [0, 3, 1, 2]), None)
    if transpose is None:
        return False
    consumers = [n for n in g.node if transpose.output[0] in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "QLinearConv" or consumers[0].input[0] != transpose.output[0]:
        return False
    conv = consumers[0]
    init = {i.name: i for i in g.initializer}
    if any(conv.input[i] not in init for i in range(1, len(conv.input))):
        return False
    weights = numpy_helper.to_array(init[conv.input[3]])
    kernel = list(_attr(conv, "kernel_shape", weights.shape[2:]))
    strides = list(_attr(conv, "strides", [1, 1]))
    pads = list(_attr(conv, "pads", [0, 0, 0, 0]))
    if (weights.ndim != 4 or weights.shape[1] != c or c % 4 == 0 or _attr(conv, "group", 1) != 1
            or list(_attr(conv, "dilations", [1, 1])) != [1, 1] or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or strides[1] not in (1, 2, 4) or w % PIXELS or kernel != list(weights.shape[2:])):
        return False
    o = weights.shape[0]
    stride = strides[1]
    per = PIXELS // stride
    h_out = (h + pads[0] + pads[2] - kernel[0]) // strides[0] + 1
    w_out = (w + pads[1] + pads[3] - kernel[1]) // stride + 1
    if w_out % per:
        return False
    packed, kw_groups, left = pack_weights(weights, stride, pads[1])
    right = w_out // per - 1 + kw_groups - w // PIXELS - left
    if right < 0:
        return False

    def tiled(i: int) -> None:
        a = numpy_helper.to_array(init[conv.input[i]])
        if a.ndim == 1 and a.size == o:
            init[conv.input[i]].CopyFrom(numpy_helper.from_array(np.tile(a, per), conv.input[i]))

    init[conv.input[3]].CopyFrom(numpy_helper.from_array(packed, conv.input[3]))
    for i in (4, 5, 8):  # per-channel weight scale / zero point, bias
        if i < len(conv.input) and conv.input[i]:
            tiled(i)
    for a in conv.attribute:
        if a.name == "kernel_shape":
            a.ints[:] = [kernel[0], kw_groups]
        elif a.name == "strides":
            a.ints[:] = [strides[0], 1]
        elif a.name == "pads":
            a.ints[:] = [pads[0], left, pads[2], right]
    if not any(a.name == "kernel_shape" for a in conv.attribute):
        conv.attribute.append(helper.make_attribute("kernel_shape", [kernel[0], kw_groups]))

    prefix = "edgemap_stem_pack"
    out = conv.output[0]
    g.initializer.extend([
        numpy_helper.from_array(np.array([0, h, w // PIXELS, PIXELS * c], np.int64), f"{prefix}/groups_shape"),
        numpy_helper.from_array(np.array([0, h_out, w_out, o], np.int64), f"{prefix}/pixels_shape"),
    ])
    grouped = helper.make_node("Reshape", [image, f"{prefix}/groups_shape"], [f"{prefix}/groups_nhwc"], name=f"{prefix}/Reshape_in")
    transpose.input[0] = f"{prefix}/groups_nhwc"
    conv.output[0] = f"{prefix}/conv"
    tail = [
        helper.make_node("Transpose", [f"{prefix}/conv"], [f"{prefix}/conv_nhwc"], perm=[0, 2, 3, 1], name=f"{prefix}/Transpose_nhwc"),
        helper.make_node("Reshape", [f"{prefix}/conv_nhwc", f"{prefix}/pixels_shape"], [f"{prefix}/pixels_nhwc"], name=f"{prefix}/Reshape_out"),
        helper.make_node("Transpose", [f"{prefix}/pixels_nhwc"], [out], perm=[0, 3, 1, 2], name=f"{prefix}/Transpose_nchw"),
    ]
    # The transposed image is now (N, 12, H, W/4): drop its stale shape annotation.
    stale = [v for v in g.value_info if v.name == transpose.output[0]]
    for v in stale:
        g.value_info.remove(v)
    nodes = list(g.node)
    at = nodes.index(conv)
    nodes = nodes[: nodes.index(transpose)] + [grouped] + nodes[nodes.index(transpose) : at + 1] + tail + nodes[at + 1 :]
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True
