"""`edgemap datasets`: demo datasets and dataset checks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from edgemap.cli.common import console, handle_errors, next_step

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
    console.print(f"wrote digits to {out} ({totals}; 10 classes) in {time.perf_counter() - t0:.2f}s")
    next_step(f'edgemap finetune "{out}" --backbone efficientnet_lite0 --out models/digits')


def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
