"""Scan and validate a folder dataset before anything trains on it.

Accepted layouts (folder names matched case-insensitively)::

    DATA/train/<class>/...  +  DATA/val/<class>/...          layout "train/val"
    DATA/train/<class>/...  +  DATA/validation/<class>/...   layout "train/validation"
    DATA/train/<class>/...  +  DATA/valid/<class>/...        layout "train/valid"  (Roboflow-style exports)
    DATA/<class>/...                                         layout "split" (stratified val_split)

plus an optional ``DATA/test/<class>/...`` in every layout, kept aside (never used for
training, model selection or calibration). Images may sit in nested folders inside a
class folder. Every image is decoded fully with the runtime's own ``open_image`` (the
same code training, eval and the device wheel use), so a truncated or fake image fails
here with its name rather than mid-training. The dataset is only ever read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import sys
import unicodedata
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgemap.errors import DatasetError, ImageError, ManifestError
from edgemap.runtime.preprocess import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, is_hidden, open_image
from edgemap.runtime.text import has_control_chars

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetScan",
    "LabelledImages",
    "Sample",
    "ScanOptions",
    "is_hidden",
    "rescan_for_run",
    "scan_dataset",
    "scan_labelled",
]

log = logging.getLogger("edgemap.data")

#: Names that are never a class or a sample besides anything starting with ".".
_TRAIN_NAMES = ("train",)
_VAL_NAMES = ("val", "validation", "valid")
_TEST_NAMES = ("test",)
_ROOT_KEY = "."  # key in `ignored` for files lying directly in a split folder, outside any class


def ignored_text(ignored: dict[str, int], suffixes: dict[str, int] | None = None) -> str:
    """``{".": 1, "x": 2}`` → "3 file(s): 1 outside the class folders (no class: an image there is not used); 2 not
    read as images in class folders (x 2)" (a bare "." said nothing, and an image left beside the class folders was
    called a non-image file).

    ``suffixes`` (extension → count of the ignored files in class folders) adds which kinds they were, and what
    edgemap reads when some look like photos in a format it does not (40 .heic files were "40 non-image").
    """
    def listed(counts: dict[str, int], order: Any) -> str:
        ranked = sorted(counts.items(), key=order)
        return ", ".join(f"{k} {v}" for k, v in ranked[:_MAX_LISTED]) + (", …" if len(ranked) > _MAX_LISTED else "")

    parts = [f"{ignored[_ROOT_KEY]} outside the class folders (no class: an image there is not used)"] if _ROOT_KEY in ignored else []
    in_classes = {k: v for k, v in ignored.items() if k != _ROOT_KEY}
    if in_classes:
        kinds = f"; {listed(suffixes, lambda kv: (-kv[1], kv[0]))}" if suffixes else ""
        parts.append(f"{sum(in_classes.values())} not read as images in class folders "
                     f"({listed(in_classes, lambda kv: kv[0])}{kinds})")
    text = f"{sum(ignored.values())} file(s): " + "; ".join(parts)
    if suffixes and any(ext in _UNREAD_IMAGE_SUFFIXES for ext in suffixes):
        text += f"; only {', '.join(sorted(IMAGE_EXTENSIONS))} files are read: convert the others to use them"
    return text


#: photo formats people keep in datasets that Pillow (without plugins) does not decode
_UNREAD_IMAGE_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jxl", ".jp2", ".dng", ".cr2", ".cr3", ".nef", ".arw",
                                    ".raw", ".svg", ".psd", ".ico", ".ppm", ".pgm", ".pbm", ".tga", ".exr"})
_MAX_LISTED = 5  # bad files named in one error message
_PROGRESS_MIN = 200  # show a progress bar from this many files on (TTY only)


@dataclass(frozen=True)
class Sample:
    """One image of the dataset.

    Attributes:
        path: absolute path as found (symlinks followed for reading, path kept as listed).
        label: index into ``DatasetScan.classes``.
    """

    path: Path
    label: int


@dataclass(frozen=True)
class ScanOptions:
    """Options of :func:`scan_dataset` (the single home of their defaults).

    Attributes:
        val_split: share of each class held out for validation; only used for the
            single-folder layout ``DATA/<class>/...``.
        seed: seed of that stratified split.
        skip_bad: skip undecodable files (and list them in ``skipped``) instead of raising.
        max_pixels: decompression-bomb guard per image (``None``: Pillow's own limit only).
        min_val_per_class: validation must hold at least this many images of each class.
        workers: threads used to decode-check files.
    """

    val_split: float = 0.2
    seed: int = 0
    skip_bad: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    min_val_per_class: int = 1
    workers: int = 2
    #: which listing and split rules (recorded with the run, so that a run keeps the files it was made from):
    #: 1 = before session 10 (no .jfif/.jpe; copies split by path like any file), 2 = byte-identical copies on one
    #: side of the split, .jfif/.jpe read as images
    rule: int = 2

    def __post_init__(self) -> None:
        if self.rule not in (1, 2):
            raise DatasetError(f"dataset rule {self.rule!r} is newer than this edgemap understands (1 or 2); upgrade it")
        if not 0.0 <= self.val_split < 1.0:
            raise DatasetError(f"--val-split must be in [0, 1), got {self.val_split}")
        if self.min_val_per_class < 1:
            raise DatasetError(f"min_val_per_class must be at least 1, got {self.min_val_per_class}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise DatasetError(f"--max-pixels must be positive, got {self.max_pixels}")
        if self.workers < 1:
            raise DatasetError(f"workers must be at least 1, got {self.workers}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScanOptions:
        """Rebuild options recorded by :meth:`DatasetScan.to_manifest` (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{"rule": 1, **{k: v for k, v in d.items() if k in known}})  # no rule recorded: made before it


@dataclass
class DatasetScan:
    """The validated content of a dataset folder.

    Attributes:
        root: absolute dataset folder.
        layout: ``"train/val"``, ``"train/validation"``, ``"train/valid"`` or ``"split"``.
        classes: sorted class names; a class's index is its label.
        train, val, test: samples per split (``test`` from ``DATA/test/`` when present).
        skipped: ``(path, reason)`` of undecodable files skipped with ``skip_bad``.
        ignored: class -> number of non-image files ignored (``"."``: files of any kind outside the class folders).
        fingerprint: sha256 over (split, relative path, size, mtime_ns) of every sample: a cheap check.
            ``edgemap.json`` also records :meth:`content_fingerprint` (the files' bytes), so files
            that were only touched or copied back (new mtimes, same content) are still the same data.
        options: the options the scan used.
    """

    root: Path
    layout: str
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[tuple[str, str]]
    ignored: dict[str, int]
    fingerprint: str
    options: ScanOptions = field(default_factory=ScanOptions)
    _file_digests: list[tuple[str, Sample, str]] | None = field(default=None, repr=False, compare=False)
    #: digests the scan already read (the split's copy check): not read a second time
    _read: dict[Path, str] = field(default_factory=dict, repr=False, compare=False)
    #: set by :func:`rescan_for_run`: how the test split differs from training's (training and validation do not)
    test_changed: str | None = field(default=None, compare=False)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class: ``{"train": {"cat": 40, ...}, "val": {...}, "test": {...}}``."""
        out: dict[str, dict[str, int]] = {}
        for split, samples in (("train", self.train), ("val", self.val), ("test", self.test)):
            per = dict.fromkeys(self.classes, 0) if samples else {}
            for s in samples:
                per[self.classes[s.label]] += 1
            out[split] = per
        return out

    def _digests(self) -> list[tuple[str, Sample, str]]:
        """(split, sample, sha256 of its bytes) of every sample; read once per scan."""
        if self._file_digests is None:
            self._file_digests = [(split, s, self._read.get(s.path) or file_sha256(s.path))
                                  for split, samples in (("train", self.train), ("val", self.val), ("test", self.test))
                                  for s in samples]
        return self._file_digests

    def train_digests(self) -> list[str]:
        """The sha256 of every training image's bytes, sorted, once each (what :func:`training_images_in` checks)."""
        return sorted({digest for split, _, digest in self._digests() if split == "train"})

    def model_fingerprint(self) -> str:
        """The fingerprint of the training and validation images only: what the model (and its checks) depend on.
        A test split that changed since training (new labelled photos added) leaves the model as it is."""
        return _fingerprint(self.root, (("train", self.train), ("val", self.val)))

    def content_fingerprint(self) -> str:
        """sha256 over (split, relative path, sha256 of the bytes) of every sample (reads every file)."""
        h = hashlib.sha256()
        for split, s, digest in self._digests():
            rel = os.fsencode(os.path.relpath(s.path, self.root)).replace(b"\\", b"/")
            h.update(split.encode() + b"\0" + rel + b"\0" + digest.encode() + b"\n")
        return h.hexdigest()

    def copies(self) -> dict[str, Any]:
        """Byte-identical images where they distort results: a val/test image that is also a training image
        (counted as unseen), or the same bytes under two classes (two labels). Counts and a few examples."""
        first: dict[str, tuple[str, Sample]] = {}
        found: dict[str, list[str]] = {"val_in_train": [], "test_in_train": [], "two_classes": []}
        for split, s, digest in self._digests():
            if digest not in first:
                first[digest] = (split, s)
                continue
            other_split, other = first[digest]
            if other.label != s.label:
                found["two_classes"].append(f"{s.path} ({self.classes[s.label]}) = {other.path} ({self.classes[other.label]})")
            elif other_split == "train" and split in ("val", "test"):
                found[f"{split}_in_train"].append(f"{s.path} = {other.path}")
        return {k: {"count": len(v), "examples": [_json_safe(x) for x in v[:3]]} for k, v in found.items() if v}

    def warn_copies(self) -> None:
        """Log :meth:`copies_warnings` (finetune and ``datasets scan`` do, once per scan)."""
        for line in self.copies_warnings():
            log.warning("%s: %s", _json_safe(str(self.root)), line)

    def copies_warnings(self) -> list[str]:
        """One line per kind of :meth:`copies`."""
        what = {"val_in_train": "validation image(s) have the same bytes as a training image: validation accuracy "
                                "counts them as unseen",
                "test_in_train": "test image(s) have the same bytes as a training image: test accuracy counts them "
                                 "as unseen",
                "two_classes": "image(s) have the same bytes as an image of another class: one picture, two labels"}
        return [f"{c['count']} {what[k]} (e.g. {c['examples'][0]})" for k, c in self.copies().items()]

    def matches(self, manifest_dataset: dict[str, Any]) -> bool:
        """The same files as recorded: same sizes and mtimes, or else (touched, copied back) the same bytes."""
        if self.fingerprint == manifest_dataset.get("fingerprint"):
            return True
        recorded = manifest_dataset.get("content_fingerprint")
        return bool(recorded) and self.content_fingerprint() == recorded

    def to_manifest(self) -> dict[str, Any]:
        """JSON-able summary stored as ``edgemap.json["dataset"]`` (read back by :func:`rescan_for_run`)."""
        return {
            "root": _json_safe(str(self.root)),
            "layout": self.layout,
            "classes": list(self.classes),
            "options": asdict(self.options),
            "counts": self.counts(),
            "fingerprint": self.fingerprint,
            "model_fingerprint": self.model_fingerprint(),
            "content_fingerprint": self.content_fingerprint(),
            "copies": self.copies(),
            "skipped": [[_json_safe(p), _json_safe(r)] for p, r in self.skipped],
            "ignored": dict(self.ignored),
        }


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes; DatasetError names a file that cannot be read."""
    try:
        fh = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                fh.update(chunk)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e.strerror or e})") from e
    return fh.hexdigest()


#: In a run directory: the sha256 of each training image, one per line (``edgemap.json["dataset"]["train_digests"]``).
#: ``edgemap eval --data`` uses it to say how many images it scores were trained on, wherever the files are now.
TRAIN_DIGESTS_FILE = "train_images.sha256"


def write_train_digests(scan: DatasetScan, run_dir: Path) -> dict[str, Any]:
    """Write :data:`TRAIN_DIGESTS_FILE` into ``run_dir``; returns the record for ``edgemap.json["dataset"]``."""
    from edgemap.fsutil import atomic_write_bytes

    digests = scan.train_digests()
    atomic_write_bytes(run_dir / TRAIN_DIGESTS_FILE, "".join(d + "\n" for d in digests).encode())
    return {"path": TRAIN_DIGESTS_FILE, "count": len(digests)}


def training_images_in(run_dir: Path, dataset: dict[str, Any], paths: Iterable[str | Path]) -> int | None:
    """How many of ``paths`` have the same bytes as a training image of the run (None: the run has no digests)."""
    record = dataset.get("train_digests")
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return None
    try:
        known = set((run_dir / Path(record["path"]).name).read_text(encoding="ascii").split())
    except (OSError, UnicodeDecodeError):
        return None
    return sum(file_sha256(p) in known for p in paths) if known else 0


# ---- public entry points ----------------------------------------------------------------


def scan_dataset(root: str | Path, opts: ScanOptions = ScanOptions()) -> DatasetScan:
    """List, decode-check and validate a folder dataset.

    Raises DatasetError, naming the file or folder and the fix, for: a missing root, no
    class folders, a single class, an empty class folder, train/val class sets that
    differ, a validation set smaller than ``min_val_per_class`` per class, and (unless
    ``skip_bad``) any unreadable image, including decompression bombs.

    Example:
        >>> scan = scan_dataset("data/digits", ScanOptions(skip_bad=True))
        >>> scan.classes[:3], len(scan.train), len(scan.val)
        (['0', '1', '2'], 1438, 359)
    """
    return _scan(root, opts, decode_check=True, known_bad=None)


@dataclass
class LabelledImages:
    """Images with class names from a folder given to ``edgemap eval --data`` (see :func:`scan_labelled`).

    Attributes:
        root: absolute folder given.
        folder: the folder actually listed (``root``, or its ``test/`` or ``val/``).
        part: ``"test"``, ``"val"`` or ``"all"`` (class folders directly in ``root``).
        samples: ``(path, class name)`` in class-name then path order.
        skipped: ``(path, reason)`` of unreadable files skipped with ``skip_bad``.
    """

    root: Path
    folder: Path
    part: str
    samples: list[tuple[Path, str]]
    skipped: list[tuple[str, str]]

    @property
    def classes(self) -> list[str]:
        return sorted({c for _, c in self.samples})


def scan_labelled(root: str | Path, opts: ScanOptions = ScanOptions()) -> LabelledImages:
    """List and decode-check a folder of labelled images to evaluate on, without training's rules.

    ``DATA/test/<class>/...`` is taken when present, else ``DATA/val/<class>/...`` (or
    ``validation``/``valid``), else the class folders directly in ``DATA``. Unlike
    :func:`scan_dataset` one class is enough, class folders may be empty (skipped with a
    warning) and no validation share is held out: every image listed is evaluated.

    Raises DatasetError for: a missing root, a folder with only ``train/``, no class folders,
    no images at all, and (unless ``skip_bad``) unreadable images.

    Example:
        >>> imgs = scan_labelled("held_out")        # held_out/cat/*.jpg, held_out/dog/*.jpg
        >>> imgs.part, imgs.classes, len(imgs.samples)
        ('all', ['cat', 'dog'], 120)
    """
    root, _, (train_name, val_name, test_name) = _split_folders(root)
    if test_name or val_name:
        part = "test" if test_name else "val"
        lst = _list_split(root / str(test_name or val_name), root)
    elif train_name:
        raise DatasetError(
            f"{root}: holds only {train_name}/, whose images trained the model; pass a folder of class folders "
            "that were not trained on (or one with val/ or test/ inside)"
        )
    else:
        part = "all"
        lst = _list_split(root, root)
    if not lst.images:
        raise DatasetError(
            f"{lst.folder}: no class folders found; expected {lst.folder}/<class>/<image>.jpg (one sub-folder per "
            "class, named like the run's classes, so each image has a label)"
        )
    empty = sorted(name for name, paths in lst.images.items() if not paths)
    if empty:
        log.warning("%s: class folder(s) without images skipped: %s", lst.folder, ", ".join(empty))
    if lst.ignored:  # as training says it
        log.warning("%s: ignored %s", lst.folder, ignored_text(lst.ignored, lst.suffixes))
    files = [p for paths in lst.images.values() for p in paths]
    if not files and not lst.broken:
        raise DatasetError(f"{lst.folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class folders")
    bad: dict[str, str] = {str(p): why for p, why in lst.broken}
    bad.update(_decode_check(files, opts))
    if bad and not opts.skip_bad:
        raise _unreadable(lst.folder, bad)
    samples = [(p, name) for name in sorted(lst.images) for p in lst.images[name] if str(p) not in bad]
    if not samples:
        raise DatasetError(f"{lst.folder}: no readable images left after skipping {len(bad)} unreadable file(s)")
    return LabelledImages(root=root, folder=lst.folder, part=part, samples=samples, skipped=sorted(bad.items()))


def rescan_for_run(manifest_dataset: dict[str, Any]) -> DatasetScan:
    """Re-scan the dataset a run was trained on and refuse it if it changed.

    Uses the options recorded in ``edgemap.json["dataset"]`` so the train/val/test lists
    come out exactly as in training (the files skipped then are skipped again). The
    files are not decoded again: an unchanged fingerprint (sizes and mtimes) means they
    are the files that were checked then.

    Raises:
        ManifestError: the ``dataset`` record is missing or malformed.
        DatasetError: the folder is gone or its fingerprint differs ("dataset changed since training").

    Example:
        >>> scan = rescan_for_run(RunDir.load("models/digits").data["dataset"])
    """
    if not isinstance(manifest_dataset, dict) or not {"root", "fingerprint"} <= set(manifest_dataset):
        raise ManifestError(
            "edgemap.json: 'dataset' is missing root/fingerprint; the run was not made by `edgemap finetune` "
            "from a dataset folder. Re-create the run with `edgemap finetune`."
        )
    raw_opts = manifest_dataset.get("options") or {}
    try:
        opts = ScanOptions.from_dict(raw_opts)
    except (TypeError, DatasetError) as e:
        raise ManifestError(f"edgemap.json: dataset.options {raw_opts!r} are invalid ({e})") from e
    root = Path(manifest_dataset["root"])
    if not root.is_dir():
        raise DatasetError(
            f"{root}: the dataset this run was trained on is gone; restore it there (same files) to continue, or, if "
            "it moved, give its new place: `edgemap export RUN --data NEW_PLACE` (or `edgemap run NEW_PLACE --out RUN`)"
        )
    known_bad = {str(item[0]): str(item[1]) if len(item) > 1 else "skipped in training" for item in manifest_dataset.get("skipped") or []}
    try:
        scan = _scan(root, opts, decode_check=False, known_bad=known_bad)
    except DatasetError as e:
        raise DatasetError(f"dataset changed since training: {e}") from e
    recorded = manifest_dataset["fingerprint"]
    if not scan.matches(manifest_dataset):
        was = manifest_dataset.get("counts") or {}
        diff = _count_diff(was, scan.counts())
        trained = manifest_dataset.get("classes")
        if isinstance(trained, list) and trained != scan.classes:  # the likely cause, said first
            added, gone = sorted(set(scan.classes) - set(trained)), sorted(set(trained) - set(scan.classes))
            diff = "; ".join(x for x in (f"classes added: {', '.join(added)}" if added else "",
                                         f"classes gone: {', '.join(gone)}" if gone else "", diff) if x)
        model_fp = manifest_dataset.get("model_fingerprint")  # (runs before session 11 have none: strict check)
        # a test split changed, not removed: without one, eval would score the validation split (which picked the
        # kept epoch and judged int8) as if it were unseen
        if model_fp and model_fp == scan.model_fingerprint() and scan.test:
            scan.test_changed = diff or "test images renamed or changed"
            if (str(root), scan.fingerprint) in _SAID_TEST_CHANGED:  # once per process (run: its check, then eval)
                return scan
            _SAID_TEST_CHANGED.add((str(root), scan.fingerprint))
            log.warning("%s: the test split changed since training (%s); training and validation did not, so the "
                        "model stands: results on the test split score its images as they are now", root,
                        scan.test_changed)
            copied = scan.copies().get("test_in_train")
            if copied:  # new "test" photos that are training images would be scored as unseen
                log.warning("%s: %d test image(s) have the same bytes as a training image: test accuracy counts them "
                            "as unseen (e.g. %s)", root, copied["count"], copied["examples"][0])
            return scan
        if model_fp and model_fp != scan.model_fingerprint() and not diff.startswith("classes"):  # what matters
            diff = "; ".join(x for x in ("training or validation images changed (added, removed, renamed, replaced "
                                         "or touched)", diff) if x)
        raise DatasetError(
            f"dataset changed since training: {root} fingerprint {scan.fingerprint[:12]} != recorded {str(recorded)[:12]}"
            f" ({diff or 'same counts: files were renamed or their content changed'}); "
            "restore the original files or train a new run on the changed dataset"
        )
    classes = manifest_dataset.get("classes")
    if classes is not None and list(classes) != scan.classes:
        raise DatasetError(f"dataset changed since training: classes {scan.classes} != recorded {classes}")
    return scan


_SAID_TEST_CHANGED: set[tuple[str, str]] = set()


def record_at(moved: dict[str, Any], scan: DatasetScan) -> dict[str, Any]:
    """The ``dataset`` record of the same files found at ``scan.root`` (see :func:`relocated`): its new root, and
    the fingerprints of the files there (a copy made without its file times matched by content only; every later
    command then hashed the whole dataset again, and a test image added there was refused)."""
    record = {**moved, "root": str(scan.root)}
    if scan.test_changed is None:  # the very files: their sizes and times now (a changed test split is eval's to record)
        record["fingerprint"] = scan.fingerprint
        record["model_fingerprint"] = scan.model_fingerprint()
    return record


def relocated(manifest_dataset: dict[str, Any], data: str | Path) -> dict[str, Any]:
    """The ``dataset`` record of a run as if its files were at ``data`` (moved, or copied to another machine): its
    root and the paths of the files training skipped. :func:`rescan_for_run` of it checks they are the same files."""
    was = manifest_dataset.get("root")
    skipped = manifest_dataset.get("skipped")
    if isinstance(skipped, list) and isinstance(was, str) and was:
        rebased = []
        for item in skipped:
            try:
                rel = Path(item[0]).relative_to(was)
            except (ValueError, TypeError, IndexError):
                rebased.append(item)
                continue
            rebased.append([os.path.join(os.path.abspath(data), rel), *item[1:]])  # as the scan spells paths (abspath)
        skipped = rebased
    return {**manifest_dataset, "root": str(data), "skipped": skipped}


# ---- listing ------------------------------------------------------------------------------


@dataclass
class _Listing:
    """Files found under one split folder: class name -> image paths, and ignored counts."""

    folder: Path
    images: dict[str, list[Path]]
    dirs: dict[str, Path]
    ignored: dict[str, int]
    broken: list[tuple[Path, str]]
    extensions: frozenset[str] = IMAGE_EXTENSIONS  # the image files it lists (the scan rule's)
    suffixes: dict[str, int] = field(default_factory=dict)  # extensions of the ignored files in class folders


def _scan(root: str | Path, opts: ScanOptions, *, decode_check: bool, known_bad: dict[str, str] | None) -> DatasetScan:
    root, layout, tr, va, te = _list_layout(root, opts)
    listings = [x for x in (tr, va, te) if x is not None]
    classes = _check_classes(tr, va, te)
    bad = _bad_files(root, listings, opts, decode_check=decode_check, known_bad=known_bad)
    index = {c: i for i, c in enumerate(classes)}
    train, val, test = [], [], []
    read: dict[Path, str] = {}  # file digests the split read (copies share a size): reused, not read again
    for name in classes:
        good = [p for p in tr.images[name] if str(p) not in bad]
        if va is None:
            t, v = _split_class(root, name, good, opts, read)
            train += [Sample(p, index[name]) for p in t]
            val += [Sample(p, index[name]) for p in v]
        else:
            train += [Sample(p, index[name]) for p in good]
            val += [Sample(p, index[name]) for p in va.images[name] if str(p) not in bad]
        if not any(s.label == index[name] for s in train):
            raise DatasetError(f"{tr.dirs[name]}: no readable training images left after skipping bad files; add images")
    if te is not None:
        test = [Sample(p, index[c]) for c in sorted(te.images) for p in te.images[c] if str(p) not in bad]

    _check_val(root, layout, classes, val, va, opts)
    _check_same_files(classes, (("train", train), ("val", val), ("test", test)))
    ignored = _warn_ignored(root, listings)
    _warn_nested_classes(tr.folder, tr.dirs)
    return DatasetScan(
        root=root,
        layout=layout,
        classes=classes,
        train=train,
        val=val,
        test=test,
        skipped=sorted(bad.items()),
        ignored=ignored,
        fingerprint=_fingerprint(root, (("train", train), ("val", val), ("test", test))),
        options=opts,
        _read=read,
    )


def _list_layout(root: str | Path, opts: ScanOptions) -> tuple[Path, str, _Listing, _Listing | None, _Listing | None]:
    """(root, layout, train listing, val listing or None for the single-folder layout, test listing or None)."""
    root, top, (train_name, val_name, test_name) = _split_folders(root)
    exts = _extensions_of(opts.rule)
    # a class called "test" (or "valid"...) would be dropped or misread; in a train/ + val/ layout an unlabelled test/
    # (Kaggle's) is just not used, as before
    for name in (train_name, val_name) + (() if train_name and val_name else (test_name,)):
        if name and _holds_images_directly(root / name, exts):
            raise DatasetError(
                f"{root / name}: holds images directly, like a class folder, but {name!r} is a split name: "
                f"train, val (validation, valid) and test, in any case, at the top of {root} mean "
                "DATA/<split>/<class>/...; rename that class folder (e.g. to " + repr(name + "_") + "), or, if it "
                "is a split, put its images in class sub-folders"
            )
    def test_listing() -> _Listing | None:  # listed last, as the error checks of the other splits come first
        return _list_split(root / test_name, root, exts) if test_name else None

    if not (train_name or val_name):
        if opts.val_split <= 0:
            raise DatasetError(
                f"{root}: --val-split 0 leaves no validation images for a single-folder dataset; "
                "use e.g. --val-split 0.2, or provide DATA/train + DATA/val"
            )
        tr = _list_split(root, root, exts, exclude={test_name} if test_name else set())
        return root, "split", tr, None, test_listing()
    if not train_name:
        raise DatasetError(f"{root / val_name}: found a validation folder but no {root / 'train'}; add train/<class>/... beside it")
    if not val_name:
        raise DatasetError(
            f"{root / train_name}: found train/ but no val/ (or validation/) beside it; add val/<class>/..., "
            f"or put the class folders directly in {root} to let edgemap split off {opts.val_split:.0%} for validation"
        )
    others = sorted(set(top) - {train_name, val_name, test_name})
    if others:
        log.warning("%s: ignoring folders %s (not train/val/test)", root, ", ".join(others))
    tr, va = _list_split(root / train_name, root, exts), _list_split(root / val_name, root, exts)
    return root, f"train/{val_name.lower()}", tr, va, test_listing()


def _check_classes(tr: _Listing, va: _Listing | None, te: _Listing | None) -> list[str]:
    """The classes (sorted train class folders), after checking every split holds images of the same ones."""
    classes = sorted(tr.images)
    if not classes:
        raise DatasetError(
            f"{tr.folder}: no class folders found; expected {tr.folder}/<class>/<image>.jpg "
            "(one sub-folder per class, at least two classes)"
        )
    for lst in (x for x in (tr, va, te) if x is not None):
        for name, paths in lst.images.items():
            if not paths and not any(p.is_relative_to(lst.dirs[name]) for p, _ in lst.broken):
                # removing an empty val/<class> only led to "classes differ from train": say what validation needs
                fix = (f"validation needs images of every class: add some, or remove {name!r} from {tr.folder} too"
                       if lst is va else "add images or remove the folder")
                raise DatasetError(
                    f"{lst.dirs[name]}: class folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); {fix}"
                )
    if len(classes) < 2:
        raise DatasetError(f"{tr.dirs[classes[0]]}: only one class found in {tr.folder}; a classifier needs at least two class folders")
    if va is not None and set(va.images) != set(classes):
        missing = sorted(set(classes) - set(va.images))
        extra = sorted(set(va.images) - set(classes))
        raise DatasetError(
            f"{va.folder}: classes differ from {tr.folder}: "
            + "; ".join(x for x in (f"missing in val: {missing}" if missing else "", f"not in train: {extra}" if extra else "") if x)
            + "; make both folders hold the same class sub-folders"
        )
    if te is not None:
        extra = sorted(set(te.images) - set(classes))
        if extra:
            raise DatasetError(f"{te.folder}: classes not in training: {extra}; remove them or add them to training")
    return classes


def _bad_files(root: Path, listings: list[_Listing], opts: ScanOptions, *, decode_check: bool,
               known_bad: dict[str, str] | None) -> dict[str, str]:
    """path -> why, of the files that cannot be used: decode-checked now, or the recorded skips re-applied."""
    all_files = [p for lst in listings for paths in lst.images.values() for p in paths]
    bad: dict[str, str] = {str(p): why for lst in listings for p, why in lst.broken}
    if decode_check:
        bad.update(_decode_check(all_files, opts))
    elif known_bad:
        for p in all_files:
            why = known_bad.get(str(p)) or known_bad.get(_json_safe(str(p)))
            if why is not None:
                bad[str(p)] = why
    if bad and not opts.skip_bad and decode_check:
        raise _unreadable(root, bad)
    return bad


def _warn_ignored(root: Path, listings: list[_Listing]) -> dict[str, int]:
    """The ignored-file counts of all splits (class -> count), warned about once."""
    ignored: dict[str, int] = {}
    suffixes: dict[str, int] = {}
    for lst in listings:
        for counts, into in ((lst.ignored, ignored), (lst.suffixes, suffixes)):
            for name, n in counts.items():
                into[name] = into.get(name, 0) + n
    if ignored:
        log.warning("%s: ignored %s", root, ignored_text(ignored, suffixes))
    return ignored


def _extensions_of(rule: int) -> frozenset[str]:
    """The image extensions a scan of this rule reads (see ScanOptions.rule)."""
    return IMAGE_EXTENSIONS if rule >= 2 else IMAGE_EXTENSIONS - {".jfif", ".jpe"}


def _holds_images_directly(folder: Path, extensions: frozenset[str]) -> bool:
    """No class sub-folders, but image files of its own."""
    return not _subdirs(folder) and any(
        Path(e.name).suffix.lower() in extensions and not is_hidden(e.name) for e in _entries(folder)
    )


def _check_same_files(classes: list[str], splits: Iterable[tuple[str, list[Sample]]]) -> None:
    """One file (a symlink or a hard link to it) in training and in val/test: those results would measure training
    images; or under two classes: one image would teach two labels. (val and test may share files.)"""
    owner: dict[tuple[int, int], tuple[str, Sample]] = {}
    clashes: list[str] = []
    for split, samples in splits:
        for s in samples:
            try:
                st = os.stat(s.path)
            except OSError:
                continue  # listed, then gone: the decode check names it
            key = (st.st_dev, st.st_ino)
            if key not in owner:
                owner[key] = (split, s)
                continue
            first_split, first = owner[key]
            if first.label != s.label or (first_split == "train") != (split == "train"):
                clashes.append(f"{s.path} ({split}, {classes[s.label]}) is {first.path} ({first_split}, "
                               f"{classes[first.label]})")
    if clashes:
        more = f" and {len(clashes) - _MAX_LISTED} more" if len(clashes) > _MAX_LISTED else ""
        raise DatasetError(
            f"{len(clashes)} image(s) are the same file (a symlink or hard link) as an image of training or of another "
            "class: " + "; ".join(clashes[:_MAX_LISTED]) + more
            + ". Validation and test must not hold training images, and an image has one class: remove those links"
        )


def _split_folders(root: str | Path) -> tuple[Path, list[str], tuple[str | None, str | None, str | None]]:
    """The absolute root, its visible sub-folders and its (train, val, test) folder names (None: absent)."""
    root = Path(os.path.abspath(os.fspath(root)))
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder not found; pass the folder holding train/ and val/ (or one folder per class)")
    if not root.is_dir():
        raise DatasetError(f"{root}: is a file, not a dataset folder; pass the folder holding train/ and val/ (or one folder per class)")
    top = _subdirs(root)
    by_lower: dict[str, list[str]] = {}
    for name in top:
        by_lower.setdefault(name.lower(), []).append(name)
    names = tuple(_pick(root, by_lower, n) for n in (_TRAIN_NAMES, _VAL_NAMES, _TEST_NAMES))
    return root, top, names  # type: ignore[return-value]


def _unreadable(root: Path, bad: dict[str, str]) -> DatasetError:
    listed = "; ".join(f"{p} ({why})" for p, why in sorted(bad.items())[:_MAX_LISTED])
    more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return DatasetError(
        f"{len(bad)} unreadable image file(s) in {root}: {listed}{more}. "
        "Fix or remove them (edgemap never changes your dataset), or pass --skip-bad to skip them"
    )


def _pick(root: Path, by_lower: dict[str, list[str]], names: tuple[str, ...]) -> str | None:
    found = [n for key in names for n in by_lower.get(key, [])]
    if len(found) > 1:
        raise DatasetError(f"{root}: ambiguous split folders {sorted(found)}; keep only one of them (train, val, "
                           "validation, valid and test are split names in any case: if these are class folders, rename "
                           "them, e.g. " + repr(found[0] + "_") + ")")
    return found[0] if found else None


def _subdirs(folder: Path) -> list[str]:
    """Visible sub-folders (symlinks followed) of ``folder``, sorted."""
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise DatasetError(f"{folder}: cannot list folder ({e.strerror or e}); check its permissions") from e
    out = []
    for entry in entries:
        if is_hidden(entry.name):
            continue
        try:
            if entry.is_dir(follow_symlinks=True):
                out.append(entry.name)
        except OSError:
            continue
    return sorted(out)


def _class_name(folder: Path) -> str:
    name = folder.name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DatasetError(f"{folder}: class folder name is not valid UTF-8; rename the folder") from e
    if has_control_chars(name):  # a tab or newline forges output lines, ESC drives terminals
        raise DatasetError(f"{folder.parent / repr(name)[1:-1]}: class folder name has control characters (tab, newline, "
                           "escape...); rename the folder")
    # NFC so that "café" copied from macOS (NFD) and from Linux (NFC) is one class.
    return unicodedata.normalize("NFC", name)


def _list_split(folder: Path, root: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS,
                exclude: Iterable[str] = ()) -> _Listing:
    """List class folders of one split and the image files below each (recursive, loop-safe)."""
    excluded = set(exclude)
    root_real = os.path.realpath(root)
    split_real = os.path.realpath(folder)
    lst = _Listing(folder=folder, images={}, dirs={}, ignored={}, broken=[], extensions=extensions)
    visited: set[tuple[int, int]] = set()
    real_class: dict[str, str] = {}  # real folder -> the class listed from it
    try:
        st = os.stat(folder)
    except OSError as e:
        raise DatasetError(f"{folder}: cannot read folder ({e.strerror or e})") from e
    visited.add((st.st_dev, st.st_ino))
    for entry in _entries(folder):
        if is_hidden(entry.name) or entry.name in excluded:
            continue
        path = Path(folder, entry.name)
        kind = _kind(path)
        if kind == "dir":
            name = _class_name(path)
            if name in lst.images:
                raise DatasetError(f"{path}: two class folders are named {name!r} (after Unicode normalisation); rename one")
            class_real = os.path.realpath(path)
            if _inside(split_real, class_real):
                raise DatasetError(
                    f"{path}: symlink loop: this class folder points to {class_real}, which contains the dataset; "
                    "remove the link"
                )
            alias = real_class.get(class_real)
            real_class.setdefault(class_real, name)
            if alias is not None:
                link, other = (path, lst.dirs[alias]) if path.is_symlink() else (lst.dirs[alias], path)
                raise DatasetError(f"{link}: links to the class folder {other}: one folder cannot be two "
                                   f"classes ({alias!r} and {name!r}); remove the link or make it a folder of its own")
            lst.dirs[name] = path
            lst.images[name] = []
            _walk_class(path, name, lst, visited, class_real, root_real)
        elif kind == "file" or kind == "broken":
            lst.ignored[_ROOT_KEY] = lst.ignored.get(_ROOT_KEY, 0) + 1
    return lst


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"{folder}: cannot list folder ({e.strerror or e}); check its permissions") from e


def _kind(path: Path) -> str:
    """'dir', 'file', 'broken' (dangling symlink) or 'other' (socket, fifo, device)."""
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        return "broken" if os.path.islink(path) else "other"
    except OSError:
        return "broken"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "other"


def _inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_class(
    folder: Path, name: str, lst: _Listing, visited: set[tuple[int, int]], class_real: str, root_real: str
) -> None:
    """Depth-first walk of a class folder; a real folder is entered once (symlink loops end).

    A linked sub-folder is followed when it stays inside this class folder or points
    outside the dataset altogether; a link to the dataset itself, one of its ancestors,
    another class or another split is skipped with a warning (it would loop or leak
    images across classes/splits).
    """
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            st = os.stat(current)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited:
            log.warning("%s: already scanned (symlink loop or duplicate link); not entered again", current)
            continue
        visited.add(key)
        subdirs = []
        for entry in _entries(current):
            if is_hidden(entry.name):
                continue
            path = Path(current, entry.name)
            kind = _kind(path)
            if kind == "dir":
                real = os.path.realpath(path)
                if _inside(real, class_real) or not (_inside(real, root_real) or _inside(root_real, real)):
                    subdirs.append(path)
                else:
                    log.warning("%s: links to %s, outside this class folder but inside the dataset; skipped", path, real)
            elif Path(entry.name).suffix.lower() in lst.extensions:
                if kind == "file":
                    lst.images[name].append(path)
                elif kind == "broken":
                    lst.broken.append((path, "broken symlink: its target does not exist"))
                else:
                    lst.broken.append((path, "not a regular file"))
            else:
                lst.ignored[name] = lst.ignored.get(name, 0) + 1
                suffix = Path(entry.name).suffix.lower() or "(no extension)"
                lst.suffixes[suffix] = lst.suffixes.get(suffix, 0) + 1
        stack.extend(reversed(subdirs))
    lst.images[name].sort(key=lambda p: os.fsencode(p))


# ---- checks -------------------------------------------------------------------------------


def _decode_check(files: list[Path], opts: ScanOptions) -> dict[str, str]:
    """Decode every file fully with the runtime's ``open_image``; return {path: reason} of failures."""

    def check(p: Path) -> tuple[Path, str | None]:
        try:
            open_image(p, max_pixels=opts.max_pixels)
        except ImageError as e:
            msg = str(e)
            prefix = f"{p}: "
            return p, msg[len(prefix) :] if msg.startswith(prefix) else msg
        except MemoryError:
            return p, "out of memory while decoding (lower --max-pixels)"
        return p, None

    bad: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        advance = stack.enter_context(_progress(len(files), "checking images"))
        results: Iterable[tuple[Path, str | None]]
        if opts.workers == 1 or len(files) < 32:
            results = map(check, files)
        else:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="edgemap-scan"))
            results = pool.map(check, files, chunksize=16)
        for p, why in results:
            if why is not None:
                bad[str(p)] = why
            advance()
    return bad


