"""``edgemap report``: one self-contained HTML page (and its PNG plots) for a run directory.

The page reads only ``edgemap.json``, ``metrics.jsonl`` and the artifacts they name, and
shows, with the numbers a user wants first:

- headline cards: accuracy fp32 → int8, the fastest batch-1 latency, model size fp32 → int8;
- accuracy vs latency per runtime × precision (``metrics.eval`` joined with ``metrics.bench``);
- eval and bench tables; the int8 accuracy gate's attempts; the export parity table;
- training curves (loss, accuracy, learning rate; head-only and full phases marked);
- confusion matrices for fp32 and int8 (from ``metrics.eval``; else computed here);
- a grid of misclassified validation images with their true and predicted labels;
- the dataset (counts per split and class, skipped files) and every artifact with its size.

Eval does not keep per-image predictions, so the misclassified grid comes from running the
fp32 ONNX model (and the int8 one when there is one) with the torch-free runtime
(``edgemap.runtime``: the code the device wheel runs) on at most ``max_images`` validation
images. A section whose stage has not run says so with the command that fills it.

Files: ``RUN_DIR/report/report.html`` (PNGs embedded as ``data:`` URIs, inline CSS, no
JavaScript, no network) and the PNGs beside it, every one written atomically.
"""

from __future__ import annotations

import base64
import errno
import html
import io
import json
import math
import os
import re
import shlex
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemap.artifacts import current_results, stored_rows
from edgemap.bench import timing_notes
from edgemap.data.scan import ignored_text
from edgemap.errors import EdgemapError, ManifestError
from edgemap.fsutil import NOT_WRITABLE, atomic_write_bytes, remove_stale_temps, size_text, special_file, writers_lock
from edgemap.manifest import RunDir, fresh_run, hand_back, now_iso
from edgemap.metrics import score_text

REPORT_DIR = "report"
REPORT_FILE = "report.html"
#: int8 artifacts the report runs on ONNX Runtime CPU for its own predictions, in order of preference
_INT8_KEYS = ("onnx_int8_qoperator", "onnx_int8_qdq")
_PALETTE = {"torch": "#6b7280", "cpu": "#2563eb", "cuda": "#16a34a", "tensorrt": "#059669", "openvino": "#7c3aed"}
_ACCENT = "#2563eb"
_WARN = "#dc2626"


@dataclass(frozen=True)
class ReportOptions:
    """Options of ``edgemap report`` (the single home of their defaults).

    Attributes:
        out: HTML file (or folder) to write; None = ``RUN_DIR/report/report.html``. The plots also go
            beside it as PNGs: ``RUN_DIR/report/``, or ``NAME_files/`` next to ``out``.
        predict: run the exported models on validation images for the misclassified grid (and
            the confusion matrices when ``edgemap eval`` has not run).
        max_images: at most this many validation images (stratified across classes) are predicted.
        grid: at most this many misclassified images are shown.
        threads: intra-op threads of those sessions (None = physical cores).
        dpi: resolution of the PNG plots.
    """

    out: str | Path | None = None  # a str keeps a trailing "/" (a folder to make); Path("x/") drops it
    predict: bool = True
    max_images: int = 2000
    grid: int = 40
    threads: int | None = None
    dpi: int = 110

    def validate(self) -> None:
        from edgemap.options import normalize

        normalize(self, whole=("max_images", "grid", "dpi"))  # and threads
        if self.max_images < 1:
            raise ManifestError(f"--max-images must be >= 1, got {self.max_images}")
        if self.grid < 0:
            raise ManifestError(f"--grid must be >= 0, got {self.grid}")
        if not 30 <= self.dpi <= 600:
            raise ManifestError(f"--dpi must be within 30..600, got {self.dpi}")


@dataclass
class ReportResult:
    """What ``report`` wrote.

    ``sections`` maps each section to ``"ok"`` or why it is empty (with the command that
    fills it); ``warnings`` are problems met on the way (the page shows them too).
    """

    html: Path
    images: dict[str, Path]
    sections: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    checked: int = 0  # validation images the report predicted itself
    misclassified: dict[str, int] = field(default_factory=dict)  # precision -> count among `checked`
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "html": str(self.html), "images": {k: str(v) for k, v in self.images.items()}, "sections": self.sections,
            "warnings": self.warnings, "checked": self.checked, "misclassified": self.misclassified,
            "bytes": self.bytes, "seconds": round(self.seconds, 3),
        }


@dataclass
class _Predictions:
    """The report's own predictions on validation images (one model per precision)."""

    images: np.ndarray  # uint8 (N, H, W, 3), what the model saw
    labels: np.ndarray  # (N,) in the run's class order
    paths: list[Path]
    pred: dict[str, np.ndarray] = field(default_factory=dict)  # precision -> (N,)
    conf: dict[str, np.ndarray] = field(default_factory=dict)  # precision -> softmax prob of the prediction
    model: dict[str, str] = field(default_factory=dict)  # precision -> model file name


