"""`edgemap finetune DATA --out RUN_DIR`: adapt a pretrained backbone to a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from edgemap.cli.common import (
    DataArg,
    JsonOpt,
    console,
    default_out,
    err_console,
    handle_errors,
    mark_worker_done,
    next_step,
    shq,
    write_json_out,
)
from edgemap.metrics import score_text


class RichReporter:
    """Rich progress bars: loss, accuracy and images/s per epoch."""

    def __init__(self, to_stderr: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=err_console if to_stderr else console,
        )
        self.task: Any = None

    def __enter__(self) -> RichReporter:
        return self  # the bars start with the first phase: an early error leaves no empty line behind

    def __exit__(self, *exc: Any) -> None:
        if self.task is not None:
            self.progress.stop()

    def done(self) -> None:
        """Training is over: its bar stops (in `edgemap run` it stayed live through export, eval and bench, and in a
        log its last state came after the report's lines)."""
        if self.task is not None:
            self.progress.stop()
            self.task = None

    def phase(self, name: str, total: int) -> None:
        if self.task is None:
            self.progress.start()
        else:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(name, total=total, stats="")

    def advance(self, n: int = 1, **f: Any) -> None:
        stats = f"loss {f['loss']:.3f} acc {f['acc']:.3f} {f['ips']:.0f} img/s" if f else ""
        self.progress.update(self.task, advance=n, **({"stats": stats} if stats else {}))

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.progress.console.print(  # one line each, also in a log file (rich folds at 80 columns there)
            f"epoch {row['epoch']:>3} \\[{row['phase']}] train loss {row['train_loss']:.4f} acc "
            f"{score_text(row['train_acc'], 4, 1)} | val loss {row['val_loss']:.4f} [bold]acc "
            f"{score_text(row['val_acc'], 4, 1)}[/] | lr {row['lr']:.2e}", soft_wrap=True
        )

    def message(self, text: str, *, markup: bool = False) -> None:
        """Print a line above the bar; paths and class names are shown as they are (no rich markup)."""
        self.progress.console.print(text, markup=markup, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @handle_errors
    def finetune_cmd(
        data: DataArg,
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create (default: models/<data folder name>).")] = None,  # type: ignore[assignment]
        backbone: Annotated[str | None, typer.Option(help="Backbone (see `edgemap backbones`). \\[default: efficientnet_lite0]")] = None,
        epochs: Annotated[int | None, typer.Option(help="Total epochs, head-only ones included. \\[default: 12]")] = None,
        img_size: Annotated[int | None, typer.Option(help="Square input size in pixels. \\[default: the backbone's]")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Images per step. \\[default: 32]")] = None,
        lr: Annotated[float | None, typer.Option(help="Head learning rate; the backbone gets a quarter. \\[default: 2e-3]")] = None,
        freeze_epochs: Annotated[int | None, typer.Option(help="Head-only epochs on cached frozen features first. \\[default: 2]")] = None,
        seed: Annotated[int | None, typer.Option(help="Random seed (runs are reproducible on CPU); in a single-folder dataset it also picks the validation images. \\[default: 0]")] = None,
        device: Annotated[str | None, typer.Option(help="auto | cpu | cuda. \\[default: auto]")] = None,
        precision: Annotated[str | None, typer.Option(help="auto | fp32 | bf16 | fp16 (autocast). \\[default: auto]")] = None,
        val_split: Annotated[float | None, typer.Option(help="Validation fraction for a single-folder dataset. \\[default: 0.2]")] = None,
        patience: Annotated[int | None, typer.Option(help="Early stop after N epochs without a better val accuracy. \\[default: 4]")] = None,
        skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip undecodable images (listed in the run) instead of stopping.")] = False,
        no_flip: Annotated[bool, typer.Option("--no-flip", help="No random horizontal flips (digits, text, asymmetric objects).")] = False,
        no_augment: Annotated[bool, typer.Option("--no-augment", help="No random resized crops (flips still, unless --no-flip).")] = False,
        threads: Annotated[int | None, typer.Option(help="CPU threads (0: the default) \\[default: physical cores, shared among --nproc processes]")] = None,
        max_pixels: Annotated[int | None, typer.Option(help="Refuse images with more pixels (decompression-bomb guard).")] = None,
        checkpoint_every: Annotated[int | None, typer.Option(hidden=True)] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out exactly where it stopped.")] = False,
        nproc: Annotated[int | None, typer.Option(help="Launch N processes with torchrun (DDP, one node).")] = None,
        json_out: JsonOpt = None,
    ) -> None:
        """Fine-tune a pretrained backbone on DATA and write the run directory.

        DATA is DATA/train/<class>/... with DATA/val/<class>/... (or validation/), or DATA/<class>/...
        split by --val-split. A DATA/test/ split is kept aside for `edgemap eval`.
        """
        from edgemap.errors import TrainingError
        from edgemap.train.finetune import FinetuneOptions, cap_default_freeze, finetune

        given = dict(backbone=backbone, epochs=epochs, img_size=img_size, batch_size=batch_size, lr=lr,
                     freeze_epochs=freeze_epochs, seed=seed, device=device, precision=precision, val_split=val_split,
                     patience=patience, threads=threads, max_pixels=max_pixels, checkpoint_every=checkpoint_every)
        kwargs = {k: v for k, v in given.items() if v is not None}
        if not resume:
            kwargs = cap_default_freeze(kwargs)
        if skip_bad:
            kwargs["skip_bad"] = True
        if no_flip:
            kwargs["flip"] = False
        if no_augment:
            kwargs["augment"] = False
        if nproc is not None and nproc < 1:
            raise TrainingError(f"--nproc {nproc}: must be >= 1 (1 trains in this process)")
        if nproc and nproc > 1:
            from edgemap.train.distributed import collective_timeout_s, launch_torchrun

            collective_timeout_s()  # a bad EDGEMAP_DIST_TIMEOUT: one line here, not one traceback per worker

            if not resume:
                FinetuneOptions(**kwargs).validate()  # a typo fails here, before N processes import torch
            raise typer.Exit(launch_torchrun(nproc))
        out = out or default_out(data)
        quiet = json_out is not None and str(json_out) == "-"  # stdout carries the JSON
        with RichReporter(to_stderr=quiet) as rep:
            if resume:  # the run's own options, plus what was given explicitly (checked for conflicts)
                res = finetune(data, out, resume=True, overrides=kwargs, reporter=rep)
            else:
                res = finetune(data, out, FinetuneOptions(**kwargs), reporter=rep)
        mark_worker_done()  # under --nproc: the launcher learns the run finished (a Ctrl-C may come at its end)
        if res.run_dir == Path():  # a non-zero rank under torchrun: rank 0 reports
            return
        write_json_out(json_out, res.to_dict())
        if quiet:
            return
        console.print(
            f"[green]done[/] in {res.seconds:.0f} s: best val accuracy [bold]{score_text(res.best_val_accuracy, 4, 1)}[/] at epoch "
            f"{res.best_epoch} ({res.epochs_run} epochs{', stopped early' if res.stopped_early else ''}; "
            f"{res.images_per_second:.0f} img/s, {res.autocast}, channels_last={res.channels_last}, {res.device})"
        )
        if res.skipped:
            console.print(f"[yellow]skipped {len(res.skipped)} unreadable file(s)[/] (listed in {escape(str(res.run_dir))}/edgemap.json)", soft_wrap=True)
        console.print(f"run directory: {res.run_dir}", markup=False, soft_wrap=True)
        next_step(f"edgemap export {shq(res.run_dir)} --int8")
