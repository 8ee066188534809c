"""`edgemap eval`: accuracy of every runtime × precision on the same images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from edgemap.cli.common import JsonOpt, RunDirArg, console, handle_errors, next_step, split_csv, write_json_out

RUNTIME_HELP = "Runtimes, comma-separated: torch (PyTorch fp32 reference), cpu, cuda, tensorrt, openvino[:DEVICE]."


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def render(result) -> Table:  # noqa: ANN001 - EvalResult, imported lazily
    """The summary table: one line per runtime × precision."""
    table = Table(title=f"edgemap eval: {result.data}")
    for col in ("runtime", "precision", "n", "acc %", "top5 %", "macro P", "macro R", "macro F1", "agree %",
                "max |Δ|", "ran on"):
        table.add_column(col, justify="right" if col not in ("runtime", "precision", "ran on") else "left")
    for r in result.rows:
        if r.status != "ok":
            colour = "yellow" if r.status == "unavailable" else "red"
            table.add_row(r.runtime, r.precision, "", "", "", "", "", "", "", "", f"[{colour}]{r.status}: {escape(r.reason)}[/]")
            continue
        agree = _pct(r.agreement)
        if r.within_tolerance is False:
            agree = f"[red]{agree} (outside tolerance)[/]"
        table.add_row(
            r.runtime, r.precision, str(r.n), _pct(r.accuracy), _pct(r.top5),
            f"{r.macro_precision:.3f}", f"{r.macro_recall:.3f}", f"{r.macro_f1:.3f}", agree,
            "" if r.max_abs_diff is None else f"{r.max_abs_diff:.3g}", r.provider,
        )
    return table


def render_details(row, classes: list[str]) -> list[Table]:  # noqa: ANN001
    """Per-class table and confusion matrix of one row."""
    per = Table(title=f"{row.runtime} {row.precision}: per class")
    for col in ("class", "precision", "recall", "F1", "support"):
        per.add_column(col, justify="left" if col == "class" else "right")
    for c in row.per_class:
        per.add_row(c["class"], f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
    cm = Table(title=f"{row.runtime} {row.precision}: confusion (rows = true, columns = predicted)")
    cm.add_column("")
    for c in classes:
        cm.add_column(c[:8], justify="right")
    for c, line in zip(classes, row.confusion, strict=True):
        cm.add_row(c, *(str(v) for v in line))
    return [per, cm]


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @handle_errors
    def eval_(
        run_dir: RunDirArg,
        data: Annotated[Path | None, typer.Option("--data", help="Folder of labelled images to evaluate on: its test/, else val/, else its <class>/ folders (one class is enough; class names as in the run). Default: the run's test split, else its validation split.")] = None,
        runtime: Annotated[str, typer.Option("--runtime", help=RUNTIME_HELP)] = "torch,cpu,cuda,openvino",
        precision: Annotated[str, typer.Option("--precision", help="fp32, int8 or both.")] = "fp32,int8",
        strict: Annotated[bool, typer.Option("--strict", help="Fail when a runtime is unavailable instead of listing it.")] = False,
        bf16: Annotated[bool, typer.Option("--bf16", help="Let OpenVINO compute fp32 models in bf16 too (its CPU default where the CPU has it; faster, less exact). Default: f32 for fp32 models.")] = False,
        details: Annotated[bool, typer.Option("--details", help="Also print per-class tables and confusion matrices.")] = False,
        max_pixels: Annotated[int | None, typer.Option("--max-pixels", help="Decompression-bomb limit per image, in pixels \\[default: the one the run was trained with].")] = None,
        skip_bad: Annotated[bool, typer.Option("--skip-bad", help="With --data: skip (and count) unreadable images instead of failing.")] = False,
        json_out: JsonOpt = None,
    ) -> None:
        """Accuracy, top-5, macro P/R/F1 and agreement with PyTorch for each runtime × precision."""
        from edgemap.evaluate import EvalOptions, evaluate

        opts = EvalOptions(data=data, runtimes=tuple(split_csv(runtime)), precisions=tuple(split_csv(precision)),
                           strict=strict, exact=False if bf16 else None, max_pixels=max_pixels, skip_bad=skip_bad)
        result = evaluate(run_dir, opts)
        write_json_out(json_out, [r.to_dict() for r in result.rows])
        if json_out is not None and str(json_out) == "-":
            return
        console.print(render(result))
        if details:
            for r in result.rows:
                if r.status == "ok":
                    for t in render_details(r, result.classes):
                        console.print(t)
        if any(r.within_tolerance is False and "bf16" in r.provider for r in result.rows):
            console.print("[yellow]OpenVINO computed in bf16 (--bf16) and left the tolerance; "
                          "without --bf16 it computes in f32, as the packaged wheel does.[/]")
        console.print("stored in edgemap.json → metrics.eval (per-class rows and confusion matrices included)")
        next_step(f'edgemap bench "{run_dir}"')
