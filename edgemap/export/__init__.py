"""``edgemap export``: the trained run → ``model.onnx`` (+ int8 models), verified.

The exported graph takes what a device has after decode + resize, a uint8 RGB batch
``images`` of shape (N, H, W, 3) with a dynamic N, and returns float32 ``logits`` (N, C);
the cast, NHWC→NCHW transpose and mean/std normalisation are inside the graph. Class names,
the resize/crop rule and interpolation, the input/output spec and provenance (backbone,
run, package versions) are in ``metadata_props`` (keys in :mod:`edgemap.runtime.metadata`).

Steps, each recorded in ``edgemap.json``:

1. export with the TorchScript exporter (see :mod:`edgemap.export.onnx_export` for why),
   ``onnx.checker`` + an ONNX Runtime load (typed errors for an op unsupported at the
   opset and an IR version newer than the installed runtime); ``model.onnx`` is written
   atomically and only when its bytes change;
2. the parity check, always on (:mod:`edgemap.export.parity`) → ``metrics.parity``;
3. with ``int8``: calibration on training images, quantization, accuracy gate
   (:mod:`edgemap.export.quantize`) → ``metrics.int8_gate``.

Example:
    >>> from edgemap.export import ExportOptions, export
    >>> res = export("models/digits", ExportOptions(int8=True))
    >>> res.int8["qoperator"]
    PosixPath('models/digits/model.int8.qoperator.onnx')
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemap.errors import AccuracyGateError, ExportError, Interrupted, ParityError, QuantizationError
from edgemap.runtime.text import printable

log = logging.getLogger(__name__)

__all__ = ["ExportOptions", "ExportResult", "export"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """Options of ``edgemap export`` (the single home of their defaults).

    Attributes:
        opset: ONNX opset (int8 needs ≥ 13).
        int8: also write int8 models behind the accuracy gate.
        calib_size: calibration images (training split, stratified across classes).
        calib_method: minmax | entropy | percentile.
        max_drop: largest allowed int8 top-1 drop, in points, on the validation set.
        targets: runtimes to write int8 models for; None = every int8-capable runtime
            (``edgemap.artifacts.int8_targets()``) that is available on this machine.
        parity_atol, parity_rtol: parity tolerance on max |Δlogit| (atol + rtol·max|logit|).
        parity_batch: the odd batch size of the parity check.
        parity_runtimes: runtimes compared with PyTorch.
        gate_images: at most this many validation images (stratified) in the gate.
        calib_chunk: images per calibration pass (bounds histogram memory).
        threads: intra-op threads of the sessions used (None = physical cores).
        seed: seeds the stratified picks.
    """

    opset: int = 17
    int8: bool = False
    calib_size: int = 300
    calib_method: str = "minmax"
    max_drop: float = 1.0
    targets: tuple[str, ...] | None = None
    parity_atol: float = 1e-3
    parity_rtol: float = 1e-3
    parity_batch: int = 7
    parity_runtimes: tuple[str, ...] = ("cpu", "openvino")
    gate_images: int = 2000
    calib_chunk: int = 16
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from edgemap.options import normalize

        normalize(self, names=("targets", "parity_runtimes"),
                  whole=("opset", "calib_size", "parity_batch", "gate_images", "calib_chunk", "seed"),
                  reals=("max_drop", "parity_atol", "parity_rtol"))
        # names are checked when the options are made (a typo was found only when export started)
        from edgemap.export.calibration import METHODS
        from edgemap.runtime.errors import OptionError
        from edgemap.runtime.sessions import parse_runtime

        if self.calib_method not in METHODS:
            raise QuantizationError(f"--calib-method {self.calib_method!r} is not one of {', '.join(METHODS)}")
        # ranges of the API-only fields: a negative or nan tolerance failed a good model's parity (recorded as failed,
        # package then refused the run), calib_chunk 0 was a bare "No data is collected", -5 fed overlapping slices
        for name in ("parity_atol", "parity_rtol"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ExportError(f"{name} must be a finite number >= 0, got {v}")
        for name in ("calib_chunk", "gate_images"):
            if getattr(self, name) < 1:
                raise ExportError(f"{name} must be at least 1, got {getattr(self, name)}")
        for option, names, error in (("--targets", self.targets or (), QuantizationError),
                                     ("parity_runtimes", self.parity_runtimes, ExportError)):
            for name in names:
                try:
                    parse_runtime(name)
                except OptionError as e:
                    raise error(f"{option}: {e}") from None


@dataclass
class ExportResult:
    """What ``export`` wrote and measured."""

    run_dir: Path
    onnx_path: Path
    rewritten: bool  # False when model.onnx already had exactly these bytes
    parity: list[Any] = field(default_factory=list)  # ParityRow
    int8: dict[str, Path] = field(default_factory=dict)  # format -> written path
    gate: list[Any] = field(default_factory=list)  # GateAttempt, every format
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # things the user should know (the CLI prints them)
    retired: dict[str, str] = field(default_factory=dict)  # format -> int8 file of the previous model.onnx, now *.stale.onnx
    int8_unchanged: list[str] = field(default_factory=list)  # formats written again with the bytes they had

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, as ``edgemap export --json`` writes it."""
        from dataclasses import asdict

        return {
            "onnx": str(self.onnx_path), "rewritten": self.rewritten,
            "parity": [r.to_dict() for r in self.parity],
            "int8": {k: str(v) for k, v in self.int8.items()},
            "gate": [asdict(a) for a in self.gate], "warnings": self.warnings,
            "retired": dict(self.retired), "int8_unchanged": list(self.int8_unchanged), "seconds": round(self.seconds, 3),
        }


