"""`edgemap run`: the whole mapping — finetune → export --int8 → eval → bench → package → report.

Each stage is the same function the single commands call. The run directory's
``stages`` record says which finished; re-running skips finished stages (after checking
their artifacts' sha256), resumes an interrupted fine-tuning exactly, and redoes an
interrupted later stage from its start.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemap.bench import BenchOptions
from edgemap.evaluate import EvalOptions
from edgemap.export import ExportOptions
from edgemap.manifest import MANIFEST_NAME, RunDir, run_lock
from edgemap.package import PackageOptions
from edgemap.train.finetune import FinetuneOptions

STAGES = ("finetune", "export", "eval", "bench", "package", "report")
_STAGE_ARTIFACTS = {"finetune": ("weights_best",), "export": ("onnx_fp32",)}


@dataclass(frozen=True)
class RunOptions:
    """Options of every stage, each stage's own frozen dataclass (their defaults live there)."""

    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    export: ExportOptions = field(default_factory=lambda: ExportOptions(int8=True))
    eval: EvalOptions = field(default_factory=EvalOptions)
    bench: BenchOptions = field(default_factory=lambda: BenchOptions(batches=(1,), seconds=3.0))
    package: PackageOptions = field(default_factory=PackageOptions)
    report: bool = True


@dataclass
class StageOutcome:
    stage: str
    status: str  # "done" | "skipped" | "resumed"
    seconds: float
    detail: str = ""


@dataclass
class RunResult:
    run_dir: Path
    stages: list[StageOutcome]
    summary: list[dict[str, Any]]  # one row per runtime × precision: accuracy and latency
    artifacts: list[dict[str, Any]]  # key, path, bytes
    wheel: str | None
    report: str | None
    seconds: float
    unavailable: list[tuple[str, str]] = field(default_factory=list)  # runtimes eval could not run, and why

    @property
    def did_nothing(self) -> bool:
        return all(s.status == "skipped" for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "seconds": round(self.seconds, 2), "did_nothing": self.did_nothing,
            "stages": [vars(s) for s in self.stages], "summary": self.summary, "artifacts": self.artifacts,
            "wheel": self.wheel, "report": self.report, "unavailable": [list(u) for u in self.unavailable],
        }


def _finished(run_path: Path, stage: str) -> bool:
    """The stage is recorded done and its artifacts are intact (sha256 checked)."""
    if not (run_path / MANIFEST_NAME).exists():
        return False
    run = RunDir.load(run_path)
    if not run.stage_done(stage):
        return False
    for key in _STAGE_ARTIFACTS.get(stage, ()):
        run.artifact_path(key)  # raises on a missing or changed file: never silently redo over it
    return True


