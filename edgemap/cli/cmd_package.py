"""`edgemap package`: build the device wheel of a run (or the generic edgemap-runtime wheel)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from edgemap.cli.common import JsonOpt, console, err_console, handle_errors, next_step, write_json_out


def register(app: typer.Typer) -> None:
    @app.command("package")
    @handle_errors
    def package_cmd(
        run_dir: Annotated[Path | None, typer.Argument(help="Run directory with an exported model (not needed with --runtime-only).", show_default=False)] = None,
        runtime: Annotated[str | None, typer.Option("--runtime", help="onnxruntime (CPU, QOperator int8), openvino (QDQ int8) or cuda (NVIDIA GPU, fp32; the wheel asks for onnxruntime-gpu, which replaces onnxruntime).")] = None,
        precision: Annotated[str | None, typer.Option("--precision", help="int8 or fp32 \\[default: int8 when exported, else fp32]")] = None,
        name: Annotated[str | None, typer.Option("--name", help="Package name = console command \\[default: <run dir>-classifier, plus -openvino / -cuda for those runtimes].")] = None,
        version: Annotated[str | None, typer.Option("--version", help="PEP 440 version \\[default: 0.1.0.<export time>+<runtime>.m<model sha256, 12 hex>: each model and runtime its own version, so pip on a device replaces another model's wheel instead of keeping it, and pip install -U takes the latest export].")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="Folder for the wheel \\[default: RUN_DIR/dist].")] = None,
        runtime_only: Annotated[bool, typer.Option("--runtime-only", help="Build edgemap-runtime: the same module without a model.")] = False,
        json_out: JsonOpt = None,
    ) -> None:
        """Build a torch-free wheel: model + classes + preprocessing, depending on numpy, Pillow and one runtime."""
        from edgemap.package import PackageOptions, package

        given = {"runtime": runtime, "precision": precision, "name": name, "version": version, "out": out}
        opts = PackageOptions(runtime_only=runtime_only, **{k: v for k, v in given.items() if v is not None})
        r = package(run_dir, opts)
        write_json_out(json_out, r.to_dict())
        if json_out is not None and str(json_out) == "-":
            return
        console.print(f"[green]built[/] {escape(str(r.wheel))}", soft_wrap=True)
        from edgemap.fsutil import size_text

        size = size_text(r.wheel_bytes)
        if r.model_bytes is not None:
            console.print(f"  {r.name} {r.version}: {r.precision} model for {r.runtime}, sha256 {r.model_sha256}", markup=False)
            size += f" (model {size_text(r.model_bytes)}; wheel − model = {size_text(r.overhead_bytes, sign=True)})"
        console.print(f"  wheel {size}; depends on {', '.join(r.requirements)}")
        for note in r.warnings:
            err_console.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)
        if r.replaced:
            err_console.print(f"[yellow]warning:[/] replaced an earlier {escape(r.wheel.name)} with other contents; pip "
                              "keeps a version it already installed, so a device needs the --force-reinstall below, "
                              "or give this build its own --version", soft_wrap=True)
        if r.named_after_run_folder:  # a retrain into v2/ made "v2-classifier": installed beside v1's
            console.print(f"  its name {r.name} comes from the run folder: a model retrained into another folder gets "
                          "another name and installs beside this one on a device; give each model of one app the "
                          "same --name", markup=False, soft_wrap=True)
        if r.runtime == "cuda":
            console.print("  onnxruntime-gpu replaces onnxruntime (one module); <1.27 are CUDA 12 builds: a CUDA 13 "
                          "device takes 'onnxruntime-gpu>=1.27' instead", markup=False, soft_wrap=True)
        usage = f"{r.command} MODEL.onnx IMAGE..." if runtime_only else f"{r.command} IMAGE... --top-k 3"
        next_step(f"{r.pip_install} && {usage}")