class _progress:
    """A rich progress bar on a TTY for big folders; a no-op otherwise."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.bar = total, what, None

    def __enter__(self) -> Callable[[], None]:
        if self.total < _PROGRESS_MIN or not sys.stderr.isatty():
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )
        self.bar.start()
        task = self.bar.add_task(self.what, total=self.total)
        bar = self.bar
        return lambda: bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _warn_nested_classes(folder: Path, class_dirs: dict[str, Path]) -> None:
    """Say so when every class folder holds only the same sub-folders (batch1/{cat,dog}, batch2/{cat,dog}): the
    classes learnt are then the top folders (batch1, batch2), almost certainly not what was meant."""
    subs: list[frozenset[str]] = []
    for path in class_dirs.values():
        try:
            entries = [e for e in os.scandir(path) if not is_hidden(e.name)]
        except OSError:
            return
        if not entries or not all(e.is_dir() for e in entries):
            return
        subs.append(frozenset(e.name for e in entries))
    if len(subs) >= 2 and len(subs[0]) >= 2 and all(x == subs[0] for x in subs):
        inner = ", ".join(sorted(subs[0]))
        log.warning("%s: every class folder (%s) holds only the same sub-folders (%s): the classes learnt are the "
                    "top folders, not %s; if those are the classes, give each one folder (e.g. merge %s into one "
                    "DATA/<class>/ tree)", folder, ", ".join(sorted(class_dirs)), inner, inner,
                    " and ".join(sorted(class_dirs)))


def _split_class(root: Path, name: str, files: list[Path], opts: ScanOptions,
                 read: dict[Path, str] | None = None) -> tuple[list[Path], list[Path]]:
    """Deterministic stratified split of one class: order by a seeded hash of the relative path.

    Hash order (not a shuffled index) keeps each file's side stable when other files are
    added or removed, and does not depend on listing order or the numpy version. Files with the
    same bytes go to the same side (the group takes its first member's place in that order).
    ``read`` collects the digests computed (the scan's digests reuse them).
    """
    k = opts.min_val_per_class
    n = len(files)
    read = {} if read is None else read
    if n <= k:
        raise DatasetError(
            f"{files[0].parent if files else root / name}: class {name!r} has {n} image(s); the validation split needs "
            f"{k} and training at least 1, so add images (at least {k + 1}) or provide DATA/train + DATA/val"
        )
    n_val = min(n - 1, max(k, round(n * opts.val_split)))

    def key(p: Path) -> bytes:
        rel = os.fsencode(os.path.relpath(p, root))
        return hashlib.sha256(f"{opts.seed}\0".encode() + rel).digest()

    # byte-identical copies ("img3.png" and "img3 (1).png") stay on one side: split apart, validation scored training
    # images as unseen (early stopping, the kept weights and the int8 gate all judged on them)
    groups: dict[str, list[Path]] = {}
    if opts.rule >= 2:  # only files of one size can be copies: the others are not read again (every rescan splits)
        size_of: dict[Path, int | None] = {}
        for p in files:
            try:
                size_of[p] = os.stat(p).st_size
            except OSError:  # gone meanwhile: a group of its own (the fingerprint check names the change)
                size_of[p] = None
        sizes: dict[int | None, int] = {}
        for size in size_of.values():
            sizes[size] = sizes.get(size, 0) + 1
        for p in files:
            shared = size_of[p] is not None and sizes[size_of[p]] > 1
            if shared:
                read[p] = digest = file_sha256(p)
            groups.setdefault(digest if shared else f"path:{p}", []).append(p)
    # no copies, a run made before rule 2, or one image copied n times (no unseen image can exist: the copies
    # warning says so): the path-hash order alone, as always
    if len(groups) in (0, 1, n):
        val = set(sorted(files, key=key)[:n_val])
    else:
        ordered = sorted(groups.values(), key=lambda g: min(map(key, g)))
        val = set()
        for group in ordered:  # in hash order, the groups that fit the validation share
            if len(val) + len(group) <= n_val:
                val.update(group)
        for group in sorted(ordered, key=len):  # too few for min_val_per_class: the smallest groups left
            if len(val) >= k:
                break
            if not val.issuperset(group) and len(val) + len(group) <= n - 1:
                val.update(group)
    return [p for p in files if p not in val], [p for p in files if p in val]


def _check_val(root: Path, layout: str, classes: list[str], val: list[Sample], va: _Listing | None, opts: ScanOptions) -> None:
    k = opts.min_val_per_class
    if not val:
        where = va.folder if va is not None else root
        raise DatasetError(f"{where}: validation set is empty; add images to it (at least {k} per class)")
    per = dict.fromkeys(classes, 0)
    for s in val:
        per[classes[s.label]] += 1
    short = {c: n for c, n in per.items() if n < k}
    if short:
        where = va.folder if va is not None else root
        listed = ", ".join(f"{c!r}: {n}" for c, n in sorted(short.items()))
        raise DatasetError(
            f"{where}: validation needs at least {k} readable image(s) per class; too few for {listed}; "
            + ("add images to those val/<class> folders" if va is not None else "add images or raise --val-split")
        )


def _fingerprint(root: Path, splits: Iterable[tuple[str, list[Sample]]]) -> str:
    h = hashlib.sha256()
    for split, samples in splits:
        for s in samples:
            try:
                st = os.stat(s.path)
            except OSError as e:
                raise DatasetError(f"{s.path}: cannot read file ({e.strerror or e})") from e
            rel = os.fsencode(os.path.relpath(s.path, root)).replace(b"\\", b"/")
            h.update(split.encode() + b"\0" + rel + b"\0" + f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _count_diff(was: dict[str, dict[str, int]], now: dict[str, dict[str, int]]) -> str:
    parts = []
    for split in ("train", "val", "test"):
        a, b = sum((was.get(split) or {}).values()), sum((now.get(split) or {}).values())
        if a != b:
            parts.append(f"{split} {b} images, was {a}")
    return ", ".join(parts)


def _json_safe(s: str) -> str:
    """Paths with undecodable bytes (surrogate escapes) made printable for JSON."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