def run_pipeline(data: str | Path, out: str | Path, opts: RunOptions = RunOptions(), *,  # noqa: B008 - frozen
                 on_stage: Callable[[str], Any] | None = None, finetune_reporter: Any = None,
                 export_progress: Callable[[str], None] | None = None) -> RunResult:
    """Run every stage into ``out``, skipping those already finished there.

    Example:
        >>> res = run_pipeline("data/digits", "models/digits", RunOptions(finetune=FinetuneOptions(img_size=64)))
        >>> res.summary[0]["accuracy"], res.wheel
    """
    from edgemap.bench import bench
    from edgemap.evaluate import evaluate
    from edgemap.export import export
    from edgemap.package import package
    from edgemap.train import checkpoint as ckpt
    from edgemap.train.finetune import finetune

    out = Path(out)
    t0 = time.perf_counter()
    outcomes: list[StageOutcome] = []
    wheel = report_path = None
    with contextlib.ExitStack() as held:
        # one writer per run directory (manifest.run_lock); the stages' own locks nest inside this one
        held_lock = (out / MANIFEST_NAME).is_file()
        if held_lock:
            held.enter_context(run_lock(out, "run"))
        for stage in STAGES:
            if stage == "report" and not opts.report:
                continue
            if _finished(out, stage):
                outcomes.append(StageOutcome(stage, "skipped", 0.0, "already done"))
                if stage == "package":
                    wheel = RunDir.load(out).data["stages"]["package"].get("wheel")
                if stage == "report":
                    report_path = RunDir.load(out).data["stages"]["report"].get("html")
                continue
            if on_stage:
                on_stage(stage)
            ts = time.perf_counter()
            status, detail = "done", ""
            if stage == "finetune":
                resume = (out / ckpt.STATE_FILE).exists() and (out / MANIFEST_NAME).exists()
                res = finetune(data, out, None if resume else opts.finetune, resume=resume, reporter=finetune_reporter)
                status = "resumed" if resume else "done"
                detail = f"best val accuracy {res.best_val_accuracy:.4f} (epoch {res.best_epoch})"
            elif stage == "export":
                res = export(out, opts.export, progress=export_progress)
                detail = f"{res.onnx_path.name}" + (f" + int8 {', '.join(res.int8)}" if res.int8 else "")
            elif stage == "eval":
                res = evaluate(out, opts.eval)
                detail = f"{sum(r.status == 'ok' for r in res.rows)} runtime × precision rows"
            elif stage == "bench":
                rows = bench(out, opts.bench)
                detail = f"{sum(r.status == 'ok' for r in rows)} rows"
            elif stage == "package":
                res = package(out, opts.package)
                wheel = str(res.wheel)
                detail = f"{res.wheel.name} ({res.wheel_bytes / 1e6:.2f} MB, {res.precision})"
            elif stage == "report":
                from edgemap.report import ReportOptions, report

                res = report(out, ReportOptions())
                report_path = str(res.html)
                detail = report_path
            run = RunDir.load(out)  # stages save the manifest themselves: reload, never overwrite theirs
            extra: dict[str, Any] = {}
            if stage == "package":
                extra["wheel"] = wheel
            if stage == "report":
                extra["html"] = report_path
            if stage not in ("finetune", "export"):  # those two record their own completion
                run.set_stage(stage, "done", seconds=round(time.perf_counter() - ts, 2), **extra)
            outcomes.append(StageOutcome(stage, status, time.perf_counter() - ts, detail))
            if not held_lock and (out / MANIFEST_NAME).is_file():  # finetune just made it: hold it for the rest
                held.enter_context(run_lock(out, "run"))
                held_lock = True
        run = RunDir.load(out)
        return RunResult(
            run_dir=out, stages=outcomes, summary=summarize(run), artifacts=_artifact_rows(run), wheel=wheel,
            report=report_path, seconds=time.perf_counter() - t0, unavailable=_unavailable(run),
        )


def _unavailable(run: RunDir) -> list[tuple[str, str]]:
    evals = run.data.get("metrics", {}).get("eval", {})
    rows = evals.get("rows", evals) if isinstance(evals, dict) else evals
    seen: dict[str, str] = {}
    for r in rows or []:
        if isinstance(r, dict) and r.get("status") not in (None, "ok"):
            seen.setdefault(r["runtime"], f"{r['status']}: {r.get('reason', '')}")
    return list(seen.items())


def summarize(run: RunDir) -> list[dict[str, Any]]:
    """Accuracy (eval) and batch-1 latency (bench) per runtime × precision, from the manifest."""
    metrics = run.data.get("metrics", {})
    evals = metrics.get("eval", {})
    eval_rows = evals.get("rows", evals) if isinstance(evals, dict) else evals
    bench_data = metrics.get("bench", {})
    bench_rows = bench_data.get("rows", bench_data) if isinstance(bench_data, dict) else bench_data
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in eval_rows or []:
        if isinstance(r, dict) and r.get("status", "ok") == "ok":
            rows[(r["runtime"], r["precision"])] = {
                "runtime": r["runtime"], "precision": r["precision"], "accuracy": r.get("accuracy"),
                "agreement": r.get("agreement"), "n": r.get("n"),
            }
    for r in bench_rows or []:
        if isinstance(r, dict) and r.get("status", "ok") == "ok" and r.get("batch") == 1:
            row = rows.setdefault((r["runtime"], r["precision"]), {"runtime": r["runtime"], "precision": r["precision"]})
            row.update(p50_ms=r.get("p50_ms"), p99_ms=r.get("p99_ms"), throughput=r.get("throughput"),
                       provider=r.get("provider"))
    return list(rows.values())


def _artifact_rows(run: RunDir) -> list[dict[str, Any]]:
    return [{"key": k, "path": str(run.path / a["path"]), "bytes": a.get("bytes")} for k, a in run.artifacts.items()]
