"""`edgemap run DATA --out RUN_DIR` and `edgemap demo`: the whole mapping in one command."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from edgemap.cli.common import (
    TOLERANCE_NOTE,
    DataArg,
    JsonOpt,
    agreement_cell,
    console,
    default_out,
    handle_errors,
    next_step,
    result_table,
    short_provider,
    shq,
    split_runtimes,
    write_json_out,
)


def _fmt(v: Any, pct: bool = False, digits: int = 2) -> str:
    if v is None:
        return ""
    from edgemap.metrics import score_text

    return score_text(100 * v, digits, 100) if pct else f"{v:.{digits}f}"  # an imperfect score never 100.00


def _ms(v: Any) -> str:
    """Three significant digits, as `edgemap bench` prints latency (0.0121 and 0.0149 ms both printed 0.01)."""
    return "" if v is None else f"{v:.3g}"


def summary_table(result: Any) -> Table:
    """Accuracy and batch-1 latency per runtime × precision; readable at 80 columns and in pipes (as eval/bench)."""
    table = result_table(f"edgemap run: {escape(str(result.run_dir))}",
                         ["runtime", "prec", "acc %", "agree %", "p50 ms", "p99 ms", "img/s", "ran on"],
                         text=("runtime", "prec"))
    for r in result.summary:
        table.add_row(r["runtime"], r["precision"], _fmt(r.get("accuracy"), True),
                      agreement_cell(_fmt(r.get("agreement"), True), r.get("within_tolerance")),
                      _ms(r.get("p50_ms")), _ms(r.get("p99_ms")), _fmt(r.get("throughput"), digits=0),
                      escape(short_provider(r.get("provider") or "")))
    notes = []
    if getattr(result, "eval_data", None):
        notes.append(f"accuracy on {result.eval_data}")
    if any(r.get("within_tolerance") is False for r in result.summary):
        notes.append(TOLERANCE_NOTE)
    notes += getattr(result, "timing_notes", [])  # as `edgemap bench` says them: a p50 measured on a busy machine
    table.caption = escape("; ".join(notes)) if notes else None
    return table


def artifact_table(result: Any) -> Table:
    """Every file the run made, paths relative to the run directory when inside it."""
    table = result_table(f"artifacts in {escape(str(result.run_dir))}", ["artifact", "MB", "path"], wide=("path",),
                         text=("artifact",))
    root = Path(result.run_dir).absolute()

    def short(path: str) -> str:
        p = Path(path).absolute()
        return escape(str(p.relative_to(root)) if p.is_relative_to(root) else str(p))

    for a in result.artifacts:
        size = a.get("bytes")
        table.add_row(a["key"], f"{size / 1e6:.2f}" if size else "", short(a["path"]))
    if result.wheel:
        size = f"{Path(result.wheel).stat().st_size / 1e6:.2f}" if Path(result.wheel).exists() else ""
        table.add_row("wheel", size, short(result.wheel))
    if result.report:
        table.add_row("report", "", short(result.report))
    return table


def run_and_show(data: Path, out: Path, opts: Any, json_out: Path | None) -> None:
    from edgemap.cli.cmd_finetune import RichReporter
    from edgemap.pipeline import run_pipeline

    quiet = json_out is not None and str(json_out) == "-"
    with RichReporter(to_stderr=quiet) as rep:
        def on_stage(stage: str) -> None:
            if stage != "finetune":
                rep.done()
            if not quiet:
                rep.message(f"[bold cyan]── {stage} ──[/]", markup=True)

        result = run_pipeline(data, out, opts, on_stage=on_stage, finetune_reporter=rep,
                              export_progress=lambda msg: rep.message(f"  {msg}"))
    write_json_out(json_out, result.to_dict())
    if quiet:
        return
    if result.did_nothing:
        console.print(f"[green]nothing to do[/]: every stage of {escape(str(out))} is already done (its weights and models verified by sha256)", soft_wrap=True)
    for s in result.stages:
        console.print(f"  {s.stage:9s} {s.status:8s} {s.seconds:6.1f} s  {s.detail}", markup=False, soft_wrap=True)
    from edgemap.runtime.text import printable

    skipped = result.skipped
    if skipped:  # --skip-bad: named here as finetune and `datasets scan` name them
        names = ", ".join(printable(name) for name in skipped[:3]) + (" …" if len(skipped) > 3 else "")
        console.print(f"[yellow]skipped {len(skipped)} unreadable file(s)[/]: {escape(names)} (all in "
                      f"{escape(str(out))}/edgemap.json → dataset.skipped)", soft_wrap=True)
    console.print(summary_table(result))
    for runtime, reason in result.unavailable:
        console.print(f"[yellow]{runtime}[/]: {escape(reason)}", soft_wrap=True)
    console.print(artifact_table(result))
    console.print(f"total {result.seconds:.0f} s")
    if result.wheel:
        console.print(f"\ninstall on a device: {result.pip_install}", markup=False, soft_wrap=True)
    if result.report:  # made by this run: where to open it, not a command that makes it again
        console.print(f"report: {Path(result.report).resolve().as_uri()}", markup=False, soft_wrap=True)
        for w in result.report_warnings:  # as `edgemap report` prints them (they were dropped here)
            console.print(f"  [yellow]warning:[/] {escape(str(w))}", soft_wrap=True)
    else:
        next_step(f"edgemap report {shq(out)}")  # one command per line: each can be pasted as it is
    console.print(f"also: edgemap bench {shq(out)} --batch 1,8\n      edgemap eval {shq(out)} --details", soft_wrap=True,
                  markup=False)


def register(app: typer.Typer) -> None:
    @app.command("run")
    @handle_errors
    def run_cmd(
        data: DataArg,
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (re-running continues where it stopped).")] = None,  # type: ignore[assignment]
        backbone: Annotated[str | None, typer.Option(help="Backbone \\[default: efficientnet_lite0].")] = None,
        epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs \\[default: 12].")] = None,
        freeze_epochs: Annotated[int | None, typer.Option(help="Head-only epochs first, part of --epochs \\[default: 2].")] = None,
        img_size: Annotated[int | None, typer.Option(help="Input size \\[default: the backbone's].")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Training batch size \\[default: 32].")] = None,
        lr: Annotated[float | None, typer.Option(help="Head learning rate \\[default: 2e-3].")] = None,
        seed: Annotated[int | None, typer.Option(help="Random seed; in a single-folder dataset it also picks the validation images \\[default: 0].")] = None,
        device: Annotated[str | None, typer.Option(help="Training device auto|cpu|cuda \\[default: auto].")] = None,
        no_flip: Annotated[bool, typer.Option("--no-flip", help="No random horizontal flips.")] = False,
        skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images (listed in the run).")] = False,
        val_split: Annotated[float | None, typer.Option(help="Validation fraction for a single-folder dataset \\[default: 0.2].")] = None,
        patience: Annotated[int | None, typer.Option(help="Early stop after N epochs without a better val accuracy \\[default: 4].")] = None,
        max_pixels: Annotated[int | None, typer.Option(help="Refuse images with more pixels (decompression-bomb guard) \\[default: Pillow's, ~89 M].")] = None,
        int8: Annotated[bool | None, typer.Option("--int8/--no-int8", help="Quantize to int8 behind the accuracy gate \\[default: yes]; --no-int8 keeps the run fp32 (export, eval, bench and the wheel).", show_default=False)] = None,
        max_drop: Annotated[float | None, typer.Option(help="Largest int8 top-1 drop allowed, points \\[default: 1.0].")] = None,
        calib_size: Annotated[int | None, typer.Option(help="int8 calibration images \\[default: 300].")] = None,
        calib_method: Annotated[str | None, typer.Option(help="int8 calibration minmax | entropy | percentile \\[default: minmax].")] = None,
        opset: Annotated[int | None, typer.Option(help="ONNX opset of the export \\[default: 17; int8 needs ≥ 13].")] = None,
        runtime: Annotated[str | None, typer.Option(help="Runtimes for eval/bench \\[default: torch,cpu,cuda,openvino].")] = None,
        bench_seconds: Annotated[float | None, typer.Option(help="Seconds per bench measurement \\[default: 3].")] = None,
        package_runtime: Annotated[str | None, typer.Option(help="Wheel runtime onnxruntime|openvino|cuda \\[default: onnxruntime].")] = None,
        name: Annotated[str | None, typer.Option(help="Wheel name; keep it for every model of one app \\[default: <run dir>-classifier, plus -openvino / -cuda for those runtimes].")] = None,
        report: Annotated[bool | None, typer.Option("--report/--no-report", help="Make the HTML report \\[default: yes; a re-run keeps the run's choice].", show_default=False)] = None,
        json_out: JsonOpt = None,
    ) -> None:
        """Run finetune → export --int8 → eval → bench → package → report into one run directory.

        Re-running on the same --out skips finished stages (their artifacts are sha256-checked),
        resumes an interrupted fine-tuning exactly, and redoes an interrupted later stage.
        """
        opts = build_options(backbone=backbone, epochs=epochs, freeze_epochs=freeze_epochs, img_size=img_size, batch_size=batch_size, lr=lr, seed=seed,
                             device=device, flip=False if no_flip else None, skip_bad=True if skip_bad else None,
                             val_split=val_split, patience=patience, max_pixels=max_pixels, int8=int8, max_drop=max_drop, calib_size=calib_size, calib_method=calib_method, opset=opset, runtime=runtime, bench_seconds=bench_seconds,
                             package_runtime=package_runtime, name=name, report=report)
        run_and_show(data, out or default_out(data), opts, json_out)

    @app.command("demo")
    @handle_errors
    def demo_cmd(
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's data/ and run/.")] = Path("models/demo"),
        epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs \\[default: 8].")] = None,
        freeze_epochs: Annotated[int | None, typer.Option(help="Head-only epochs first, part of --epochs \\[default: 2].")] = None,
        json_out: JsonOpt = None,
    ) -> None:
        """The whole mapping on the embedded digits dataset (scikit-learn's 1,797 scans), about a minute on 2 idle CPU cores.

        Writes OUT/data (the dataset) and OUT/run (run directory, int8 models, wheel, report).
        """
        from edgemap.data.digits import write_digits

        data = out / "data"
        if not (data / "train").is_dir():
            write_digits(data)
        # --freeze-epochs too: the head-only note names it (`demo --epochs 2` is advised `--epochs 3 --freeze-epochs 2`)
        opts = build_options(img_size=64, epochs=epochs or 8, freeze_epochs=freeze_epochs, flip=False,
                             runtime="torch,cpu,cuda,openvino", bench_seconds=2.0, name="digits-classifier")
        if epochs is None:  # the demo's own 8 is not a request: a demo made with --epochs N is still "done"
            opts = dataclasses.replace(opts, explicit=tuple(e for e in opts.explicit if e != "finetune.epochs"))
        run_and_show(data, out / "run", opts, json_out)


def build_options(*, runtime: str | None = None, bench_seconds: float | None = None, package_runtime: str | None = None,
                  name: str | None = None, max_drop: float | None = None, calib_size: int | None = None,
                  calib_method: str | None = None, opset: int | None = None,
                  report: bool | None = None, int8: bool | None = None, **finetune_kw: Any) -> Any:
    """Stage options from what the user set (unset = None = that stage's own default)."""
    from edgemap.bench import BenchOptions
    from edgemap.evaluate import EvalOptions
    from edgemap.export import ExportOptions
    from edgemap.package import PackageOptions
    from edgemap.pipeline import RunOptions
    from edgemap.train.finetune import FinetuneOptions, cap_default_freeze

    def given(**kw: Any) -> dict[str, Any]:
        return {k: v for k, v in kw.items() if v is not None}

    from edgemap.errors import EdgemapError

    runtimes = tuple(split_runtimes(runtime)) if runtime else None
    stray = [flag for flag, v in (("--max-drop", max_drop), ("--calib-size", calib_size), ("--calib-method", calib_method))
             if v is not None]
    if stray and int8 is False:  # as `edgemap export` refuses them without --int8 (they were accepted and unused)
        raise EdgemapError(f"{', '.join(stray)} only {'apply' if len(stray) > 1 else 'applies'} with int8; "
                           f"leave out --no-int8 or leave {'them' if len(stray) > 1 else 'it'} out")
    from edgemap.errors import QuantizationError
    from edgemap.export.onnx_export import MIN_INT8_OPSET

    if opset is not None and opset < MIN_INT8_OPSET and int8 is True:  # unset: the run's own choice decides (a re-run
        # of an fp32 run keeps fp32; a new run's default int8 is refused by the export's own check, before training)
        raise QuantizationError(f"--opset {opset}: int8 models need --opset {MIN_INT8_OPSET} or newer (per-channel int8); "
                           "give --no-int8 for an fp32-only run, or a newer --opset")
    from edgemap.errors import PackageError
    from edgemap.package import WHEEL_RUNTIMES

    if package_runtime is not None and package_runtime.strip().lower() not in WHEEL_RUNTIMES:  # named as run's option
        raise PackageError(f"--package-runtime {package_runtime!r}: choose {' or '.join(WHEEL_RUNTIMES)}")
    if bench_seconds is not None and not (math.isfinite(bench_seconds) and bench_seconds > 0):
        raise EdgemapError(f"--bench-seconds {bench_seconds}: must be a finite number of seconds > 0")
    explicit = [f"finetune.{k}" for k in given(**finetune_kw)]
    export_kw = given(max_drop=max_drop, calib_size=calib_size, calib_method=calib_method, opset=opset)
    explicit += [f"export.{k}" for k in given(**export_kw, int8=int8)]
    explicit += [f"{s}.precisions" for s in ("eval", "bench") if int8 is not None]
    explicit += ["package.precision"] if int8 is not None else []
    precisions = {} if int8 is None else {"precisions": ("fp32", "int8") if int8 else ("fp32",)}
    explicit += [f"{s}.runtimes" for s in ("eval", "bench") if runtimes]
    explicit += ["bench.seconds"] if bench_seconds is not None else []
    explicit += [f"package.{k}" for k in given(runtime=package_runtime, name=name)]
    explicit += [] if report is None else ["report.report"]
    return RunOptions(
        finetune=FinetuneOptions(**cap_default_freeze(given(**finetune_kw))),
        export=ExportOptions(int8=int8 is not False, **export_kw),
        eval=EvalOptions(**given(runtimes=runtimes), **precisions),
        bench=BenchOptions(batches=(1,), seconds=3.0 if bench_seconds is None else bench_seconds, warmup=5,
                           **given(runtimes=runtimes), **precisions),
        package=PackageOptions(**given(runtime=package_runtime, name=name), precision=None if int8 is not False else "fp32"),
        report=report is not False,
        explicit=tuple(explicit),
    )