def _int8_plan(targets: tuple[str, ...] | None) -> dict[str, list[str]]:
    """format → target runtimes, validated against the capability table."""
    from edgemap.artifacts import int8_targets
    from edgemap.runtime.errors import OptionError
    from edgemap.runtime.sessions import available, parse_runtime

    table = int8_targets()
    # Default: every int8-capable runtime that can run here (cpu, openvino on a CPU machine);
    # name others (e.g. tensorrt for an S8 QDQ artifact) explicitly with --targets.
    names = [t for t in table if available(t)[0]] if targets is None else list(targets)
    if not names:
        raise QuantizationError("--targets is empty; name runtimes such as cpu,openvino")
    plan: dict[str, list[str]] = {}
    for t in names:
        try:
            info, _ = parse_runtime(t)
        except OptionError as e:
            raise QuantizationError(f"--targets: {e}") from e
        if info.name not in table:
            raise QuantizationError(
                f"--targets: runtime {info.name} has no int8 path (it runs fp32); choose from {', '.join(table)}"
            )
        if t.strip().lower() != info.name:  # openvino:GPU: the device was dropped and the gate ran on the CPU
            raise QuantizationError(
                f"--targets {t}: name runtimes ({', '.join(table)}), not devices: an int8 model is made for a "
                f"runtime and runs on any of its devices; choose the device when you run it "
                f"(edgemap eval RUN_DIR --runtime {t})")
        if info.name not in plan.get(table[info.name], []):  # cpu,cpu / openvino,openvino:GPU: one target
            plan.setdefault(table[info.name], []).append(info.name)
    return plan


