"""`edgemap bench` on a trained tiny run: rows, percentiles, memory, unavailable rows, JSON, CLI."""

from __future__ import annotations

import json
import re

import pytest
from test_eval_support import trained_run  # noqa: F401
from typer.testing import CliRunner

from edgemap.bench import BenchOptions, bench
from edgemap.errors import OptionError, RuntimeUnavailableError
from edgemap.manifest import RunDir

BENCH_KEYS = {"runtime", "precision", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput", "load_ms", "model_bytes",
              "provider", "status", "reason", "mem_mb", "inference_precision", "threads", "mode", "iters"}


@pytest.fixture(scope="module")
def rows(trained_run):  # noqa: ANN001, F811
    run, _ = trained_run
    said: list[str] = []
    out = bench(run.path, BenchOptions(runtimes=("torch", "cpu", "cuda", "openvino"), batches=(1, 7),
                                       warmup=2, iters=15, threads=1), progress=said.append)
    assert said[0] == "[1/14] torch fp32 batch 1" and said[-1].startswith("[14/14] ")  # the CLI's status line
    return out


def test_every_combination_is_a_row(rows) -> None:  # noqa: ANN001
    got = {(r.runtime, r.precision, r.batch): r.status for r in rows}
    for b in (1, 7):
        assert got[("torch", "fp32", b)] == "ok"
        for rt in ("cpu", "openvino"):
            assert got[(rt, "fp32", b)] == "ok" and got[(rt, "int8", b)] == "ok"
        assert got[("cuda", "fp32", b)] == "unavailable" and got[("cuda", "int8", b)] == "unavailable"
    assert ("torch", "int8", 1) not in got  # torch is the fp32 reference only
    assert len(rows) == 2 * (1 + 2 + 2 + 2)


def test_ok_rows_are_consistent_measurements(rows, trained_run) -> None:  # noqa: ANN001, F811
    run, _ = trained_run
    for r in (r for r in rows if r.status == "ok"):
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.iters == 15 and r.threads == 1 and r.load_ms > 0 and r.mem_mb >= 0
        assert r.throughput > 0
        if r.mode.startswith("sync"):  # back-to-back calls: images/s = batch / mean latency
            assert r.throughput == pytest.approx(r.batch / (r.mean_ms / 1000), rel=1e-3)
        else:  # N requests in flight, each timed by OpenVINO: at most N batches per mean latency
            nreq = int(r.mode.split("async x")[1].split(",")[0])
            assert r.throughput <= 1.2 * nreq * r.batch / (r.mean_ms / 1000)
        assert r.provider and r.inference_precision
    by = {(r.runtime, r.precision, r.batch): r for r in rows}
    assert by[("cpu", "int8", 1)].model_bytes == run.artifact_path("onnx_int8_qoperator").stat().st_size
    assert by[("openvino", "int8", 1)].model_bytes == run.artifact_path("onnx_int8_qdq").stat().st_size
    assert by[("cpu", "int8", 1)].model_bytes < by[("cpu", "fp32", 1)].model_bytes
    assert by[("cpu", "fp32", 1)].provider == "CPUExecutionProvider"
    assert by[("openvino", "fp32", 1)].provider == "OpenVINO:CPU" and by[("openvino", "fp32", 1)].mode == "sync, static shape"
    assert by[("openvino", "int8", 7)].mode.startswith("async x")  # THROUGHPUT hint above batch 1
    assert by[("cpu", "int8", 7)].mode == "sync"
    assert by[("openvino", "int8", 1)].inference_precision.split("+")[0] in ("u8", "i8")
    assert by[("torch", "fp32", 1)].provider.startswith("torch ")


def test_rows_are_json_and_stored(rows, trained_run) -> None:  # noqa: ANN001, F811
    run, _ = trained_run
    stored = RunDir.load(run.path).data["metrics"]["bench"]
    assert stored["threads"] == 1 and len(stored["rows"]) == len(rows)
    for row in stored["rows"]:
        assert BENCH_KEYS <= set(row)
        assert (row["status"] == "ok") == (row["reason"] == "") and (row["p50_ms"] is None) == (row["status"] != "ok")
    json.dumps(stored)


def test_seconds_mode_and_option_checks(trained_run) -> None:  # noqa: F811
    run, _ = trained_run
    rows = bench(run, BenchOptions(runtimes=("cpu",), precisions=("fp32",), batches=(2,), warmup=0, seconds=0.2,
                                   save=False))
    assert rows[0].status == "ok" and rows[0].iters >= 1 and rows[0].batch == 2
    for bad in (BenchOptions(iters=5, seconds=1.0), BenchOptions(batches=(0,))):
        with pytest.raises(OptionError):
            bench(run, bad)
    with pytest.raises(RuntimeUnavailableError, match="--strict") as e:
        bench(run, BenchOptions(runtimes=("openvino:NOSUCH",), precisions=("fp32",), batches=(1, 2), iters=1,
                                strict=True, save=False))
    assert re.fullmatch(r"--strict: openvino:NOSUCH/fp32/b1, openvino:NOSUCH/fp32/b2 unavailable: "
                        r"OpenVINO device NOSUCH not found \(available: [^;]*\)", str(e.value))  # one reason, said once


