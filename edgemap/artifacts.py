"""Names of the artifacts a run directory records, and which one each runtime loads.

Keys in ``edgemap.json["artifacts"]``:

- ``weights_best`` / ``weights_last``: safetensors weights (finetune)
- ``onnx_fp32``: ``model.onnx``, uint8 NHWC input, dynamic batch (export)
- ``onnx_int8_qoperator``: ``model.int8.qoperator.onnx``, for ONNX Runtime CPU (export --int8)
- ``onnx_int8_qdq``: ``model.int8.qdq.onnx``, U8 activations, for OpenVINO (export --int8)
- ``onnx_int8_qdq_s8``: ``model.int8.qdq_s8.onnx``, S8 symmetric activations, for TensorRT

int8 entries carry ``{"precision": "int8", "format": ..., "runtimes": [...]}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemap.errors import ManifestError
from edgemap.runtime.sessions import RUNTIMES, parse_runtime

WEIGHTS_BEST = "weights_best"
WEIGHTS_LAST = "weights_last"
ONNX_FP32 = "onnx_fp32"
INT8_FORMATS = ("qoperator", "qdq", "qdq_s8")
FILENAMES = {
    ONNX_FP32: "model.onnx",
    "onnx_int8_qoperator": "model.int8.qoperator.onnx",
    "onnx_int8_qdq": "model.int8.qdq.onnx",
    "onnx_int8_qdq_s8": "model.int8.qdq_s8.onnx",
}


def int8_key(fmt: str) -> str:
    if fmt not in INT8_FORMATS:
        raise ValueError(f"int8 format must be one of {INT8_FORMATS}")
    return f"onnx_int8_{fmt}"


def key_for(runtime: str, precision: str) -> str:
    """The artifact key ``runtime`` loads for ``precision`` (``fp32`` or ``int8``)."""
    info, _ = parse_runtime(runtime)
    if precision == "fp32":
        return ONNX_FP32
    if precision == "int8":
        if info.int8_format is None:
            raise ManifestError(f"runtime {info.name} has no int8 path; use --precision fp32")
        return int8_key(info.int8_format)
    raise ManifestError(f"unknown precision {precision!r}; use fp32 or int8")


def int8_targets() -> dict[str, str]:
    """runtime name → int8 format, for every runtime with an int8 path."""
    return {name: r.int8_format for name, r in RUNTIMES.items() if r.int8_format}


def model_run_mismatch(run: Any, model: Path, data: bytes | None = None) -> str | None:
    """What the exported ``model``'s own metadata says differently from the run's ``edgemap.json``, else None.

    A device reads classes and preprocessing from the model; eval and package use the run's
    manifest. If someone edited one of them, results would be measured (and a model card
    written) with labels or preprocessing the device never uses.
    """
    from edgemap.runtime.onnx_meta import model_meta, parse_model_bytes, read_model_meta

    meta = read_model_meta(model) if data is None else model_meta(parse_model_bytes(data, str(model)), str(model))
    diffs = []
    if list(meta.classes) != list(run.classes):
        diffs.append(f"classes {list(meta.classes)} vs {list(run.classes)}")
    if meta.contract.to_dict() != run.contract.to_dict():
        diffs.append(f"preprocessing {meta.contract.to_dict()} vs {run.contract.to_dict()}")
    if not diffs:
        return None
    return (f"{model.name}: its metadata differs from {run.manifest_path.name} ({'; '.join(diffs)}); the device uses the "
            f"model's. Restore edgemap.json, or re-run `edgemap export` to write models that match it")


def recorded_sha256(run: Any, path: str | Path) -> str:
    """The sha256 ``edgemap.json`` records for the artifact at ``path`` ("" if none): stored with each eval and
    bench row, so results can be told from those of a model that has since been replaced."""
    target = Path(path).resolve()
    for entry in run.artifacts.values():
        if (run.path / entry["path"]).resolve() == target:
            return str(entry.get("sha256", ""))
    return ""


def measured_on_other_models(run: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The eval/bench rows (dicts) measured on a model (or weights) the run no longer records: results of an earlier
    export or fine-tuning. Rows without ``model_sha256`` (runs from before edgemap 0.1 stored it) count as current."""
    current = {str(e.get("sha256", "")) for e in run.artifacts.values()}
    return [r for r in rows if r.get("model_sha256") and r["model_sha256"] not in current]


def stored_rows(section: Any) -> list[dict[str, Any]]:
    """metrics.eval / metrics.bench → a list of row dicts (lists or dicts of rows accepted)."""
    if isinstance(section, dict):
        if "rows" in section:
            return stored_rows(section["rows"])
        return [{"key": k, **v} for k, v in section.items() if isinstance(v, dict)]
    if isinstance(section, list):
        return [r for r in section if isinstance(r, dict)]
    return []


def current_results(run: Any, stage: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``metrics.eval`` / ``metrics.bench`` rows split into those of the run's current models and those measured on
    models replaced since (another export, or fine-tuning again): the model card, the report and `edgemap run`'s
    summary show only the first. Rows that did not run belong to the latest measurement (eval and bench keep only
    rows that ran from earlier ones), unless no row of it is current: then the whole measurement is old."""
    rows = stored_rows((run.data.get("metrics", {}) or {}).get(stage))
    old = measured_on_other_models(run, rows)
    if old and not any(r.get("status", "ok") == "ok" and not any(r is o for o in old) for r in rows):
        old += [r for r in rows if r.get("status", "ok") != "ok" and not any(r is o for o in old)]
    return [r for r in rows if not any(r is o for o in old)], old
