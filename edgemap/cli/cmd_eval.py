"""`edgemap eval`: accuracy of every runtime × precision on the same images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgemap.cli.common import (
    TOLERANCE_NOTE,
    JsonOpt,
    RunDirArg,
    agreement_cell,
    console,
    handle_errors,
    next_step,
    note_cell,
    result_table,
    row_notes,
    short_provider,
    shq,
    split_csv,
    split_runtimes,
    write_json_out,
)

RUNTIME_HELP = ("Runtimes, comma-separated: torch (PyTorch fp32 reference), cpu, cuda, tensorrt, openvino[:DEVICE] "
                "(a device list stays one runtime: openvino:AUTO:GPU,CPU).")


def _pct(v: float | None) -> str:
    from edgemap.metrics import score_text

    return "" if v is None else score_text(100 * v, 2, 100)


def _f1(v: float) -> str:
    from edgemap.metrics import score_text

    return score_text(v, 3, 1)


def render(result) -> Group:  # noqa: ANN001 - EvalResult, imported lazily
    """The summary table, one line per runtime × precision, and the reasons of rows that did not run."""
    table = result_table(f"edgemap eval: {escape(str(result.data))}",
                         ["runtime", "prec", "acc %", "top5 %", "F1", "agree %", "max |Δ|", "ran on"],
                         text=("runtime", "prec"))
    notes: list[tuple[str, str, str]] = []
    for r in result.rows:
        if r.status != "ok":
            table.add_row(r.runtime, r.precision, "", "", "", "", "",
                          note_cell(notes, f"{r.runtime} {r.precision}", r.status, r.reason))
            continue
        table.add_row(
            r.runtime, r.precision, _pct(r.accuracy), _pct(r.top5), _f1(r.macro_f1),
            agreement_cell(_pct(r.agreement), r.within_tolerance),
            "" if r.max_abs_diff is None else f"{r.max_abs_diff:.2g}", escape(short_provider(r.provider)),
        )
    parts: list[Any] = [table, row_notes(notes)]
    parts += [Text(f"note: {n}", style="yellow") for n in getattr(result, "notes", [])]
    if any(r.within_tolerance is False for r in result.rows):
        parts.append(Text(TOLERANCE_NOTE, style="red"))
    return Group(*parts)


def render_details(row, classes: list[str]) -> list[Table]:  # noqa: ANN001
    """Per-class table and confusion matrix of one row."""
    per = Table(title=f"{row.runtime} {row.precision}: per class")
    for col in ("class", "precision", "recall", "F1", "support"):
        per.add_column(col, justify="left" if col == "class" else "right")
    predicted = [sum(col) for col in zip(*row.confusion, strict=True)] if row.confusion else []
    undefined = False
    for i, c in enumerate(row.per_class):
        # 0/0 is shown as "—", not 0.000: a class with no images here (recall) or never predicted (precision)
        p_none = i < len(predicted) and predicted[i] == 0
        r_none = c["support"] == 0
        undefined |= p_none or r_none
        per.add_row(escape(c["class"]), "—" if p_none else _f1(c["precision"]), "—" if r_none else _f1(c["recall"]),
                    "—" if p_none and r_none else _f1(c["f1"]), str(c["support"]))  # 0.9997 never shown as 1.000
    if undefined:
        per.caption = "— undefined (0/0): no images of the class, or never predicted"
    # columns show at most 8 characters of a class name; where two names share them (healthy_leaf, healthy_stem),
    # the classes are numbered instead, and the rows say which number is which
    short = [c[:8] for c in classes]
    numbered = len(set(short)) < len(short)
    cm = Table(title=f"{row.runtime} {row.precision}: confusion (rows = true, columns = predicted)")
    cm.add_column("")
    for i, c in enumerate(short):
        cm.add_column(str(i) if numbered else escape(c), justify="right")
    for i, (c, line) in enumerate(zip(classes, row.confusion, strict=True)):
        cm.add_row(escape(f"{i} {c}" if numbered else c), *(str(v) for v in line))
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
        known_classes_only: Annotated[bool, typer.Option("--known-classes-only", help="With --data: leave out (and count) images of classes the run does not know, e.g. a class added since it was trained.")] = False,
        no_save: Annotated[bool, typer.Option("--no-save", help="Measure only: keep the results stored in the run (and the wheel's model card) as they are, e.g. to compare runs on new data.")] = False,
        json_out: JsonOpt = None,
    ) -> None:
        """Accuracy, top-5, macro P/R/F1 and agreement with PyTorch for each runtime × precision."""
        from edgemap.evaluate import EvalOptions, evaluate, nothing_ran
        from edgemap.fsutil import not_writable
        from edgemap.runtime.errors import RuntimeUnavailableError

        read_only = not_writable(run_dir) if run_dir.is_dir() else None
        opts = EvalOptions(data=data, runtimes=tuple(split_runtimes(runtime)), precisions=tuple(split_csv(precision)),
                           strict=strict, exact=False if bf16 else None, max_pixels=max_pixels, skip_bad=skip_bad,
                           known_classes_only=known_classes_only,
                           save=read_only is None and not no_save)
        from edgemap.errors import ResultsNotStored

        not_stored = None
        try:
            result = evaluate(run_dir, opts)
        except ResultsNotStored as e:  # a full disk: the table is shown (and written with --json), then the error
            result, not_stored = e.result, e
        write_json_out(json_out, [r.to_dict() for r in result.rows])
        failed = nothing_ran([r.status for r in result.rows], "eval",  # no table with --json -: the reasons then
                             [f"{r.runtime}: {r.reason}" for r in result.rows] if str(json_out) == "-" else None)
        if json_out is not None and str(json_out) == "-":
            if failed:
                raise RuntimeUnavailableError(failed)
            if not_stored is not None:
                raise not_stored
            return
        console.print(render(result))
        if failed:
            raise RuntimeUnavailableError(failed)
        if not_stored is not None:
            if details:
                for r in result.rows:
                    if r.status == "ok":
                        for t in render_details(r, result.classes):
                            console.print(t)
            raise not_stored
        if details:
            for r in result.rows:
                if r.status == "ok":
                    for t in render_details(r, result.classes):
                        console.print(t)
        if bf16 and any(r.within_tolerance is False and r.precision == "fp32" and "bf16" in r.provider
                        for r in result.rows):  # int8 models always run u8+bf16 here: not what --bf16 changes
            console.print("[yellow]OpenVINO computed in bf16 (--bf16) and left the tolerance; "
                          "without --bf16 it computes in f32, as the packaged wheel does.[/]")
        if read_only:
            console.print(f"[yellow]not stored[/]: the run directory is not writable ({escape(read_only)})", soft_wrap=True)
            return
        if no_save:
            console.print("not stored (--no-save): the run's stored results are unchanged")
            return
        console.print("stored in edgemap.json → metrics.eval (per-class rows and confusion matrices included)")
        next_step(f"edgemap bench {shq(run_dir)}")
