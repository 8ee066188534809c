"""`edgemap datasets`: demo datasets and dataset checks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from edgemap.cli.common import (
    DataArg,
    JsonOpt,
    console,
    default_out,
    err_console,
    handle_errors,
    next_step,
    shq,
    write_json_out,
)

datasets_app = typer.Typer(help="Demo datasets and dataset checks.", no_args_is_help=True)


@datasets_app.command("digits")
@handle_errors
def digits(
    out: Annotated[Path, typer.Argument(help="Folder to write OUT/train/<digit>/*.png and OUT/val/<digit>/*.png into.", show_default=False)],
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of each class put in val/.")] = 0.2,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of each class put in test/ (0 = none).")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the stratified split.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty OUT (replaces its train/val/test).")] = False,
) -> None:
    """Write scikit-learn's 1,797 handwritten digits (8x8 PNGs) as a folder dataset. No network needed."""
    from edgemap.data.digits import write_digits

    t0 = time.perf_counter()
    counts = write_digits(out, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, force=force)
    totals = ", ".join(f"{split} {sum(c.values())}" for split, c in counts.items())
    console.print(f"wrote digits to {out} ({totals}; 10 classes) in {time.perf_counter() - t0:.2f}s", markup=False)
    # 8x8 scans: 64 px (224 took ~10x as long for the same accuracy), and no flips (a flipped digit is another one)
    next_step(f"edgemap finetune {shq(out)} --backbone efficientnet_lite0 --img-size 64 --no-flip --out models/digits")


@datasets_app.command("scan")
@handle_errors
def scan(
    data: DataArg,
    val_split: Annotated[float | None, typer.Option("--val-split", help="Share held out for validation (single-folder layout only). \\[default: 0.2]")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of that split. \\[default: 0]")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip (and list) unreadable images instead of failing.")] = False,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", help="Decompression-bomb limit per image, in pixels. \\[default: Pillow's, ~89 M]")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Check a dataset folder the way `edgemap finetune` will: layout, classes, every image decoded."""
    from rich.table import Table

    from edgemap.data.scan import ScanOptions, scan_dataset

    given = {"val_split": val_split, "seed": seed, "max_pixels": max_pixels}
    opts = ScanOptions(skip_bad=skip_bad, **{k: v for k, v in given.items() if v is not None})
    t0 = time.perf_counter()
    result = scan_dataset(data, opts)
    seconds = time.perf_counter() - t0
    counts = result.counts()
    splits = [s for s in ("train", "val", "test") if counts[s]]
    out = err_console if json_out is not None and str(json_out) == "-" else console  # stdout is the JSON then
    table = Table(title=f"{escape(str(result.root))} ({result.layout})")
    table.add_column("class")
    for s in splits:
        table.add_column(s, justify="right")
    table.add_column("ignored", justify="right")
    for c in result.classes:
        table.add_row(escape(c), *(str(counts[s].get(c, 0)) for s in splits), str(result.ignored.get(c, 0) or ""))
    out.print(table)
    for path, why in result.skipped:
        out.print(f"[yellow]skipped[/] {escape(str(path))}: {escape(str(why))}", soft_wrap=True)
    total = sum(len(x) for x in (result.train, result.val, result.test))
    out.print(f"{len(result.classes)} classes, {total} images checked in {seconds:.2f}s; fingerprint {result.fingerprint[:16]}")
    write_json_out(json_out, result.to_manifest())
    result.warn_copies()
    if out is console:  # the same scan options, so finetune sees the dataset as this scan did
        unused = {"val_split"} if result.layout != "split" else set()
        extra = "".join(f" --{k.replace('_', '-')} {v}" for k, v in given.items()
                        if v is not None and k not in unused)  # the layout ignores it
        next_step(f"edgemap finetune {shq(data)} --out {shq(default_out(data))}"
                  + (" --skip-bad" if skip_bad else "") + extra)


def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
