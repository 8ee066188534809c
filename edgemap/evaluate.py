"""``edgemap eval``: accuracy of every runtime × precision on the same images.

Each image is decoded and resized once (``edgemap.runtime.preprocess``, the code the device
wheel runs) and the same uint8 batch goes to every runtime. PyTorch eager on the trained
weights (runtime ``torch``, fp32) is the reference: every row carries its top-1
``agreement`` with it and the largest logit difference from it.

Tolerance (``TOLERANCE``; a row outside it has ``within_tolerance = False``):

- fp32 on any runtime: disagreements with the reference ≤ max(1, 1 % of n) and accuracy
  within max(1/n, 1 point). Kernel order and OpenVINO's default bf16 compute on
  AMX/AVX512-BF16 CPUs only flip near-tie predictions.
- int8: disagreements ≤ max(2, 5 % of n) and accuracy within max(2/n, 2 points) of the
  reference (export's accuracy gate already bounds the int8 drop on the validation set).
"""

from __future__ import annotations

import hashlib
import math
import shlex
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemap.errors import (
    DatasetError,
    EdgemapError,
    ManifestError,
    ModelFormatError,
    OptionError,
    RuntimeUnavailableError,
)
from edgemap.manifest import RunDir, fresh_run, hand_back, now_iso, run_lock
from edgemap.options import normalize
from edgemap.runtime.sessions import engine_errors

REFERENCE = "torch"
ALL_RUNTIMES = ("torch", "cpu", "cuda", "tensorrt", "openvino")
#: precision → (max disagreement fraction, min disagreements allowed, max |accuracy diff|, min in samples)
TOLERANCE: dict[str, tuple[float, int, float, int]] = {"fp32": (0.01, 1, 0.01, 1), "int8": (0.05, 2, 0.02, 2)}


@dataclass(frozen=True)
class EvalOptions:
    """Options of ``edgemap eval`` (the single home of their defaults).

    Attributes:
        data: dataset folder to evaluate on; None = the run's test split, else its validation split.
        runtimes: runtimes to evaluate (``torch`` is the fp32 reference; ``openvino:GPU`` accepted).
        precisions: ``fp32`` and/or ``int8``.
        strict: raise when a combination is unavailable or fails instead of listing it.
        batch: images per inference call.
        threads: intra-op threads (None = physical cores).
        save: store the rows in the run's edgemap.json under ``metrics.eval``.
        exact: OpenVINO precision (see SessionOptions.exact): None = f32 for fp32 models and
            OpenVINO's default for int8 ones, as the wheel deploys them; False = its bf16 default.
        max_pixels: decompression-bomb limit per image; None = the limit the run was trained
            with (its recorded scan options), so images training accepted are accepted here.
        skip_bad: with ``data``: skip (and count) undecodable images instead of failing.
        known_classes_only: with ``data``: leave out (and count) the images of classes the run does not know
            (a class added since it was trained), so runs of other class lists compare on the classes they share.
    """

    data: Path | None = None
    runtimes: tuple[str, ...] = ("torch", "cpu", "cuda", "openvino")
    precisions: tuple[str, ...] = ("fp32", "int8")
    strict: bool = False
    batch: int = 32
    threads: int | None = None
    save: bool = True
    exact: bool | None = None
    max_pixels: int | None = None
    skip_bad: bool = False
    known_classes_only: bool = False

    def __post_init__(self) -> None:
        normalize(self, names=("runtimes", "precisions"), counts={"batch": 1, "max_pixels": 1},
                  flags={"batch": "EvalOptions.batch"})
        _combos(self.runtimes, self.precisions)  # unknown names when the options are made, not when eval starts
        if self.skip_bad and self.data is None:  # was checked by the CLI only: from Python it was ignored
            raise DatasetError("--skip-bad goes with --data: the run's own dataset is read with the skips recorded "
                               "at training")
        if self.known_classes_only and self.data is None:
            raise DatasetError("--known-classes-only goes with --data: the run's own dataset holds its classes")


