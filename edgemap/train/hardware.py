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
    """AMX or AVX512-BF16: bf16 autocast pays off on these CPUs."""
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


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
    if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
