"""``edgemap bench``: latency percentiles, throughput, load time and memory per runtime × precision × batch.

Method (the project's shared PERFORMANCE notes): a fixed random uint8 batch of the contract's size; ``warmup`` calls
not timed; then ``iters`` timed calls (or as many as fit in ``seconds``); percentiles, never
means alone. Threads default to the physical cores. OpenVINO gets the LATENCY hint at batch
1 and the THROUGHPUT hint above it; under THROUGHPUT it is driven like ``benchmark_app``:
an ``AsyncInferQueue`` with the plugin's optimal number of requests (one synchronous
request would use a single stream, i.e. a fraction of the cores). OpenVINO compiles the benchmarked batch size as a static shape
(as ``benchmark_app -shape`` does; dynamic batch costs ~10 % on Lite0). Every row says what really
ran: the provider/device and, for OpenVINO, the precision its kernels compute in.

Peak memory growth is the process's resident set size (RSS) sampled after load, after
warm-up and after every timed call, minus the RSS before the session was created. The engine
is imported and a one-node model run first, so its one-time cost (torch's import alone is
~185 MB, OpenVINO's CPU plugin ~25 MB) is not charged to whichever row runs first; what is left
of it (OpenVINO's ONNX frontend, ~10 MB) still shows in the first OpenVINO row.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemap.artifacts import recorded_sha256
from edgemap.errors import EdgemapError, OptionError, RuntimeUnavailableError
from edgemap.evaluate import (
    _combos,
    nothing_ran,
    open_session,
    refuse_older_models,
    store_rows,
    strict_failure,
)
from edgemap.manifest import RunDir, fresh_run, hand_back, run_lock
from edgemap.options import normalize
from edgemap.runtime.sessions import engine_errors

log = logging.getLogger(__name__)

DEFAULT_ITERS = 100


@dataclass(frozen=True)
class BenchOptions:
    """Options of ``edgemap bench`` (the single home of their defaults).

    Attributes:
        runtimes: runtimes to measure (``torch`` = PyTorch eager fp32 on the trained weights).
        precisions: ``fp32`` and/or ``int8``.
        batches: batch sizes.
        threads: intra-op threads (None = physical cores).
        warmup: untimed calls before measuring.
        iters: timed calls (None = ``DEFAULT_ITERS`` unless ``seconds`` is set).
        seconds: measure for this long instead of a fixed count.
        strict: raise when a combination is unavailable or fails instead of listing it.
        save: store the rows in edgemap.json under ``metrics.bench``.
        seed: seed of the random input batch.
        exact: OpenVINO precision (see SessionOptions.exact): None = as eval and the wheel run
            it; False = its bf16 CPU default everywhere (faster on bf16-capable CPUs, less exact).
    """

    runtimes: tuple[str, ...] = ("torch", "cpu", "cuda", "openvino")
    precisions: tuple[str, ...] = ("fp32", "int8")
    batches: tuple[int, ...] = (1, 8)
    threads: int | None = None
    warmup: int = 10
    iters: int | None = None
    seconds: float | None = None
    strict: bool = False
    save: bool = True
    seed: int = 0
    exact: bool | None = None

    def __post_init__(self) -> None:
        normalize(self, names=("runtimes", "precisions"), numbers=("batches",), counts={"warmup": 0, "iters": 1},
                  seconds=("seconds",))
        _combos(self.runtimes, self.precisions)  # unknown names when the options are made, not when bench starts


@dataclass
class BenchRow:
    """One runtime × precision × batch. ``status`` is ``ok``, ``unavailable`` or ``error`` (+ ``reason``)."""

    runtime: str
    precision: str
    batch: int
    status: str = "ok"
    reason: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    throughput: float | None = None  # images per second
    load_ms: float | None = None
    mem_mb: float | None = None  # peak RSS growth
    model_bytes: int | None = None
    model: str = ""
    model_sha256: str = ""  # of the model (or weights) measured: tells results of a later-replaced model
    provider: str = ""
    inference_precision: str = ""
    threads: int | None = None
    mode: str = ""  # "sync" or "async xN" (OpenVINO THROUGHPUT)
    iters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- memory --------------------------------------------------------------------------------
def timing_notes(rows: Any) -> list[str]:
    """Caveats of measured rows (BenchRows or their stored dicts): rows timed only a few calls (their p99 is about
    their slowest call), and rows whose p99 is over 5× their p50 (a shared or throttled machine: their p50 may not be
    what the model costs). Said by `edgemap bench`, the `edgemap run` summary and the report alike."""
    def get(r: Any, k: str) -> Any:
        return r.get(k) if isinstance(r, dict) else getattr(r, k, None)

    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None

    ok = [r for r in rows if (get(r, "status") or "ok") == "ok"]
    notes = []
    few = min((int(n) for r in ok if (n := num(get(r, "iters")))), default=0)
    if 0 < few < 100:  # one timed call gave p50 = p90 = p99, unsaid
        notes.append(f"some rows timed only {few} call(s): their p99 is about their slowest call "
                     "(--iters 100 or --seconds for a real tail)")
    shaky = [f"{get(r, 'runtime')} {get(r, 'precision')} b{get(r, 'batch')}" for r in ok
             if (p50 := num(get(r, "p50_ms"))) and (p99 := num(get(r, "p99_ms"))) is not None and p99 > 5 * p50]
    if shaky:
        notes.append(f"unsteady timing (p99 over 5× p50) in {', '.join(shaky)}: another process or CPU throttling? "
                     "measure again on a quiet machine")
    return notes


def rss_bytes() -> int:
    """Current resident set size of this process (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:  # macOS / BSD: peak, not current; growth then under-reports after the first row
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)
    except (ImportError, OSError):
        return 0