def _check_options(opts: ExportOptions) -> dict[str, list[str]]:
    from edgemap.export.calibration import METHODS, MIN_CALIB_IMAGES
    from edgemap.export.onnx_export import MIN_INT8_OPSET, check_opset

    if opts.parity_batch < 2 or opts.parity_batch % 2 == 0:
        raise ExportError(f"parity_batch must be an odd number > 1, got {opts.parity_batch}")
    from edgemap.runtime.errors import OptionError
    from edgemap.runtime.sessions import parse_runtime

    if not opts.parity_runtimes:
        raise ExportError(f"parity_runtimes must name runtimes, e.g. ('cpu', 'openvino'); got {opts.parity_runtimes!r}")
    for rt in opts.parity_runtimes:
        try:
            parse_runtime(rt)
        except OptionError as e:
            raise ExportError(f"parity_runtimes: {e}") from None
    # the int8 options' values are checked without --int8 too (from Python, a typo passed unseen until int8 was on)
    if opts.calib_method not in METHODS:
        raise QuantizationError(f"--calib-method {opts.calib_method!r} is not one of {', '.join(METHODS)}")
    if opts.calib_size < MIN_CALIB_IMAGES:
        raise QuantizationError(
            f"--calib-size {opts.calib_size} is too small: int8 calibration needs at least {MIN_CALIB_IMAGES} images"
        )
    if not 0 <= opts.max_drop <= 100:  # inf was written into edgemap.json as Infinity, which is not JSON
        raise QuantizationError(f"--max-drop must be 0 to 100 points, got {opts.max_drop}")
    check_opset(opts.opset)  # `edgemap run --opset 99` is refused before fine-tuning, not after it
    if not opts.int8:
        return {}
    if opts.opset < MIN_INT8_OPSET:
        raise QuantizationError(f"--int8 needs --opset {MIN_INT8_OPSET} or newer (per-channel int8), got {opts.opset}; or "
                                "export fp32 only (no --int8; `edgemap run --no-int8`)")
    return _int8_plan(opts.targets)


def _dataset(run: Any, dataset: Any, data: str | Path | None = None) -> Any:
    if dataset is not None:
        return dataset
    if not run.data.get("dataset"):
        raise ExportError(f"{run.manifest_path}: no dataset recorded; export needs the run's validation images for the parity check")
    from edgemap.data.scan import rescan_for_run

    if data is None:
        from edgemap.errors import DatasetError

        root = run.data["dataset"].get("root")
        if isinstance(root, str) and not Path(root).is_dir():  # moved, or the run was copied to another machine
            raise DatasetError(f"{root}: the dataset this run was trained on is gone; restore it there (same files) "
                               f"to continue, or give its new place: add --data DIR to this command (edgemap export "
                               f"{shlex.quote(str(run.path))} ... --data DIR)")
        return rescan_for_run(run.data["dataset"])
    # the training dataset at another place (moved, or copied to this machine): the same files, or refused
    from edgemap.data.scan import record_at, relocated

    was = run.data["dataset"].get("root")
    moved = relocated(run.data["dataset"], data)
    scan = rescan_for_run(moved)
    if not was or os.path.realpath(was) != os.path.realpath(scan.root):  # realpath: no error on a symlink loop
        log.warning("--data: the dataset is now at %s (the same files as at %s); recorded", printable(str(scan.root)),
                    printable(str(was)))
        run.data["dataset"] = record_at(moved, scan)  # saved with the export's records
    return scan


