"""Static int8 post-training quantization behind an accuracy gate.

Recipe (measured on this project's machines, see PERFORMANCE.md and the export report):

- ``quant_pre_process`` first (shape inference + ORT graph optimisation): ``quantize_static``
  on a uint8-input model fails inside the calibrator without it.
- Weights: int8 symmetric **per-channel** (per-tensor collapses depthwise convs).
  Activations: **uint8 asymmetric** (U8S8 is the fast VNNI path on x86; ReLU6/Clip fuse
  only with asymmetric activations). ``reduce_range`` off (VNNI CPUs).
- Formats: ``qoperator`` (QLinearConv…, the fastest for ONNX Runtime CPU) and ``qdq``
  (Quantize/DequantizeLinear pairs, what OpenVINO and TensorRT consume). One artifact per
  format that the targets need (``edgemap.artifacts.int8_targets()``).
- The in-graph normalisation ``(x - mean) / std`` stays float, and when mean/std are the
  same integer/scale on every channel (EfficientNet-Lite: 127/128) the stem's input
  quantization is pinned to ``scale = 1/std, zero_point = mean``: quantizing the normalised
  image then returns the uint8 pixels exactly, so edgemap removes Cast/Sub/Mul/QuantizeLinear
  and feeds the uint8 image straight into the first int8 conv (lossless, and it removed
  ~0.4 ms of 1.5 ms at 224 px on ORT CPU). In the QOperator artifact the RGB stem conv then
  reads the image as groups of 4 pixels × 3 channels (``edgemap.export.stem_pack``, also
  lossless): ONNX Runtime's fast int8 conv needs a multiple of 4 input channels.

Accuracy gate: each int8 artifact is evaluated against the fp32 model on the validation set
(top-1 with the dataset labels, and agreement with the fp32 predictions), on the runtime it
is meant for. If top-1 drops more than ``max_drop`` points, fallbacks are tried in this order,
stopping at the first that passes:

1. the asked calibration method, everything quantized (except the normalisation);
2. another calibration method (the first of percentile, minmax, entropy not yet tried);
3. the better method so far, with the stem conv and the classifier kept in float;
4. as 3, plus the nodes whose local quantization error is largest (lowest SQNR of the
   QDQ model's activations on calibration images; 10% of the quantized nodes, at least 2),
   while at least half of the conv/linear layers stay int8.

A passing attempt is written atomically under its final name. If none passes, nothing is
written over an existing artifact: the best attempt is kept as
``model.int8.<format>.rejected.onnx`` (not recorded as an artifact) and
:class:`AccuracyGateError` carries the table of attempts.
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemap.errors import QuantizationError
from edgemap.export.calibration import METHODS, ImageReader, calibrate, quiet
from edgemap.export.stem_pack import pack_stem_pixels
from edgemap.fsutil import size_text
from edgemap.runtime.preprocess import DEFAULT_MAX_PIXELS, PreprocessContract

FALLBACK_METHODS = ("percentile", "minmax", "entropy")


@dataclass(frozen=True)
class FormatSpec:
    """How one int8 artifact format is quantized."""

    name: str
    qdq: bool
    activation: str  # "uint8" | "int8"
    symmetric_activations: bool


FORMATS: dict[str, FormatSpec] = {
    "qoperator": FormatSpec("qoperator", qdq=False, activation="uint8", symmetric_activations=False),
    "qdq": FormatSpec("qdq", qdq=True, activation="uint8", symmetric_activations=False),
    # TensorRT needs symmetric int8 activations; used if the capability table maps a runtime to it.
    "qdq_s8": FormatSpec("qdq_s8", qdq=True, activation="int8", symmetric_activations=True),
}


@dataclass
class GateAttempt:
    """One row of the accuracy-gate table."""

    format: str
    attempt: int
    method: str
    excluded: list[str]
    runtime: str
    top1_fp32: float
    top1_int8: float
    drop_points: float
    agreement: float
    passed: bool
    seconds: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GraphInfo:
    """What the quantizer needs to know about the (pre-processed) fp32 graph."""

    norm_nodes: list[str]  # Cast/Sub/Mul… between the uint8 input and the stem conv
    norm_output: str | None  # the normalised float tensor
    uint8_nchw: str | None  # the transposed uint8 image feeding the normalisation
    stem: str | None  # first Conv
    classifier: str | None  # the Gemm/MatMul producing the logits
    quantizable: list[str] = field(default_factory=list)
    weighted: list[str] = field(default_factory=list)  # Conv/Gemm/MatMul among them


#: errors of the place, not of the model: passed through as OSError (the CLI says what to do, exit 74)
_PLACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
#: below this much free space a failing tool most likely wrote a truncated file (ORT does not raise then)
_LOW_SPACE = 1 << 20


def tool_failed(what: str, e: Exception, folder: Path) -> Exception:
    """The error for an onnxruntime quantization tool that failed in ``folder``.

    A full disk makes ORT write truncated models without an error; the next step then fails
    with a protobuf "wire format" or decode error. Both, and a real OSError of the place, are
    reported as what they are (exit 74), not as a quantization problem.
    """
    if isinstance(e, OSError) and e.errno in _PLACE_ERRNOS:
        return e
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = _LOW_SPACE
    if free < _LOW_SPACE:
        return OSError(errno.ENOSPC, f"{what} failed with {size_text(free)} left on the disk ({e})", str(folder))
    return QuantizationError(f"{what} failed: {e}")


def check_free_space(folder: Path, fp32_path: Path) -> None:
    """Refuse to start int8 work that cannot fit: its work files take about 3× the fp32 model."""
    need = 3 * fp32_path.stat().st_size + (16 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(errno.ENOSPC, f"int8 quantization needs about {size_text(need)} free for its work files, "
                      f"{size_text(free)} left", str(folder))


def prepare(fp32_path: Path, out_path: Path) -> Path:
    """Run ``quant_pre_process`` (shape inference + graph optimisation) into ``out_path``."""
    from onnxruntime.quantization import quant_pre_process

    try:
        with quiet():
            quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=False)
    except Exception as e:  # ORT/onnx raise assorted types here
        raise tool_failed(f"{fp32_path}: onnxruntime quantization pre-processing", e, out_path.parent) from e
    return out_path


def graph_info(model_path: Path) -> GraphInfo:
    """Find the normalisation chain, the stem conv and the classifier of an fp32 graph."""
    import onnx

    g = onnx.load(str(model_path)).graph
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}
    norm: list[str] = []
    uint8_nchw = None
    tensor = g.input[0].name
    # Walk forward from the input through single-consumer elementwise/layout ops to the first Conv.
    while True:
        nxt = consumers.get(tensor, [])
        if len(nxt) != 1:
            break
        node = nxt[0]
        if node.op_type in ("Conv", "Pad"):
            break
        if node.op_type not in ("Transpose", "Cast", "Sub", "Mul", "Div", "Add"):
            break
        if node.op_type == "Transpose" and tensor == g.input[0].name:
            uint8_nchw = node.output[0]
        else:
            norm.append(node.name)
        tensor = node.output[0]
    stem = next((n.name for n in g.node if n.op_type == "Conv"), None)
    out = g.output[0].name
    classifier = None
    node = producer.get(out)
    while node is not None:
        if node.op_type in ("Gemm", "MatMul"):
            classifier = node.name
            break
        node = producer.get(node.input[0])
    quantizable = [n.name for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul", "Add", "Mul", "GlobalAveragePool")
                   and n.name not in norm]
    weighted = [n.name for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    return GraphInfo(norm, tensor if norm else None, uint8_nchw, stem, classifier, quantizable, weighted)


def foldable(contract: PreprocessContract) -> bool:
    """Whether quantizing the normalised input with (1/std, mean) gives back the uint8 pixels exactly."""
    m, s = contract.mean, contract.std
    return len(set(m)) == 1 and len(set(s)) == 1 and float(m[0]).is_integer() and 0 <= m[0] <= 255 and s[0] > 0


def quantize_once(
    pre_path: Path,
    out_path: Path,
    spec: FormatSpec,
    method: str,
    cache: Path,
    info: GraphInfo,
    contract: PreprocessContract,
    exclude: Sequence[str] = (),
) -> Path:
    """One ``quantize_static`` call from cached ranges, then the lossless input fold."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    exclude = list(dict.fromkeys([*info.norm_nodes, *exclude]))
    extra: dict[str, Any] = {"ActivationSymmetric": spec.symmetric_activations, "WeightSymmetric": True}
    fold = spec.activation == "uint8" and foldable(contract) and info.norm_output and info.stem not in exclude
    if fold:
        extra["TensorQuantOverrides"] = {
            info.norm_output: [{"scale": np.array(1.0 / contract.std[0], np.float32),
                                "zero_point": np.array(int(contract.mean[0]), np.uint8)}]
        }
    ort_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[method]
    try:
        with quiet():
            quantize_static(
                str(pre_path), str(out_path), None,
                quant_format=QuantFormat.QDQ if spec.qdq else QuantFormat.QOperator,
                per_channel=True, reduce_range=False,
                activation_type=QuantType.QUInt8 if spec.activation == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=exclude, calibrate_method=ort_method,
                extra_options=extra, calibration_cache_path=str(cache),
            )
    except Exception as e:  # onnxruntime.quantization raises plain exceptions
        raise tool_failed(f"{pre_path}: quantize_static ({spec.name}, {method})", e, out_path.parent) from e
    if fold and fold_input_quantization(out_path, info, contract) and not spec.qdq:
        pack_stem_pixels(out_path)
    return out_path