@dataclass
class EvalRow:
    """One runtime × precision. ``status`` is ``ok``, ``unavailable`` or ``error`` (+ ``reason``)."""

    runtime: str
    precision: str
    status: str = "ok"
    reason: str = ""
    n: int = 0
    accuracy: float | None = None
    top5: float | None = None
    macro_precision: float | None = None
    macro_recall: float | None = None
    macro_f1: float | None = None
    agreement: float | None = None
    max_abs_diff: float | None = None
    within_tolerance: bool | None = None
    provider: str = ""
    model: str = ""
    model_sha256: str = ""  # of the model (or weights) measured: tells results of a later-replaced model
    seconds: float | None = None
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    """Rows of one ``evaluate`` call plus what they were measured on."""

    rows: list[EvalRow]
    classes: list[str]
    data: str
    n: int
    notes: list[str] = field(default_factory=list)  # e.g. why agreement is blank
    own_data: bool = False  # measured on the run's own held-out split (not a --data folder)
    images_sha256: str = ""  # of the decoded images and their labels: stored rows are merged only on the same ones

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "n": self.n, "classes": self.classes, "rows": [r.to_dict() for r in self.rows],
                "notes": list(self.notes), "own_data": self.own_data, "images_sha256": self.images_sha256}


# ---- torch reference runtime ------------------------------------------------------------
class TorchSession:
    """PyTorch eager on the run's trained weights, with the runtime Session's interface."""

    def __init__(self, run: RunDir, threads: int | None = None):
        import torch

        from edgemap.model import load_classifier
        from edgemap.runtime.sessions import physical_cores

        self.threads = threads or physical_cores()
        self._prev_threads = torch.get_num_threads()
        t0 = time.perf_counter()
        self.net = load_classifier(run)
        self.load_ms = (time.perf_counter() - t0) * 1000
        self.path = run.artifact_path("weights_best", verify=False)
        self.providers_in_use = [f"torch {torch.__version__.split('+')[0]} eager:CPU"]
        self.precision_in_use = "fp32"
        self._torch = torch

    @property
    def provider(self) -> str:
        return f"{self.providers_in_use[0]} (fp32)"

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with engine_errors(REFERENCE, len(batch)), torch.inference_mode():
            return self.net(torch.from_numpy(np.ascontiguousarray(batch))).float().numpy()

    def close(self) -> None:
        """Give torch back the thread count it had (it is process-wide)."""
        self._torch.set_num_threads(self._prev_threads)


def open_session(
    run: RunDir, runtime: str, precision: str, threads: int | None, hint: str = "latency", exact: bool | None = None,
    batch: int | None = None,
) -> Any:
    """A loaded session for ``runtime`` × ``precision`` on the run's matching artifact.

    ``exact`` makes OpenVINO compute in f32 instead of its bf16 default on bf16-capable CPUs;
    ``batch`` fixes the batch size (OpenVINO compiles static shapes).

    Raises RuntimeUnavailableError (with the reason) for any combination that cannot run here.
    """
    from edgemap.artifacts import key_for, model_run_mismatch
    from edgemap.runtime.sessions import SessionOptions, available, check_precision, load, parse_runtime

    if runtime == REFERENCE:
        if precision != "fp32":
            raise RuntimeUnavailableError("torch is the fp32 reference; int8 runs on cpu/openvino/tensorrt")
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise RuntimeUnavailableError("package torch is not installed") from e
        exported = run.path / run.artifacts.get("onnx_fp32", {}).get("path", "model.onnx")
        mismatch = model_run_mismatch(run, exported) if "onnx_fp32" in run.artifacts and exported.is_file() else None
        if mismatch:  # the reference would run with the edited classes/preprocessing and pass as a good row
            raise ModelFormatError(mismatch)
        return TorchSession(run, threads)
    info, _ = parse_runtime(runtime)
    ok, why = check_precision(info, precision)
    if not ok:
        raise RuntimeUnavailableError(why)
    ok, why = available(runtime)
    if not ok:
        raise RuntimeUnavailableError(why)
    key = key_for(runtime, precision)
    if key not in run.artifacts:
        flag = " --int8" if precision == "int8" else ""
        raise RuntimeUnavailableError(f"no '{key}' artifact in {run.path}; run `edgemap export {shlex.quote(str(run.path))}{flag}` first")
    path, data = run.artifact_bytes(key)  # refuses a file whose sha256 changed; these bytes are what runs
    mismatch = model_run_mismatch(run, path, data)
    if mismatch:
        raise ModelFormatError(mismatch)
    return load(path, runtime, SessionOptions(threads=threads, hint=hint, exact=exact, batch=batch), data=data)