def export(run_dir: Any, opts: ExportOptions | None = None, *, dataset: Any = None, progress: Progress | None = None,
           again: str | None = None, data: str | Path | None = None) -> ExportResult:
    """Export a trained run to ONNX, check parity, and (``opts.int8``) quantize behind the gate.

    Args:
        run_dir: a RunDir or its path (made by ``edgemap finetune``).
        opts: options (defaults: opset 17, fp32 only).
        dataset: override the run's recorded dataset (an object with ``.train`` and
            ``.val`` lists of samples having ``.path`` and ``.label``); default: rescan it.
        progress: called with a short text before each step (the CLI shows it).
        again: what an interrupt's message tells to do (default: run this export again; `edgemap run` names itself).
        data: where the run's training dataset is now (moved or copied: the same files, checked by fingerprint;
            the new place is recorded); default: where it was trained.

    Returns:
        ExportResult with the paths written, the parity table and every gate attempt.

    Raises:
        ExportError: no trained weights, op unsupported at the opset, IR version too new.
        ParityError: a runtime's logits differ from PyTorch (lists every failure).
        QuantizationError: calibration set empty or too small, bad int8 options.
        AccuracyGateError: no int8 attempt within ``max_drop`` (``.attempts`` is the table).

    Example:
        >>> res = export("models/digits", ExportOptions(int8=True, targets=("cpu",)))
    """
    from edgemap.manifest import RunDir, fresh_run, hand_back, run_lock

    t_start = time.perf_counter()
    opts = opts or ExportOptions()
    plan = _check_options(opts)
    with run_lock(run_dir.path if isinstance(run_dir, RunDir) else Path(run_dir), "export"):
        run = fresh_run(run_dir)  # as it is now: a caller's RunDir may predate an eval or bench that saved since
        try:
            result = _export_locked(run, opts, plan, dataset, progress or (lambda _msg: None), again, data)
        finally:
            hand_back(run_dir, run)
    result.seconds = time.perf_counter() - t_start
    return result


def _export_locked(run: Any, opts: ExportOptions, plan: dict[str, list[str]], dataset: Any, say: Progress,
                   again: str | None = None, data: str | Path | None = None) -> ExportResult:
    _remove_leftovers(run.path)
    if "weights_best" not in run.artifacts:
        raise ExportError(f"{run.path}: no trained weights ('weights_best') recorded; run `edgemap finetune` first")
    warnings: list[str] = []
    ft = run.data["stages"].get("finetune", {})
    if ft.get("status") != "done":
        best = run.artifacts["weights_best"]
        warnings.append(
            f"fine-tuning did not finish (status {ft.get('status', 'unknown')!r}); exporting the best weights so far "
            f"(epoch {best.get('epoch', '?')}, val accuracy {best.get('val_accuracy', '?')}). "
            f"Finish it with `edgemap finetune DATA --out {shlex.quote(str(run.path))} --resume`, then export again"
        )
    ds = _dataset(run, dataset, data)
    from edgemap.export.calibration import load_images, select_calibration, stratified

    calib = select_calibration(list(ds.train), opts.calib_size, opts.seed) if opts.int8 else []
    if opts.int8 and len(calib) < opts.calib_size:
        warnings.append(f"calibrated on all {len(calib)} training images (--calib-size {opts.calib_size} asks for more)")
    parity_samples = stratified(list(ds.val), opts.parity_batch, opts.seed)
    if not parity_samples:  # an input problem (exit 2), not a failed check
        raise ExportError(f"{run.path}: the validation split is empty; the parity check needs validation images")

    say("loading the trained model")
    from edgemap.model import load_classifier

    net = load_classifier(run)
    images = load_images(parity_samples, run.contract, run.max_pixels)
    onnx_path, rewritten, rows = _export_fp32(run, net, images, opts, say)
    result = ExportResult(run.path, onnx_path, rewritten, parity=rows, warnings=warnings)
    if rewritten:
        result.retired = _retire_stale_int8(run, onnx_path)
    before = {k: v.get("sha256") for k, v in run.artifacts.items() if k.startswith("onnx_int8_")}
    try:
        if opts.int8:
            _int8(run, onnx_path, calib, list(ds.val), plan, opts, result, say)
    except AccuracyGateError as e:
        run.set_stage("export", "failed", save=False, reason="int8 accuracy gate")
        e.result = result  # type: ignore[attr-defined] # what was written before the gate failed (--json)
        raise
    except KeyboardInterrupt as e:
        if not result.rewritten:
            raise  # model.onnx and its int8 models are as they were
        # the new model.onnx is recorded and the old int8 models are retired: the export is half done, say so
        name = e.args[0] if e.args else "SIGINT"
        run.set_stage("export", "interrupted", save=False, reason=f"{name} during int8 quantization")
        gone = sorted(name for fmt, name in result.retired.items() if fmt not in result.int8)
        retired = (f"the int8 models of the previous one are retired ({', '.join(gone)} → *.stale.onnx); "
                   if gone else "")
        made = f"{', '.join(p.name for p in result.int8.values())} made, the others not" if result.int8 else \
            "the new int8 models were not made"
        err = Interrupted(f"interrupted by {name} during int8 quantization: model.onnx is new and recorded; {retired}"
                          f"{made}; " + (again or f"run `edgemap export {shlex.quote(str(run.path))} --int8` again"))
        err.exit_code = 143 if name == "SIGTERM" else 130
        raise err from None
    finally:
        warnings.extend(_retired_notes(run, result, opts))
        from edgemap.artifacts import int8_key

        result.int8_unchanged = [f for f in result.int8
                                 if before.get(int8_key(f)) == (run.artifacts.get(int8_key(f)) or {}).get("sha256")]
        # eval, bench, package, report saw the old models (not when every model came out with the bytes it had)
        if result.rewritten or len(result.int8_unchanged) < len(result.int8):
            run.outdate_after("export", "export wrote new models", save=False)
        run.save()
    run.set_stage("export", "done", int8=opts.int8 or _has_int8(run))
    return result


