"""`edgemap run`: the whole mapping — finetune → export --int8 → eval → bench → package → report.

Each stage is the same function the single commands call. The run directory's
``stages`` record says which finished; re-running skips finished stages (after checking
their artifacts' sha256 and that the wheel and report are still there), resumes an
interrupted fine-tuning exactly, and redoes an interrupted later stage from its start.

Re-running checks the run against what is asked now: another dataset, a changed dataset or
other fine-tuning options are refused (a run directory holds one model); changed options of
a later stage (say ``--package-runtime``) redo that stage and every one after it; a stage
whose inputs changed since (``edgemap export`` run by hand) is redone with those after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemap.bench import BenchOptions
from edgemap.errors import DatasetError, TrainingError
from edgemap.evaluate import EvalOptions
from edgemap.export import ExportOptions
from edgemap.fsutil import size_text
from edgemap.manifest import MANIFEST_NAME, STAGE_ORDER, RunDir, run_lock, run_relative
from edgemap.metrics import score_text
from edgemap.options import recorded_value
from edgemap.package import PackageOptions
from edgemap.train.finetune import RESULT_NEUTRAL_OPTIONS, FinetuneOptions

STAGES = STAGE_ORDER
log = logging.getLogger(__name__)
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
    # "stage.option" names the user set (the CLI fills it); on a re-run only these are compared
    # with the run's. None: every option counts (an API caller passing complete options).
    explicit: tuple[str, ...] | None = None

    def given(self, stage: str, names: Any) -> set[str]:
        if self.explicit is None:
            return set(names)
        return {e.split(".", 1)[1] for e in self.explicit if e.startswith(stage + ".")} & set(names)


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
    eval_data: str | None = None  # what the accuracies were measured on (folder, split, images)
    wheel_replaced: bool = False  # this run rebuilt a same-version wheel with other contents
    wheel_deps_changed: bool = False  # ... which asked for other packages
    wheel_runtime: str | None = None  # the runtime the wheel is for (its install command differs for cuda)
    report_warnings: list[str] = field(default_factory=list)  # what this run's report warned about (as `edgemap report`)
    skipped: list[str] = field(default_factory=list)  # unreadable files this command's fine-tuning skipped (--skip-bad)
    timing_notes: list[str] = field(default_factory=list)  # caveats of the summary's latencies (as `edgemap bench`)

    @property
    def pip_install(self) -> str | None:
        """The device's install command for the wheel this run made (None without one)."""
        from edgemap.package import pip_install_command

        return (pip_install_command(self.wheel, self.wheel_replaced, self.wheel_runtime, self.wheel_deps_changed)
                if self.wheel else None)

    @property
    def did_nothing(self) -> bool:
        return all(s.status == "skipped" for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(Path(self.run_dir).absolute()), "seconds": round(self.seconds, 2), "did_nothing": self.did_nothing,
            "stages": [vars(s) for s in self.stages], "summary": self.summary, "artifacts": self.artifacts,
            "wheel": self.wheel, "report": self.report, "unavailable": [list(u) for u in self.unavailable],
            "eval_data": self.eval_data, "skipped": self.skipped, "wheel_replaced": self.wheel_replaced,
            "report_warnings": self.report_warnings, "timing_notes": self.timing_notes,
            "pip_install": self.pip_install,
        }


def _finished(run_path: Path, stage: str, opts: RunOptions) -> bool:
    """The stage is recorded done and what it made is intact (artifacts sha256-checked, wheel/report present)."""
    if not (run_path / MANIFEST_NAME).exists():
        return False
    run = RunDir.load(run_path)
    if not run.stage_done(stage):
        return False
    for key in _STAGE_ARTIFACTS.get(stage, ()):
        run.artifact_path(key)  # raises on a missing or changed file: never silently redo over it
    info = run.data["stages"][stage]
    if stage == "export" and opts.export.int8:
        int8 = [k for k in run.artifacts if k.startswith("onnx_int8_")]
        if not int8:
            return False  # exported by hand without --int8 (or its int8 models were retired)
        for key in int8:
            run.artifact_path(key)
    if stage == "eval" and opts.eval.data is None:
        stored = (run.data.get("metrics") or {}).get("eval")
        if isinstance(stored, dict) and stored.get("own_data") is False:
            return False  # an `edgemap eval --data OTHER` replaced the run's own results: measure them again
    if stage in ("package", "report"):
        made = info.get("wheel" if stage == "package" else "html")
        if not made or not _resolve(run_path, made).is_file():
            return False  # deleted since: make it again
    return True


