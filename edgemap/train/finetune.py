"""`edgemap finetune`: adapt a pretrained backbone to a folder of images.

Recipe: a new classifier head; ``freeze_epochs`` head-only epochs on cached features of
the frozen backbone (no augmentation in that phase, so each image's features are computed
once and those epochs cost almost nothing); then the whole net, the backbone at
``backbone_lr_mult`` × the head's learning rate. AdamW, linear warm-up + cosine decay,
label smoothing, random-resized-crop (+ optional flip) augmentation, bf16 autocast and
channels_last on CPUs with AVX512-BF16/AMX (AMP on CUDA), early stopping on validation
accuracy.

Exact resume: every random draw of a step (batch order, augmentation, dropout) is seeded
from ``(seed, epoch, step)``, and the state file holds model, optimizer and RNG states
plus the position in the epoch, so an interrupted + resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgemap.artifacts import WEIGHTS_BEST, WEIGHTS_LAST
from edgemap.backbones import get_spec
from edgemap.errors import DatasetError, Interrupted, ResumeError, TrainingError
from edgemap.fsutil import atomic_path, atomic_write_bytes, remove_stale_temps
from edgemap.manifest import MANIFEST_NAME, RunDir
from edgemap.model import ClassifierNet, build_classifier
from edgemap.runtime.preprocess import DEFAULT_MAX_PIXELS, PreprocessContract, preprocess
from edgemap.runtime.sessions import physical_cores
from edgemap.train import checkpoint as ckpt
from edgemap.train.hardware import autocast_dtype, resolve_device

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class FinetuneOptions:
    """Every finetune default lives here (the CLI passes only what the user set).

    Attributes:
        backbone: registry name (``edgemap backbones``).
        epochs: total epochs, head-only ones included.
        img_size: square input size; None = the backbone's native size.
        batch_size: images per step.
        lr: head learning rate (AdamW); the backbone gets ``lr * backbone_lr_mult``.
        freeze_epochs: head-only epochs on cached frozen features before full fine-tuning.
        seed: makes a run reproducible on CPU.
        device: auto | cpu | cuda[:N].
        precision: auto (bf16 where the CPU/GPU is fast at it) | fp32 | bf16 | fp16 (CUDA).
        val_split: validation fraction for a single-folder dataset.
        skip_bad: skip undecodable images (listed in the manifest) instead of stopping.
        flip: random horizontal flips (turn off for digits/text).
        augment: random resized crops during full fine-tuning.
        patience: early stopping after this many epochs without a better val accuracy.
        checkpoint_seconds: also save the resumable state mid-epoch this often.
        checkpoint_every: also save it every N steps (0 = off); tests use it.
        bn_momentum: BatchNorm momentum while fine-tuning (the TF weights carry 0.01).
        bn_recalibrate: re-estimate BatchNorm statistics on the training images first (AdaBN).
    """

    backbone: str = "efficientnet_lite0"
    epochs: int = 12
    img_size: int | None = None
    batch_size: int = 32
    lr: float = 2e-3
    backbone_lr_mult: float = 0.1
    bn_momentum: float = 0.1
    bn_recalibrate: bool = True
    weight_decay: float = 0.01
    freeze_epochs: int = 2
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    dropout: float = 0.2
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    val_split: float = 0.2
    skip_bad: bool = False
    flip: bool = True
    augment: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_pct: float = 1.0
    patience: int = 4
    pretrained: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    threads: int | None = None
    checkpoint_seconds: float = 60.0
    checkpoint_every: int = 0

    def validate(self) -> None:
        spec = get_spec(self.backbone)  # raises BackboneError for an unknown name
        size = self.img_size or spec.input_size
        if size < 16 or size % spec.size_multiple:
            raise TrainingError(f"--img-size {size}: {self.backbone} needs a multiple of {spec.size_multiple} and >= 16")
        for name, val, lo in (("epochs", self.epochs, 1), ("batch-size", self.batch_size, 1), ("freeze-epochs", self.freeze_epochs, 0)):
            if val < lo:
                raise TrainingError(f"--{name} {val}: must be >= {lo}")
        if self.freeze_epochs > self.epochs:
            raise TrainingError(f"--freeze-epochs {self.freeze_epochs} exceeds --epochs {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr {self.lr}: must be a positive number")
        if not 0.0 < self.val_split < 1.0:
            raise TrainingError(f"--val-split {self.val_split}: must be between 0 and 1")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise TrainingError(f"--precision {self.precision!r}: use auto, fp32, bf16 or fp16")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "crop_scale" in kw:
            kw["crop_scale"] = tuple(kw["crop_scale"])
        return cls(**kw)


@dataclass
class FinetuneResult:
    run_dir: Path
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    images_per_second: float
    classes: list[str]
    counts: dict[str, dict[str, int]]
    skipped: list[tuple[str, str]]
    autocast: str
    channels_last: bool
    device: str


# --------------------------------------------------------------------------------------
# data: decode once at the contract size, then augment batches on tensors
# --------------------------------------------------------------------------------------
def load_arrays(paths: list[Path], contract: PreprocessContract, max_pixels: int | None, workers: int,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Decode + resize every image once with the runtime's preprocessing → (N, H, W, 3) uint8."""
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty((len(paths), contract.height, contract.width, 3), dtype=np.uint8)

    def work(i: int) -> int:
        out[i] = preprocess(paths[i], contract, max_pixels=max_pixels)
        return i

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(work, range(len(paths))):
            if progress:
                progress(1)
    return out