def _row_error(runtime: str, precision: str, e: Exception) -> EvalRow:
    status = "unavailable" if isinstance(e, RuntimeUnavailableError) else "error"
    return EvalRow(runtime, precision, status=status, reason=str(e))


def _combos(runtimes: tuple[str, ...], precisions: tuple[str, ...]) -> list[tuple[str, str]]:
    """Reference first, then the asked order; every pair once. Unknown names are refused here, before anything runs."""
    from edgemap.runtime.sessions import parse_runtime

    if not runtimes:
        raise OptionError("--runtime is empty; name at least one of " + ", ".join(ALL_RUNTIMES))
    for p in precisions:
        if p not in ("fp32", "int8"):
            raise OptionError(f"--precision {p!r} is unknown; use fp32 and/or int8")
    if not precisions:
        raise OptionError("--precision is empty; use fp32 and/or int8")
    names = []
    for r in runtimes:
        name, colon, device = r.strip().partition(":")
        if name.lower() != REFERENCE or colon:
            try:
                parse_runtime(r)
            except OptionError:
                raise OptionError(
                    f"--runtime {r.strip()!r} is unknown; choose from {', '.join(ALL_RUNTIMES)} (openvino:DEVICE for "
                    "another OpenVINO device, e.g. openvino:GPU)") from None
        names.append(normal_runtime(r))  # openvino:cpu, openvino:CPU and openvino: one row
    rts = sorted(dict.fromkeys(names), key=lambda r: r != REFERENCE)
    combos = [(r, p) for r in rts for p in dict.fromkeys(precisions) if not (r == REFERENCE and p != "fp32")]
    if not combos:
        raise OptionError(f"nothing to run: {REFERENCE} is the fp32 reference (it has no int8 model); "
                                      "add --precision fp32 or another --runtime")
    return combos


def refuse_older_models(run: RunDir, runtimes: tuple[str, ...]) -> None:
    """Refuse measuring exported models made from other weights than the run's (fine-tuned again since).

    Each ONNX row would fail with the same reason; this says it once, before any work (ManifestError, exit 2).
    """
    if "onnx_fp32" in run.artifacts and any(r.strip().lower() != REFERENCE for r in runtimes):
        run.artifact_path("onnx_fp32", verify=False)


