"""The bundled demo dataset: scikit-learn's handwritten digits written as a folder of PNGs.

``sklearn.datasets.load_digits`` ships 1,797 8x8 scans (values 0–16) inside the
scikit-learn wheel, so this needs no network. Each scan becomes an 8x8 grayscale PNG
(0–16 scaled to 0–255); edgemap's preprocessing resizes it to the model's input size.

Layout written::

    OUT/train/<digit>/<i>.png
    OUT/val/<digit>/<i>.png
    OUT/test/<digit>/<i>.png      (only with test_fraction > 0)

``<i>`` is the sample's index in ``load_digits()``, so a file can be traced back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgemap.errors import DatasetError

SPLITS = ("train", "val", "test")


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic stratified split of sample indices into train/val/test.

    Within each class the indices are permuted with a seeded generator; ``round(n * f)``
    go to each held-out split, but at least one to val (and to test when asked) as long
    as the class keeps at least one training sample.

    Example:
        >>> parts = stratified_split(np.array([0, 0, 1, 1, 1]), 0.4)
        >>> sorted(len(v) for v in parts.values())
        [0, 2, 3]
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n >= 3 else 0
        n_val = max(1, round(n * val_fraction)) if val_fraction > 0 and n - n_test >= 2 else 0
        n_val = min(n_val, n - n_test - 1) if n - n_test >= 1 else 0
        out["test"].extend(idx[:n_test].tolist())
        out["val"].extend(idx[n_test : n_test + n_val].tolist())
        out["train"].extend(idx[n_test + n_val :].tolist())
    return {s: np.sort(np.asarray(v, dtype=np.int64)) for s, v in out.items()}


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as float64 images (1797, 8, 8) with values 0–16, and int64 labels.

    Reads the CSV that scikit-learn bundles straight from its install folder: importing
    ``sklearn`` (and SciPy behind it) costs over a second, the file itself a few ms. Falls
    back to ``sklearn.datasets.load_digits`` if the file is not where it is expected.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None:
        raise DatasetError('the digits demo needs scikit-learn: pip install "scikit-learn>=1.3"')
    for folder in spec.submodule_search_locations or []:
        csv = Path(folder, "datasets", "data", "digits.csv.gz")
        if csv.is_file():
            data = np.loadtxt(csv, delimiter=",")
            if data.shape == (1797, 65):
                return data[:, :64].reshape(-1, 8, 8), data[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.asarray(digits.images, dtype=np.float64), np.asarray(digits.target, dtype=np.int64)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise DatasetError(
            f"--val-fraction + --test-fraction = {val_fraction + test_fraction:g} leaves no training images; "
            "keep their sum below 1"
        )


def _visible_entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def write_digits(
    out: str | Path, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0, force: bool = False
) -> dict[str, dict[str, int]]:
    """Write scikit-learn's digits as ``OUT/{train,val[,test]}/<digit>/<i>.png``.

    The split is stratified and deterministic for a given seed. Files are written into a
    hidden staging folder beside the splits and moved in only when complete, so an
    interrupted run never leaves a half-written dataset under ``OUT/train``.

    Args:
        out: destination folder; must be missing or empty unless ``force``.
        val_fraction: share of each class put in ``val/``.
        test_fraction: share of each class put in ``test/`` (0 = no test split).
        seed: seed of the stratified split.
        force: allow a non-empty ``out``; its ``train/``, ``val/`` and ``test/`` are replaced,
            other files are left alone.

    Returns:
        Counts per split and class, e.g. ``{"train": {"0": 142, ...}, "val": {...}}``.

    Example:
        >>> counts = write_digits("data/digits")
        >>> sum(counts["train"].values()) + sum(counts["val"].values())
        1797
    """
    _check_fractions(val_fraction, test_fraction)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder; choose another OUT")
    if out.is_dir() and _visible_entries(out) and not force:
        raise DatasetError(f"{out}: folder is not empty; choose an empty/new OUT or pass --force to replace its splits")

    from PIL import Image

    raw, labels = load_digits_arrays()
    images = np.clip(np.round(raw * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    parts = stratified_split(labels, val_fraction, test_fraction, seed)

    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".digits.", suffix=".edgemap-tmp", dir=out))
    counts: dict[str, dict[str, int]] = {}
    try:
        for split in SPLITS:
            if split == "test" and test_fraction <= 0:
                continue
            per_class = {str(c): 0 for c in range(10)}
            for c in range(10):
                (stage / split / str(c)).mkdir(parents=True)
            for i in parts[split]:
                c = int(labels[i])
                Image.fromarray(images[i], mode="L").save(stage / split / str(c) / f"{int(i)}.png", format="PNG")
                per_class[str(c)] += 1
            counts[split] = per_class
        for split in SPLITS:
            dest = out / split
            if dest.is_symlink() or dest.is_file():
                dest.unlink()
            elif dest.exists():
                shutil.rmtree(dest)
            if split in counts:
                os.replace(stage / split, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return counts