def _has_int8(run: Any) -> bool:
    return any(k.startswith("onnx_int8_") for k in run.artifacts)


def _remove_leftovers(run_path: Path) -> None:
    """Temp files and work folders a killed export left behind (never artifacts: not in the manifest)."""
    from edgemap.fsutil import remove_stale_temps

    remove_stale_temps(run_path)
    for work in run_path.glob(".export-work-*"):
        shutil.rmtree(work, ignore_errors=True)


def _export_fp32(run: Any, net: Any, images: Any, opts: ExportOptions, say: Progress) -> tuple[Path, bool, list[Any]]:
    """Write model.onnx if its bytes change, after it passed the checker and the parity check.

    A new model that fails parity never replaces the recorded one: it is kept as
    ``model.rejected.onnx`` (not recorded) and ``metrics.parity_rejected`` holds its table;
    ``metrics.parity`` always describes the recorded ``model.onnx``.
    """
    from edgemap.artifacts import FILENAMES, ONNX_FP32
    from edgemap.export.onnx_export import build_metadata, check_model, finalize_bytes, io_spec, torch_to_onnx_bytes
    from edgemap.fsutil import atomic_write_bytes

    c = run.contract
    say(f"exporting ONNX (opset {opts.opset})")
    data = finalize_bytes(torch_to_onnx_bytes(net, c.height, c.width, opts.opset), build_metadata(run, "fp32", "fp32"))
    dest = run.path / FILENAMES[ONNX_FP32]
    rewritten = not (dest.is_file() and same_model(dest.read_bytes(), data))
    inp, out = io_spec(c.height, c.width, len(run.classes))
    meta = dict(opset=opts.opset, input=inp, output=out, precision="fp32", format="fp32",
                exporter="torch.onnx.export(dynamo=False)", weights_sha256=run.artifacts["weights_best"]["sha256"])
    if not rewritten:
        check_model(dest, opts.opset)
        rows = _parity(run, net, dest, images, opts, say, rejected=False)
        run.add_artifact(ONNX_FP32, dest, stage="export", **meta)
        return dest, False, rows
    try:
        with run.write_artifact(ONNX_FP32, dest, stage="export", **meta) as tmp:
            tmp.write_bytes(data)
            check_model(tmp, opts.opset, name=dest.name)  # a model that fails here never replaces a good one
            rows = _parity(run, net, tmp, images, opts, say, rejected=True)
    except ParityError as e:
        kept = run.path / "model.rejected.onnx"
        atomic_write_bytes(kept, data)
        had = "the previous model.onnx is kept" if run.has_artifact(ONNX_FP32) else "no model.onnx was recorded"
        err = ParityError(f"{e}; {had}, the failing model is {kept.name} (not recorded) for inspection")
        err.rows = getattr(e, "rows", [])  # type: ignore[attr-defined]
        raise err from None
    run.data.get("metrics", {}).pop("parity_rejected", None)
    _remove_superseded(run.path / "model.rejected.onnx")  # superseded: a new model.onnx passed
    _record_parity(run, rows, opts, failed=False)
    return dest, True, rows


