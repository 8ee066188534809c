"""Runtime sessions behind one small interface, with a capability table and fallback checks.

Runtimes (names accepted by ``--runtime``):

========== ============= ================================ ================================
name       engine        provider / device                int8 format it runs fastest
========== ============= ================================ ================================
cpu        onnxruntime   CPUExecutionProvider             QOperator (U8 act, S8 weights)
cuda       onnxruntime   CUDAExecutionProvider            fp32 (no QLinearConv kernel)
tensorrt   onnxruntime   TensorrtExecutionProvider        QDQ S8S8 (symmetric activations)
openvino   openvino      CPU (``openvino:GPU`` etc.)      QDQ
========== ============= ================================ ================================

A session that ran on another provider/device than the one asked for raises
:class:`ProviderFallbackError`: a silent CPU fallback is never reported as a CUDA result.
No torch import here: this module is vendored into the device wheel.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemap.runtime.errors import (
    EdgemapError,
    InferenceError,
    OptionError,
    ProviderFallbackError,
    RuntimeUnavailableError,
)
from edgemap.runtime.text import one_line

#: this module inside a device wheel (``edgemap package`` vendors it as ``<module>.sessions``): no edgemap there, and
#: the way out of a missing GPU is the CPU runtime, not a re-export
_ON_DEVICE = not __name__.startswith("edgemap.")
CUDA_INSTALL_HINT = (
    "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.20,<1.27' (CUDA 12 builds; 1.27 "
    "on need CUDA 13; it replaces onnxruntime: never install both, and removing one deletes the files they share"
    + ("; or --runtime onnxruntime runs this model on the CPU)" if _ON_DEVICE else ")")
)


@dataclass(frozen=True)
class RuntimeInfo:
    """One row of the capability table."""

    name: str
    engine: str  # "onnxruntime" | "openvino"
    provider: str  # ORT execution provider, or the OpenVINO device
    precisions: tuple[str, ...]
    int8_format: str | None  # which int8 artifact this runtime runs fastest: "qoperator" | "qdq" | None
    description: str = ""


#: OpenVINO's devices that choose or combine real ones (openvino:AUTO:GPU,CPU)
VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI")

RUNTIMES: dict[str, RuntimeInfo] = {
    r.name: r
    for r in (
        RuntimeInfo("cpu", "onnxruntime", "CPUExecutionProvider", ("fp32", "int8"), "qoperator",
                    description="ONNX Runtime on CPU"),
        RuntimeInfo("cuda", "onnxruntime", "CUDAExecutionProvider", ("fp32",), None,
                    description="ONNX Runtime CUDA EP (no int8 conv kernels: runs fp32)"),
        RuntimeInfo("tensorrt", "onnxruntime", "TensorrtExecutionProvider", ("fp32", "int8"), "qdq_s8",
                    description="ONNX Runtime TensorRT EP (int8 via QDQ)"),
        RuntimeInfo("openvino", "openvino", "CPU", ("fp32", "int8"), "qdq",
                    description="OpenVINO runtime (CPU by default; openvino:GPU etc.)"),
    )
}


def parse_runtime(spec: str) -> tuple[RuntimeInfo, str]:
    """``"openvino:GPU"`` → (openvino info, "GPU"); ``"cpu"`` → (cpu info, provider)."""
    name, _, device = spec.strip().partition(":")
    name = name.lower()
    if name not in RUNTIMES:
        raise OptionError(f"unknown runtime {spec!r}; choose from {', '.join(RUNTIMES)}")
    info = RUNTIMES[name]
    if device and info.engine != "openvino":
        raise OptionError(f"runtime {name!r} takes no device suffix (only openvino:DEVICE does)")
    return info, (device.upper() if device else info.provider)


def check_precision(info: RuntimeInfo, precision: str) -> tuple[bool, str]:
    """Whether the capability table allows ``precision`` on ``info``, and why not."""
    if precision not in ("fp32", "int8"):
        return False, f"unknown precision {precision!r} (fp32 or int8)"
    if precision not in info.precisions:
        if _ON_DEVICE:  # the wheel's model is what it is: say which runtime runs it
            return False, (f"{info.name} has no {precision} kernels for convolutions: run this {precision} model with "
                           "--runtime onnxruntime (CPU), or package the fp32 model for the GPU (edgemap package "
                           "--runtime cuda)")
        return False, f"{info.name} has no {precision} kernels for convolutions; use {'/'.join(info.precisions)}"
    return True, ""


def physical_cores() -> int:
    """Physical cores (hyper-threads don't speed up these kernels); falls back to os.cpu_count()."""
    try:
        cores = set()
        phys = core = None
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    cores.add((phys, core))
                    phys = core = None
        if cores:
            avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            return max(1, min(len(cores), avail))
    except OSError:
        pass
    return max(1, os.cpu_count() or 1)


def _can_load(*libs: str) -> str | None:
    """None if one of ``libs`` (those of this platform: .dll on Windows, the others elsewhere) loads, else the first
    one's error (the last named the Windows DLL on Linux)."""
    mine = [lib for lib in libs if lib.endswith(".dll") == (os.name == "nt")] or list(libs)
    err = None
    for lib in mine:
        try:
            ctypes.CDLL(lib)
            return None
        except OSError as e:
            err = err or str(e)
    return err


def interrupt_in_chain(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C/SIGTERM (KeyboardInterrupt) among ``e``'s causes and contexts, if any."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def reraise_interrupt(e: BaseException) -> None:
    """Raise the Ctrl-C/SIGTERM an import error wraps: onnxruntime's and OpenVINO's native module initialisation turn
    a KeyboardInterrupt into "ImportError: initialization failed", and the interrupt became "runtime unavailable:
    pip install -U onnxruntime" with the command going on to exit 0."""
    ki = interrupt_in_chain(e)
    if ki is not None:
        raise ki


def _import_failure(e: ImportError, module: str, pkg: str) -> str:
    """Why ``import module`` failed: not installed, or installed but broken (onnxruntime 1.18.0 with numpy 2 said
    "not installed"). A Ctrl-C that interrupted the import is raised again (see :func:`reraise_interrupt`)."""
    reraise_interrupt(e)
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == module:
        return f"package {pkg} is not installed (pip install {pkg})"
    return (f"package {pkg} is installed but failed to import ({one_line(e)}); it may need other versions of its "
            f"dependencies (e.g. numpy): pip install -U {pkg}")


def available(spec: str) -> tuple[bool, str]:
    """Whether runtime ``spec`` can run here, and why not ("" when it can)."""
    try:
        info, device = parse_runtime(spec)
    except OptionError as e:
        return False, str(e)
    if info.engine == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError as e:
            pkg = "onnxruntime-gpu" if info.name in ("cuda", "tensorrt") else "onnxruntime"
            return False, _import_failure(e, "onnxruntime", pkg)
        providers = ort.get_available_providers()
        if info.provider not in providers:
            if info.name == "cpu":
                return False, "this onnxruntime build has no CPUExecutionProvider"
            missing = f"{info.provider} missing from this onnxruntime build ({', '.join(providers)})"
            if _can_load("libcuda.so.1", "libcuda.so", "nvcuda.dll"):  # no driver: the pip advice would not help here
                return False, (f"no NVIDIA GPU driver on this machine (libcuda could not be loaded) and {missing}: "
                               f"{info.name} cannot run here; on a machine with an NVIDIA GPU: {CUDA_INSTALL_HINT}")
            return False, f"{missing}: {CUDA_INSTALL_HINT}"
        if info.name in ("cuda", "tensorrt"):
            err = _can_load("libcuda.so.1", "libcuda.so", "nvcuda.dll")
            if err:
                return False, (f"no NVIDIA driver: libcuda could not be loaded ({err})"
                               + ("; in a container, give it the GPU (docker run --gpus all); --runtime onnxruntime "
                                  "runs this model on the CPU" if _ON_DEVICE else ""))
            if info.name == "tensorrt":
                err = _can_load("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so", "nvinfer.dll", "nvinfer_10.dll")
                if err:
                    return False, f"TensorRT libraries missing: libnvinfer could not be loaded ({err})"
        return True, ""
    try:
        import openvino  # noqa: F401 - installed?
    except ImportError as e:
        return False, _import_failure(e, "openvino", "openvino")
    devices = _ov_core().available_devices
    base = device.split(".")[0].split(":")[0]  # AUTO:CPU, HETERO:GPU,CPU...
    if base not in VIRTUAL_DEVICES and not any(d == device or d.startswith(base) for d in devices):
        return False, f"OpenVINO device {device} not found (available: {', '.join(devices) or 'none'})"
    return True, ""


@dataclass(frozen=True)
class SessionOptions:
    """How a session is created.

    Attributes:
        threads: intra-op threads (None = physical cores).
        hint: "latency" or "throughput" (OpenVINO performance hint; ORT ignores it).
        exact: True: OpenVINO computes in f32. False: its own CPU default (bf16 on
            bf16-capable CPUs; faster, less exact: it cost 3 points of accuracy on an fp32 Lite0
            digits model here). None (default): f32 for fp32 models, OpenVINO's default for int8
            models (only their few float layers are affected; the int8 gate measured them so, and
            benchmark_app runs them so).
        batch: fix the batch dimension: OpenVINO then compiles static shapes (as
            ``benchmark_app -shape`` does; ~10 % faster on Lite0 at batch 1) and the session
            runs only that batch size. None keeps the dynamic batch. ORT ignores it.
    """

    threads: int | None = None
    hint: str = "latency"
    exact: bool | None = None
    batch: int | None = None


@dataclass
class Session:
    """A loaded model on one runtime: ``run(uint8 NHWC batch) -> float32 logits``."""

    runtime: str
    info: RuntimeInfo
    device: str
    path: Path
    load_ms: float
    providers_in_use: list[str]
    precision_in_use: str
    _run: Any = field(repr=False)
    input_name: str = "images"
    #: the engine's own object (onnxruntime.InferenceSession or openvino.CompiledModel), for
    #: callers that need more than ``run`` (e.g. bench's OpenVINO async throughput queue).
    native: Any = field(default=None, repr=False)

    def run(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected a uint8 (N, H, W, 3) batch, got {batch.dtype} {batch.shape}")
        with engine_errors(self.runtime, len(batch)):
            return self._run(np.ascontiguousarray(batch))

    @property
    def provider(self) -> str:
        """What actually ran, in words (for bench/eval tables)."""
        return ",".join(self.providers_in_use) + (f" ({self.precision_in_use})" if self.precision_in_use else "")


@contextlib.contextmanager
def engine_errors(runtime: str, batch: int) -> Iterator[None]:
    """An engine's own failure while running a batch (ONNX Runtime's Fail/RuntimeException, OpenVINO's and torch's
    RuntimeError, out of memory) as one InferenceError line naming the runtime and the batch size."""
    try:
        yield
    except EdgemapError:
        raise
    except MemoryError:
        raise InferenceError(f"{runtime}: out of memory running a batch of {batch} (try a smaller batch)") from None
    except Exception as e:  # noqa: BLE001 - the engines raise their own types; none of them is a caller's bug here
        text = one_line(e) or type(e).__name__
        raise InferenceError(f"{runtime} failed running a batch of {batch}: {text[:300]}") from e


def _older(version: str, than: str) -> bool:
    """"1.20.1" is older than "1.21" (pre-release and local tags ignored)."""
    def nums(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])

    return nums(version) < nums(than)


def load(path: str | Path, runtime: str = "cpu", opts: SessionOptions | None = None, data: bytes | None = None) -> Session:
    """Create a session for the model at ``path`` on ``runtime``; refuse silent fallbacks.

    ``data``: the model's bytes, already read (and checked) by the caller; ``path`` then only names it.

    Example:
        >>> s = load("models/digits/model.onnx", "openvino")
        >>> logits = s.run(np.zeros((1, 64, 64, 3), np.uint8))
    """
    opts = opts or SessionOptions()
    info, device = parse_runtime(runtime)
    ok, why = available(runtime)
    if not ok:
        raise RuntimeUnavailableError(f"runtime {runtime!r} unavailable: {why}")
    path = Path(path)
    from edgemap.runtime.onnx_meta import parse_model_bytes, read_model_bytes, refuse_external_data

    # The runtime gets the very bytes checked here (and by a caller that verified their sha256: ``data``), never the
    # path again: a file swapped in between would run unchecked. And before any runtime sees them: a runtime
    # following external_data.location could read any file on the device (older onnxruntime releases did).
    data = read_model_bytes(path) if data is None else data
    model_info = refuse_external_data(parse_model_bytes(data, str(path)), str(path))
    if opts.exact is None:
        opts = dataclasses.replace(opts, exact=model_info.metadata.get("edgemap.precision") != "int8")
    threads = opts.threads or physical_cores()
    t0 = time.perf_counter()
    if info.engine == "onnxruntime":
        sess = _load_ort(path, info, threads, data, model_info)
    else:
        sess = _load_openvino(path, device, threads, opts, data)
    sess.load_ms = (time.perf_counter() - t0) * 1000
    sess.runtime = runtime
    return sess


def check_ort_providers(info: RuntimeInfo, in_use: list[str]) -> list[str]:
    """Return ``in_use`` if its first provider is the one ``info`` asks for, else raise.

    ONNX Runtime silently drops a provider it cannot create (CUDA libraries missing, no
    device) and runs the rest of the list, logging one line: that is a fallback, never a result.
    """
    if not in_use or in_use[0] != info.provider:
        raise ProviderFallbackError(
            f"asked for {info.provider} but onnxruntime created {in_use}: the session fell back "
            f"(CUDA/TensorRT libraries missing or incompatible?); not reporting a CPU result as {info.name}"
        )
    return list(in_use)


def check_ov_devices(device: str, devices: list[str]) -> list[str]:
    """Return the devices a compiled OpenVINO model runs on if they match ``device``, else raise."""
    base = device.split(".")[0].split(":")[0]
    if base not in VIRTUAL_DEVICES and not any(d.startswith(base) for d in devices):
        raise ProviderFallbackError(f"asked for OpenVINO {device} but it ran on {devices}; not reporting that as {device}")
    return list(devices)


_OV_COMPUTE_OPS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


def ov_compute_precision(compiled: Any) -> str:
    """The precision(s) OpenVINO really computes convolutions/matmuls in, most used first.

    Read from the compiled runtime model ("bf16" for an fp32 model on an AMX/AVX512-BF16
    CPU, "i8"/"u8" for int8 kernels), falling back to ``INFERENCE_PRECISION_HINT``.
    """
    counts: dict[str, int] = {}
    try:
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            if "layerType" in rt and rt["layerType"].astype(str) in _OV_COMPUTE_OPS and "runtimePrecision" in rt:
                prec = rt["runtimePrecision"].astype(str)
                counts[prec] = counts.get(prec, 0) + 1
    except Exception:  # noqa: BLE001 - plugins without a runtime model (some GPUs/NPUs)
        counts = {}
    if counts:
        return "+".join(sorted(counts, key=lambda k: -counts[k]))
    try:
        return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except Exception:  # noqa: BLE001
        return ""


def _load_ort(path: Path, info: RuntimeInfo, threads: int, data: bytes | None = None, model_info: Any = None) -> Session:
    import onnxruntime as ort

    from edgemap.runtime.onnx_meta import onnxruntime_floor

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4  # errors come back as exceptions, said once by edgemap (ORT also printed them)
    providers: list[Any] = [info.provider]
    if info.name == "tensorrt":
        providers = [(info.provider, {"trt_int8_enable": True}), "CUDAExecutionProvider", "CPUExecutionProvider"]
    elif info.name == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:
        s = ort.InferenceSession(str(path) if data is None else data, sess_options=so, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        text = one_line(e)
        floor = onnxruntime_floor(model_info) if model_info is not None else "1.18.1"
        if _older(ort.__version__, floor):
            text += (f" (this model, IR {model_info.ir_version} / opset {model_info.opsets.get('ai.onnx')}, needs "
                     f"onnxruntime >= {floor}; this is {ort.__version__}: pip install -U 'onnxruntime>={floor}')")
        raise RuntimeUnavailableError(f"{path}: onnxruntime could not load the model on {info.name}: {text}") from e
    in_use = check_ort_providers(info, s.get_providers())
    name = s.get_inputs()[0].name
    out = s.get_outputs()[0].name
    return Session(
        runtime=info.name, info=info, device=info.provider, path=path, load_ms=0.0,
        providers_in_use=in_use[:1], precision_in_use="", _run=lambda b: s.run([out], {name: b})[0], input_name=name,
        native=s,
    )


def _ov_core() -> Any:
    """The process's one OpenVINO Core, kept until exit.

    OpenVINO's CPU plugin gives the main thread an alternate signal stack per Core and, when
    a Core is destroyed, restores the one it found, which may belong to a Core already
    destroyed (unmapped). A Ctrl-C after that kills the process with SIGSEGV (seen: exit 139
    when `edgemap run` was interrupted in its bench stage). One Core for the process avoids
    the out-of-order teardown; OpenVINO recommends one Core per process anyway.
    """
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


_CORE: Any = None


def _load_openvino(path: Path, device: str, threads: int, opts: SessionOptions, data: bytes | None = None) -> Session:
    core = _ov_core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY" if opts.hint == "latency" else "THROUGHPUT"}
    cpu: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, **({"INFERENCE_PRECISION_HINT": "f32"} if opts.exact else {})}
    if device.startswith("CPU"):
        config.update(cpu)
    elif device.split(":")[0] in VIRTUAL_DEVICES:  # to the device that runs it
        config["DEVICE_PROPERTIES"] = {"CPU": cpu, **({"GPU": {"INFERENCE_PRECISION_HINT": "f32"}} if opts.exact else {})}
    elif opts.exact:
        config["INFERENCE_PRECISION_HINT"] = "f32"  # GPU: f16 by default
    try:
        model = core.read_model(str(path) if data is None else data)
        if opts.batch:
            shape = model.input(0).get_partial_shape()
            shape[0] = opts.batch
            model.reshape({model.input(0): shape})
        compiled = core.compile_model(model, device, config)
    except Exception as e:  # OpenVINO raises RuntimeError for everything
        text = one_line(e)
        if any(k in text for k in ("allocate", "bad_alloc", "out of memory")):  # this machine ran out, at this batch
            raise InferenceError(f"{path}: OpenVINO ran out of memory compiling the model for {device}"
                                 f"{f' at batch {opts.batch}' if opts.batch else ''}: {text[-300:]}") from e
        raise RuntimeUnavailableError(f"{path}: OpenVINO could not compile the model for {device}: {text}") from e
    try:
        devices = list(compiled.get_property("EXECUTION_DEVICES"))
    except Exception:  # noqa: BLE001 - older plugins lack the property
        devices = [device]
    devices = check_ov_devices(device, devices)
    precision = ov_compute_precision(compiled)
    # one infer request per thread: a request runs one inference at a time, and one shared by threads ("Infer
    # Request is busy", or another thread's logits returned) broke a threaded server built on the device wheel
    requests = threading.local()
    requests.request = compiled.create_infer_request()  # the loading thread's, made now (fails here, not later)
    out_port = compiled.output(0)

    def _run(batch: np.ndarray) -> np.ndarray:
        request = getattr(requests, "request", None)
        if request is None:
            request = requests.request = compiled.create_infer_request()
        # share_inputs: no copy of the (contiguous) batch; outputs are copied (share_outputs=False)
        res = request.infer({0: batch}, share_inputs=True)
        return np.asarray(res[out_port], dtype=np.float32)

    return Session(
        runtime="openvino", info=RUNTIMES["openvino"], device=device, path=path, load_ms=0.0,
        providers_in_use=[f"OpenVINO:{d}" for d in devices], precision_in_use=precision, _run=_run,
        input_name=compiled.input(0).get_any_name() if compiled.input(0).get_names() else "images",
        native=compiled,
    )
