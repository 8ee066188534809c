"""`edgemap report`: one self-contained HTML page (plots embedded) for a run directory."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from edgemap.cli.common import JsonOpt, RunDirArg, console, handle_errors, next_step, shq, write_json_out
from edgemap.fsutil import size_text


def register(app: typer.Typer) -> None:
    @app.command("report")
    @handle_errors
    def report_cmd(
        run_dir: RunDirArg,
        out: Annotated[str | None, typer.Option("--out", help="HTML file (a name ending in .html) or folder (an existing one, one ending in /, or a new name without a suffix) to write \\[default: RUN_DIR/report/report.html]; its plots are also saved as PNGs beside it (RUN_DIR/report/, or NAME_files/ next to --out).")] = None,
        predict: Annotated[bool, typer.Option("--predict/--no-predict", help="Run the exported models on validation images for the misclassified grid.")] = True,
        max_images: Annotated[int | None, typer.Option("--max-images", help="At most this many validation images are predicted \\[default: 2000].")] = None,
        grid: Annotated[int | None, typer.Option("--grid", help="At most this many misclassified images shown \\[default: 40].")] = None,
        json_out: JsonOpt = None,
    ) -> None:
        """Training curves, confusion matrices, accuracy vs latency, misclassified images, int8 gate: one HTML file."""
        from edgemap.report import ReportOptions, report

        given = {"out": out, "max_images": max_images, "grid": grid}
        opts = ReportOptions(predict=predict, **{k: v for k, v in given.items() if v is not None})
        r = report(run_dir, opts)
        write_json_out(json_out, r.to_dict())
        if json_out is not None and str(json_out) == "-":
            return
        console.print(f"[green]wrote[/] {escape(str(r.html))} ({size_text(r.bytes)}, {len(r.images)} plots embedded, "
                      f"{r.seconds:.1f} s)", soft_wrap=True)
        for name, status in r.sections.items():
            if status != "ok" and status not in r.warnings:  # said once, as the warning below
                console.print(f"  [yellow]{name}[/]: {escape(str(status))}", soft_wrap=True)
        for w in r.warnings:
            console.print(f"  [yellow]warning:[/] {escape(str(w))}", soft_wrap=True)
        console.print(f"open it: {r.html.resolve().as_uri()}", soft_wrap=True, markup=False)
        from edgemap.manifest import RunDir

        run = RunDir.load(run_dir)
        if "onnx_fp32" not in run.artifacts:
            next_step(f"edgemap export {shq(run_dir)} --int8")
        elif not run.stage_done("package") and not list((run.path / "dist").glob("*.whl")):  # nothing left to suggest
            next_step(f"edgemap package {shq(run_dir)}")