def step_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + step) % (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step_seed(seed, epoch, 999_983))
    return torch.randperm(n, generator=g)


def augment(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float], flip: bool) -> torch.Tensor:
    """Random resized crop (+ flip) of a normalised NCHW batch in one affine_grid/grid_sample."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=gen)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = torch.exp(logr)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# --------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------
def lr_factor(global_step: int, steps_per_epoch: int, freeze_epochs: int, epochs: int, warmup_epochs: float) -> float:
    """Warm-up then constant in the head-only phase; warm-up then cosine in the full phase."""
    head_steps = freeze_epochs * steps_per_epoch
    if global_step < head_steps:
        warm = max(1, min(steps_per_epoch, head_steps))
        return min(1.0, (global_step + 1) / warm)
    t = global_step - head_steps
    total = max(1, (epochs - freeze_epochs) * steps_per_epoch)
    warm = max(1, int(warmup_epochs * steps_per_epoch))
    if t < warm:
        return (t + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / max(1, total - warm))))


# --------------------------------------------------------------------------------------
# interruption
# --------------------------------------------------------------------------------------
class _StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.signum is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum


@contextmanager
def _catch_signals() -> Iterator[_StopFlag]:
    import threading

    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------
class _Reporter:
    """Progress callbacks; the CLI passes a rich implementation, tests pass nothing."""

    def phase(self, name: str, total: int) -> None: ...
    def advance(self, n: int = 1, **fields: Any) -> None: ...
    def epoch_done(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


def _counts_line(scan: Any) -> str:
    return ", ".join(f"{split}: {sum(v.values())}" for split, v in scan.counts().items() if v)


def finetune(data: str | Path, out: str | Path, opts: FinetuneOptions | None = None, *, resume: bool = False,
             overrides: dict[str, Any] | None = None, reporter: _Reporter | None = None) -> FinetuneResult:
    """Fine-tune ``opts.backbone`` on the folder dataset ``data``; write the run directory ``out``.

    Args:
        data: ``DATA/train/<class>/`` + ``DATA/val|validation/<class>/`` (+ optional ``DATA/test``), or
            ``DATA/<class>/`` split by ``opts.val_split``.
        out: run directory to create (must not hold another run unless ``resume``).
        opts: options (default: FinetuneOptions()). On resume, the run's stored options are used and
            ``opts``, when given, must agree with them (except epochs, threads, device, checkpointing).
        resume: continue the interrupted run in ``out`` exactly where its state file left it.
        overrides: on resume, the options the user set explicitly (same rule as ``opts``).

    Returns:
        FinetuneResult with the best validation accuracy and where everything went.

    Example:
        >>> finetune("data/digits", "models/digits", FinetuneOptions(img_size=64, flip=False))
    """
    from edgemap.data.scan import ScanOptions, scan_dataset

    rep = reporter or _Reporter()
    out = Path(out)
    t_start = time.perf_counter()
    state_tensors = state_meta = None
    if resume:
        given = dict(overrides or {})
        if opts is not None:
            given.update(opts.to_dict())
        run, opts, state_tensors, state_meta = _open_for_resume(out, given)
    else:
        opts = opts or FinetuneOptions()
        if (out / MANIFEST_NAME).exists():
            raise TrainingError(f"{out} already holds a run; continue it with --resume, or choose another --out")
    opts.validate()
    torch.set_num_threads(opts.threads or physical_cores())
    device = resolve_device(opts.device)
    spec = get_spec(opts.backbone)
    size = opts.img_size or spec.input_size
    contract = PreprocessContract(size, size, crop_pct=opts.crop_pct, interpolation=spec.interpolation, mean=spec.mean, std=spec.std)

    scan = scan_dataset(data, ScanOptions(val_split=opts.val_split, seed=opts.seed, skip_bad=opts.skip_bad, max_pixels=opts.max_pixels))
    rep.message(f"dataset {scan.root}: {len(scan.classes)} classes, {_counts_line(scan)} ({scan.layout})")
    if resume:
        _check_compatible(run, scan, opts)
    else:
        run = RunDir.create(
            out,
            backbone={"name": opts.backbone, "weights": spec.weights if opts.pretrained else "random init"},
            classes=scan.classes,
            contract=contract,
            options={"finetune": opts.to_dict()},
            dataset=scan.to_manifest(),
        )
    run.set_stage("finetune", "running")
    remove_stale_temps(run.path / "state")
    remove_stale_temps(run.path / "weights")

    # ---- decode once ------------------------------------------------------------------
    rep.phase("decode", len(scan.train) + len(scan.val))
    train_x = load_arrays([s.path for s in scan.train], contract, opts.max_pixels, 4, rep.advance)
    val_x = load_arrays([s.path for s in scan.val], contract, opts.max_pixels, 4, rep.advance)
    train_y = torch.tensor([s.label for s in scan.train], dtype=torch.long)
    val_y = torch.tensor([s.label for s in scan.val], dtype=torch.long)
    train_t = torch.from_numpy(train_x)
    val_t = torch.from_numpy(val_x)

    # ---- model / optimiser --------------------------------------------------------------
    net = build_classifier(opts.backbone, len(scan.classes), contract, pretrained=opts.pretrained, seed=opts.seed, dropout=opts.dropout)
    # TF-ported BatchNorm keeps momentum 0.01: running statistics would lag the new domain for
    # hundreds of steps and validation would see stale ones. Fine-tuning uses PyTorch's 0.1.
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = opts.bn_momentum
    mem_format = torch.channels_last if opts.channels_last else torch.contiguous_format
    net = net.to(device=device, memory_format=mem_format)
    opt = torch.optim.AdamW(
        [{"params": list(net.backbone.parameters()), "lr": opts.lr * opts.backbone_lr_mult, "name": "backbone"},
         {"params": list(net.head.parameters()), "lr": opts.lr, "name": "head"}],
        lr=opts.lr, weight_decay=opts.weight_decay,
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    amp = autocast_dtype(device, opts.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp == torch.float16)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()

    steps_per_epoch = math.ceil(len(scan.train) / opts.batch_size)
    info: dict[str, Any] = {
        "epoch": 0, "step": 0, "global_step": 0, "best_acc": -1.0, "best_loss": float("inf"), "best_epoch": -1,
        "bad_epochs": 0, "images_seen": 0, "train_seconds": 0.0,
    }
    if state_tensors is not None:
        ckpt.apply_state(state_tensors, state_meta, net, opt)
        info.update(state_meta["info"]["progress"])
        rep.message(f"resuming at epoch {info['epoch'] + 1}, step {info['step']} of {steps_per_epoch}")
    _truncate_metrics(run.path, info["epoch"])

    def save_progress() -> None:
        ckpt.save_state(run.path, net, opt, {
            "progress": info, "options": opts.to_dict(), "classes": scan.classes, "backbone": opts.backbone,
            "fingerprint": scan.fingerprint,
        })

    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)
    feats_cache: torch.Tensor | None = None
    last_save = time.monotonic()
    stopped_early = False
    with _catch_signals() as stop:
        while info["epoch"] < opts.epochs:
            epoch = info["epoch"]
            head_only = epoch < opts.freeze_epochs
            for p in net.backbone.parameters():
                p.requires_grad_(not head_only)
            if info["global_step"] == 0 and opts.bn_recalibrate:
                _recalibrate_bn(net, train_t, opts.batch_size, device, mem_format, autocast, rep)
            if head_only and feats_cache is None:
                feats_cache = _frozen_features(net, train_t, opts.batch_size, device, mem_format, autocast, rep)
            order = epoch_order(len(train_t), opts.seed, epoch)
            rep.phase(f"epoch {epoch + 1}/{opts.epochs}" + (" (head only)" if head_only else ""), steps_per_epoch)
            if info["step"]:
                rep.advance(info["step"])
            run_loss = run_correct = run_n = 0.0
            t_epoch = time.perf_counter()
            net.train()
            if head_only:
                net.backbone.eval()
            while info["step"] < steps_per_epoch:
                step = info["step"]
                if stop.signum is not None:
                    save_progress()
                    run.set_stage("finetune", "interrupted")
                    raise Interrupted(
                        f"interrupted by {signal.Signals(stop.signum).name}; state saved. Resume with: "
                        f"edgemap finetune '{data}' --out '{run.path}' --resume"
                    )
                idx = order[step * opts.batch_size:(step + 1) * opts.batch_size]
                torch.manual_seed(step_seed(opts.seed, epoch, step))  # dropout / drop-connect
                gen = torch.Generator().manual_seed(step_seed(opts.seed, epoch, step) + 1)
                y = train_y[idx].to(device)
                f = lr_factor(info["global_step"], steps_per_epoch, opts.freeze_epochs, opts.epochs, opts.warmup_epochs)
                for g, base in zip(opt.param_groups, base_lrs):
                    g["lr"] = base * f * (0.0 if head_only and g.get("name") == "backbone" else 1.0)
                with autocast():
                    if head_only:
                        logits = net.classify(feats_cache[idx].to(device))
                    else:
                        x = net.normalize(train_t[idx].to(device)).contiguous(memory_format=mem_format)
                        if opts.augment:
                            x = augment(x, gen, opts.crop_scale, opts.flip)
                        logits = net.forward_normalized(x)
                    loss = loss_fn(logits.float(), y)
                if not torch.isfinite(loss):
                    run.set_stage("finetune", "failed", reason="non-finite loss")
                    raise TrainingError(
                        f"loss became {loss.item()} at epoch {epoch + 1} step {step}; the last good state is kept in "
                        f"{run.path / ckpt.STATE_FILE}. Lower --lr (now {opts.lr}) or use --precision fp32"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                n = len(idx)
                run_loss += loss.item() * n
                run_correct += (logits.argmax(1) == y).sum().item()
                run_n += n
                info["step"] += 1
                info["global_step"] += 1
                info["images_seen"] += n
                elapsed = time.perf_counter() - t_epoch
                rep.advance(1, loss=run_loss / run_n, acc=run_correct / run_n, ips=run_n / max(elapsed, 1e-9))
                due_steps = opts.checkpoint_every and info["global_step"] % opts.checkpoint_every == 0
                if due_steps or time.monotonic() - last_save > opts.checkpoint_seconds:
                    info["train_seconds"] += time.perf_counter() - t_epoch
                    t_epoch = time.perf_counter()
                    save_progress()
                    last_save = time.monotonic()
            info["train_seconds"] += time.perf_counter() - t_epoch
            # ---- end of epoch: validate, keep best, early stop ---------------------------
            # fp32, not autocast: model selection must see the accuracy the exported fp32 model will have
            val_loss, val_acc = _evaluate(net, val_t, val_y, opts.batch_size, device, mem_format, nullcontext, loss_fn)
            row = {
                "epoch": epoch + 1, "phase": "head" if head_only else "full",
                "train_loss": run_loss / max(run_n, 1), "train_acc": run_correct / max(run_n, 1),
                "val_loss": val_loss, "val_acc": val_acc,
                "lr": opt.param_groups[1]["lr"], "backbone_lr": opt.param_groups[0]["lr"],
                "images_per_s": info["images_seen"] / max(info["train_seconds"], 1e-9),
            }
            improved = val_acc > info["best_acc"] or (val_acc == info["best_acc"] and val_loss < info["best_loss"])
            if improved:
                info.update(best_acc=val_acc, best_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0)
                _save_weights(run, net, WEIGHTS_BEST, epoch + 1, val_acc)
            elif not head_only:
                info["bad_epochs"] += 1
            _append_metrics(run.path, row)
            rep.epoch_done(row)
            info["epoch"] += 1
            info["step"] = 0
            save_progress()
            last_save = time.monotonic()
            if not head_only and info["bad_epochs"] >= opts.patience and info["epoch"] < opts.epochs:
                stopped_early = True
                rep.message(f"early stop: no better val accuracy for {opts.patience} epochs")
                break

    _save_weights(run, net, WEIGHTS_LAST, info["epoch"], None)
    run.add_artifact("metrics", run.path / METRICS_FILE, stage="finetune", save=False)
    ips = info["images_seen"] / max(info["train_seconds"], 1e-9)
    best = {"epoch": info["best_epoch"], "val_accuracy": info["best_acc"], "val_loss": info["best_loss"]}
    run.data["metrics"]["finetune"] = {
        "best": best, "epochs_run": info["epoch"], "stopped_early": stopped_early,
        "train_images_per_second": ips, "autocast": str(amp).replace("torch.", "") if amp else "fp32",
        "channels_last": opts.channels_last, "device": str(device),
    }
    run.set_stage("finetune", "done", seconds=round(time.perf_counter() - t_start, 2))
    return FinetuneResult(
        run_dir=run.path, best_epoch=info["best_epoch"], best_val_accuracy=info["best_acc"], best_val_loss=info["best_loss"],
        epochs_run=info["epoch"], stopped_early=stopped_early, seconds=time.perf_counter() - t_start,
        images_per_second=ips, classes=scan.classes, counts=scan.counts(), skipped=list(scan.skipped),
        autocast=str(amp).replace("torch.", "") if amp else "fp32", channels_last=opts.channels_last, device=str(device),
    )


def _recalibrate_bn(net: ClassifierNet, x_u8: torch.Tensor, bs: int, device: torch.device, mem_format: Any,
                    autocast: Callable[[], Any], rep: _Reporter) -> None:
    """Re-estimate BatchNorm statistics on the training images (AdaBN) before the head phase.

    ImageNet statistics mis-normalise a new domain. Without this, the head learns on
    features normalised one way and, once the backbone thaws and BN switches to batch
    statistics, suddenly sees another: accuracy collapses for an epoch or two.
    """
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the whole pass
    net.train()
    rep.phase("re-estimating BatchNorm statistics", math.ceil(len(x_u8) / bs))
    with torch.no_grad(), autocast():
        for i in range(0, len(x_u8), bs):
            net.features(net.normalize(x_u8[i:i + bs].to(device)).contiguous(memory_format=mem_format))
            rep.advance(1)
    for m, mom in zip(bns, saved):
        m.momentum = mom


def _frozen_features(net: ClassifierNet, x_u8: torch.Tensor, bs: int, device: torch.device, mem_format: Any,
                     autocast: Callable[[], Any], rep: _Reporter) -> torch.Tensor:
    """Backbone features of every (un-augmented) training image, computed once."""
    net.eval()
    chunks = []
    rep.phase("caching frozen features", math.ceil(len(x_u8) / bs))
    with torch.inference_mode(), autocast():
        for i in range(0, len(x_u8), bs):
            x = net.normalize(x_u8[i:i + bs].to(device)).contiguous(memory_format=mem_format)
            chunks.append(net.features(x).float().cpu())
            rep.advance(1)
    return torch.cat(chunks)


def _evaluate(net: ClassifierNet, x_u8: torch.Tensor, y: torch.Tensor, bs: int, device: torch.device, mem_format: Any,
              autocast: Callable[[], Any], loss_fn: torch.nn.Module) -> tuple[float, float]:
    net.eval()
    total_loss = correct = 0.0
    with torch.inference_mode(), autocast():
        for i in range(0, len(x_u8), bs):
            x = net.normalize(x_u8[i:i + bs].to(device)).contiguous(memory_format=mem_format)
            logits = net.forward_normalized(x).float()
            yy = y[i:i + bs].to(device)
            total_loss += loss_fn(logits, yy).item() * len(yy)
            correct += (logits.argmax(1) == yy).sum().item()
    n = max(len(x_u8), 1)
    return total_loss / n, correct / n


def _save_weights(run: RunDir, net: ClassifierNet, key: str, epoch: int, val_acc: float | None) -> None:
    from safetensors.torch import save_file

    dest = run.path / "weights" / f"{key.split('_', 1)[1]}.safetensors"
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in net.state_dict().items()}
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp), metadata={"epoch": str(epoch), "backbone": run.backbone})
    run.add_artifact(key, dest, stage="finetune", epoch=epoch, val_accuracy=val_acc)


def _append_metrics(run_path: Path, row: dict[str, Any]) -> None:
    path = run_path / METRICS_FILE
    old = path.read_bytes() if path.exists() else b""
    atomic_write_bytes(path, old + (json.dumps(row) + "\n").encode())


def _truncate_metrics(run_path: Path, epochs_done: int) -> None:
    """On resume, drop metric lines of epochs the state file has not reached (a kill after the line was written)."""
    path = run_path / METRICS_FILE
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= epochs_done]
    if len(keep) != len(lines):
        atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())


def _open_for_resume(out: Path, given: dict[str, Any]) -> tuple[RunDir, FinetuneOptions, Any, Any]:
    from edgemap.errors import ManifestError

    if not out.is_dir():
        raise ResumeError(f"--resume: {out} does not exist; start a new run without --resume")
    try:
        run = RunDir.load(out)
    except ManifestError as e:
        raise ResumeError(f"--resume: {e}") from e
    if run.stage_done("finetune"):
        raise ResumeError(f"--resume: the run in {out} already finished; start a new run with another --out")
    tensors, meta = ckpt.read_state(out)
    stored = FinetuneOptions.from_dict(meta["info"]["options"])
    if meta["info"].get("backbone") != run.backbone:
        raise ResumeError(f"--resume: state file backbone {meta['info'].get('backbone')!r} differs from the manifest's {run.backbone!r}")
    # Options given now must agree with the run's, except those that do not change the result.
    free = {"epochs", "threads", "checkpoint_seconds", "checkpoint_every", "device"}
    stored_d = stored.to_dict()
    conflicts = [
        f"{k}: the run used {stored_d[k]!r}, given {v!r}"
        for k, v in given.items()
        if k not in free and k in stored_d and (list(v) if isinstance(v, tuple) else v) != stored_d[k]
    ]
    if conflicts:
        raise ResumeError(f"--resume: options differ from the run in {out}: " + "; ".join(conflicts))
    stored = dataclasses.replace(stored, **{k: v for k, v in given.items() if k in free})
    return run, stored, tensors, meta


def _check_compatible(run: RunDir, scan: Any, opts: FinetuneOptions) -> None:
    if scan.classes != run.classes:
        missing = sorted(set(run.classes) - set(scan.classes))
        extra = sorted(set(scan.classes) - set(run.classes))
        raise ResumeError(f"--resume: the dataset's classes differ from the run's (missing {missing}, extra {extra})")
    recorded = run.data.get("dataset", {}).get("fingerprint")
    if recorded and recorded != scan.fingerprint:
        raise DatasetError(
            f"--resume: dataset {scan.root} changed since the run started (fingerprint differs); resuming would not be exact. "
            "Start a new run with another --out"
        )
