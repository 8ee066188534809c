"""`edgemap backbones`: list the registered backbones."""

from __future__ import annotations

import typer
from rich.table import Table

from edgemap.cli.common import JsonOpt, console, handle_errors, next_step, write_json_out


def register(app: typer.Typer) -> None:
    @app.command("backbones")
    @handle_errors
    def backbones(json_out: JsonOpt = None) -> None:
        """List backbones: input size, parameters, weights source and whether they load here."""
        from edgemap.backbones import build_backbone, count_params, list_backbones, weights_available
        from edgemap.train.finetune import FinetuneOptions

        table = Table(title="edgemap backbones")
        for col in ("name", "input", "params", "ImageNet preprocessing", "weights", "status"):
            table.add_column(col, no_wrap=col == "name")
        rows = []
        for spec in list_backbones():
            ok, why = weights_available(spec)
            _, model = build_backbone(spec.name, pretrained=False)
            params = count_params(model) - sum(p.numel() for p in getattr(model, spec.head).parameters())
            rows.append({"name": spec.name, "input_size": spec.input_size, "params": params, "interpolation": spec.interpolation,
                         "crop_pct": spec.crop_pct, "finetune_crop_pct": FinetuneOptions.crop_pct,
                         "mean": list(spec.mean), "std": list(spec.std), "weights": spec.weights,
                         "available": ok, "reason": "" if ok else why, "description": spec.description})
            table.add_row(
                spec.name,
                f"{spec.input_size}px",
                f"{params / 1e6:.2f} M",
                f"{spec.interpolation}, crop {spec.crop_pct}, mean {spec.mean[0]:g} std {spec.std[0]:g}",
                spec.weights,
                "[green]ready[/]" if ok else f"[yellow]{why}[/]",
            )
        write_json_out(json_out, rows)
        if json_out is not None and str(json_out) == "-":
            return
        console.print(table)
        console.print("params exclude the ImageNet head, which finetune replaces. Fine-tuned runs keep the "
                      f"interpolation and mean/std but not ImageNet's crop margin (crop {FinetuneOptions.crop_pct}): "
                      "the shorter side fills the input and the longer side is center-cropped to a square, in "
                      "training and on the device alike.", soft_wrap=True)
        next_step("edgemap datasets digits data/digits && edgemap finetune data/digits --img-size 64 --no-flip")