# ---- reading the run ------------------------------------------------------------------------
def read_metrics(run_path: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` (unparseable lines are skipped, as a crash may cut the last one)."""
    path = Path(run_path) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int | float):
            rows.append(row)
    return sorted(rows, key=lambda r: r["epoch"])


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status", "ok") == "ok"]


def _num(v: Any) -> float | None:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return None
    try:
        f = float(v)  # a 4,000-digit integer from a hand-edited manifest: OverflowError
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _pick_eval(rows: list[dict[str, Any]], precision: str) -> dict[str, Any] | None:
    """The eval row a headline uses: ORT CPU first, then any row of that precision with a confusion matrix."""
    cands = [r for r in _ok(rows) if r.get("precision") == precision and _num(r.get("accuracy")) is not None]
    order = {"cpu": 0, "torch": 1, "openvino": 2}
    cands.sort(key=lambda r: order.get(str(r.get("runtime", "")).split(":")[0], 9))
    return cands[0] if cands else None


def _batch(row: dict[str, Any]) -> int | None:
    """A bench row's batch size (None where a hand edit made it something else)."""
    b = row.get("batch", 1)
    return b if isinstance(b, int) and not isinstance(b, bool) else None


def _latency_rows(bench_rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(runtime, precision) → the bench row at batch 1 (else at the smallest batch measured)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in _ok(bench_rows):
        if _num(r.get("p50_ms")) is None or _batch(r) is None:
            continue
        key = (str(r.get("runtime")), str(r.get("precision")))
        if key not in out or _batch(r) < _batch(out[key]):  # type: ignore[operator]
            out[key] = r
    return out


# ---- predictions ------------------------------------------------------------------------------
def _predict(run: RunDir, opts: ReportOptions) -> _Predictions:
    """Run fp32 (and int8) ONNX with the torch-free runtime on up to ``max_images`` validation images."""
    from edgemap.data.scan import rescan_for_run
    from edgemap.export.calibration import stratified
    from edgemap.runtime.preprocess import preprocess_batch
    from edgemap.runtime.sessions import SessionOptions, load

    if "onnx_fp32" not in run.artifacts:
        raise ManifestError(f"no exported model in {run.path}; run `edgemap export {shlex.quote(str(run.path))} --int8` first")
    if not run.data.get("dataset"):
        raise ManifestError(f"{run.manifest_path}: no dataset recorded, so no validation images to show")
    scan = rescan_for_run(run.data["dataset"])
    if not scan.val:
        raise ManifestError(f"{scan.root}: the validation split is empty")
    samples = stratified(list(scan.val), opts.max_images)
    samples.sort(key=lambda s: (int(s.label), str(s.path)))
    index = {c: i for i, c in enumerate(run.classes)}
    labels = np.asarray([index[scan.classes[int(s.label)]] for s in samples], dtype=np.int64)
    paths = [Path(s.path) for s in samples]
    images = preprocess_batch(paths, run.contract, run.max_pixels)
    out = _Predictions(images=images, labels=labels, paths=paths)
    keys = [("fp32", "onnx_fp32")] + [("int8", k) for k in _INT8_KEYS if k in run.artifacts][:1]
    for precision, key in keys:
        path = run.artifact_path(key)  # refuses a model whose sha256 changed
        sess = load(path, "cpu", SessionOptions(threads=opts.threads))
        logits = np.concatenate([sess.run(images[i : i + 64]) for i in range(0, len(images), 64)])
        z = logits - logits.max(axis=1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        out.pred[precision] = logits.argmax(axis=1)
        out.conf[precision] = prob.max(axis=1)
        out.model[precision] = path.name
    return out


# ---- plots ------------------------------------------------------------------------------------
def _style() -> dict[str, Any]:
    return {
        "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
        "axes.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#9ca3af",
        "axes.grid": True, "grid.color": "#e5e7eb", "grid.linewidth": 0.8, "xtick.color": "#374151",
        "ytick.color": "#374151", "legend.frameon": False, "legend.fontsize": 8,
        "text.parse_math": False,  # a class named "$\\bad{$" is text, not mathtext (it crashed the report)
    }


# matplotlib's UserWarning, one per glyph and plot: "Glyph 29483 (\N{...}) missing from font(s) DejaVu Sans."
_MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from (?:current )?font(?:\(s\))?\s*(.*?)\.?$")


def _png(fig: Any, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def plot_training(rows: list[dict[str, Any]], best_epoch: int | None = None, label_smoothing: float = 0.0,
                  dpi: int = 110) -> bytes:
    """Loss, accuracy and learning rate per epoch; head-only epochs shaded, the saved best epoch starred.

    ``best_epoch`` is the epoch training kept (``metrics.finetune.best``: the highest validation accuracy, ties
    broken by the lower validation loss); without it, the first epoch with the highest accuracy."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_style()):
        fig = Figure(figsize=(11, 3.2))
        axes = fig.subplots(1, 3)
        ep = [r["epoch"] for r in rows]
        head = [r["epoch"] for r in rows if r.get("phase") == "head"]

        def series(key: str) -> list[float]:
            return [_num(r.get(key)) if _num(r.get(key)) is not None else float("nan") for r in rows]

        for ax in axes:
            if head:
                ax.axvspan(min(head) - 0.5, max(head) + 0.5, color="#fef3c7", zorder=0, lw=0)
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
        marker = "o" if len(rows) <= 30 else None
        axes[0].plot(ep, series("train_loss"), marker=marker, ms=3, color="#9ca3af", label="train")
        axes[0].plot(ep, series("val_loss"), marker=marker, ms=3, color=_ACCENT, label="validation")
        # training's cross-entropy, label smoothing included (validation too: it breaks accuracy ties)
        axes[0].set_title(f"loss (label smoothing {label_smoothing:g})" if label_smoothing else "loss")
        acc_t = [v * 100 for v in series("train_acc")]
        acc_v = [v * 100 for v in series("val_acc")]
        axes[1].plot(ep, acc_t, marker=marker, ms=3, color="#9ca3af", label="train")
        axes[1].plot(ep, acc_v, marker=marker, ms=3, color=_ACCENT, label="validation")
        best = _best_index(ep, acc_v, best_epoch)
        if best is not None:
            axes[1].plot([ep[best]], [acc_v[best]], marker="*", ms=13, color="#f59e0b", zorder=5, ls="none",
                         label=f"best {_pct(acc_v[best] / 100)} (epoch {ep[best]})")
        axes[1].set_title("accuracy (%)")
        axes[2].plot(ep, series("lr"), marker=marker, ms=3, color=_ACCENT, label="head")
        if any(not math.isnan(v) for v in series("backbone_lr")):
            axes[2].plot(ep, series("backbone_lr"), marker=marker, ms=3, color="#7c3aed", label="backbone")
        axes[2].set_title("learning rate")
        axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        for ax in axes:
            handles, labels = ax.get_legend_handles_labels()
            if head:
                from matplotlib.patches import Patch

                handles.append(Patch(color="#fef3c7", label="head only (backbone frozen)"))
            ax.legend(handles=handles, loc="best")
        fig.tight_layout()
        return _png(fig, dpi)


def _best_index(epochs: list[int], acc: list[float], best_epoch: int | None) -> int | None:
    """Index of the epoch to star: the one training kept, else the first with the highest accuracy."""
    if best_epoch in epochs and not math.isnan(acc[epochs.index(best_epoch)]):
        return epochs.index(best_epoch)
    return int(np.nanargmax(acc)) if any(not math.isnan(v) for v in acc) else None


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, dpi: int = 110) -> bytes:
    """Row-normalised confusion matrix (colour = share of the true class), counts written in cells."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    cm = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    with matplotlib.rc_context({**_style(), "axes.grid": False}):
        side = min(7.5, max(3.6, 0.42 * k + 1.6))
        fig = Figure(figsize=(side + 0.8, side))
        ax = fig.subplots()
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(cm.sum(1, keepdims=True) > 0, cm / cm.sum(1, keepdims=True), 0.0)
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        if k <= 25:
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        dark = share[i, j] > 0.55  # white text on dark cells; a confusion there is outlined in red
                        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8 if k <= 12 else 6,
                                color="white" if dark else ("#111827" if i == j else _WARN),
                                fontweight="bold" if i != j else "normal")
                        if dark and i != j:
                            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=_WARN,
                                                   linewidth=2.5))
        if k <= 40:
            names = [c if len(c) <= 14 else c[:13] + "…" for c in classes]
            ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 3 else 0)
            ax.set_yticks(range(k), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        n, right = int(cm.sum()), int(np.trace(cm))
        ax.set_title(f"{title}\n{right}/{n} correct ({score_text(100 * right / max(n, 1), 2, 100)}%)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
        fig.tight_layout()
        return _png(fig, dpi)


def _place_labels(fig: Any, ax: Any, anns: list[Any]) -> None:
    """Move each annotation to the first of a few offsets where it overlaps no earlier label or point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    offsets = [((7, 4), "left", "bottom"), ((7, -4), "left", "top"), ((-7, 4), "right", "bottom"),
               ((-7, -4), "right", "top"), ((7, 16), "left", "bottom"), ((7, -16), "left", "top"),
               ((-7, 16), "right", "bottom"), ((-7, -16), "right", "top")]
    taken = [a.xy for a in anns]
    points = [ax.transData.transform(xy) for xy in taken]
    placed: list[Any] = []
    for ann in anns:
        best, best_cost = offsets[0], None
        for off, ha, va in offsets:
            ann.set_position(off)
            ann.set_ha(ha)
            ann.set_va(va)
            bb = ann.get_window_extent(renderer).expanded(1.04, 1.08)
            cost = sum(bb.overlaps(o) for o in placed) * 10
            cost += sum(bb.contains(px, py) for px, py in points)
            axbb = ax.get_window_extent(renderer)
            cost += 5 * (bb.x0 < axbb.x0 or bb.x1 > axbb.x1 or bb.y0 < axbb.y0 or bb.y1 > axbb.y1)
            if best_cost is None or cost < best_cost:
                best, best_cost = (off, ha, va), cost
            if cost == 0:
                break
        ann.set_position(best[0])
        ann.set_ha(best[1])
        ann.set_va(best[2])
        placed.append(ann.get_window_extent(renderer))


def plot_accuracy_latency(points: list[dict[str, Any]], dpi: int = 110) -> bytes:
    """Accuracy (%) vs p50 latency (ms, log scale); one labelled point per runtime × precision."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    with matplotlib.rc_context(_style()):
        fig = Figure(figsize=(8, 4.4))
        ax = fig.subplots()
        anns = []
        for p in sorted(points, key=lambda p: (p["latency_ms"], -p["accuracy"])):
            rt = p["runtime"].split(":")[0]
            ax.scatter([p["latency_ms"]], [p["accuracy"]], s=90 if p["precision"] == "int8" else 70,
                       marker="D" if p["precision"] == "int8" else "o", color=_PALETTE.get(rt, "#111827"),
                       edgecolor="white", linewidth=1.2, zorder=3)
            batch = f", batch {p['batch']}" if p.get("batch", 1) != 1 else ""  # one call of 8 images is not one of 1
            anns.append(ax.annotate(f"{p['runtime']} {p['precision']}{batch}\n{p['latency_ms']:.3g} ms · {score_text(p['accuracy'], 2, 100)}%",
                                    (p["latency_ms"], p["accuracy"]), xytext=(7, 4), textcoords="offset points",
                                    fontsize=8, color="#111827", linespacing=1.1))
        ax.set_xscale("log")
        lat = [p["latency_ms"] for p in points]
        ax.set_xlim(min(lat) / 2.2, max(lat) * 2.2)
        acc = [p["accuracy"] for p in points]
        pad = max(0.5, (max(acc) - min(acc)) * 0.3)
        ax.set_ylim(min(acc) - pad, min(100.0 + pad * 0.3, max(acc) + pad))
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("p50 latency per call, ms (log scale) — left is faster")
        ax.set_ylabel("top-1 accuracy, %")
        ax.set_title("accuracy vs latency (● fp32, ◆ int8)")
        fig.tight_layout()
        _place_labels(fig, ax, anns)
        return _png(fig, dpi)


def plot_misclassified(pred: _Predictions, classes: list[str], limit: int, dpi: int = 110) -> tuple[bytes, int]:
    """Grid of fp32 mistakes, most confident first; each tile names true, fp32 and int8 labels."""
    import matplotlib
    from matplotlib.figure import Figure

    wrong = np.flatnonzero(pred.pred["fp32"] != pred.labels)
    wrong = wrong[np.argsort(-pred.conf["fp32"][wrong], kind="stable")][:limit]
    int8 = pred.pred.get("int8")

    def name(i: int) -> str:
        c = classes[int(i)]
        return c if len(c) <= 12 else c[:11] + "…"

    cols = min(8, max(1, len(wrong)))
    rows = max(1, math.ceil(len(wrong) / cols))
    with matplotlib.rc_context({**_style(), "axes.grid": False}):
        fig = Figure(figsize=(1.25 * cols, 1.62 * rows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
        for ax in axes:
            ax.axis("off")
        for ax, i in zip(axes, wrong):
            ax.imshow(pred.images[i], interpolation="nearest")
            text = f"true {name(pred.labels[i])}\nfp32 {name(pred.pred['fp32'][i])} ({pred.conf['fp32'][i]:.0%})"
            if int8 is not None:
                text += f"\nint8 {name(int8[i])}"
            ax.set_title(text, fontsize=7, color=_WARN, fontweight="normal", linespacing=1.15)
        return _png(fig, dpi), len(wrong)


# ---- HTML -------------------------------------------------------------------------------------
_CSS = """
:root{--ink:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f9fafb;--accent:#2563eb;--ok:#16a34a;--bad:#dc2626;--warn:#b45309}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 28px 60px}
header{background:#111827;color:#f9fafb;padding:26px 0 22px}
header .wrap{max-width:1180px;margin:0 auto;padding:0 28px}
header h1{margin:0;font-size:26px;letter-spacing:-.01em}
header .sub{color:#d1d5db;margin-top:4px}
header .chips{margin-top:12px;display:flex;flex-wrap:wrap;gap:6px}
.chip{display:inline-block;border-radius:999px;padding:2px 10px;font-size:12px;background:#374151;color:#f3f4f6}
.chip.done{background:#065f46}.chip.todo{background:#4b5563;color:#d1d5db}.chip.fail{background:#991b1b}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(210px,1fr));gap:14px;margin:-4px 0 26px}
.card{background:#fff;border:1px solid var(--line);border-radius:12px;padding:14px 16px}
.card .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.05em}
.card .value{font-size:22px;font-weight:650;margin-top:2px;font-variant-numeric:tabular-nums;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.card .note{color:var(--muted);font-size:12.5px}
section{background:#fff;border:1px solid var(--line);border-radius:12px;padding:18px 20px;margin:0 0 20px}
section h2{font-size:17px;margin:0 0 4px}
section p.lead{color:var(--muted);margin:0 0 12px}
.missing{color:var(--warn);background:#fffbeb;border:1px solid #fde68a;border-radius:8px;padding:8px 12px}
.warn{color:var(--bad);background:#fef2f2;border:1px solid #fecaca;border-radius:8px;padding:8px 12px;margin:0 0 12px}
code{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f3f4f6;border-radius:4px;padding:1px 5px}
.missing code{background:#fef3c7}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;font-size:13px}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.04em;background:#fafafa}
td.num,th.num{text-align:right}
.scroll{overflow-x:auto}
.pill{display:inline-block;border-radius:999px;padding:0 8px;font-size:12px;font-weight:600}
.pill.ok{background:#dcfce7;color:#166534}.pill.bad{background:#fee2e2;color:#991b1b}.pill.na{background:#f3f4f6;color:#4b5563}
img.plot{display:block;max-width:100%;height:auto;margin:6px auto 0}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(380px,1fr));gap:16px;align-items:start}
ul.skipped{color:var(--muted);font-size:12.5px;margin:10px 0 0;padding-left:18px}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:30px}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and abs(v) < 10 ** -(digits - 1):
            return f"{v:.2e}"
        return f"{v:,.{digits}g}" if abs(v) >= 1e5 else f"{v:.{digits}g}"
    return str(v)


def _pct(v: Any, digits: int = 2) -> str:
    f = _num(v)
    if f is None:
        return "—"
    return score_text(100 * f, digits, 100) + "%"  # an imperfect score is never shown as 100% (1999 of 2000: 99.95%)


def _size(n: Any) -> str:
    f = _num(n)
    return "—" if f is None else size_text(f)


def _pill(ok: Any, yes: str = "ok", no: str = "fail") -> str:
    if ok is None:
        return '<span class="pill na">—</span>'
    return f'<span class="pill ok">{_e(yes)}</span>' if ok else f'<span class="pill bad">{_e(no)}</span>'


def _table(head: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
    """An HTML table; cells are already-escaped HTML."""
    numeric = numeric or set()
    th = "".join(f'<th{" class=num" if i in numeric else ""}>{_e(h)}</th>' for i, h in enumerate(head))
    body = []
    for row in rows:
        tds = "".join(f'<td{" class=num" if i in numeric else ""}>{c}</td>' for i, c in enumerate(row))
        body.append(f"<tr>{tds}</tr>")
    return f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _not_measured(rows: list[dict[str, Any]]) -> str:
    """Rows that did not run, one line per runtime × precision × reason (bench repeats them per batch)."""
    seen: dict[tuple[str, str, str], str] = {}
    for r in rows:
        if r.get("status", "ok") != "ok":
            seen.setdefault((str(r.get("runtime")), str(r.get("precision")), str(r.get("reason", ""))), str(r.get("status")))
    if not seen:
        return ""
    items = "".join(f"<li><b>{_e(rt)} {_e(pr)}</b> {_e(st)}: {_e(why)}</li>" for (rt, pr, why), st in seen.items())
    return f'<ul class="skipped">{items}</ul>'


def _missing(text: str, cmd: str | None = None) -> str:
    tail = f": <code>{_e(cmd)}</code>" if cmd else ""
    return f'<p class="missing">{_e(text)}{tail}</p>'


def _img(data: bytes, alt: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img class="plot" src="{uri}" alt="{_e(alt)}">'


def _section(sid: str, title: str, lead: str, body: str) -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{lead_html}{body}</section>'


def _file_state(path: Path, recorded_bytes: Any) -> str:
    """"" when the recorded file is there with its recorded size, else what is wrong (the sha256 is checked by the
    commands that use the file; a size is free to check)."""
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    return "changed (another size than recorded)" if isinstance(recorded_bytes, int) and size != recorded_bytes else ""


# ---- the stage --------------------------------------------------------------------------------
class _Builder:
    """Collects sections, plots and warnings for one run."""

    def __init__(self, run: RunDir, opts: ReportOptions, out_dir: Path):
        self.run, self.opts, self.out_dir = run, opts, out_dir
        self.metrics: dict[str, Any] = run.data.get("metrics") or {}
        # rows of a replaced model (export or fine-tuning ran again since) are never shown as the current model's
        self.eval_rows, old_eval = current_results(run, "eval")
        self.bench_rows, old_bench = current_results(run, "bench")
        self.images: dict[str, Path] = {}
        self.pngs: dict[str, bytes] = {}
        self.sections: dict[str, str] = {}
        self.warnings: list[str] = []
        self.missing_glyphs: set[str] = set()
        self.glyph_fonts: set[str] = set()
        self.pred: _Predictions | None = None
        self.misclassified: dict[str, int] = {}
        for stage, old in (("eval", old_eval), ("bench", old_bench)):
            info = run.data.get("stages", {}).get(stage, {})
            if old:
                self.warnings.append(f"{len(old)} {stage} result row(s) were measured on a model replaced since and are "
                                     f"left out; run `edgemap {stage} {shlex.quote(str(run.path))}` to measure the current models")
            elif info.get("status") == "outdated" and self.metrics.get(stage):
                self.warnings.append(f"the {stage} results below were measured before {info.get('reason', 'a later change')}; "
                                     f"run `edgemap {stage} {shlex.quote(str(run.path))}` to measure the current models")

    @property
    def rd(self) -> str:
        """The run directory as one shell word, for the commands the report names."""
        return shlex.quote(str(self.run.path))

    def plot(self, name: str, make: Any, *args: Any) -> bytes:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = make(*args, dpi=self.opts.dpi)
        for w in caught:  # a class name in a script the plot font lacks: once in the report, not a warning per glyph
            glyph = _MISSING_GLYPH.match(str(w.message))
            if glyph:
                self.missing_glyphs.add(chr(int(glyph.group(1))))
                self.glyph_fonts.add(glyph.group(2) or "the plot font")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        extra = None
        if isinstance(data, tuple):
            data, extra = data
        path = self.out_dir / f"{name}.png"
        atomic_write_bytes(path, data)
        self.images[name] = path
        self.pngs[name] = data
        return data if extra is None else (data, extra)  # type: ignore[return-value]

    def guarded(self, section: str, make: Any) -> str:
        """One section's HTML; a value edgemap never writes (a hand-edited edgemap.json or metrics.jsonl: a batch of
        "x", an accuracy of 1e308, a 400-digit count) leaves that section out with a warning, not a traceback."""
        try:
            return make()
        except (ValueError, TypeError, OverflowError, ArithmeticError, KeyError, AttributeError, IndexError) as e:
            # the same exceptions are what a bug in a section's code raises: EDGEMAP_REPORT_STRICT=1 (the test suite
            # sets it) or EDGEMAP_DEBUG=1 raises them, so a bug is not taken for hand-edited values
            if os.environ.get("EDGEMAP_REPORT_STRICT") or os.environ.get("EDGEMAP_DEBUG"):
                raise
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
            self.sections[section] = f"left out: unreadable values ({why})"
            self.warnings.append(f"the {section} section is left out: edgemap.json or metrics.jsonl holds values "
                                 f"edgemap does not write ({why}); run the stage that wrote them again (if they "
                                 "were not edited, it is a bug: EDGEMAP_DEBUG=1 shows where)")
            return ""

    def glyph_warning(self) -> None:
        """One warning for the characters (of class names) the plots' font could not draw."""
        if not self.missing_glyphs:
            return
        font = ", ".join(sorted(self.glyph_fonts))
        chars = sorted(self.missing_glyphs)
        shown = " ".join(chars[:12]) + (" …" if len(chars) > 12 else "")
        self.warnings.append(f"the plots' font ({font}) has no glyph for {len(chars)} character(s) of the class names "
                             f"({shown}): they show as boxes in the plots (the tables show them); install a font that "
                             "has them (e.g. Noto Sans CJK) for matplotlib to find")

    # -- predictions (misclassified grid, fallback confusion matrices) --
    def predict(self) -> None:
        if not self.opts.predict:
            return
        try:
            self.pred = _predict(self.run, self.opts)
        except (EdgemapError, OSError) as e:
            self.warnings.append(f"misclassified images not computed: {e}")

    # -- sections --
    def headline(self) -> str:
        cards = []
        ft = self.metrics.get("finetune") or {}
        best = ft.get("best") or {}
        fp = _pick_eval(self.eval_rows, "fp32")
        i8 = _pick_eval(self.eval_rows, "int8")
        if fp and i8:
            drop = 100 * (_num(fp["accuracy"]) - _num(i8["accuracy"]))  # type: ignore[operator]
            cards.append(("accuracy fp32 → int8", f"{_pct(fp['accuracy'])} → {_pct(i8['accuracy'])}",
                          (f"{drop:.2f} points lower" if drop > 0 else "no drop" if drop == 0 else f"{-drop:.2f} points higher")
                          + f" on {fp.get('n', '?')} images ({_e(i8.get('runtime'))})"))
        elif fp:
            cards.append(("accuracy fp32", _pct(fp["accuracy"]), f"{fp.get('n', '?')} images · no int8 row"))
        elif _num(best.get("val_accuracy")) is not None:
            cards.append(("best validation accuracy", _pct(best["val_accuracy"]), f"epoch {best.get('epoch')} (training)"))
        lat = _latency_rows(self.bench_rows)
        if lat:
            # latencies of one batch size only: a batch-8 call against a batch-1 call made "29× PyTorch eager" of 3.7×
            batch = min(_batch(r) for r in lat.values())  # type: ignore[type-var]
            same = {k: r for k, r in lat.items() if _batch(r) == batch}
            (rt, pr), row = min(same.items(), key=lambda kv: kv[1]["p50_ms"])
            note = f"{rt} {pr}, batch {row.get('batch')}, p50"
            ref = same.get(("torch", "fp32"))
            if ref and (rt, pr) != ("torch", "fp32") and row["p50_ms"] > 0:
                note += f" · {ref['p50_ms'] / row['p50_ms']:.1f}× PyTorch eager"
            cards.append(("fastest latency", f"{_fmt(row['p50_ms'], 3)} ms", note))
            tput = max(_ok(self.bench_rows), key=lambda r: _num(r.get("throughput")) or 0.0)
            if _num(tput.get("throughput")):
                cards.append(("best throughput", f"{tput['throughput']:,.0f} img/s",
                              f"{tput.get('runtime')} {tput.get('precision')}, batch {tput.get('batch')}"))
        arts = self.run.artifacts
        if "onnx_fp32" in arts:
            small = [arts[k] for k in _INT8_KEYS + ("onnx_int8_qdq_s8",) if k in arts]
            if small:
                s = min(small, key=lambda a: a.get("bytes", 1 << 60))
                ratio = arts["onnx_fp32"].get("bytes", 0) / max(1, s.get("bytes", 1))
                cards.append(("int8 model size", _size(s.get("bytes")),
                              f"{ratio:.1f}× smaller than fp32 ({_size(arts['onnx_fp32'].get('bytes'))}), "
                              f"{_e(s.get('format', 'int8'))}"))
            else:
                cards.append(("model size", _size(arts["onnx_fp32"].get("bytes")), "fp32 ONNX · no int8 model yet"))
        if ft:
            cards.append(("training", f"{ft.get('epochs_run', '?')} epochs",
                          f"best epoch {best.get('epoch', '?')} · {_fmt(_num(ft.get('train_images_per_second')), 3)} img/s"
                          f" on {_e(ft.get('device', '?'))}"))
        if not cards:
            return ""
        html_cards = "".join(
            f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{_e(value)}</div>'
            f'<div class="note">{note}</div></div>'
            for label, value, note in cards
        )
        return f'<div class="cards">{html_cards}</div>'

    def accuracy_latency(self) -> str:
        lead = "Each point is one runtime × precision: accuracy from <code>edgemap eval</code>, latency from <code>edgemap bench</code> (batch 1, else the smallest batch measured)."
        if not self.eval_rows:
            self.sections["accuracy_latency"] = f"not run yet: edgemap eval {self.rd}"
            return _section("accuracy-latency", "Accuracy vs latency", "", _missing("not run yet", f"edgemap eval {self.rd}"))
        if not self.bench_rows:
            self.sections["accuracy_latency"] = f"not run yet: edgemap bench {self.rd}"
            return _section("accuracy-latency", "Accuracy vs latency", "", _missing("not run yet", f"edgemap bench {self.rd}"))
        lat = _latency_rows(self.bench_rows)
        points = []
        for r in _ok(self.eval_rows):
            b = lat.get((str(r.get("runtime")), str(r.get("precision"))))
            if b and _num(r.get("accuracy")) is not None and _num(b.get("p50_ms")):
                points.append({"runtime": str(r["runtime"]), "precision": str(r["precision"]),
                               "accuracy": 100 * float(r["accuracy"]), "latency_ms": float(b["p50_ms"]),
                               "batch": _batch(b)})
        if not points:
            self.sections["accuracy_latency"] = "no runtime × precision has both an eval and a bench row"
            return _section("accuracy-latency", "Accuracy vs latency", "",
                            _missing("no runtime × precision has both an eval and a bench row"))
        self.sections["accuracy_latency"] = "ok"
        data = self.plot("accuracy_vs_latency", plot_accuracy_latency, points)
        return _section("accuracy-latency", "Accuracy vs latency", lead, _img(data, "accuracy vs latency per runtime and precision"))

    def eval_table(self) -> str:
        title = "Accuracy per runtime × precision"
        if not self.eval_rows:
            self.sections["eval"] = f"not run yet: edgemap eval {self.rd}"
            return _section("eval", title, "", _missing("not run yet", f"edgemap eval {self.rd}"))
        self.sections["eval"] = "ok"
        ev = self.metrics.get("eval") if isinstance(self.metrics.get("eval"), dict) else {}
        rows = [[
            _e(r.get("runtime")), _e(r.get("precision")), _pct(r.get("accuracy")), _pct(r.get("macro_f1")),
            _pct(r.get("agreement")), _e(_fmt(_num(r.get("max_abs_diff")), 3)),
            _pill(r.get("within_tolerance"), "within", "outside"), _e(r.get("provider") or ""),
        ] for r in _ok(self.eval_rows)]
        lead = (f"On {_e(ev.get('data', 'the evaluation split'))}. Agreement and the largest logit difference are "
                "against PyTorch fp32 (the reference).")
        return _section("eval", title, lead, _table(
            ["runtime", "precision", "top-1", "macro F1", "agreement", "max |Δlogit|", "tolerance", "what ran"],
            rows, numeric={2, 3, 4, 5}) + _not_measured(self.eval_rows))

    def bench_table(self) -> str:
        title = "Latency and throughput"
        if not self.bench_rows:
            self.sections["bench"] = f"not run yet: edgemap bench {self.rd}"
            return _section("bench", title, "", _missing("not run yet", f"edgemap bench {self.rd}"))
        self.sections["bench"] = "ok"
        b = self.metrics.get("bench") if isinstance(self.metrics.get("bench"), dict) else {}
        rows = [[
            _e(r.get("runtime")), _e(r.get("precision")), _e(r.get("batch")),
            _e(_fmt(_num(r.get("p50_ms")), 3)), _e(_fmt(_num(r.get("p90_ms")), 3)), _e(_fmt(_num(r.get("p99_ms")), 3)),
            _e(f"{r['throughput']:,.0f}") if _num(r.get("throughput")) else "—",
            _e(_fmt(_num(r.get("load_ms")), 3)), _e(_fmt(_num(r.get("mem_mb")), 3)),
            _e(f"{r.get('provider', '')} ({r.get('inference_precision') or r.get('precision')})"
               + (f", {r['mode']}" if r.get("mode") else "")),
        ] for r in _ok(self.bench_rows)]
        lead = (f"Percentiles in ms over timed calls after warm-up, {_e(b.get('threads', '?'))} threads; throughput in "
                "images/s; memory is the peak growth of the process's resident set.")
        lead += "".join(f" <strong>Note:</strong> {_e(n)}." for n in timing_notes(_ok(self.bench_rows)))
        return _section("bench", title, lead, _table(
            ["runtime", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "load ms", "mem MiB", "what ran"],
            rows, numeric={2, 3, 4, 5, 6, 7, 8}) + _not_measured(self.bench_rows))

    def training(self) -> str:
        rows = read_metrics(self.run.path)
        if not rows:
            self.sections["training"] = "no metrics.jsonl: the run was not trained by `edgemap finetune`"
            return _section("training", "Training", "", _missing("no training curves: this run has no metrics.jsonl",
                                                                "edgemap finetune DATA --out " + self.rd))
        self.sections["training"] = "ok"
        best = ((self.metrics.get("finetune") or {}).get("best") or {}).get("epoch")
        smoothing = _num((self.run.data.get("options", {}).get("finetune") or {}).get("label_smoothing")) or 0.0
        data = self.plot("training_curves", plot_training, rows, best if isinstance(best, int) else None, smoothing)
        last = rows[-1]
        heads = sum(r.get("phase") == "head" for r in rows)  # "shaded epochs" were named where none were shaded
        how = ("every epoch trained the head only, on cached frozen features" if heads == len(rows) else
               "the shaded epochs trained the head only on cached frozen features, the rest fine-tuned the whole "
               "network" if heads else "every epoch fine-tuned the whole network")
        lead = (f"{len(rows)} epochs; {how}. Last epoch: validation accuracy {_pct(last.get('val_acc'))}, "
                f"loss {_e(_fmt(_num(last.get('val_loss')), 4))}"
                + (f" (cross-entropy with the training's label smoothing {smoothing:g})." if smoothing else "."))
        return _section("training", "Training", lead, _img(data, "training curves: loss, accuracy, learning rate"))

    def confusion(self) -> str:
        classes = self.run.classes
        blocks = []
        shown = []
        for precision in ("fp32", "int8"):
            row = _pick_eval(self.eval_rows, precision)
            cm = None
            if row and isinstance(row.get("confusion"), list) and len(row["confusion"]) == len(classes):
                cm = np.asarray(row["confusion"])
                title = f"{precision} · {row.get('runtime')} ({Path(str(row.get('model') or '')).name or 'eval'})"
            elif self.pred is not None and precision in self.pred.pred:
                from edgemap.metrics import confusion_matrix

                cm = confusion_matrix(self.pred.labels, self.pred.pred[precision], len(classes))
                title = f"{precision} · cpu ({self.pred.model[precision]}), {len(self.pred.labels)} validation images"
            if cm is None:
                continue
            blocks.append(_img(self.plot(f"confusion_{precision}", plot_confusion, cm, classes, title),
                               f"confusion matrix {precision}"))
            shown.append(precision)
        if not blocks:
            self.sections["confusion"] = f"not run yet: edgemap eval {self.rd}"
            return _section("confusion", "Confusion matrices", "", _missing("not run yet", f"edgemap eval {self.rd}"))
        lead = "Rows are the true class, columns the prediction; colour is the share of the true class; mistakes (off-diagonal counts) are red, outlined in red where they are most of their row."
        missing = next((p for p in ("fp32", "int8") if p not in shown), None)
        if missing is None:
            self.sections["confusion"], note = "ok", ""
        elif missing == "int8" and not any(k.startswith("onnx_int8") for k in self.run.artifacts):
            self.sections["confusion"] = "fp32 only (no int8 model yet)"
            note = _missing("no int8 matrix yet", f"edgemap export {self.rd} --int8")
        else:  # the model is there (it said "no int8 model yet, export --int8" when int8 models were exported)
            self.sections["confusion"] = f"{shown[0]} only (no current {missing} eval row)"
            note = _missing(f"no {missing} matrix: no current {missing} eval row",
                            f"edgemap eval {self.rd} --precision {missing}")
        return _section("confusion", "Confusion matrices", lead, f'<div class="grid2">{"".join(blocks)}</div>{note}')

    def misclassified_grid(self) -> str:
        title = "Misclassified validation images"
        if self.pred is None:
            why = next((w for w in self.warnings if w.startswith("misclassified")), "")
            if not self.opts.predict:
                self.sections["misclassified"] = "turned off (--no-predict)"
                return _section("misclassified", title, "", _missing("not computed (report run with --no-predict)"))
            if "onnx_fp32" not in self.run.artifacts:
                self.sections["misclassified"] = f"not run yet: edgemap export {self.rd} --int8"
                return _section("misclassified", title, "", _missing("not run yet", f"edgemap export {self.rd} --int8"))
            self.sections["misclassified"] = why or "not computed"
            return _section("misclassified", title, "", _missing(why or "not computed"))
        p = self.pred
        n = len(p.labels)
        counts = {k: int((v != p.labels).sum()) for k, v in p.pred.items()}
        self.misclassified = counts
        parts = [f"fp32 <code>{_e(p.model['fp32'])}</code> got {counts['fp32']} of {n} wrong"]
        if "int8" in p.pred:
            flips = int((p.pred["int8"] != p.pred["fp32"]).sum())
            parts.append(f"int8 <code>{_e(p.model['int8'])}</code> {counts['int8']} wrong, and changed {flips} "
                         f"prediction{'s' if flips != 1 else ''} of fp32")
        lead = ("; ".join(parts) + f" (ONNX Runtime CPU, the device runtime's preprocessing; {n} validation images"
                f"{' picked across classes' if n >= self.opts.max_images else ''}). Most confident mistakes first; "
                "each tile shows what the model saw.")
        if counts["fp32"] == 0:
            self.sections["misclassified"] = "ok"
            return _section("misclassified", title, lead, '<p><span class="pill ok">no mistakes</span></p>')
        if self.opts.grid == 0:
            self.sections["misclassified"] = "ok"
            return _section("misclassified", title, lead, "")
        data, shown = self.plot("misclassified", plot_misclassified, p, self.run.classes, self.opts.grid)
        self.sections["misclassified"] = "ok"
        more = f" Showing {shown} of {counts['fp32']}." if shown < counts["fp32"] else ""
        return _section("misclassified", title, lead + more, _img(data, "misclassified validation images"))

    def gate(self) -> str:
        table = self.metrics.get("int8_gate")
        title = "int8 accuracy gate"
        if not isinstance(table, dict) or not table:
            self.sections["int8_gate"] = f"not run yet: edgemap export {self.rd} --int8"
            return _section("int8-gate", title, "", _missing("not run yet", f"edgemap export {self.rd} --int8"))
        self.sections["int8_gate"] = "ok"
        rows, summary = [], []
        for fmt, entry in table.items():
            if not isinstance(entry, dict):
                continue
            verdict = "passed" if entry.get("passed") else "refused"
            kept = entry.get("artifact") or entry.get("rejected") or "—"
            summary.append(f"<b>{_e(fmt)}</b> for {_e(', '.join(entry.get('targets') or []))}: {_pill(entry.get('passed'), verdict, verdict)} → <code>{_e(kept)}</code>")
            for a in entry.get("attempts") or []:
                rows.append([
                    _e(fmt), _e(a.get("attempt")), _e(a.get("method")), _e(a.get("runtime")),
                    _e(_fmt(_num(a.get("top1_fp32")), 4)), _e(_fmt(_num(a.get("top1_int8")), 4)),
                    _e(_fmt(_num(a.get("drop_points")), 3)), _e(_fmt(_num(a.get("agreement")), 4)),
                    _e(f"{len(a.get('excluded') or [])} node(s)" if a.get("excluded") else "none"),
                    _pill(a.get("passed"), "pass", "fail"), _e(a.get("note", "")),
                ])
        max_drop = next((e.get("max_drop") for e in table.values() if isinstance(e, dict) and "max_drop" in e), None)
        lead = (f"Every quantization attempt, in order; an int8 model is kept only when its top-1 drop on the validation "
                f"images is within --max-drop {_e(_fmt(_num(max_drop), 3))} points. Accuracies in %.<br>" + "<br>".join(summary))
        return _section("int8-gate", title, lead, _table(
            ["format", "#", "calibration", "checked on", "top-1 fp32", "top-1 int8", "drop (points)", "agreement",
             "kept in fp32", "gate", "note"], rows, numeric={1, 4, 5, 6, 7}))

    def parity(self) -> str:
        par = self.metrics.get("parity")
        title = "Export parity (PyTorch vs ONNX)"
        if not isinstance(par, dict):
            self.sections["parity"] = f"not run yet: edgemap export {self.rd}"
            return _section("parity", title, "", _missing("not run yet", f"edgemap export {self.rd}"))
        self.sections["parity"] = "ok"
        rows = [[_e(r.get("runtime")), _e(r.get("batch")), _e(r.get("images")), _e(_fmt(_num(r.get("max_abs_diff")), 3)),
                 _e(_fmt(_num(r.get("tolerance")), 3)), _pct(r.get("top1_agreement")), _e(r.get("flipped")),
                 _pill(r.get("status") == "ok" if r.get("status") != "skipped" else None, "ok", str(r.get("status"))),
                 _e(r.get("provider", "")) + (f" — {_e(r['note'])}" if r.get("note") else "")]
                for r in stored_rows(par.get("rows"))]
        lead = f"{_pill(par.get('passed'), 'passed', 'failed')} Logits of model.onnx compared with PyTorch on validation images at batch 1 and an odd batch."
        return _section("parity", title, lead, _table(
            ["runtime", "batch", "images", "max |Δlogit|", "tolerance", "top-1 agreement", "flipped", "status", "provider"],
            rows, numeric={1, 2, 3, 4, 5, 6}))

    def dataset(self) -> str:
        ds = self.run.data.get("dataset") or {}
        counts = ds.get("counts") or {}
        if not counts:
            self.sections["dataset"] = "no dataset recorded"
            return _section("dataset", "Dataset", "", _missing("no dataset recorded in edgemap.json"))
        self.sections["dataset"] = "ok"
        splits = [s for s in ("train", "val", "test") if counts.get(s)]
        rows = [[_e(c)] + [_e(counts[s].get(c, 0)) for s in splits] for c in self.run.classes]
        rows.append(["<b>total</b>"] + [f"<b>{sum(counts[s].values())}</b>" for s in splits])
        lead = f"<code>{_e(ds.get('root', '?'))}</code> ({_e(ds.get('layout', '?'))}), fingerprint <code>{_e(str(ds.get('fingerprint', ''))[:12])}</code>."
        body = _table(["class"] + splits, rows, numeric=set(range(1, len(splits) + 1)))
        skipped = ds.get("skipped") or []
        if skipped:
            body += f"<h3>Skipped files ({len(skipped)})</h3>" + _table(
                ["file", "reason"], [[f"<code>{_e(s[0])}</code>", _e(s[1] if len(s) > 1 else "")] for s in skipped[:200]])
        ignored = ds.get("ignored") or {}
        if ignored:
            body += "<p class=lead>Ignored " + _e(ignored_text(ignored)) + "</p>"
        return _section("dataset", "Dataset", lead, body)

    def artifacts(self) -> str:
        arts = self.run.artifacts
        rows = []
        broken = 0
        for key, a in arts.items():
            meta = [a.get("precision"), a.get("format") if a.get("format") != a.get("precision") else None,
                    ", ".join(a.get("runtimes") or []) or None]
            state = _file_state(self.run.path / a["path"], a.get("bytes"))
            if state:
                broken += 1
                self.warnings.append(f"{a['path']} (artifact {key}) is {state}; {self.run.remake_hint(key)}")
            rows.append([_e(key), f"<code>{_e(a.get('path'))}</code>" + (f" {_pill(False, '', state)}" if state else ""),
                         _e(_size(a.get("bytes"))),
                         _e(" · ".join(str(m) for m in meta if m) or "—"), _e(a.get("stage", "")),
                         f"<code>{_e(str(a.get('sha256', ''))[:12])}</code>"])
        made = ((self.run.data.get("stages") or {}).get("package") or {}).get("wheel")  # `edgemap run` records it
        current = (self.run.path / made).resolve() if made else None
        for whl in sorted((self.run.path / "dist").glob("*.whl")) if (self.run.path / "dist").is_dir() else []:
            kind = "device package" if current in (None, whl.resolve()) else "device package (an earlier build)"
            rows.append(["wheel", f"<code>{_e(whl.relative_to(self.run.path))}</code>", _e(_size(whl.stat().st_size)),
                         kind, "package", "—"])
        self.sections["artifacts"] = (f"{broken} file(s) missing or changed" if broken else "ok") if rows else "none"
        if not rows:
            return _section("artifacts", "Artifacts", "", _missing("no artifacts recorded"))
        return _section("artifacts", "Artifacts", "Every file the run recorded, with its size and sha256 (refused when it changes).",
                        _table(["key", "file", "size", "kind", "stage", "sha256"], rows, numeric={2}))

    def header(self) -> str:
        run, c = self.run, self.run.contract
        classes = run.classes
        # each name isolated (<bdi>): a right-to-left override in one ("\u202egnp.exe") reversed the rest of the line
        shown = ", ".join(f"<bdi>{_e(c)}</bdi>" for c in classes[:12]) + (f", … ({len(classes)} in all)" if len(classes) > 12 else "")
        bb = run.data.get("backbone") or {}
        stages = run.data.get("stages") or {}
        chips = []
        for st in ("finetune", "export", "eval", "bench", "package"):
            status = (stages.get(st) or {}).get("status")
            if st == "eval" and status is None and self.eval_rows:
                status = "done"
            if st == "bench" and status is None and self.bench_rows:
                status = "done"
            if st == "package" and status is None and list((run.path / "dist").glob("*.whl")):
                status = "done"
            cls = "done" if status == "done" else ("fail" if status in ("failed", "error") else "todo")
            chips.append(f'<span class="chip {cls}">{_e(st)}: {_e(status or "not run")}</span>')
        return (
            f'<header><div class="wrap"><h1><bdi>{_e(run.path.resolve().name)}</bdi></h1>'
            f'<div class="sub">{_e(bb.get("name", "?"))} · {len(classes)} classes ({shown}) · '
            f'{c.height}×{c.width} px uint8 RGB, {_e(c.interpolation)} · created {_e(run.data.get("created", "?"))}</div>'
            f'<div class="chips">{"".join(chips)}</div></div></header>'
        )

    def footer(self) -> str:
        from edgemap import __version__

        versions = self.run.data.get("versions") or {}
        v = " · ".join(f"{k} {val}" for k, val in versions.items() if isinstance(val, str))
        return f"<footer>edgemap {_e(__version__)} report, {_e(now_iso())} · run made with {_e(v)}</footer>"


def report(run_dir: str | Path | RunDir, opts: ReportOptions | None = None) -> ReportResult:
    """Write ``RUN_DIR/report/report.html`` (self-contained) and the PNG plots it shows.

    Args:
        run_dir: a run directory (or a loaded RunDir); any stage may be missing, its
            section then names the command that fills it.
        opts: output path, prediction bounds, plot resolution.

    Returns:
        ReportResult with the HTML path, the PNGs, and each section's status.

    Raises:
        ManifestError: not a run directory, or invalid options.

    Example:
        >>> res = report("models/digits")
        >>> res.html
        PosixPath('models/digits/report/report.html')
    """
    t0 = time.perf_counter()
    opts = opts or ReportOptions()
    opts.validate()
    run = fresh_run(run_dir)  # what eval and bench stored since a caller's RunDir was loaded
    html_path = Path(opts.out) if opts.out is not None else run.own_folder(REPORT_DIR) / REPORT_FILE
    # a folder (or one to make: a trailing "/", or a new name without a suffix, which became an HTML file named
    # like a folder): the file in it
    if html_path.is_dir() or str(opts.out or "").endswith(("/", os.sep)) or (
            opts.out is not None and not html_path.exists() and not html_path.suffix):
        html_path = html_path / REPORT_FILE
    if opts.out is not None and special_file(html_path):  # /dev/stdout, a FIFO: the PNGs need a folder beside it
        raise ManifestError(f"--out {opts.out}: not a file or folder path; give a path such as report.html or a folder")
    # the plots as PNG files too: RUN_DIR/report/, or beside --out (NAME_files/), never in a run given --out elsewhere
    out_dir = run.own_folder(REPORT_DIR) if opts.out is None else html_path.parent / f"{html_path.stem}_files"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in NOT_WRITABLE or e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the place refused the write: one line, exit 74
        raise ManifestError(f"--out {opts.out}: cannot make the folder {out_dir} ({e.strerror}); "
                            "give a path in a folder you can write") from None
    with writers_lock(out_dir):  # another report into this folder goes first; then a killed one's temps go (only
        # this folder's: the page's own folder may be shared, or be the run directory, whose writers hold other locks)
        remove_stale_temps(out_dir)
        return _build_report(run, run_dir, opts, out_dir, html_path, t0)


def _build_report(run: RunDir, run_dir: Any, opts: ReportOptions, out_dir: Path, html_path: Path,
                  t0: float) -> ReportResult:
    b = _Builder(run, opts, out_dir)
    b.predict()
    body = [b.guarded(section, make) for section, make in (
        ("accuracy_latency", b.accuracy_latency), ("eval", b.eval_table), ("bench", b.bench_table),
        ("training", b.training), ("confusion", b.confusion), ("misclassified", b.misclassified_grid),
        ("int8_gate", b.gate), ("parity", b.parity), ("dataset", b.dataset), ("artifacts", b.artifacts))]
    b.glyph_warning()
    warn = "".join(f'<p class="warn">{_e(w)}</p>' for w in b.warnings)
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>edgemap report · {_e(run.path.resolve().name)}</title><style>{_CSS}</style></head><body>"
        f"{b.header()}<main>{b.headline()}{warn}{''.join(body)}{b.footer()}</main></body></html>\n"
    )
    data = doc.encode("utf-8")
    html_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(html_path, data)
    hand_back(run_dir, run)  # the caller's RunDir sees what eval and bench stored since it was loaded
    return ReportResult(
        html=html_path, images=b.images, sections=b.sections, warnings=b.warnings,
        checked=len(b.pred.labels) if b.pred is not None else 0, misclassified=b.misclassified,
        bytes=len(data), seconds=time.perf_counter() - t0,
    )