def fold_input_quantization(path: Path, info: GraphInfo, contract: PreprocessContract) -> bool:
    """Feed the uint8 image straight into the stem's int8 input (see the module docstring).

    Only when the QuantizeLinear of the normalised tensor has exactly scale 1/std and
    zero point mean; returns whether the graph changed.
    """
    import onnx
    from onnx import numpy_helper

    if info.uint8_nchw is None or info.norm_output is None:
        return False
    model = onnx.load(str(path))
    g = model.graph
    init = {i.name: i for i in g.initializer}
    q = next((n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == info.norm_output), None)
    if q is None or len(q.input) < 3 or q.input[1] not in init or q.input[2] not in init:
        return False
    scale = numpy_helper.to_array(init[q.input[1]])
    zp = numpy_helper.to_array(init[q.input[2]])
    if scale.size != 1 or zp.size != 1 or zp.dtype != np.uint8:
        return False
    if not np.isclose(float(scale), 1.0 / contract.std[0], rtol=1e-6) or int(zp) != int(contract.mean[0]):
        return False
    for n in g.node:
        for i, name in enumerate(n.input):
            if name == q.output[0]:
                n.input[i] = info.uint8_nchw
    # Drop nodes nobody consumes any more (the QuantizeLinear and the normalisation chain).
    outputs = {o.name for o in g.output}
    changed = True
    while changed:
        used = {i for n in g.node for i in n.input} | outputs
        keep = [n for n in g.node if any(o in used for o in n.output)]
        changed = len(keep) != len(g.node)
        if changed:
            del g.node[:]
            g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    keep_init = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_init)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True


