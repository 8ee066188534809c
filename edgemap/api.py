"""edgemap's Python API in one place: each CLI stage as a function, with its options class.

    from edgemap.api import FinetuneOptions, ExportOptions, EvalOptions, finetune, export, evaluate

    finetune("data/cats", "models/cats", FinetuneOptions(epochs=8))
    export("models/cats", ExportOptions(int8=True))
    res = evaluate("models/cats", EvalOptions(runtimes=("torch", "cpu", "openvino")))

Every stage takes the run directory (a path or a loaded :class:`RunDir`) and an options object whose
defaults are the CLI's; it records its results in the run's ``edgemap.json`` as the command does, and
raises the typed errors of :mod:`edgemap.errors` (:class:`EdgemapError` and its subclasses).
Names are imported when first used: ``import edgemap.api`` loads neither torch nor the runtimes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name → module that defines it
_WHERE = {
    "scan_dataset": "edgemap.data.scan", "ScanOptions": "edgemap.data.scan", "DatasetScan": "edgemap.data.scan",
    "finetune": "edgemap.train.finetune", "FinetuneOptions": "edgemap.train.finetune",
    "FinetuneResult": "edgemap.train.finetune",
    "export": "edgemap.export", "ExportOptions": "edgemap.export", "ExportResult": "edgemap.export",
    "evaluate": "edgemap.evaluate", "evaluate_arrays": "edgemap.evaluate", "EvalOptions": "edgemap.evaluate",
    "EvalResult": "edgemap.evaluate",
    "bench": "edgemap.bench", "BenchOptions": "edgemap.bench", "BenchRow": "edgemap.bench",
    "package": "edgemap.package", "PackageOptions": "edgemap.package", "PackageResult": "edgemap.package",
    "report": "edgemap.report", "ReportOptions": "edgemap.report", "ReportResult": "edgemap.report",
    "run_pipeline": "edgemap.pipeline", "RunOptions": "edgemap.pipeline", "RunResult": "edgemap.pipeline",
    "RunDir": "edgemap.manifest",
    "Classifier": "edgemap.runtime.classifier", "PreprocessContract": "edgemap.runtime.preprocess",
    "EdgemapError": "edgemap.errors",
}

__all__ = ["BenchOptions", "BenchRow", "Classifier", "DatasetScan", "EdgemapError", "EvalOptions", "EvalResult",
           "ExportOptions", "ExportResult", "FinetuneOptions", "FinetuneResult", "PackageOptions", "PackageResult",
           "PreprocessContract", "ReportOptions", "ReportResult", "RunDir", "RunOptions", "RunResult", "ScanOptions",
           "bench", "evaluate", "evaluate_arrays", "export", "finetune", "package", "report", "run_pipeline",
           "scan_dataset"]  # = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'edgemap.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # what type checkers and IDEs see
    from edgemap.bench import BenchOptions, BenchRow, bench
    from edgemap.data.scan import DatasetScan, ScanOptions, scan_dataset
    from edgemap.errors import EdgemapError
    from edgemap.evaluate import EvalOptions, EvalResult, evaluate, evaluate_arrays
    from edgemap.export import ExportOptions, ExportResult, export
    from edgemap.manifest import RunDir
    from edgemap.package import PackageOptions, PackageResult, package
    from edgemap.pipeline import RunOptions, RunResult, run_pipeline
    from edgemap.report import ReportOptions, ReportResult, report
    from edgemap.runtime.classifier import Classifier
    from edgemap.runtime.preprocess import PreprocessContract
    from edgemap.train.finetune import FinetuneOptions, FinetuneResult, finetune