def _release_memory() -> None:
    """Return freed heap to the OS so the next row's baseline is honest (glibc only)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- timing --------------------------------------------------------------------------------
def _stop(n: int, started: float, iters: int | None, seconds: float | None) -> bool:
    if seconds is not None:
        return time.perf_counter() - started >= seconds and n >= 1
    return n >= (iters or DEFAULT_ITERS)


def measure_sync(run: Any, x: np.ndarray, opts: BenchOptions, peak: list[int]) -> tuple[np.ndarray, float]:
    """Latencies (s) of back-to-back ``run(x)`` calls and the wall time they took."""
    for _ in range(opts.warmup):
        run(x)
    peak[0] = max(peak[0], rss_bytes())
    lat: list[float] = []
    started = time.perf_counter()
    while not _stop(len(lat), started, opts.iters, opts.seconds):
        t0 = time.perf_counter()
        run(x)
        lat.append(time.perf_counter() - t0)
        peak[0] = max(peak[0], rss_bytes())
    return np.asarray(lat), float(np.sum(lat))


def measure_ov_async(compiled: Any, x: np.ndarray, opts: BenchOptions, peak: list[int]) -> tuple[np.ndarray, float, int]:
    """benchmark_app's throughput loop: keep the plugin's optimal number of requests busy.

    Requests are reused round-robin and each one's latency is read from OpenVINO after
    ``wait()``. No Python completion callback: an OpenVINO thread that needs the GIL to run
    one could deadlock against the main thread tearing the compiled model down (seen as
    a bench that hung until SIGKILL).
    """
    try:
        nreq = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    except Exception:  # noqa: BLE001 - plugin without the property
        nreq = 1
    reqs = [compiled.create_infer_request() for _ in range(nreq)]
    busy = [False] * nreq
    lat: list[float] = []

    def submit(k: int) -> None:
        i = k % nreq
        if busy[i]:
            reqs[i].wait()  # releases the GIL
            lat.append(reqs[i].latency / 1000.0)  # ms → s, measured by OpenVINO
        reqs[i].start_async({0: x})
        busy[i] = True

    def drain() -> None:
        for i, r in enumerate(reqs):
            if busy[i]:
                r.wait()
                lat.append(r.latency / 1000.0)
                busy[i] = False

    try:
        for k in range(max(opts.warmup, nreq)):
            submit(k)
        drain()
        lat.clear()
        peak[0] = max(peak[0], rss_bytes())
        n = 0
        started = time.perf_counter()
        while not _stop(n, started, opts.iters, opts.seconds):
            submit(n)
            n += 1
            peak[0] = max(peak[0], rss_bytes())
        drain()
        wall = time.perf_counter() - started
    finally:
        drain()
        del reqs[:]  # before the compiled model goes
    return np.asarray(lat), wall, nreq


def _load_engine(runtime: str) -> None:
    """Import (and initialise) the engine ``runtime`` uses, so a row's memory growth is its model's, whichever row
    runs first. Failures are left to open_session, which reports them."""
    from edgemap.evaluate import REFERENCE
    from edgemap.runtime.sessions import available

    try:
        if runtime == REFERENCE:
            import torch  # noqa: F401
            return
        ok, _ = available(runtime)  # imports onnxruntime / openvino and makes OpenVINO's Core
        if ok:  # a first session also loads the engine's plugins and frontends (~25 MB for OpenVINO's CPU plugin)
            _warm_session(runtime)
    except Exception:  # noqa: BLE001 - reported by open_session with its reason
        pass


_WARMED: set[str] = set()


def _warm_session(runtime: str) -> None:
    """Load and run a one-node ONNX model once per engine and device."""
    from onnx import TensorProto, helper

    from edgemap.runtime.sessions import _ov_core, parse_runtime

    info, device = parse_runtime(runtime)
    key = f"{info.engine}:{device}"
    if key in _WARMED:
        return
    _WARMED.add(key)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    x = np.zeros((1, 4), np.float32)
    if info.engine == "openvino":
        _ov_core().compile_model(_ov_core().read_model(data), device)(x)
    else:
        import onnxruntime as ort

        ort.InferenceSession(data, providers=[info.provider]).run(None, {"x": x})


def _bench_one(run: RunDir, runtime: str, precision: str, batch: int, opts: BenchOptions, threads: int) -> BenchRow:
    row = BenchRow(runtime, precision, batch, threads=threads)
    is_ov = runtime.split(":")[0] == "openvino"
    hint = "throughput" if is_ov and batch > 1 else "latency"
    _load_engine(runtime)  # the engine's one-time import is not this model's memory (torch alone is ~185 MB)
    _release_memory()
    base = rss_bytes()
    peak = [base]
    # a benchmark runs one batch size: OpenVINO gets it as a static shape, as benchmark_app -shape does
    sess = open_session(run, runtime, precision, threads, hint=hint, exact=opts.exact, batch=batch)
    try:
        peak[0] = max(peak[0], rss_bytes())
        c = run.contract
        with engine_errors(runtime, batch):  # also the input batch: a --batch too large for this machine is a row
            x = np.random.default_rng(opts.seed).integers(0, 256, (batch, c.height, c.width, 3), dtype=np.uint8)
            if is_ov and hint == "throughput" and getattr(sess, "native", None) is not None:
                lat, wall, nreq = measure_ov_async(sess.native, x, opts, peak)
                row.mode = f"async x{nreq}"
            else:
                lat, wall = measure_sync(sess.run, x, opts, peak)
                row.mode = "sync"
    finally:
        getattr(sess, "close", lambda: None)()  # torch's process-wide thread count, also after a failure
    done = len(lat)
    if is_ov:
        row.mode += ", static shape"
    ms = lat * 1000.0
    row.p50_ms, row.p90_ms, row.p99_ms = (round(float(v), 6) for v in np.percentile(ms, [50, 90, 99]))
    row.mean_ms = round(float(ms.mean()), 6)
    row.throughput = round(batch * done / wall, 2) if wall > 0 else None
    row.load_ms = round(float(sess.load_ms), 2)
    row.mem_mb = round(max(0, peak[0] - base) / 2**20, 2)
    row.model_bytes = Path(sess.path).stat().st_size
    row.model, row.model_sha256 = Path(sess.path).name, recorded_sha256(run, sess.path)
    row.provider = ",".join(sess.providers_in_use)
    row.inference_precision = sess.precision_in_use or precision
    row.iters = done
    return row


def bench(run_dir: str | Path | RunDir, opts: BenchOptions = BenchOptions(), *,  # noqa: B008 - frozen
          progress: Any = None) -> list[BenchRow]:
    """Measure every runtime × precision × batch on the run's exported models.

    Args:
        run_dir: a run directory (or loaded RunDir) with exported models (and weights for ``torch``).
        opts: runtimes, precisions, batches, threads and how long to measure.

    Returns:
        One BenchRow per combination; unavailable ones carry ``status`` and ``reason``.

    Example:
        >>> rows = bench("models/digits", BenchOptions(runtimes=("cpu", "openvino"), batches=(1,)))
        >>> [(r.runtime, r.precision, r.p50_ms, r.provider) for r in rows]
    """

    if opts.iters is not None and opts.seconds is not None:
        raise OptionError("give either --iters or --seconds, not both")
    if not opts.batches or any(b < 1 for b in opts.batches):
        raise OptionError(f"--batch needs positive sizes, got {list(opts.batches)}")
    guard = run_lock(run_dir.path if isinstance(run_dir, RunDir) else Path(run_dir), "bench") if opts.save else nullcontext()
    with guard:
        # as it is now: a RunDir loaded before a later export would save its old records over the export's
        run = fresh_run(run_dir)
        try:
            refuse_older_models(run, opts.runtimes)
            return _bench_all(run, opts, progress or (lambda _msg: None))
        finally:
            hand_back(run_dir, run)


def _bench_all(run: RunDir, opts: BenchOptions, say: Any) -> list[BenchRow]:
    from edgemap.runtime.sessions import physical_cores

    threads = opts.threads or physical_cores()
    rows: list[BenchRow] = []
    combos = [(rt, p, b) for rt, p in _combos(opts.runtimes, opts.precisions) for b in dict.fromkeys(opts.batches)]
    for i, (runtime, precision, batch) in enumerate(combos, 1):
        say(f"[{i}/{len(combos)}] {runtime} {precision} batch {batch}")
        try:
            rows.append(_bench_one(run, runtime, precision, batch, opts, threads))
        except (EdgemapError, OSError) as e:
            status = "unavailable" if isinstance(e, RuntimeUnavailableError) else "error"
            rows.append(BenchRow(runtime, precision, batch, status=status, reason=str(e), threads=threads))
    if opts.strict:
        bad = [r for r in rows if r.status != "ok"]
        if bad:
            raise strict_failure([(f"{r.runtime}/{r.precision}/b{r.batch}", r.status, r.reason) for r in bad])
    if opts.save and not nothing_ran([r.status for r in rows], "bench"):
        before = run.data.get("metrics", {}).get("bench")
        measured = [r for r in (before.get("rows") or []) if isinstance(r, dict) and r.get("status") == "ok"] \
            if isinstance(before, dict) else []
        if measured and before.get("threads") not in (None, threads):
            log.warning("the %d stored bench row(s), measured with %s thread(s), were replaced by these (%d thread(s)): "
                        "rows are compared only at one thread count", len(measured), before["threads"], threads)
        store_rows(run, "bench", {"threads": threads, "rows": [r.to_dict() for r in rows]},
                   ("runtime", "precision", "batch"), same=("threads",), result=rows)
    return rows