def worst_nodes(
    pre_path: Path, qdq_path: Path, paths: Sequence[Path], contract: PreprocessContract, k: int,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[str]:
    """Names of the ``k`` fp32-graph nodes whose outputs lose most to quantization (lowest SQNR)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    aug = qdq_path.with_name(qdq_path.stem + ".debug.onnx")
    with quiet():
        modify_model_output_intermediate_tensors(str(qdq_path), str(aug))
        acts = collect_activations(str(aug), ImageReader(paths, contract, max_pixels=max_pixels))
    aug.unlink(missing_ok=True)
    # compute_activation_error() needs float activations too (KeyError 'float' without): score pre vs post QDQ here.
    errors = {
        name: float(compute_signal_to_quantization_noice_ratio(m["pre_qdq"], m["post_qdq"]))
        for name, m in create_activation_matching(acts).items()
        if m.get("pre_qdq") is not None and m.get("post_qdq") is not None
    }
    producer = {o: n.name for n in onnx.load(str(pre_path)).graph.node for o in n.output}
    scored = sorted((e, name) for name, e in errors.items() if name in producer and np.isfinite(e))
    out: list[str] = []
    for _, name in scored:
        node = producer[name]
        if node not in out:
            out.append(node)
        if len(out) >= k:
            break
    return out


def predict(path: Path, runtime: str, images: np.ndarray, threads: int | None = None, batch: int = 32,
            int8: bool = False) -> np.ndarray:
    """Top-1 predictions of a model on ``runtime`` (batched). ``int8``: a candidate whose metadata still says fp32
    (copied from model.onnx) runs as the written int8 model will, in eval and on the device: OpenVINO's own
    precision for int8 models (bf16 where the CPU has it), not the exact f32 that fp32 models get."""
    from edgemap.runtime.sessions import SessionOptions, load

    sess = load(path, runtime, SessionOptions(threads=threads, exact=False if int8 else None))
    preds = [sess.run(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)]
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def eval_runtime(targets: Sequence[str]) -> str:
    """The runtime an artifact is gated on: the first available target using it, else ORT CPU."""
    from edgemap.runtime.sessions import available

    for t in targets:
        if available(t)[0]:
            return t
    return "cpu"


@dataclass
class GateResult:
    """The outcome of the gate for one format."""

    format: str
    passed: bool
    attempts: list[GateAttempt]
    chosen: int | None  # index into attempts of the written/kept attempt
    path: Path | None  # the final (passed) or rejected file


def run_gate(
    fmt: str,
    targets: Sequence[str],
    pre_path: Path,
    work: Path,
    calib_paths: Sequence[Path],
    contract: PreprocessContract,
    method: str,
    images: np.ndarray,
    labels: np.ndarray,
    fp32_preds: np.ndarray,
    max_drop: float,
    caches: dict[tuple[str, bool], Path],
    chunk: int = 16,
    threads: int | None = None,
    progress: Any = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> GateResult:
    """Quantize to ``fmt`` and try the documented fallbacks until one passes the gate."""
    if method not in METHODS:
        raise QuantizationError(f"--calib-method {method!r} is not one of {', '.join(METHODS)}")
    spec = FORMATS[fmt]
    info = graph_info(pre_path)
    runtime = eval_runtime(targets)
    top1_fp32 = float(np.mean(fp32_preds == labels)) * 100 if len(labels) else float("nan")
    attempts: list[GateAttempt] = []
    files: list[Path] = []

    def cache_for(m: str) -> Path:
        key = (m, spec.symmetric_activations)
        if key not in caches:
            if progress:
                progress(f"calibrating ({m}, {len(calib_paths)} images)")
            caches[key] = calibrate(pre_path, calib_paths, contract, m, spec.symmetric_activations,
                                    work / f"ranges.{m}.{'sym' if spec.symmetric_activations else 'asym'}.json", chunk,
                                    max_pixels)
        return caches[key]

    def attempt(m: str, exclude: list[str], note: str) -> GateAttempt:
        n = len(attempts) + 1
        if progress:
            progress(f"int8 {fmt}: attempt {n} ({note})")
        t0 = time.perf_counter()
        out = work / f"{fmt}.attempt{n}.onnx"
        quantize_once(pre_path, out, spec, m, cache_for(m), info, contract, exclude)
        preds = predict(out, runtime, images, threads, int8=True)
        top1 = float(np.mean(preds == labels)) * 100 if len(labels) else float("nan")
        agree = float(np.mean(preds == fp32_preds)) * 100 if len(preds) else float("nan")
        drop = top1_fp32 - top1
        # judged on counts: a drop of exactly max_drop passes (98.4% → 97.4% is 1.0000000000000142 in floats)
        lost = int(np.sum(fp32_preds == labels)) - int(np.sum(preds == labels))
        passed = lost * 100 <= max_drop * len(labels) + 1e-6 if len(labels) else bool(drop <= max_drop)
        row = GateAttempt(fmt, n, m, list(exclude), runtime, round(top1_fp32, 3), round(top1, 3), round(drop, 3),
                          round(agree, 3), bool(passed), round(time.perf_counter() - t0, 2), note)
        attempts.append(row)
        files.append(out)
        return row

    def best() -> int:
        return max(range(len(attempts)), key=lambda i: (attempts[i].top1_int8, attempts[i].agreement, -i))

    row = attempt(method, [], "as asked")
    if not row.passed:
        other = next(m for m in FALLBACK_METHODS if m != method)
        attempt(other, [], "another calibration method")
    if not attempts[-1].passed:
        m = attempts[best()].method
        edge = [x for x in (info.stem, info.classifier) if x]
        attempt(m, edge, "stem conv + classifier in float")
    if not attempts[-1].passed:
        m = attempts[best()].method
        k = max(2, len(info.quantizable) // 10)
        edge = [x for x in (info.stem, info.classifier) if x]
        probe = work / f"{fmt}.probe.onnx"
        probe_spec = FORMATS["qdq_s8"] if spec.symmetric_activations else FORMATS["qdq"]
        quantize_once(pre_path, probe, probe_spec, m, cache_for(m), info, contract, edge)
        ranked = [n for n in worst_nodes(pre_path, probe, list(calib_paths)[:16], contract, len(info.quantizable),
                                       max_pixels) if n not in edge]
        # Keep at least half of the conv/linear layers int8: past that the "int8" model is mostly float.
        room = len(info.weighted) // 2 - sum(1 for n in edge if n in info.weighted)
        worst = []
        for n in ranked:
            if len(worst) >= k:
                break
            if n in info.weighted:
                if room <= 0:
                    continue
                room -= 1
            worst.append(n)
        attempt(m, edge + worst, f"+ {len(worst)} nodes with the largest quantization error in float")
    passed = next((i for i, a in enumerate(attempts) if a.passed), None)
    chosen = passed if passed is not None else best()
    return GateResult(fmt, passed is not None, attempts, chosen, files[chosen])
