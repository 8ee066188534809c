"""`edgemap backbones`: list the registered backbones."""

from __future__ import annotations

import typer
from rich.table import Table

from edgemap.cli.common import console, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("backbones")
    @handle_errors
    def backbones() -> None:
        """List backbones: input size, parameters, weights source and whether they load here."""
        from edgemap.backbones import build_backbone, count_params, list_backbones, weights_available

        table = Table(title="edgemap backbones")
        for col in ("name", "input", "params", "preprocessing", "weights", "status"):
            table.add_column(col)
        for spec in list_backbones():
            ok, why = weights_available(spec)
            _, model = build_backbone(spec.name, pretrained=False)
            params = count_params(model) - sum(p.numel() for p in model._fc.parameters())
            table.add_row(
                spec.name,
                f"{spec.input_size}px",
                f"{params / 1e6:.2f} M",
                f"{spec.interpolation}, crop {spec.crop_pct}, mean {spec.mean[0]:g} std {spec.std[0]:g}",
                spec.weights,
                "[green]ready[/]" if ok else f"[yellow]{why}[/]",
            )
        console.print(table)
        console.print("params exclude the ImageNet head, which finetune replaces.")