def same_model(old: bytes, new: bytes) -> bool:
    """Whether two exports are the same model: equal bytes, or equal but for the provenance metadata.

    The run folder's name and the package versions are provenance, not the model: a copied run
    directory (``cp -r``) or an upgraded Pillow re-exports the same graph, and rewriting model.onnx
    would retire int8 models that are still exactly right for it. Classes, preprocessing and
    every other key still count.
    """
    if old == new:
        return True
    import onnx

    from edgemap.runtime import metadata as md

    try:
        models = [onnx.load_from_string(b) for b in (old, new)]
    except Exception:  # noqa: BLE001 - an unreadable old file is simply different
        return False
    for m in models:
        kept = sorted((p.key, p.value) for p in m.metadata_props if p.key not in (md.RUN, md.VERSIONS))
        del m.metadata_props[:]
        for key, value in kept:
            m.metadata_props.add(key=key, value=value)
    return models[0].SerializeToString(deterministic=True) == models[1].SerializeToString(deterministic=True)


def _parity(run: Any, net: Any, path: Path, images: Any, opts: ExportOptions, say: Progress, rejected: bool) -> list[Any]:
    """Run the parity check on ``path``; on failure record it and re-raise (``rejected``: a new, unrecorded model)."""
    from edgemap.export.parity import check_parity

    say(f"parity check (PyTorch vs {', '.join(opts.parity_runtimes)}; batch 1 and {opts.parity_batch})")
    try:
        rows = check_parity(net, path, images, opts.parity_runtimes, opts.parity_batch,
                            opts.parity_atol, opts.parity_rtol, opts.threads, name="model.onnx")
    except ParityError as e:
        _record_parity(run, getattr(e, "rows", []), opts, failed=True, key="parity_rejected" if rejected else "parity")
        run.set_stage("export", "failed", reason="parity")
        raise
    if not rejected:
        _record_parity(run, rows, opts, failed=False)
    return rows


def _record_parity(run: Any, rows: list[Any], opts: ExportOptions, failed: bool, key: str = "parity") -> None:
    metrics = run.data.setdefault("metrics", {})
    metrics[key] = {
        "passed": not failed,
        "atol": opts.parity_atol,
        "rtol": opts.parity_rtol,
        "rows": [r.to_dict() for r in rows],
    }
    run.save()


