"""`edgemap bench`: latency percentiles, throughput, load time and memory per runtime × precision × batch."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Group
from rich.markup import escape
from rich.text import Text

from edgemap.cli.cmd_eval import RUNTIME_HELP
from edgemap.cli.common import (
    JsonOpt,
    RunDirArg,
    console,
    handle_errors,
    next_step,
    note_cell,
    result_table,
    row_notes,
    short_provider,
    shq,
    split_csv,
    split_runtimes,
    write_json_out,
)


def render(rows) -> Group:  # noqa: ANN001 - list[BenchRow], imported lazily
    """Latency table (ms), one line per runtime × precision × batch; below it what ran and why rows did not."""
    threads = rows[0].threads if rows else "?"
    table = result_table(f"edgemap bench ({threads} thread{'' if threads == 1 else 's'}; ms)",
                         ["runtime", "prec", "b", "p50", "p90", "p99", "img/s", "load", "MiB", "mode"], wide=(),
                         text=("runtime", "prec", "mode"))
    notes: list[tuple[str, str, str]] = []
    ran_on: dict[str, str] = {}
    for r in rows:
        if r.status != "ok":
            table.add_row(r.runtime, r.precision, str(r.batch), "", "", "", "", "", "",
                          note_cell(notes, f"{r.runtime} {r.precision} batch {r.batch}", r.status, r.reason, short=True))
            continue
        ran_on.setdefault(f"{r.runtime} {r.precision}", f"{short_provider(r.provider)}, computed in {r.inference_precision}")
        table.add_row(
            r.runtime, r.precision, str(r.batch), f"{r.p50_ms:.3g}", f"{r.p90_ms:.3g}", f"{r.p99_ms:.3g}",
            f"{r.throughput:.0f}", f"{r.load_ms:.0f}", f"{r.mem_mb:.0f}",
            escape(r.mode.replace(", static shape", "").replace("async x", "async×")),
        )
    legend = Text("b: batch; p50/p90/p99: latency ms; load: session load ms; MiB: memory growth", style="dim")
    lines = [Text(f"ran on: {k} → {v}") for k, v in ran_on.items()]
    from edgemap.bench import timing_notes

    lines += [Text(f"note: {n}", style="yellow") for n in timing_notes(rows)]
    return Group(table, legend, *lines, row_notes(notes))


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @handle_errors
    def bench_(
        run_dir: RunDirArg,
        runtime: Annotated[str, typer.Option("--runtime", help=RUNTIME_HELP)] = "torch,cpu,cuda,openvino",
        precision: Annotated[str, typer.Option("--precision", help="fp32, int8 or both.")] = "fp32,int8",
        batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1,8",
        threads: Annotated[int | None, typer.Option("--threads", help="Intra-op threads (0: the default) \\[default: physical cores].")] = None,
        warmup: Annotated[int | None, typer.Option("--warmup", help="Untimed calls first (default 10).")] = None,
        iters: Annotated[int | None, typer.Option("--iters", help="Timed calls (default 100).")] = None,
        seconds: Annotated[float | None, typer.Option("--seconds", help="Measure for S seconds instead of --iters.")] = None,
        strict: Annotated[bool, typer.Option("--strict", help="Fail when a runtime is unavailable instead of listing it.")] = False,
        bf16: Annotated[bool, typer.Option("--bf16", help="Let OpenVINO compute fp32 models in bf16 too (its CPU default where the CPU has it; faster, less exact). Default: f32 for fp32 models.")] = False,
        json_out: JsonOpt = None,
    ) -> None:
        """p50/p90/p99 latency, throughput, load time, memory and the provider that really ran."""
        from edgemap.bench import BenchOptions, bench
        from edgemap.evaluate import nothing_ran
        from edgemap.fsutil import not_writable
        from edgemap.runtime.errors import RuntimeUnavailableError

        read_only = not_writable(run_dir) if run_dir.is_dir() else None
        given = {"threads": threads or None, "warmup": warmup, "iters": iters, "seconds": seconds}  # 0: as finetune
        opts = BenchOptions(
            runtimes=tuple(split_runtimes(runtime)), precisions=tuple(split_csv(precision)),
            batches=batch, strict=strict, exact=False if bf16 else None, save=read_only is None,
            **{k: v for k, v in given.items() if v is not None},
        )
        from edgemap.errors import ResultsNotStored

        not_stored = None
        with console.status("benchmarking…") as status:
            try:
                rows = bench(run_dir, opts, progress=lambda msg: status.update(escape(msg) + "…"))
            except ResultsNotStored as e:  # a full disk: the rows are shown (and written with --json), then the error
                rows, not_stored = e.result, e
        write_json_out(json_out, [r.to_dict() for r in rows])
        failed = nothing_ran([r.status for r in rows], "bench",  # no table with --json -: the reasons then
                             [f"{r.runtime}: {r.reason}" for r in rows] if str(json_out) == "-" else None)
        if json_out is None or str(json_out) != "-":
            console.print(render(rows))
        if failed:
            raise RuntimeUnavailableError(failed)
        if not_stored is not None:
            raise not_stored
        if json_out is not None and str(json_out) == "-":
            return
        if read_only:
            console.print(f"[yellow]not stored[/]: the run directory is not writable ({escape(read_only)})", soft_wrap=True)
            return
        console.print("stored in edgemap.json → metrics.bench")
        next_step(f"edgemap package {shq(run_dir)}")