def kept_rows(previous: Any, new: dict[str, Any], key: tuple[str, ...], same: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of the stored ``previous`` result that ``new`` did not measure again, when both were measured alike
    (``same`` fields equal: the same images, the same threads): `eval --runtime openvino` after a full eval kept
    only the openvino rows, and the model card lost the runtime the wheel ships."""
    # a field the stored result lacks (stored by an older edgemap: images_sha256) is not compared
    if not isinstance(previous, dict) or any(previous.get(f) != new.get(f) for f in same if f in previous):
        return []
    done = {_row_key(r, key) for r in new["rows"]}
    return [r for r in previous.get("rows", []) if isinstance(r, dict) and r.get("status") == "ok"  # what ran only
            and _row_key(r, key) not in done]


def merged_rows(kept: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kept rows and new ones, the PyTorch reference first (then in runtime order)."""
    return sorted(kept + new, key=lambda r: (r.get("runtime") != REFERENCE, ALL_RUNTIMES.index(
        str(r.get("runtime", "")).split(":")[0]) if str(r.get("runtime", "")).split(":")[0] in ALL_RUNTIMES else 99))


def _row_key(row: dict[str, Any], key: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(normal_runtime(str(row.get(k, ""))) if k == "runtime" else row.get(k) for k in key)


def normal_runtime(spec: str) -> str:
    """One name per runtime: ``openvino:cpu`` and ``openvino:CPU`` are ``openvino`` (CPU is its default device)."""
    name, colon, device = spec.strip().partition(":")
    name, device = name.lower(), device.upper()
    if not device or (name == "openvino" and device == "CPU"):  # "cpu:", "openvino:", "openvino:CPU"
        return name
    return name + colon + device


def strict_failure(bad: list[tuple[str, str, str]]) -> EdgemapError:
    """``--strict``'s error for rows that did not run, given as (label, status, reason); one reason is said once.
    A RuntimeUnavailableError only when every one is unavailable here: a row that failed (out of memory, a missing
    model) is not something a sweep that skips unavailable runtimes may skip."""
    groups: dict[tuple[str, str], list[str]] = {}
    for label, status, reason in bad:
        groups.setdefault((status, reason), []).append(label)
    text = "--strict: " + "; ".join(f"{', '.join(labels)} {status}: {reason}" for (status, reason), labels in groups.items())
    return RuntimeUnavailableError(text) if all(status == "unavailable" for _, status, _ in bad) else EdgemapError(text)


def store_rows(run: RunDir, stage: str, new: dict[str, Any], keys: tuple[str, ...], same: tuple[str, ...],
               result: object = None) -> None:
    """Save ``new`` (its ``rows`` measured now) as ``metrics.<stage>``, keeping the stored rows of other
    ``keys`` measured on the same ``same`` fields; the model card and the report show them, so package and
    report are outdated. Shared by eval and bench.

    Raises:
        ResultsNotStored: the run's disk is full (or read-only); it carries ``result``, what was measured.
    """
    import errno

    from edgemap.errors import ResultsNotStored
    from edgemap.fsutil import remove_stale_temps

    remove_stale_temps(run.path)  # a kill -9 while an earlier eval or bench saved (the run lock is held here)
    new = {**new, "rows": merged_rows(kept_rows(run.data.get("metrics", {}).get(stage), new, keys, same=same), new["rows"])}
    run.data.setdefault("metrics", {})[stage] = {"updated": now_iso(), **new}
    run.outdate(("package", "report"), f"{stage} results changed", save=False)
    try:
        run.save()
    except OSError as e:  # minutes of measuring were lost with the save: the results go back to the caller
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise ResultsNotStored(e, result) from e
        raise


def nothing_ran(statuses: list[str], what: str, reasons: list[str] | None = None) -> str | None:
    """The error for a command none of whose rows ran (its earlier results are kept), else None. ``reasons``: said
    in the error itself, when no table shows them (``--json -``, ``edgemap run``)."""
    if statuses and "ok" not in statuses:
        why = "; ".join(dict.fromkeys(reasons)) if reasons else "see the table"
        return (f"no runtime ran ({', '.join(sorted(set(statuses)))}: {why}): the {what} results stored "
                "earlier in edgemap.json are kept")
    return None


def _within(precision: str, n: int, agreement: float, acc: float, ref_acc: float) -> bool:
    frac, min_dis, acc_tol, min_acc = TOLERANCE[precision]
    disagreements = round((1.0 - agreement) * n)
    return disagreements <= max(min_dis, math.floor(frac * n)) and abs(acc - ref_acc) <= max(min_acc / max(n, 1), acc_tol) + 1e-9


def evaluate_arrays(
    run: RunDir, images: np.ndarray, labels: np.ndarray, opts: EvalOptions = EvalOptions(), data: str = "<arrays>",
    own_data: bool = False,
) -> EvalResult:
    """Evaluate already-preprocessed uint8 (N, H, W, 3) images with labels in the run's class order.

    Example:
        >>> res = evaluate_arrays(RunDir.load("models/digits"), x, y, EvalOptions(runtimes=("torch", "cpu")))
    """
    # saving: hold the run directory like `evaluate` (it wrote edgemap.json while another command held it)
    with run_lock(run.path, "eval") if opts.save else nullcontext():
        # what is on disk now: a RunDir loaded earlier would save its old records over a later export's, or (not
        # saving) refuse the models exported since as "changed"
        now = fresh_run(run)
        try:
            return _evaluate_arrays(now, images, labels, opts, data, own_data)
        finally:
            if opts.save:  # what it stored; a read-only evaluation leaves the caller's object (and its edits) alone
                hand_back(run, now)


def _evaluate_arrays(run: RunDir, images: np.ndarray, labels: np.ndarray, opts: EvalOptions, data: str,
                     own_data: bool = False) -> EvalResult:
    from edgemap.artifacts import recorded_sha256
    from edgemap.metrics import agreement, classification_report

    classes = run.classes
    c = run.contract
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (c.height, c.width, 3):
        raise DatasetError(f"images must be uint8 (N, {c.height}, {c.width}, 3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise DatasetError(f"{data}: no images to evaluate")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),) or (len(labels) and not 0 <= labels.min() <= labels.max() < len(classes)):
        raise DatasetError(f"{data}: labels must be {len(images)} class indices in 0..{len(classes) - 1} "
                           f"(one per image, in the run's class order), got shape {labels.shape}")

    rows: list[EvalRow] = []
    ref_logits: np.ndarray | None = None
    ref_acc = 0.0
    combos = _combos(opts.runtimes, opts.precisions)
    ref_shown = any(r == REFERENCE for r, _ in combos)
    if not ref_shown:  # the reference still runs (agreement needs it) but gets no row
        combos.insert(0, (REFERENCE, "fp32"))
    notes: list[str] = []
    for runtime, precision in combos:
        shown = runtime != REFERENCE or ref_shown
        try:
            sess = open_session(run, runtime, precision, opts.threads, exact=opts.exact)
            t0 = time.perf_counter()
            try:
                logits = np.concatenate([sess.run(images[i : i + opts.batch]) for i in range(0, len(images), opts.batch)])
            finally:
                getattr(sess, "close", lambda: None)()
            seconds = time.perf_counter() - t0
        except (EdgemapError, OSError) as e:
            if runtime == REFERENCE and not shown:  # only needed for agreement: say why that column is blank
                notes.append(f"agreement with PyTorch not computed: the {REFERENCE} reference could not run ({e})")
                continue
            rows.append(_row_error(runtime, precision, e))
            continue
        if logits.shape != (len(images), len(classes)):
            rows.append(EvalRow(runtime, precision, status="error",
                                reason=f"model output {logits.shape} does not match {len(classes)} classes"))
            continue
        rep = classification_report(labels, logits, classes)
        row = EvalRow(
            runtime, precision, n=rep.n, accuracy=rep.accuracy, top5=rep.top5,
            macro_precision=rep.macro_precision, macro_recall=rep.macro_recall, macro_f1=rep.macro_f1,
            provider=sess.provider, model=Path(sess.path).name, model_sha256=recorded_sha256(run, sess.path),
            seconds=round(seconds, 4),
            per_class=rep.per_class, confusion=rep.confusion,
        )
        if runtime == REFERENCE:
            ref_logits, ref_acc = logits, rep.accuracy
        if ref_logits is not None:
            row.agreement = agreement(ref_logits.argmax(1), logits.argmax(1))
            row.max_abs_diff = float(np.abs(ref_logits - logits).max())
            row.within_tolerance = _within(precision, rep.n, row.agreement, rep.accuracy, ref_acc)
        if shown:
            rows.append(row)
    if opts.strict:
        bad = [r for r in rows if r.status != "ok"]
        if bad:
            raise strict_failure([(f"{r.runtime}/{r.precision}", r.status, r.reason) for r in bad])
    digest = hashlib.sha256(np.ascontiguousarray(images).data)
    digest.update(labels.astype("<i8").tobytes())
    result = EvalResult(rows=rows, classes=classes, data=data, n=int(len(images)), notes=notes, own_data=own_data,
                        images_sha256=digest.hexdigest())
    if opts.save and not nothing_ran([r.status for r in rows], "eval"):
        before = run.data.get("metrics", {}).get("eval")
        other = isinstance(before, dict) and (before.get("data") not in (None, data) or before.get("images_sha256")
                                              not in (None, result.images_sha256))
        if other:  # the card and report show the latest
            same_name = before.get("data") == data
            result.notes.append(
                f"the stored results on {before.get('data')}{' (other images then)' if same_name else ''} were replaced "
                "by these; `edgemap package` and `edgemap "
                "report` show these now" + ("" if own_data else
                f" (`edgemap run` measures the run's own held-out split again before it packages, and so does "
                f"`edgemap eval {shlex.quote(str(run.path))}`, while that dataset is unchanged; `--no-save` "
                "measures without replacing them)"))
        store_rows(run, "eval", result.to_dict(), ("runtime", "precision"), same=("data", "n", "images_sha256"),
                   result=result)
    return result


def _split_samples(scan: Any) -> tuple[list[Any], str]:
    """The samples eval uses from the run's own dataset: its test split, else its validation split."""
    if scan.test:
        return list(scan.test), "test"
    if scan.val:
        return list(scan.val), "val"
    raise DatasetError(f"{scan.root}: neither a test nor a validation split to evaluate on; pass --data DIR")


def _has_training_images(run: RunDir, folder: Path) -> bool:
    """Whether ``folder`` (what ``--data`` listed) holds images of the run's training split."""
    recorded = str((run.data.get("dataset") or {}).get("root", ""))
    if not recorded:
        return False
    try:
        rel = folder.resolve().relative_to(Path(recorded).resolve())
    except ValueError:
        return False
    from edgemap.data.scan import _TEST_NAMES, _VAL_NAMES

    return not rel.parts or rel.parts[0].lower() not in (*_VAL_NAMES, *_TEST_NAMES)


def load_samples(run: RunDir, data: Path | None, max_pixels: int | None = None, skip_bad: bool = False,
                 known_classes_only: bool = False) -> tuple[list[Path], np.ndarray, str]:
    """Image paths and labels (in the run's class order) for ``evaluate``, plus a description.

    ``data`` is any folder of labelled images (:func:`edgemap.data.scan.scan_labelled`: its
    ``test/``, else ``val/``, else its class folders, one class is enough); without it the
    run's own dataset is re-checked and its test (else validation) split is used.
    """
    return _load_samples(run, data, max_pixels, skip_bad, known_classes_only)[:3]


def _load_samples(run: RunDir, data: Path | None, max_pixels: int | None = None, skip_bad: bool = False,
                  known_classes_only: bool = False) -> tuple[list[Path], np.ndarray, str, Any]:
    """:func:`load_samples`, and the rescan of the run's own dataset (None with ``data``)."""
    from edgemap.data import scan as scan_mod

    scan = None

    if data is not None:
        limit = max_pixels if max_pixels is not None else run.max_pixels
        found = scan_mod.scan_labelled(Path(data), scan_mod.ScanOptions(max_pixels=limit, skip_bad=skip_bad))
        where = str(data) + (f", {len(found.skipped)} unreadable skipped" if found.skipped else "")
        named, split = found.samples, found.part
        known = set(run.classes)
        unknown_here = sorted({name for _, name in named} - known)
        if unknown_here and known_classes_only:  # left out first: the overlap below counts the images scored
            left = sum(name not in known for _, name in named)
            named = [(p, name) for p, name in named if name in known]
            where += f", {left} image(s) of classes the run does not know left out ({', '.join(unknown_here)})"
            if not named:
                raise DatasetError(f"{where}: no images of the run's classes ({', '.join(run.classes)})")
        # shown in the table and on the model card: by content (a copy or a moved dataset), else by place
        trained_on = scan_mod.training_images_in(run.path, run.data.get("dataset") or {}, (p for p, _ in named))
        if trained_on:
            where += f", {trained_on} of {len(named)} images are training images (same bytes)"
        elif trained_on is None and _has_training_images(run, found.folder):
            where += ", the run's own dataset: training images included"
    else:
        if not run.data.get("dataset"):
            raise ManifestError(f"{run.manifest_path}: no dataset recorded; pass --data DIR")
        try:
            scan = scan_mod.rescan_for_run(run.data["dataset"])
        except DatasetError as e:
            raise DatasetError(f"{e}; or evaluate on another labelled folder: "
                               f"edgemap eval {shlex.quote(str(run.path))} --data FOLDER") from e
        where = str(scan.root)
        samples, split = _split_samples(scan)
        named = [(Path(s.path), scan.classes[int(s.label)]) for s in samples]
    index = {c: i for i, c in enumerate(run.classes)}
    unknown = sorted({name for _, name in named} - set(index))
    if unknown:
        raise DatasetError(
            f"{where}: classes not known to the run {run.path} ({', '.join(unknown)}); "
            f"the run knows: {', '.join(run.classes)}. Remove those folders, or give --known-classes-only to leave "
            "their images out (e.g. to compare runs trained on other class lists)"
        )
    paths = [p for p, _ in named]
    labels = np.asarray([index[name] for _, name in named], dtype=np.int64)
    return paths, labels, f"{where} ({split}, {len(paths)} image{'s' if len(paths) != 1 else ''})", scan


def evaluate(run_dir: str | Path | RunDir, opts: EvalOptions = EvalOptions()) -> EvalResult:
    """Evaluate every runtime × precision on the run's test (else validation) split or ``opts.data``.

    Args:
        run_dir: a run directory (or a loaded RunDir) with trained weights and exported models.
        opts: runtimes, precisions, data folder, strictness.

    Returns:
        EvalResult with one EvalRow per combination, the torch fp32 reference first.

    Example:
        >>> res = evaluate("models/digits", EvalOptions(runtimes=("torch", "cpu", "openvino")))
        >>> [(r.runtime, r.precision, r.accuracy, r.agreement) for r in res.rows]
    """
    from edgemap.runtime.preprocess import preprocess_batch

    # saving results into edgemap.json: hold the run directory (see manifest.run_lock)
    guard = run_lock(run_dir.path if isinstance(run_dir, RunDir) else Path(run_dir), "eval") if opts.save else nullcontext()
    with guard:
        run = fresh_run(run_dir)  # as it is now (see evaluate_arrays)
        refuse_older_models(run, opts.runtimes)
        paths, labels, where, scan = _load_samples(run, opts.data, opts.max_pixels, opts.skip_bad,
                                                   opts.known_classes_only)
        limit = opts.max_pixels if opts.max_pixels is not None else run.max_pixels
        images = preprocess_batch(paths, run.contract, limit)  # once, reused by every runtime
        before = {(r.get("runtime"), r.get("precision")) for r in _stored_rows(run)}
        try:
            result = evaluate_arrays(run, images, labels, opts, data=where, own_data=opts.data is None)
            measured = {(r.runtime, r.precision) for r in result.rows if r.status == "ok"}
            # recorded only when every row stored before was measured again: an eval of some rows (say fp32 only)
            # would leave the others lost, and `edgemap run` would take the new test split as scored
            if scan is not None and scan.test_changed and opts.save and before <= measured:
                _record_test_split(run, scan)
            return result
        finally:
            hand_back(run_dir, run)


def _stored_rows(run: RunDir) -> list[dict[str, Any]]:
    """The eval rows stored in the run that ran (status ok)."""
    stored = (run.data.get("metrics") or {}).get("eval")
    rows = stored.get("rows") if isinstance(stored, dict) else None
    return [r for r in rows or [] if isinstance(r, dict) and r.get("status", "ok") == "ok"]


def _record_test_split(run: RunDir, scan: Any) -> None:
    """The run's results are now on the test split as it is (new labelled images added since training): recorded
    as the run's dataset (training and validation were checked unchanged), so later commands do not warn again and
    `edgemap run` does not score it again."""
    now = fresh_run(run)
    now.data["dataset"].update(fingerprint=scan.fingerprint, content_fingerprint=scan.content_fingerprint(),
                               counts=scan.counts())
    now.save()
    hand_back(run, now)
