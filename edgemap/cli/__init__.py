"""The ``edgemap`` command line: one small file per command (Typer)."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="edgemap",
    help="Map a pretrained backbone to a small, fast, verified model on an edge device.\n\n"
    "finetune → export [--int8] → eval / bench → package. Each stage reads and writes one run directory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _flags_take_no_value() -> None:
    """``--help`` showed every on/off flag as ``--skip-bad <bool>``, as if it took a value (typer 0.29's rich help);
    ``--skip-bad true`` then failed with "unexpected extra argument". A flag's type column is left empty."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "edgemap_flags", False):
        return

    def display_type_rich(self, ctx):  # noqa: ANN001, ANN202 - typer's own signature
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich.edgemap_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_take_no_value()


def _version(value: bool) -> None:
    if value:
        from edgemap import __version__

        typer.echo(f"edgemap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Map a pretrained backbone to a small, fast, verified model on an edge device."""


# One module per command; each defines `register(app)`. Imports stay light (no torch) so
# `edgemap --help` is instant: the stages import torch/onnx/openvino lazily.
_COMMANDS = ["backbones", "datasets", "finetune", "export", "eval", "bench", "package", "run", "report"]
for _name in _COMMANDS:  # a missing module is a broken install: it fails here, not as "No such command"
    importlib.import_module(f"edgemap.cli.cmd_{_name}").register(app)


def main() -> None:
    import contextlib
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):  # a cp1252/latin-1 stdout (a Windows console redirected to a file): a
        with contextlib.suppress(AttributeError, ValueError):  # "Δ" or "…" it cannot hold is escaped, not a crash
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]  # after the work was saved
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        app()
        return
    # A torchrun worker: leave through os._exit once the command is done (see
    # edgemap.train.distributed.exit_worker: gloo workers could abort in interpreter finalization).
    import traceback

    from edgemap.train.distributed import exit_worker

    code = 0
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed, then the worker exits non-zero like Python would
        traceback.print_exc()
        code = 1
    exit_worker(code)