def _resolve(run_path: Path, recorded: str) -> Path:
    """A recorded wheel/report path: relative to the run directory when it is inside it."""
    p = Path(recorded)
    return p if p.is_absolute() else run_path / p


def _stage_options(opts: RunOptions) -> dict[str, Any]:
    """Each later stage's options as JSON (recorded in the run, compared on the next run)."""
    parts = {"export": opts.export, "eval": opts.eval, "bench": opts.bench, "package": opts.package}
    out: dict[str, Any] = {k: json.loads(json.dumps(dataclasses.asdict(v), default=str)) for k, v in parts.items()}
    out["report"] = opts.report
    return out


def check_options(opts: RunOptions, finetune_opts: FinetuneOptions | None = None) -> None:
    """Every stage's option checks, before the first stage starts: a bad --name must not wait for hours of training.

    ``finetune_opts``: the fine-tuning options that will run (a re-run's are the run's own with what was given now).
    Raises the stage's own typed error, naming the ``edgemap run`` option.
    """
    from edgemap.errors import PackageError
    from edgemap.evaluate import REFERENCE, _combos
    from edgemap.export import _check_options
    from edgemap.package import WHEEL_RUNTIMES, validate_name, validate_version
    from edgemap.runtime.errors import RuntimeUnavailableError
    from edgemap.runtime.sessions import available

    (finetune_opts or opts.finetune).validate()
    _check_options(opts.export)
    for what in (opts.eval, opts.bench):
        _combos(what.runtimes, what.precisions)
    reasons = {}
    for r in dict.fromkeys(opts.eval.runtimes):
        if r.strip().lower() == REFERENCE:
            break
        ok, why = available(r.strip())
        if ok:
            break
        reasons[r] = why
    else:  # nothing eval (or bench, same list) could run here: say so now, not after fine-tuning
        raise RuntimeUnavailableError("none of --runtime can run here: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    if (opts.package.runtime or "onnxruntime").strip().lower() not in WHEEL_RUNTIMES:
        raise PackageError(f"--package-runtime {opts.package.runtime!r}: choose {' or '.join(WHEEL_RUNTIMES)}")
    if opts.package.name is not None:
        validate_name(opts.package.name)
    if opts.package.version is not None:
        validate_version(opts.package.version)


def _check_existing(run: RunDir, data: Path, opts: RunOptions) -> tuple[list[str], bool]:
    """Refuse a run made from another dataset or with other fine-tuning options; return the stages whose options
    changed (to redo with those after them), and whether the test split changed since training."""
    from edgemap.data.scan import record_at, relocated, rescan_for_run

    if not isinstance(run.data.get("dataset"), dict) or not run.data["dataset"].get("root"):
        raise DatasetError(f"{run.path} records no dataset (it was not made by `edgemap finetune`), so it cannot be "
                           f"checked against {data}; choose another --out")
    recorded_root = Path(str(run.data["dataset"]["root"]))
    if recorded_root.resolve() != data.resolve():
        # the same files at another place (the dataset moved or was renamed): the run continues, and records it
        moved = relocated(run.data["dataset"], data)
        try:
            scan = rescan_for_run(moved)
        except DatasetError as e:
            raise DatasetError(f"{run.path} was made from the dataset {recorded_root}, not {data} ({e}); "
                               "a run directory holds one model: choose another --out") from None
        log.warning("%s: the run's dataset is now here (the same files as at %s); recorded", data, recorded_root)
        run.data["dataset"] = record_at(moved, scan)
        run.save()
    else:
        scan = rescan_for_run(run.data["dataset"])  # DatasetError if its files changed since training
    given = opts.finetune.to_dict()
    stored = run.data.get("options", {}).get("finetune") or {}
    free = set(RESULT_NEUTRAL_OPTIONS) | (set() if run.stage_done("finetune") else {"epochs"})  # an unfinished run may get more
    asked = opts.given("finetune", given)
    diff = [f"{k}: {stored[k]!r} → {v!r}" for k, v in given.items()
            if k in asked and k in stored and k not in free and _resolved(k, v, stored) != _resolved(k, stored[k], stored)]
    if diff:
        raise TrainingError(f"{run.path} was fine-tuned with other options ({'; '.join(diff)}); a run directory holds "
                            "one model: choose another --out, or run again with the options it was made with")
    recorded = run.data.get("options", {}).get("run") or {}
    now = _stage_options(opts)
    changed = []
    for s in STAGES[1:]:
        if s not in recorded:  # made by hand or by an older edgemap: an option given now cannot be checked, so redo
            if opts.explicit is not None and opts.given(s, now[s] if s != "report" else ["report"]):
                changed.append(s)
            continue
        if s == "report":
            differs = "report" in opts.given("report", ["report"]) and recorded[s] != now[s]
        else:
            differs = any(recorded[s].get(k) != now[s][k] for k in opts.given(s, now[s]))
        if differs:
            changed.append(s)
    return changed, bool(scan.test_changed)


def _resolved(key: str, value: Any, stored: dict[str, Any]) -> Any:
    """A fine-tuning option as it takes effect: --img-size unset is the backbone's own size (given 32 = unset for tiny)."""
    if isinstance(value, tuple):
        value = list(value)
    if key == "img_size" and value is None:
        from edgemap.backbones.registry import get_spec

        with contextlib.suppress(Exception):  # an unknown recorded backbone: compare as recorded
            return get_spec(str(stored.get("backbone"))).input_size
    return value


def _asked_finetune(opts: RunOptions) -> dict[str, Any]:
    """The fine-tuning options the user set now (all of them for an API caller passing complete options)."""
    given = opts.finetune.to_dict()
    return {k: v for k, v in given.items() if k in opts.given("finetune", given)}


def _resumed_options(run: RunDir, opts: RunOptions) -> FinetuneOptions:
    """The fine-tuning options a re-run trains (or trained) with: the run's own, with what was given now."""
    stored = run.data.get("options", {}).get("finetune")
    if not isinstance(stored, dict):
        return opts.finetune
    return FinetuneOptions.from_dict({**stored, **_asked_finetune(opts)})


def _with_recorded(opts: RunOptions, recorded: dict[str, Any]) -> RunOptions:
    """The options a re-run uses: what the user set now, else what the run recorded, else the defaults."""
    if opts.explicit is None:
        return opts
    parts = {}
    for stage in ("export", "eval", "bench", "package"):
        current, old = getattr(opts, stage), recorded.get(stage)
        if not isinstance(old, dict):
            continue
        asked = opts.given(stage, old)
        kept = {}
        for f in dataclasses.fields(current):
            if f.name in old and f.name not in asked:
                v = recorded_value(f, old[f.name])
                if stage == "export" and f.name == "max_drop" and isinstance(v, int | float) and not v <= 100:
                    v = 100.0  # recorded by an older edgemap as inf (Infinity): the same gate, and valid now
                if isinstance(v, list):
                    v = tuple(v)
                elif isinstance(v, str) and "Path" in str(f.type):
                    v = Path(v)
                kept[f.name] = v
        parts[stage] = dataclasses.replace(current, **kept)
    if "report" in recorded and not opts.given("report", ["report"]):
        parts["report"] = bool(recorded["report"])
    return dataclasses.replace(opts, **parts)


def run_pipeline(data: str | Path, out: str | Path | RunDir, opts: RunOptions = RunOptions(), *,  # noqa: B008 - frozen
                 on_stage: Callable[[str], Any] | None = None, finetune_reporter: Any = None,
                 export_progress: Callable[[str], None] | None = None) -> RunResult:
    """Run every stage into ``out``, skipping those already finished there.

    Example:
        >>> res = run_pipeline("data/digits", "models/digits", RunOptions(finetune=FinetuneOptions(img_size=64)))
        >>> res.summary[0]["accuracy"], res.wheel
    """
    out, data = Path(out.path if isinstance(out, RunDir) else out), Path(data)  # a RunDir, as the stages take
    t0 = time.perf_counter()
    outcomes: list[StageOutcome] = []
    wheel = report_path = None
    report_warnings: list[str] = []
    wheel_replaced = wheel_deps_changed = False
    with contextlib.ExitStack() as held:
        # one writer per run directory (manifest.run_lock); the stages' own locks nest inside this one
        held_lock = (out / MANIFEST_NAME).is_file()
        if not held_lock:
            check_options(opts)
        if held_lock:
            held.enter_context(run_lock(out, "run"))
            opts = _reconcile(RunDir.load(out), data, opts)
        for stage in STAGES:
            if stage == "report" and not opts.report:
                if (out / MANIFEST_NAME).is_file():  # remembered: a later bare re-run does not add a report
                    run = RunDir.load(out)
                    run.data["options"].setdefault("run", {})["report"] = False
                    run.save()
                continue
            if _finished(out, stage, opts):
                outcomes.append(StageOutcome(stage, "skipped", 0.0, "already done"))
                if stage == "package":
                    wheel = str(_resolve(out, RunDir.load(out).data["stages"]["package"]["wheel"]).absolute())
                if stage == "report":
                    report_path = str(_resolve(out, RunDir.load(out).data["stages"]["report"]["html"]).absolute())
                continue
            if on_stage:
                on_stage(stage)
            ts = time.perf_counter()
            try:
                status, detail, made = _run_stage(stage, data, out, opts, finetune_reporter, export_progress)
            except BaseException:  # the bare re-run that continues (often the command in the message) must use
                _remember_options(out, opts)  # this command's options: its --calib-size, --runtime, --name...
                raise
            if stage == "package":
                wheel, wheel_replaced, wheel_deps_changed = made
            elif stage == "report":
                report_path, report_warnings = made
            _record_stage(out, stage, opts, time.perf_counter() - ts, wheel if stage == "package" else None,
                          report_path if stage == "report" else None)
            outcomes.append(StageOutcome(stage, status, time.perf_counter() - ts, detail))
            if not held_lock and (out / MANIFEST_NAME).is_file():  # finetune just made it: hold it for the rest
                held.enter_context(run_lock(out, "run"))
                held_lock = True
        run = RunDir.load(out)
        trained = any(s.stage == "finetune" and s.status != "skipped" for s in outcomes)
        return RunResult(
            skipped=[str(item[0]) for item in (run.data.get("dataset") or {}).get("skipped") or []] if trained else [],
            run_dir=out, stages=outcomes, artifacts=_artifact_rows(run), wheel=wheel,
            # the precisions this command measures (`run --no-int8` on a run with int8 models: fp32 rows only)
            summary=[r for r in summarize(run) if r["precision"] in opts.eval.precisions],
            report=report_path, report_warnings=report_warnings, seconds=time.perf_counter() - t0,
            unavailable=_unavailable(run),
            eval_data=((run.data.get("metrics") or {}).get("eval") or {}).get("data"), wheel_replaced=wheel_replaced,
            wheel_deps_changed=wheel_deps_changed, wheel_runtime=(opts.package.runtime or "onnxruntime").strip().lower(),
            timing_notes=_timing_notes(run, opts.eval.precisions),
        )


def _reconcile(existing: RunDir, data: Path, opts: RunOptions) -> RunOptions:
    """A re-run on an existing run directory: check it against what is asked now (another dataset or other
    fine-tuning options are refused), outdate the stages whose options changed (and those after them), and return
    the options the re-run uses (the run's recorded ones for what was not given now)."""
    changed, test_changed = _check_existing(existing, data, opts)
    opts = _with_recorded(opts, existing.data.get("options", {}).get("run") or {})
    check_options(opts, _resumed_options(existing, opts))
    if changed:  # options of a later stage changed: redo it and everything after it
        first = STAGES.index(changed[0])
        if existing.stage_done(STAGES[first]):
            existing.set_stage(STAGES[first], "outdated", save=False, reason=f"options of {changed[0]} changed")
        existing.outdate_after(STAGES[first], f"options of {changed[0]} changed", save=False)
        existing.save()
    if test_changed and existing.stage_done("eval"):  # new test images: scored again (bench does not read them)
        existing.set_stage("eval", "outdated", save=False, reason="the test split changed since training")
        existing.outdate(("package", "report"), "the test split changed since training", save=False)
        existing.save()
    return opts


def _record_stage(out: Path, stage: str, opts: RunOptions, seconds: float, wheel: str | None,
                  report_path: str | None) -> None:
    """A stage `run` ran: its status (finetune and export record their own) and the options it ran with."""
    run = RunDir.load(out)  # stages save the manifest themselves: reload, never overwrite theirs
    extra: dict[str, Any] = {}
    if wheel is not None:
        extra["wheel"] = run_relative(out, wheel)
    if report_path is not None:
        extra["html"] = run_relative(out, report_path)
    if stage not in ("finetune", "export"):
        run.set_stage(stage, "done", save=False, seconds=round(seconds, 2), **extra)
    if stage != "finetune":
        run.data["options"].setdefault("run", {})[stage] = _stage_options(opts)[stage]
    run.save()


def _timing_notes(run: RunDir, precisions: Any) -> list[str]:
    """The bench caveats of the rows the summary shows (batch 1, this command's precisions)."""
    from edgemap.artifacts import current_results
    from edgemap.bench import timing_notes

    rows = current_results(run, "bench")[0] or []
    return timing_notes([r for r in rows if isinstance(r, dict) and r.get("batch") == 1 and r.get("precision") in precisions])


def _run_stage(stage: str, data: Path, out: Path, opts: RunOptions, finetune_reporter: Any,
               export_progress: Callable[[str], None] | None) -> tuple[str, str, Any]:
    """Run one stage; (status, detail, what it made: (wheel, replaced) for package, the HTML path for report)."""
    from edgemap.bench import bench
    from edgemap.evaluate import evaluate
    from edgemap.export import export
    from edgemap.package import package
    from edgemap.train import checkpoint as ckpt
    from edgemap.train.finetune import finetune

    if stage == "finetune":
        # a run that started (even one stopped before its first checkpoint) continues with its own options
        resume = (out / MANIFEST_NAME).exists() and (
            (out / ckpt.STATE_FILE).exists() or bool(RunDir.load(out).data.get("options", {}).get("finetune")))
        if resume:  # the run's own options, but for what the user set now (checked above; --epochs may grow)
            res = finetune(data, out, None, resume=True, overrides=_asked_finetune(opts), reporter=finetune_reporter,
                           resume_hint=again_hint(out))
        else:
            res = finetune(data, out, opts.finetune, reporter=finetune_reporter, resume_hint=again_hint(out))
        return ("resumed" if resume else "done"), f"best val accuracy {score_text(res.best_val_accuracy, 4, 1)} (epoch {res.best_epoch})", None
    if stage == "export":
        if export_progress and (out / MANIFEST_NAME).is_file() and RunDir.load(out).stage_done("export"):
            # done by hand without --int8 (or its int8 models were retired): say why it is exported again
            export_progress(f"the recorded export has no int8 models: exporting again with this run's "
                            f"options (opset {opts.export.opset}, int8)")
        res = export(out, opts.export, progress=export_progress, again=again_hint(out))
        return "done", f"{res.onnx_path.name}" + (f" + int8 {', '.join(res.int8)}" if res.int8 else ""), None
    if stage == "eval":
        res = evaluate(out, opts.eval)
        _some_ran(res.rows, "eval")
        return "done", f"{sum(r.status == 'ok' for r in res.rows)} runtime × precision rows", None
    if stage == "bench":
        rows = bench(out, opts.bench)
        _some_ran(rows, "bench")
        return "done", f"{sum(r.status == 'ok' for r in rows)} rows", None
    if stage == "package":
        res = package(out, opts.package)
        return ("done", f"{res.wheel.name} ({size_text(res.wheel_bytes)}, {res.precision})",
                (str(res.wheel), res.replaced, res.replaced_requirements))
    from edgemap.report import ReportOptions, report

    res = report(out, ReportOptions())
    return "done", str(res.html), (str(res.html), list(res.warnings))


def again_hint(out: Path) -> str:
    """What to do after `edgemap run` stopped in a stage: the same command (a bare one does too) continues."""
    return f"run the same `edgemap run` command again (--out {shlex.quote(str(out))}); it continues where it stopped"


def _remember_options(out: Path, opts: RunOptions) -> None:
    """A stage stopped (Ctrl-C, an error): record this command's options of the later stages now, so that the re-run
    that continues (often the bare command from the message) exports with this command's --calib-size, packages
    with its --name... (``opts`` already holds the run's recorded options for what this command did not set)."""
    with contextlib.suppress(Exception):  # best effort: the run may not exist yet, or be locked by another process
        with run_lock(out, "run"):
            run = RunDir.load(out)
            run.data.setdefault("options", {})["run"] = {**run.data["options"].get("run", {}), **_stage_options(opts)}
            run.save()


def _some_ran(rows: list[Any], what: str) -> None:
    """A stage none of whose rows ran fails (exit 2), is not recorded done, and keeps the results stored earlier."""
    from edgemap.evaluate import nothing_ran
    from edgemap.runtime.errors import RuntimeUnavailableError

    failed = nothing_ran([r.status for r in rows], what, [f"{r.runtime}: {r.reason}" for r in rows])
    if failed:
        raise RuntimeUnavailableError(failed)


def _unavailable(run: RunDir) -> list[tuple[str, str]]:
    from edgemap.artifacts import current_results

    rows = current_results(run, "eval")[0]
    seen: dict[str, str] = {}
    for r in rows or []:
        if isinstance(r, dict) and r.get("status") not in (None, "ok"):
            seen.setdefault(r["runtime"], f"{r['status']}: {r.get('reason', '')}")
    return list(seen.items())


def summarize(run: RunDir) -> list[dict[str, Any]]:
    """Accuracy (eval) and batch-1 latency (bench) per runtime × precision, from the manifest."""
    from edgemap.artifacts import current_results

    eval_rows = current_results(run, "eval")[0]  # never rows of a model replaced since
    bench_rows = current_results(run, "bench")[0]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in eval_rows or []:
        if isinstance(r, dict) and r.get("status", "ok") == "ok":
            rows[(r["runtime"], r["precision"])] = {
                "runtime": r["runtime"], "precision": r["precision"], "accuracy": r.get("accuracy"),
                "agreement": r.get("agreement"), "n": r.get("n"), "within_tolerance": r.get("within_tolerance"),
            }
    for r in bench_rows or []:
        if isinstance(r, dict) and r.get("status", "ok") == "ok" and r.get("batch") == 1:
            row = rows.setdefault((r["runtime"], r["precision"]), {"runtime": r["runtime"], "precision": r["precision"]})
            row.update(p50_ms=r.get("p50_ms"), p99_ms=r.get("p99_ms"), throughput=r.get("throughput"),
                       provider=r.get("provider"))
    # torch first, then each runtime as eval ran them, fp32 before int8 (rows kept from an earlier eval came first)
    runtimes = list(dict.fromkeys(["torch", *(rt for rt, _ in rows)]))
    return [rows[k] for k in sorted(rows, key=lambda k: (runtimes.index(k[0]), k[1] != "fp32", k[1]))]


def _artifact_rows(run: RunDir) -> list[dict[str, Any]]:
    return [{"key": k, "path": str(run.path / a["path"]), "bytes": a.get("bytes")} for k, a in run.artifacts.items()]
