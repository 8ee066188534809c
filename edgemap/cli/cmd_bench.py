"""`edgemap bench`: latency percentiles, throughput, load time and memory per runtime × precision × batch."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from edgemap.cli.cmd_eval import RUNTIME_HELP
from edgemap.cli.common import JsonOpt, RunDirArg, console, handle_errors, next_step, split_csv, write_json_out
from edgemap.errors import EdgemapError


def _ints(value: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in split_csv(value))
    except ValueError as e:
        raise EdgemapError(f"{option} takes comma-separated integers, got {value!r}") from e


def render(rows) -> Table:  # noqa: ANN001 - list[BenchRow], imported lazily
    table = Table(title=f"edgemap bench ({rows[0].threads if rows else '?'} threads)")
    for col in ("runtime", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "load ms", "mem MB",
                "model MB", "ran on", "computes in"):
        table.add_column(col, justify="left" if col in ("runtime", "precision", "ran on", "computes in") else "right")
    for r in rows:
        if r.status != "ok":
            colour = "yellow" if r.status == "unavailable" else "red"
            table.add_row(r.runtime, r.precision, str(r.batch), "", "", "", "", "", "", "",
                          f"[{colour}]{r.status}: {escape(r.reason)}[/]", "")
            continue
        table.add_row(
            r.runtime, r.precision, str(r.batch), f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}",
            f"{r.throughput:.1f}", f"{r.load_ms:.0f}", f"{r.mem_mb:.1f}", f"{r.model_bytes / 1e6:.2f}",
            f"{r.provider} ({r.mode})", r.inference_precision,
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @handle_errors
    def bench_(
        run_dir: RunDirArg,
        runtime: Annotated[str, typer.Option("--runtime", help=RUNTIME_HELP)] = "torch,cpu,cuda,openvino",
        precision: Annotated[str, typer.Option("--precision", help="fp32, int8 or both.")] = "fp32,int8",
        batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1,8",
        threads: Annotated[int | None, typer.Option("--threads", help="Intra-op threads (default: physical cores).")] = None,
        warmup: Annotated[int | None, typer.Option("--warmup", help="Untimed calls first (default 10).")] = None,
        iters: Annotated[int | None, typer.Option("--iters", help="Timed calls (default 100).")] = None,
        seconds: Annotated[float | None, typer.Option("--seconds", help="Measure for S seconds instead of --iters.")] = None,
        strict: Annotated[bool, typer.Option("--strict", help="Fail when a runtime is unavailable instead of listing it.")] = False,
        bf16: Annotated[bool, typer.Option("--bf16", help="Let OpenVINO compute fp32 models in bf16 too (its CPU default where the CPU has it; faster, less exact). Default: f32 for fp32 models.")] = False,
        json_out: JsonOpt = None,
    ) -> None:
        """p50/p90/p99 latency, throughput, load time, memory and the provider that really ran."""
        from edgemap.bench import BenchOptions, bench

        given = {"threads": threads, "warmup": warmup, "iters": iters, "seconds": seconds}
        opts = BenchOptions(
            runtimes=tuple(split_csv(runtime)), precisions=tuple(split_csv(precision)),
            batches=_ints(batch, "--batch"), strict=strict, exact=False if bf16 else None, **{k: v for k, v in given.items() if v is not None},
        )
        with console.status("benchmarking…") as status:
            rows = bench(run_dir, opts, progress=lambda msg: status.update(escape(msg) + "…"))
        write_json_out(json_out, [r.to_dict() for r in rows])
        if json_out is not None and str(json_out) == "-":
            return
        console.print(render(rows))
        console.print("stored in edgemap.json → metrics.bench")
        next_step(f'edgemap package "{run_dir}"')
