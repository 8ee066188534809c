"""PyTorch → ONNX: the uint8 NHWC contract inside the graph, metadata, and load checks.

Exporter choice (measured here, torch 2.13, EfficientNet-Lite0 at 224 px): the TorchScript
exporter (``torch.onnx.export(..., dynamo=False)``) takes ~0.5 s, honours the asked opset
(17) and gives a graph that ONNX Runtime runs as fast as the dynamo exporter's (2.41 vs
2.44 ms, same run). The dynamo exporter took ~6.6 s, cannot go below opset 18 (its
down-conversion to 17 failed and it silently kept 18), needs ``onnxscript`` (a dev extra)
and turns ``flatten`` into a Shape/Gather/Range/Reshape chain. So edgemap uses
``dynamo=False``; its extra Pad-size constants are folded by every runtime at load time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgemap.errors import ExportError
from edgemap.runtime import metadata as md

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
#: Per-channel int8 (DequantizeLinear ``axis``) needs opset 13.
MIN_INT8_OPSET = 13


def io_spec(height: int, width: int, num_classes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The input/output description stored in ``edgemap.json`` and the ONNX metadata."""
    inp = {"name": INPUT_NAME, "layout": "NHWC", "dtype": "uint8", "shape": [-1, height, width, 3]}
    out = {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, num_classes]}
    return inp, out


def build_metadata(run: Any, precision: str, fmt: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Every key of :mod:`edgemap.runtime.metadata`, from the run directory's manifest.

    No timestamps: the same weights and package versions give byte-identical models, so
    re-exporting never rewrites an unchanged ``model.onnx``.
    """
    from edgemap.manifest import package_versions

    c = run.contract
    inp, out = io_spec(c.height, c.width, len(run.classes))
    meta = {
        md.SCHEMA: md.METADATA_SCHEMA_VERSION,
        md.CLASSES: json.dumps(run.classes, ensure_ascii=False),
        md.PREPROCESS: json.dumps(c.to_dict(), ensure_ascii=False),
        md.BACKBONE: run.backbone,
        md.RUN: run.path.resolve().name,
        md.PRECISION: precision,
        md.FORMAT: fmt,
        md.VERSIONS: json.dumps(package_versions(), sort_keys=True),
        md.INPUT: json.dumps(inp),
        md.OUTPUT: json.dumps(out),
        md.MAX_PIXELS: json.dumps(run.max_pixels),
    }
    meta.update(extra or {})
    return meta


def set_metadata(model: Any, meta: dict[str, str]) -> None:
    """Replace the edgemap keys of ``model.metadata_props`` (other keys are kept)."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    for k, v in [*keep, *sorted(meta.items())]:
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def read_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict (weights are not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


@contextlib.contextmanager
def _stdout_fd_silenced() -> Iterator[None]:
    """Silence the process's stdout (fd 1): when the TorchScript exporter fails (say at --opset 0 or 3),
    its C++ side prints the whole Torch IR graph there (57 lines for the tiny backbone, thousands for Lite0)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (a closed stdout): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


_EXPORT_LOCK = threading.Lock()


def check_opset(opset: int) -> None:
    """Refuse an opset newer than the installed torch exports (checked before fine-tuning by ``edgemap run``).

    Raises:
        ExportError: naming the newest opset this torch exports.
    """
    import torch
    from torch.onnx import _constants

    hi = getattr(_constants, "ONNX_MAX_OPSET", 20)
    if opset > hi:
        raise ExportError(f"--opset {opset} is newer than torch {torch.__version__} exports (at most {hi}); try --opset 17")


def torch_to_onnx_bytes(net: Any, height: int, width: int, opset: int) -> bytes:
    """Trace ``net`` (uint8 NHWC in, logits out) into serialized ONNX with a dynamic batch.

    Raises:
        ExportError: the opset is outside the exporter's range or an op has no ONNX
            equivalent at ``opset``.
    """
    import torch

    check_opset(opset)  # first: torch prints its whole graph to stdout on this failure
    # Batch 2 while tracing, so nothing gets specialised to a batch of one.
    example = torch.zeros((2, height, width, 3), dtype=torch.uint8)
    buf = io.BytesIO()
    try:
        # one export at a time in this process: torch.onnx keeps its export state in globals ("GLOBALS.in_onnx_export
        # must be True" from a second thread), and fd 1 is silenced process-wide (a second thread saved the first's
        # /dev/null as "stdout" and restored it: stdout was gone for good)
        with _EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad(), _stdout_fd_silenced():
            warnings.simplefilter("ignore")  # TorchScript exporter deprecation notes
            torch.onnx.export(
                net.eval(), (example,), buf, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                do_constant_folding=True,
            )
    except Exception as e:  # torch raises UnsupportedOperatorError, SymbolicValueError, RuntimeError...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch could not export {type(net).__name__} at --opset {opset}: {msg}; try --opset 17") from e
    return buf.getvalue()


_NOT_IMPL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\)")
_IR_TOO_NEW = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")


def check_model(path: str | Path, opset: int | None = None, name: str | None = None) -> None:
    """``onnx.checker`` plus a real ONNX Runtime load; typed errors naming version and op.

    ``name`` is what errors call the file (e.g. ``model.onnx`` while a temp file is checked).

    Raises:
        ExportError: IR version newer than the installed onnx/onnxruntime support, an op
            that onnxruntime has no kernel for at this opset, or an invalid graph.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    shown = name or str(path)
    model = onnx.load(str(path), load_external_data=False)
    opset = opset or next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if model.ir_version > onnx.IR_VERSION:
        raise ExportError(
            f"{shown}: ONNX IR version {model.ir_version} is newer than the installed onnx supports "
            f"(IR {onnx.IR_VERSION}); upgrade onnx/onnxruntime or export with an older --opset"
        )
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{shown}: onnx.checker rejected the exported graph at opset {opset}: {str(e).splitlines()[0]}") from e
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own Fail/NotImplemented/InvalidGraph types
        text = str(e)
        m = _IR_TOO_NEW.search(text)
        if m:
            raise ExportError(
                f"{shown}: ONNX IR version {m.group(1)} is newer than the installed onnxruntime "
                f"{ort.__version__} supports (max IR {m.group(2)}); upgrade onnxruntime or use an older --opset"
            ) from e
        m = _NOT_IMPL.search(text)
        if m:
            raise ExportError(
                f"{shown}: op {m.group(1)} at opset {m.group(2)} is not supported by onnxruntime "
                f"{ort.__version__}; choose another --opset (17 is the default)"
            ) from e
        raise ExportError(f"{shown}: onnxruntime cannot load the exported model (opset {opset}): {text.splitlines()[0]}") from e


def finalize_bytes(data: bytes, meta: dict[str, str]) -> bytes:
    """Stamp edgemap metadata into a serialized model; returns the new bytes."""
    import onnx

    model = onnx.load_from_string(data)
    set_metadata(model, meta)
    return model.SerializeToString()
