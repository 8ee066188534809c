"""Parity check: PyTorch against every runtime, on real validation images, at batch 1 and 7.

For each runtime (ONNX Runtime CPU, OpenVINO CPU) the exported model runs the same
validation images twice: one image per call (batch 1) and all at once (an odd batch, 7 by
default, so a graph specialised to one batch size, or to even sizes, is caught). Against the
PyTorch logits of the same uint8 batch:

- **max |Δlogit|** must be ≤ ``atol + rtol · max|logit|`` (defaults 1e-3 and 1e-3: fp32
  kernels agree to ~1e-6 here, while a preprocessing mismatch moves logits by whole units
  and bf16 inference by ~3e-2);
- **top-1** must agree on every image whose PyTorch top-1/top-2 margin exceeds that
  tolerance (a near-tie may flip without anything being wrong).

OpenVINO runs with ``SessionOptions(exact=True)`` (``INFERENCE_PRECISION_HINT=f32``): its
CPU plugin runs bf16 by default on bf16-capable CPUs, which is a speed choice, not an export
bug. Every failure is collected and one :class:`ParityError` lists them all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemap.errors import ParityError

DEFAULT_RUNTIMES = ("cpu", "openvino")


@dataclass
class ParityRow:
    """One runtime at one batch size."""

    runtime: str
    batch: int
    images: int
    max_abs_diff: float
    tolerance: float
    top1_agreement: float
    flipped: int  # top-1 disagreements outside near-ties
    provider: str
    status: str  # "ok" | "FAIL" | "skipped"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def odd_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Exactly ``size`` images (repeated cyclically when there are fewer)."""
    if len(images) == 0:
        raise ParityError("no validation images for the parity check; the run's dataset has an empty val split")
    idx = np.arange(size) % len(images)
    return np.ascontiguousarray(images[idx])


def _compare(runtime: str, batch: int, ref: np.ndarray, out: np.ndarray, atol: float, rtol: float, provider: str) -> ParityRow:
    tol = float(atol + rtol * np.abs(ref).max())
    if out.shape != ref.shape:
        return ParityRow(runtime, batch, len(ref), float("inf"), tol, 0.0, len(ref), provider, "FAIL",
                         f"output shape {out.shape} != {ref.shape}")
    bad = [name for name, a in (("PyTorch", ref), (runtime, out)) if a.size and not np.isfinite(a).all()]
    if bad:  # NaN/inf logits: no difference or top-1 means anything (broken weights, a zero in the normalisation)
        return ParityRow(runtime, batch, len(ref), float("nan"), tol, 0.0, len(ref), provider, "FAIL",
                         f"{' and '.join(bad)} gave non-finite logits (NaN/inf): the weights or the normalisation "
                         "are broken; re-run `edgemap finetune`")
    diff = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
    top_ref, top_out = ref.argmax(1), out.argmax(1)
    srt = np.sort(ref, axis=1)
    margin = srt[:, -1] - srt[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    flipped = int(np.sum((top_ref != top_out) & (margin > tol)))
    agree = float(np.mean(top_ref == top_out))
    ok = diff <= tol and flipped == 0
    return ParityRow(runtime, batch, len(ref), diff, tol, agree, flipped, provider, "ok" if ok else "FAIL")


def _why(r: ParityRow) -> str:
    if r.note:
        return r.note
    if r.max_abs_diff > r.tolerance:
        return f"max|Δlogit| {r.max_abs_diff:.3g} > tolerance {r.tolerance:.3g}"
    return f"top-1 differs on {r.flipped} image(s) that are not near-ties"


def torch_logits(net: Any, images: np.ndarray) -> np.ndarray:
    """PyTorch reference logits (float64) of a uint8 NHWC batch."""
    import torch

    with torch.no_grad():
        return net.eval()(torch.from_numpy(np.ascontiguousarray(images))).double().numpy()


def check_parity(
    net: Any,
    onnx_path: str | Path,
    images: np.ndarray,
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES,
    batch: int = 7,
    atol: float = 1e-3,
    rtol: float = 1e-3,
    threads: int | None = None,
    name: str | None = None,
) -> list[ParityRow]:
    """Compare PyTorch with each runtime at batch 1 and ``batch``; raise one error listing every failure.

    Args:
        net: the ClassifierNet (uint8 NHWC in).
        onnx_path: the exported model.
        images: uint8 (N, H, W, 3) validation images (repeated when N < ``batch``).
        runtimes: runtime names (see :mod:`edgemap.runtime.sessions`).
        batch: the odd batch size.
        atol, rtol: tolerance on max |Δlogit| (see the module docstring).
        threads: intra-op threads per session.
        name: what the error calls the model (default: ``onnx_path``).

    Returns:
        The parity table (also returned inside the raised ParityError's message).

    Raises:
        ParityError: listing every runtime/batch that failed.

    Example:
        >>> rows = check_parity(net, "models/digits/model.onnx", val_images)
    """
    from edgemap.runtime.errors import EdgemapError
    from edgemap.runtime.sessions import SessionOptions, available, load

    x = odd_batch(images, batch)
    ref = torch_logits(net, x)
    rows: list[ParityRow] = []
    for rt in runtimes:
        ok, why = available(rt)
        if not ok:
            rows.append(ParityRow(rt, 0, 0, float("nan"), float("nan"), float("nan"), 0, "", "skipped", why))
            continue
        try:
            sess = load(onnx_path, rt, SessionOptions(threads=threads, exact=True))
            one = np.concatenate([sess.run(x[i : i + 1]) for i in range(len(x))])
            many = sess.run(x)
        except (EdgemapError, RuntimeError, ValueError) as e:
            rows.append(ParityRow(rt, 0, len(x), float("inf"), float("nan"), 0.0, len(x), "", "FAIL", f"did not run: {e}"))
            continue
        rows.append(_compare(rt, 1, ref, one, atol, rtol, sess.provider))
        rows.append(_compare(rt, batch, ref, many, atol, rtol, sess.provider))
    failures = [r for r in rows if r.status == "FAIL"]
    if not failures and not any(r.status == "ok" for r in rows):  # "always on": nothing compared is not a pass
        err = ParityError(f"{name or onnx_path}: no runtime could run the parity check ("
                          + ("; ".join(f"{r.runtime}: {r.note}" for r in rows) or "none named")
                          + "); it must not be deployed unchecked: compare with at least cpu (ONNX Runtime)")
        err.rows = rows  # type: ignore[attr-defined]
        raise err
    if failures:
        parts = [f"{r.runtime} batch {r.batch}: {_why(r)}" for r in failures]
        err = ParityError(f"{name or onnx_path}: outputs differ from PyTorch: " + "; ".join(parts)
                          + "; it must not be deployed (report this with EDGEMAP_DEBUG=1)")
        err.rows = rows  # type: ignore[attr-defined]
        raise err
    return rows
