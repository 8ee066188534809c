"""The bundled digits demo dataset: layout, split, pixels, refusal of a non-empty OUT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgemap.data.digits import load_digits_arrays, stratified_split, write_digits
from edgemap.errors import DatasetError


def _files(root: Path) -> dict[str, set[str]]:
    return {s: {p.relative_to(root / s).as_posix() for p in (root / s).rglob("*.png")} for s in ("train", "val", "test") if (root / s).is_dir()}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One default digits dataset (seed 0) under a path with a space, é and 日本, shared by this module."""
    out = tmp_path_factory.mktemp("digits") / "my data é 日本" / "digits"
    return out, write_digits(out)


def test_write_digits_layout_counts_and_pixels(written: tuple[Path, dict]) -> None:
    from sklearn.datasets import load_digits

    out, counts = written
    assert set(counts) == {"train", "val"}
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 1797
    files = _files(out)
    assert sum(len(v) for v in files.values()) == 1797
    assert not (out / "test").exists()
    # stratified: every class is in val with ~20% of its images
    for c in range(10):
        n_val, n_tr = counts["val"][str(c)], counts["train"][str(c)]
        assert abs(n_val / (n_val + n_tr) - 0.2) < 0.01
        assert len(list((out / "val" / str(c)).glob("*.png"))) == n_val
    # disjoint splits, names are the indices into load_digits()
    names_tr = {Path(f).name for f in files["train"]}
    names_val = {Path(f).name for f in files["val"]}
    assert not names_tr & names_val
    d = load_digits()
    for rel in sorted(files["val"])[:20]:
        label, name = rel.split("/")
        i = int(Path(name).stem)
        assert int(d.target[i]) == int(label)
        with Image.open(out / "val" / rel) as im:
            assert im.mode == "L" and im.size == (8, 8)
            arr = np.asarray(im)
        np.testing.assert_array_equal(arr, np.round(d.images[i] * 255 / 16).astype(np.uint8))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # staging folder removed


def test_bundled_csv_equals_load_digits() -> None:
    from sklearn.datasets import load_digits

    images, labels = load_digits_arrays()
    d = load_digits()
    np.testing.assert_array_equal(images, d.images)
    np.testing.assert_array_equal(labels, d.target)
    assert images.min() == 0 and images.max() == 16


def test_write_digits_deterministic_and_seeded(tmp_path: Path, written: tuple[Path, dict]) -> None:
    write_digits(tmp_path / "again", seed=0)
    assert _files(tmp_path / "again") == _files(written[0])
    labels = np.repeat(np.arange(10), 30)
    s3 = stratified_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(s3["val"], stratified_split(labels, 0.2, seed=3)["val"])
    assert not np.array_equal(s3["val"], stratified_split(labels, 0.2, seed=4)["val"])


def test_write_digits_test_split_and_force(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty.*--force"):
        write_digits(out)
    assert not (out / "train").exists()
    counts = write_digits(out, val_fraction=0.1, test_fraction=0.1, force=True)
    files = _files(out)
    assert set(files) == {"train", "val", "test"}
    assert all(counts["test"][str(c)] >= 1 for c in range(10))
    names = [{Path(f).name for f in files[s]} for s in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(len(n) for n in names) == 1797
    write_digits(out, force=True)  # a re-write without test removes the stale test split
    assert not (out / "test").exists()
    assert (out / "notes.txt").read_text() == "mine"  # the user's own file is left alone
    assert sum(len(v) for v in _files(out).values()) == 1797


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.0), (1.0, 0.0), (0.5, 0.5), (0.2, -0.1)])
def test_write_digits_rejects_bad_fractions(tmp_path: Path, val: float, test: float) -> None:
    with pytest.raises(DatasetError, match="fraction"):
        write_digits(tmp_path / "d", val_fraction=val, test_fraction=test)
    assert not (tmp_path / "d").exists()


def test_stratified_split_small_classes_keep_a_training_image() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2] + [3] * 10)
    parts = stratified_split(labels, 0.2)
    for c in range(4):
        n_tr = int(np.sum(labels[parts["train"]] == c))
        n_val = int(np.sum(labels[parts["val"]] == c))
        assert n_tr >= 1
        assert n_val == (0 if c == 0 else max(1, round(np.sum(labels == c) * 0.2)))
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(labels)))


def test_cli_datasets_digits(odd_tmp: Path) -> None:
    from edgemap.cli import app

    out = odd_tmp / "cli digits it's $HOME `x`"  # the printed next command must still name this folder
    r = CliRunner().invoke(app, ["datasets", "digits", str(out), "--val-fraction", "0.25", "--seed", "1"])
    assert r.exit_code == 0, r.output
    import subprocess

    nxt = [line.removeprefix("next:").strip() for line in r.output.splitlines() if line.startswith("next:")]
    assert nxt, r.output
    words = subprocess.run(["bash", "-c", "printf '%s\\0' " + nxt[0]], capture_output=True, text=True).stdout
    assert words.split("\0")[:3] == ["edgemap", "finetune", str(out)], nxt  # what a shell passes
    from sklearn.datasets import load_digits

    expected_val = sum(round(n * 0.25) for n in np.bincount(load_digits().target))
    assert len(list((out / "val").rglob("*.png"))) == expected_val
    assert f"val {expected_val}" in r.output
    r = CliRunner().invoke(app, ["datasets", "digits", str(out)])
    assert r.exit_code != 0
    assert "--force" in r.output


def test_digits_scan_end_to_end(written: tuple[Path, dict]) -> None:
    from edgemap.data.scan import ScanOptions, rescan_for_run, scan_dataset

    out, counts = written
    scan = scan_dataset(out, ScanOptions(workers=2))
    assert scan.layout == "train/val"
    assert scan.classes == [str(c) for c in range(10)]
    assert scan.counts() == {**counts, "test": {}}
    assert len(scan.train) + len(scan.val) == 1797
    assert all(int(s.path.parent.name) == s.label for s in scan.train + scan.val + scan.test)
    assert rescan_for_run(scan.to_manifest()).fingerprint == scan.fingerprint
