"""`edgemap export`: ONNX (+ int8) with the preprocessing inside, a parity check and an accuracy gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from edgemap.cli.common import (
    JsonOpt,
    RunDirArg,
    console,
    err_console,
    handle_errors,
    next_step,
    shq,
    split_csv,
    write_json_beside_error,
    write_json_out,
)


def parity_table(rows: list[Any]) -> Table:
    """PyTorch vs each runtime, batch 1 and the odd batch."""
    table = Table(title="parity: PyTorch vs runtimes (validation images)", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for col in ("runtime", "batch", "max |Δlogit|", "tolerance", "top-1 agree %", "ran on", "status"):
        table.add_column(col, justify="right" if col in ("batch", "max |Δlogit|", "tolerance", "top-1 agree %") else "left",
                         no_wrap=col != "status")
    for r in rows:
        colour = {"ok": "green", "FAIL": "red"}.get(r.status, "yellow")
        table.add_row(r.runtime, str(r.batch), f"{r.max_abs_diff:.3g}", f"{r.tolerance:.3g}", f"{100 * r.top1_agreement:.1f}",
                      r.provider, f"[{colour}]{r.status}[/]" + (f" {escape(r.note)}" if r.note else ""))
    return table


def gate_table(attempts: list[Any], max_drop: float) -> Table:
    """Every int8 attempt: calibration, how many nodes stayed float, top-1 vs fp32, agreement."""
    table = Table(title=f"int8 accuracy gate (max drop {max_drop:g} points; validation top-1 %)", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    for col in ("format", "#", "calib", "float", "on", "fp32", "int8", "drop", "agree", "result"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("format", "calib", "on", "result") else "right")
    for a in attempts:
        table.add_row(a.format, str(a.attempt), a.method, str(len(a.excluded)), a.runtime, f"{a.top1_fp32:.2f}",
                      f"{a.top1_int8:.2f}", f"{a.drop_points:+.2f}", f"{a.agreement:.2f}",
                      "[green]pass[/]" if a.passed else "[red]fail[/]")
    table.caption = "float: nodes kept in float (names in edgemap.json → metrics.int8_gate)"
    return table


def register(app: typer.Typer) -> None:
    @app.command("export")
    @handle_errors
    def export_(
        run_dir: RunDirArg,
        int8: Annotated[bool, typer.Option("--int8", help="Also write int8 models (static PTQ) behind the accuracy gate.")] = False,
        opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset \\[default: 17; int8 needs ≥ 13].")] = None,
        calib_size: Annotated[int | None, typer.Option("--calib-size", help="Calibration images from the training split, stratified \\[default: 300].")] = None,
        calib_method: Annotated[str | None, typer.Option("--calib-method", help="minmax | entropy | percentile \\[default: minmax].")] = None,
        max_drop: Annotated[float | None, typer.Option("--max-drop", help="Largest int8 top-1 drop allowed, in points \\[default: 1.0].")] = None,
        targets: Annotated[str | None, typer.Option("--targets", help="Runtimes to write int8 models for, e.g. cpu,openvino \\[default: those with an int8 path that run here; to add tensorrt, name every target: cpu,openvino,tensorrt].")] = None,
        data: Annotated[Path | None, typer.Option("--data", help="Where the run's training dataset is now, if it moved or was copied here (the same files, checked; the new place is recorded) \\[default: where it was trained].")] = None,
        json_out: JsonOpt = None,
    ) -> None:
        """Export RUN_DIR to model.onnx (uint8 NHWC in, logits out), check parity; --int8 adds int8 models."""
        from edgemap.errors import AccuracyGateError, ExportError, ParityError
        from edgemap.export import ExportOptions, export

        int8_only = {"--calib-size": calib_size, "--calib-method": calib_method, "--max-drop": max_drop, "--targets": targets}
        stray = [flag for flag, v in int8_only.items() if v is not None]
        if stray and not int8:
            raise ExportError(f"{', '.join(stray)} only {'apply' if len(stray) > 1 else 'applies'} with --int8; "
                              f"add --int8 or leave {'them' if len(stray) > 1 else 'it'} out")
        given = {"opset": opset, "calib_size": calib_size, "calib_method": calib_method, "max_drop": max_drop,
                 "targets": tuple(split_csv(targets)) if targets is not None else None}
        opts = ExportOptions(int8=int8, **{k: v for k, v in given.items() if v is not None})
        with console.status("exporting…") as status:
            try:
                result = export(run_dir, opts, progress=lambda msg: status.update(escape(msg) + "…"), data=data)
            except AccuracyGateError as e:
                status.stop()
                if getattr(e, "result", None) is not None:
                    write_json_beside_error(json_out, {**e.result.to_dict(), "error": str(e)})  # type: ignore[attr-defined]
                if json_out is None or str(json_out) != "-":
                    res = getattr(e, "result", None)
                    for note in res.warnings if res is not None else ():  # e.g. "calibrated on all 100 training images"
                        err_console.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)
                    if res is not None and res.parity:
                        console.print(parity_table(res.parity))
                    # every format's attempts: the ones that passed (and were written) too, not only the failed
                    console.print(gate_table(res.gate if res is not None and res.gate else e.attempts, opts.max_drop))
                raise
            except ParityError as e:
                status.stop()
                rows = getattr(e, "rows", None) or []
                write_json_beside_error(json_out, {"parity": [r.to_dict() for r in rows], "error": str(e)})
                if rows and (json_out is None or str(json_out) != "-"):
                    console.print(parity_table(rows))
                raise
        write_json_out(json_out, result.to_dict())
        for note in result.warnings:
            err_console.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)
        if json_out is not None and str(json_out) == "-":
            return
        console.print(parity_table(result.parity))
        if result.gate:
            console.print(gate_table(result.gate, opts.max_drop))
        console.print(f"wrote {result.onnx_path}" + ("" if result.rewritten else " (unchanged)"), markup=False, soft_wrap=True)
        for fmt, path in result.int8.items():
            console.print(f"wrote {path} ({fmt})" + (" (unchanged)" if fmt in result.int8_unchanged else ""),
                          markup=False, soft_wrap=True)
        console.print(f"{result.seconds:.1f} s; recorded in edgemap.json (artifacts, metrics.parity"
                      + (", metrics.int8_gate)" if result.gate else ")"))
        next_step(f"edgemap eval {shq(run_dir)}")