def _remove_superseded(path: Path) -> None:
    """Delete a kept ``*.rejected.onnx``/``*.stale.onnx`` (a link: the link only); anything else there is left."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _retire_stale_int8(run: Any, onnx_path: Path) -> dict[str, str]:
    """int8 models quantized from an earlier model.onnx: unrecord them, rename them ``*.stale.onnx``.

    Returns format -> the file name they had.
    """
    from edgemap.fsutil import sha256_file

    sha = sha256_file(onnx_path)
    retired = {}
    for key in [k for k in run.artifacts if k.startswith("onnx_int8_")]:
        entry = run.artifacts[key]
        if entry.get("source_sha256") == sha:
            continue
        old = run._inside(entry["path"])  # refused when a symlinked folder leads outside the run directory
        del run.artifacts[key]
        if old.is_file():
            old.replace(old.with_name(old.name.removesuffix(".onnx") + ".stale.onnx"))
        retired[entry.get("format", key.removeprefix("onnx_int8_"))] = entry["path"]
    if retired:
        gate = run.data.get("metrics", {}).get("int8_gate", {})
        for fmt in retired:
            gate.pop(fmt, None)
        run.save()
    return retired


def _retired_notes(run: Any, result: ExportResult, opts: ExportOptions) -> list[str]:
    """What to tell about retired int8 models: nothing for a format this export wrote anew."""
    left = [name for fmt, name in result.retired.items() if fmt not in result.int8]
    if not left:
        return []
    again = "" if opts.int8 else f"; run `edgemap export {shlex.quote(str(run.path))} --int8` for int8 models of the new one"
    return [f"{', '.join(left)} {'were' if len(left) > 1 else 'was'} quantized from the previous model.onnx: no longer "
            f"recorded (renamed *.stale.onnx){again}"]


def _int8(run: Any, onnx_path: Path, calib: list[Any], val: list[Any], plan: dict[str, list[str]],
          opts: ExportOptions, result: ExportResult, say: Progress) -> None:
    import numpy as np

    from edgemap.export.calibration import load_images, stratified
    from edgemap.export.quantize import check_free_space, predict, prepare, run_gate
    from edgemap.fsutil import sha256_file

    gate_samples = stratified(val, opts.gate_images, opts.seed)
    if not gate_samples:
        raise QuantizationError(f"{run.path}: the validation split is empty; the int8 accuracy gate needs validation images")
    check_free_space(run.path, onnx_path)
    work = Path(tempfile.mkdtemp(prefix=".export-work-", dir=run.path))
    table: dict[str, Any] = {}
    failed: list[str] = []
    try:
        say("preparing the graph for quantization (quant_pre_process)")
        pre = prepare(onnx_path, work / "pre.onnx")
        say(f"fp32 reference predictions on {len(gate_samples)} validation images")
        images = load_images(gate_samples, run.contract, run.max_pixels)
        labels = np.array([int(s.label) for s in gate_samples])
        fp32_preds = predict(onnx_path, "cpu", images, opts.threads)
        caches: dict[tuple[str, bool], Path] = {}
        calib_paths = [s.path for s in calib]
        source_sha = sha256_file(onnx_path)
        for fmt, targets in plan.items():
            gate = run_gate(fmt, targets, pre, work, calib_paths, run.contract, opts.calib_method, images, labels,
                            fp32_preds, opts.max_drop, caches, opts.calib_chunk, opts.threads, say, run.max_pixels)
            result.gate.extend(gate.attempts)
            chosen = gate.attempts[gate.chosen] if gate.chosen is not None else None
            entry: dict[str, Any] = {"passed": gate.passed, "max_drop": opts.max_drop, "targets": targets,
                                     "attempts": [a.to_dict() for a in gate.attempts]}
            if gate.passed and chosen is not None and gate.path is not None:
                dest = _write_int8(run, gate.path, fmt, targets, chosen, len(calib), opts, source_sha)
                result.int8[fmt] = dest
                entry["artifact"] = dest.name
            elif gate.path is not None:
                rejected = _write_int8(run, gate.path, fmt, targets, chosen, len(calib), opts, source_sha, rejected=True)
                entry["rejected"] = rejected.name
                entry["rejected_attempt"] = chosen.attempt if chosen is not None else None  # the best (top-1, agreement)
                failed.append(fmt)
            table[fmt] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if table:
            _record_gate(run, table)
    if failed:
        attempts = [a for a in result.gate if a.format in failed]
        best = {f: next(a for a in table[f]["attempts"] if a["attempt"] == table[f].get("rejected_attempt"))
                if table[f].get("rejected_attempt") is not None else max(table[f]["attempts"], key=lambda a: a["top1_int8"])
                for f in failed}  # the attempt kept as *.rejected.onnx (ranked by top-1, then agreement)
        summary = "; ".join(f"{f}: best drop {b['drop_points']:.2f} points (attempt {b['attempt']})" for f, b in best.items())
        written = f"; {', '.join(result.int8)} passed and {'were' if len(result.int8) > 1 else 'was'} written" if result.int8 else ""
        fp32 = "model.onnx was re-exported (it passed parity)" if result.rewritten else "fp32 model.onnx is unchanged"
        if result.retired:
            fp32 += (f"; the int8 models of the previous model.onnx ({', '.join(result.retired.values())}) are no "
                     "longer recorded (renamed *.stale.onnx)")
        raise AccuracyGateError(
            f"int8 accuracy gate failed ({summary}) > --max-drop {opts.max_drop}; no {'/'.join(failed)} artifact was "
            f"replaced{written}; {fp32}; the best attempt is kept as "
            f"{', '.join(table[f]['rejected'] for f in failed)} for inspection. Try more/more varied calibration "
            "images (--calib-size), another --calib-method, or deploy fp32",
            attempts=attempts,
        )


def _record_gate(run: Any, table: dict[str, Any]) -> None:
    """``metrics.int8_gate`` describes the recorded int8 models (as ``metrics.parity`` does model.onnx).

    A format not attempted this time keeps its entry. A failed attempt whose format still has a
    recorded model (quantized earlier from this same model.onnx, still deployed by package) goes to
    ``metrics.int8_gate_rejected`` instead of hiding that model's passing entry.
    """
    metrics = run.data.setdefault("metrics", {})
    gate, rejected = dict(metrics.get("int8_gate", {})), dict(metrics.get("int8_gate_rejected", {}))
    for fmt, entry in table.items():
        if not entry["passed"] and f"onnx_int8_{fmt}" in run.artifacts:
            rejected[fmt] = entry
        else:
            gate[fmt] = entry
            rejected.pop(fmt, None)
    metrics["int8_gate"] = gate
    if rejected:
        metrics["int8_gate_rejected"] = rejected
    else:
        metrics.pop("int8_gate_rejected", None)
    run.save()


def _write_int8(run: Any, src: Path, fmt: str, targets: list[str], chosen: Any, n_calib: int,
                opts: ExportOptions, source_sha: str, rejected: bool = False) -> Path:
    import onnx

    from edgemap.artifacts import FILENAMES, int8_key
    from edgemap.export.onnx_export import build_metadata, set_metadata
    from edgemap.export.quantize import FORMATS
    from edgemap.fsutil import atomic_path

    spec = FORMATS[fmt]
    quant = {
        "activations": f"{spec.activation} {'symmetric' if spec.symmetric_activations else 'asymmetric'}",
        "weights": "int8 symmetric per-channel", "calib_method": chosen.method, "calib_images": n_calib,
        "excluded": chosen.excluded, "source_sha256": source_sha,
    }
    model = onnx.load(str(src))
    set_metadata(model, build_metadata(run, "int8", fmt, {"edgemap.quantization": json.dumps({"format": fmt, **quant})}))
    key = int8_key(fmt) if fmt in ("qoperator", "qdq") else f"onnx_int8_{fmt}"
    name = FILENAMES.get(key, f"model.int8.{fmt}.onnx")
    if rejected:
        name = name.replace(".onnx", ".rejected.onnx")
    dest = run.path / name
    if rejected:
        with atomic_path(dest) as tmp:
            onnx.save(model, str(tmp))
        return dest
    with run.write_artifact(key, dest, stage="export", save=False, precision="int8", format=fmt, runtimes=targets,
                            gate={"top1_fp32": chosen.top1_fp32, "top1_int8": chosen.top1_int8,
                                  "drop_points": chosen.drop_points, "agreement": chosen.agreement,
                                  "evaluated_on": chosen.runtime},
                            **quant) as tmp:
        onnx.save(model, str(tmp))
    for left in (name.replace(".onnx", ".rejected.onnx"), name.replace(".onnx", ".stale.onnx")):
        _remove_superseded(run.path / left)  # superseded by the model just written (kept until now to inspect)
    return dest