def test_cli_table_and_json(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    from edgemap.cli import app

    run, _ = trained_run
    out = tmp_path / "bench é.json"
    r = CliRunner().invoke(app, ["bench", str(run.path), "--runtime", "cpu,cuda", "--precision", "int8,fp32",
                                 "--batch", "1,3", "--warmup", "1", "--iters", "3", "--threads", "1",
                                 "--json", str(out)], env={"COLUMNS": "220"})
    assert r.exit_code == 0, r.output
    assert "edgemap bench" in r.output and "unavailable" in r.output and "next: edgemap package" in r.output
    assert "note: some rows timed only 3 call(s): their p99 is about their slowest" in " ".join(r.output.split())
    data = json.loads(out.read_text(encoding="utf-8"))
    assert isinstance(data, list) and len(data) == 8 and all(BENCH_KEYS <= set(x) for x in data)
    assert {x["batch"] for x in data} == {1, 3}
    r = CliRunner().invoke(app, ["bench", str(run.path), "--runtime", "cpu,openvino", "--batch", "1", "--warmup", "1",
                                 "--iters", "3"], env={"COLUMNS": "80"})
    assert r.exit_code == 0 and "…" not in r.output and max(map(len, r.output.splitlines())) <= 80, r.output
    assert all(len(line.split()) > 5 for line in r.output.splitlines() if line.strip().startswith(("cpu ", "openvino "))), r.output
    stored = RunDir.load(run.path).data["metrics"]["bench"]
    r = CliRunner().invoke(app, ["bench", str(run.path), "--runtime", "cuda", "--iters", "3"])
    assert r.exit_code == 2 and "no runtime ran" in r.output and "next:" not in r.output, r.output
    assert RunDir.load(run.path).data["metrics"]["bench"] == stored  # nothing ran: the earlier results are kept
    r = CliRunner().invoke(app, ["bench", str(run.path), "--batch", "one"])
    assert r.exit_code != 0 and "--batch" in r.output
    r = CliRunner().invoke(app, ["bench", str(run.path), "--iters", "3", "--seconds", "1"])
    assert r.exit_code != 0 and "--iters or --seconds" in r.output


def test_memory_growth_is_the_models_not_the_engines_import(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """In a fresh process the first row carried its engine's import: torch's row said ~199 MB for a 100 KB model."""
    import shutil
    import subprocess
    import sys

    run, _ = trained_run
    copy = shutil.copytree(run.path, tmp_path / "run")  # the shared run's stored results stay as they are
    r = subprocess.run([sys.executable, "-m", "edgemap", "bench", str(copy), "--runtime", "torch,cpu",
                        "--precision", "fp32", "--batch", "1", "--warmup", "1", "--iters", "5", "--threads", "1",
                        "--json", "-"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    mem = {row["runtime"]: row["mem_mb"] for row in json.loads(r.stdout)}
    assert mem["torch"] < 60 and mem["cpu"] < 30, mem


@pytest.mark.parametrize(("kw", "says"), [
    ({"threads": 0}, "--threads 0: must be a whole number from 1 to 1024"),
    ({"threads": 10**12}, "--threads 1000000000000: must be a whole number from 1 to 1024"),  # a pybind TypeError
    ({"iters": 0}, "--iters 0: must be a whole number >= 1"),
    ({"iters": 2.5}, "--iters 2.5: must be a whole number >= 1"),  # ran 3 calls
    ({"iters": "5"}, "--iters '5': must be a whole number"),  # a bare TypeError
    ({"warmup": -1}, "--warmup -1: must be a whole number >= 0"),
    ({"warmup": 2.5}, "--warmup 2.5: must be a whole number >= 0"),
    ({"seconds": float("nan")}, "--seconds nan: must be a finite number of seconds > 0"),  # measured for ever
    ({"seconds": float("inf")}, "--seconds inf: must be a finite number"),
    ({"seconds": 0}, "--seconds 0: must be a finite number"),
    ({"batches": (2.7,)}, "--batch (2.7,): must be whole numbers"),  # was cut to 2
    ({"batches": True}, "--batch True: must be whole numbers"),  # was (1,)
    ({"runtimes": None}, "--runtimes None: give a value"),  # 'NoneType' object is not iterable, later
])
def test_bad_option_values_from_python_are_one_line_when_the_options_are_made(kw: dict, says: str) -> None:
    from edgemap.errors import EdgemapError

    with pytest.raises(EdgemapError, match=re.escape(says)):
        BenchOptions(**kw)


def test_good_option_values_from_python_are_kept() -> None:
    import numpy as np

    o = BenchOptions(batches="1, 8", iters=np.int64(5), warmup=0, seconds=None, threads=np.int32(2))
    assert (o.batches, o.iters, o.warmup, o.threads) == ((1, 8), 5, 0, 2) and type(o.iters) is int
    assert BenchOptions(iters=None, seconds=2).seconds == 2.0


def test_a_runtime_that_fails_while_running_is_a_row_and_the_other_rows_are_kept(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """Out of memory inside ONNX Runtime (a batch too large for the machine) was a traceback that lost every row."""
    import subprocess
    import sys

    run, _ = trained_run
    c = run.contract
    big = 3 * 2**30 // (c.height * c.width * 3 * 4)  # its float32 copy inside the model does not fit in 3 GiB
    code = ("import json, resource, sys; from edgemap.bench import BenchOptions, bench; "
            "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, resource.RLIM_INFINITY)); "
            f"rows = bench(sys.argv[1], BenchOptions(runtimes=('cpu', 'openvino'), precisions=('fp32',), "
            f"batches=(1, {big}, 2**40), iters=1, warmup=0, save=False)); "
            "print(json.dumps([[r.batch, r.status, r.reason] for r in rows]))")
    p = subprocess.run([sys.executable, "-c", code, str(run.path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stdout.splitlines()[-1])
    (b1, ok, _), (b2, failed, why), (b3, huge, why3) = rows[:3]
    ov = rows[3:]  # OpenVINO compiles the batch in: it runs out of memory while compiling (was an "unavailable" row)
    assert [r[:2] for r in ov] == [[1, "ok"], [big, "error"], [2**40, "error"]], ov
    assert "OpenVINO ran out of memory compiling the model for CPU at batch" in ov[1][2], ov[1][2]
    assert (b1, ok) == (1, "ok") and (b2, failed) == (big, "error") and (b3, huge) == (2**40, "error")
    assert why.startswith(f"cpu failed running a batch of {big}: ") and "allocate" in why, why
    assert why3 == f"cpu: out of memory running a batch of {2**40} (try a smaller batch)", why3  # its input batch


def test_the_table_says_when_a_rows_timing_is_unsteady() -> None:
    """On a shared 2-core machine a torch row's p50 was 95 ms instead of 0.12 ms, p99 100 ms: shown as a result."""
    import io

    from rich.console import Console

    from edgemap.bench import BenchRow
    from edgemap.cli.cmd_bench import render

    steady = BenchRow("cpu", "fp32", 1, p50_ms=1.0, p90_ms=1.1, p99_ms=1.3, throughput=1000, load_ms=5, mem_mb=1,
                      iters=200, threads=2)
    shaky = BenchRow("torch", "fp32", 1, p50_ms=0.12, p90_ms=50.0, p99_ms=95.9, throughput=8000, load_ms=5, mem_mb=1,
                     iters=200, threads=2)
    for rows, said in (([steady], False), ([steady, shaky], True)):
        buf = io.StringIO()
        Console(file=buf, width=200).print(render(rows))
        assert ("unsteady timing (p99 over 5× p50) in torch fp32 b1" in buf.getvalue()) is said, buf.getvalue()


def test_the_run_summary_and_the_report_say_the_bench_caveats_too(tmp_path) -> None:  # noqa: ANN001
    """Only `edgemap bench` said "unsteady timing" or "timed only N calls": the `edgemap run` summary showed a p99 96×
    its p50, and the report headline "9974.9× PyTorch eager" from 21 calls on a loaded machine, without a word."""
    import io
    from dataclasses import asdict
    from types import SimpleNamespace

    from rich.console import Console

    from edgemap.bench import BenchRow, timing_notes
    from edgemap.cli.cmd_run import summary_table

    shaky = BenchRow("openvino", "int8", 1, p50_ms=0.0348, p90_ms=0.1, p99_ms=3.33, throughput=28000, load_ms=5,
                     mem_mb=1, iters=21, threads=2)
    notes = timing_notes([asdict(shaky)])  # stored rows are dicts
    assert notes == timing_notes([shaky]) and len(notes) == 2, notes
    assert "timed only 21 call(s)" in notes[0] and "unsteady timing (p99 over 5× p50) in openvino int8 b1" in notes[1]
    assert timing_notes([{**asdict(shaky), "iters": 500, "p99_ms": 0.05}]) == []
    result = SimpleNamespace(run_dir=tmp_path, summary=[{"runtime": "openvino", "precision": "int8", "p50_ms": 0.0348,
                                                        "p99_ms": 3.33}], timing_notes=notes)
    buf = io.StringIO()
    Console(file=buf, width=300).print(summary_table(result))
    assert "unsteady timing (p99 over 5× p50) in openvino int8 b1" in " ".join(buf.getvalue().split())
