"""What this machine's CPU/GPU can do: decides bf16 autocast and channels_last."""

from __future__ import annotations

import functools

import torch

from edgemap.errors import TrainingError


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AMX: the only CPUs where bf16 autocast training clearly pays off.

    Measured on this project's machine (AVX512-BF16 without AMX, Lite0; benchmarks/train_throughput.py,
    see the README's table): bf16 autocast 3.07x the fp32-contiguous baseline at 224 px (channels_last fp32
    1.91x) but 0.99x at 64 px, and a bf16-trained model lost ~0.8 points when evaluated in fp32 (what the
    exported model runs). So `auto` means bf16 only with AMX; `--precision bf16` forces it anywhere.
    """
    return "amx_bf16" in cpu_flags()


def resolve_device(device: str) -> torch.device:
    """``auto|cpu|cuda[:N]`` → a torch.device; clear error when CUDA was asked but is absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(
                f"--device {device}: CUDA unavailable (torch {torch.__version__} sees no GPU: CPU-only build or no "
                "NVIDIA driver); use --device cpu or install a CUDA build of torch"
            )
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise TrainingError(f"--device {device!r}: use auto, cpu or cuda")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto|fp32|bf16|fp16) on ``device``; None = fp32."""
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16":
            raise TrainingError("--precision fp16 is for CUDA; on CPU use bf16 or fp32")
        if precision == "bf16" or cpu_has_fast_bf16():
            return torch.bfloat16
        return None
    # native bf16 only: the default also says yes on GPUs that emulate it (T4, V100: slow, and not what bf16 asks)
    if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    if precision == "bf16":  # asked for by name: not silently fp16 (another range, and a loss scaler)
        raise TrainingError("--precision bf16: this GPU has no bf16; use --precision fp16 or fp32 (or auto)")
    return torch.float16
