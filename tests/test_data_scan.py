"""scan_dataset / rescan_for_run on folders the tests generate: every RELIABILITY "Dataset folder" case."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import threading
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgemap.data.scan import DatasetScan, Sample, ScanOptions, rescan_for_run, scan_dataset
from edgemap.errors import DatasetError, ManifestError

# ---- fixture builders -------------------------------------------------------------------------


def img(path: Path, seed: int = 0, size: tuple[int, int] = (8, 8), fmt: str | None = None) -> Path:
    """Write a small random RGB image; the format follows the extension unless ``fmt``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def make_classes(folder: Path, spec: dict[str, int], ext: str = ".png") -> None:
    for c, n in spec.items():
        for i in range(n):
            img(folder / c / f"{i}{ext}", seed=zlib.crc32(f"{c}/{i}".encode()))


def train_val(root: Path, classes: dict[str, int] | None = None, val: dict[str, int] | None = None, val_name: str = "val") -> Path:
    classes = classes or {"cat": 4, "dog": 3}
    make_classes(root / "train", classes)
    make_classes(root / val_name, val or {c: 2 for c in classes})
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime_ns, mode) of every entry, symlinks not followed: proves nothing was modified."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def rel(scan: DatasetScan, samples: list[Sample]) -> list[tuple[str, int]]:
    return [(s.path.relative_to(scan.root).as_posix(), s.label) for s in samples]


# ---- layouts ----------------------------------------------------------------------------------


def test_train_val_layout(odd_tmp: Path) -> None:
    root = train_val(odd_tmp / "data")
    scan = scan_dataset(root)
    assert scan.layout == "train/val"
    assert scan.classes == ["cat", "dog"]
    assert scan.root == root and scan.root.is_absolute()
    assert scan.counts() == {"train": {"cat": 4, "dog": 3}, "val": {"cat": 2, "dog": 2}, "test": {}}
    assert rel(scan, scan.val) == [("val/cat/0.png", 0), ("val/cat/1.png", 0), ("val/dog/0.png", 1), ("val/dog/1.png", 1)]
    assert all(isinstance(s, Sample) and s.path.is_absolute() and s.path.is_file() for s in scan.train + scan.val)
    assert scan.test == [] and scan.skipped == [] and scan.ignored == {}
    assert len(scan.fingerprint) == 64


@pytest.mark.parametrize(("name", "layout"), [("validation", "train/validation"), ("valid", "train/valid"), ("VAL", "train/val")])
def test_validation_folder_names(tmp_path: Path, name: str, layout: str) -> None:
    scan = scan_dataset(train_val(tmp_path, val_name=name))
    assert scan.layout == layout
    assert len(scan.val) == 4


def test_relative_root_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_val(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    scan = scan_dataset("d")
    assert scan.root == tmp_path / "d"
    assert all(s.path.is_absolute() for s in scan.train)


def test_single_folder_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 2, "b": 5, "c": 11, "d": 40})
    scan = scan_dataset(tmp_path, ScanOptions(val_split=0.2, seed=0))
    assert scan.layout == "split"
    counts = scan.counts()
    assert counts["val"] == {"a": 1, "b": 1, "c": 2, "d": 8}  # >= 1 per class, round(n * 0.2) otherwise
    assert counts["train"] == {"a": 1, "b": 4, "c": 9, "d": 32}
    train, val = {s.path for s in scan.train}, {s.path for s in scan.val}
    assert not train & val and len(train | val) == 58
    again = scan_dataset(tmp_path, ScanOptions(val_split=0.2, seed=0))
    assert again.val == scan.val and again.train == scan.train and again.fingerprint == scan.fingerprint
    other = scan_dataset(tmp_path, ScanOptions(val_split=0.2, seed=1))
    assert other.counts() == counts and {s.path for s in other.val} != val
    # the split is part of the fingerprint
    assert other.fingerprint != scan.fingerprint


def test_single_folder_split_keeps_byte_identical_copies_on_one_side(tmp_path: Path) -> None:
    """"img3.png" beside "img3 (1).png": edgemap's own split put copies in training and validation (6 of 9 validation
    images were training images), so early stopping, the kept weights and the int8 gate judged seen images."""
    make_classes(tmp_path, {"a": 20, "b": 5})
    for i in range(20):
        shutil.copy(tmp_path / "a" / f"{i}.png", tmp_path / "a" / f"{i} (1).png")
    for i in (0, 1):
        shutil.copy(tmp_path / "b" / f"{i}.png", tmp_path / "b" / f"{i} (1).png")
    for seed in range(4):
        scan = scan_dataset(tmp_path, ScanOptions(val_split=0.2, seed=seed))
        assert scan.copies() == {}, (seed, scan.copies())
        counts = scan.counts()
        assert counts["val"]["a"] == 8 and counts["train"]["a"] == 32, counts  # whole pairs: round(40 * 0.2)
        assert 1 <= counts["val"]["b"] <= 2 and counts["train"]["b"] >= 4, counts
    # a dataset without copies splits as it always did (same files on each side: runs made before keep resuming)
    plain = tmp_path.parent / "plain"
    make_classes(plain, {"a": 11})
    make_classes(plain, {"b": 7})
    ref = {"a": ["0.png", "10.png"], "b": ["2.png"]}  # what the split gave before copies were grouped
    got = scan_dataset(plain, ScanOptions(val_split=0.2, seed=0))
    names = {c: sorted(s.path.name for s in got.val if got.classes[s.label] == c) for c in got.classes}
    assert names == ref, names


def test_single_folder_split_honours_min_val_per_class(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 4, "b": 20})
    scan = scan_dataset(tmp_path, ScanOptions(val_split=0.1, min_val_per_class=3))
    assert scan.counts()["val"] == {"a": 3, "b": 3}


def test_test_split_is_kept_aside(tmp_path: Path) -> None:
    train_val(tmp_path)
    make_classes(tmp_path / "test", {"cat": 2, "dog": 1})
    scan = scan_dataset(tmp_path)
    assert scan.counts()["test"] == {"cat": 2, "dog": 1}
    assert all(s.path.relative_to(tmp_path).parts[0] == "test" for s in scan.test)
    assert not {s.path for s in scan.test} & {s.path for s in scan.train + scan.val}


def test_test_folder_is_not_a_class_in_single_folder_layout(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 5, "b": 5})
    make_classes(tmp_path / "test", {"a": 1, "b": 2})
    scan = scan_dataset(tmp_path)
    assert scan.classes == ["a", "b"]
    assert scan.counts()["test"] == {"a": 1, "b": 2}
    assert len(scan.train) + len(scan.val) == 10


def test_test_split_with_unknown_class_is_refused(tmp_path: Path) -> None:
    train_val(tmp_path)
    make_classes(tmp_path / "test", {"cat": 1, "bird": 1})
    with pytest.raises(DatasetError, match=r"test.*not in training.*bird"):
        scan_dataset(tmp_path)


def test_nested_folders_inside_a_class(tmp_path: Path) -> None:
    train_val(tmp_path)
    img(tmp_path / "train" / "cat" / "batch 2" / "deep" / "x.jpg")
    scan = scan_dataset(tmp_path)
    assert scan.counts()["train"]["cat"] == 5
    assert any(s.path.name == "x.jpg" and s.label == 0 for s in scan.train)


# ---- 1. bad files -----------------------------------------------------------------------------


def _truncated_jpeg(p: Path) -> None:
    img(p, size=(64, 64), fmt="JPEG")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _truncated_png(p: Path) -> None:
    img(p, size=(64, 64), fmt="PNG")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 200])


BAD_FILES = {
    "truncated_jpeg": ("bad.jpg", _truncated_jpeg),
    "truncated_png": ("bad.png", _truncated_png),
    "zero_byte": ("bad.jpg", lambda p: p.write_bytes(b"")),
    "text_with_image_extension": ("bad.png", lambda p: p.write_text("this is not an image\n")),
    "html_with_jpeg_extension": ("bad.jpeg", lambda p: p.write_bytes(b"<html><body>403 Forbidden</body></html>")),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_naming_it(tmp_path: Path, case: str) -> None:
    train_val(tmp_path)
    name, make = BAD_FILES[case]
    bad = tmp_path / "train" / "dog" / name
    make(bad)
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    msg = str(ei.value)
    assert str(bad) in msg and "--skip-bad" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_skipped_and_listed_with_skip_bad(tmp_path: Path, case: str) -> None:
    train_val(tmp_path)
    name, make = BAD_FILES[case]
    bad = tmp_path / "val" / "cat" / name
    make(bad)
    before = snapshot(tmp_path)
    scan = scan_dataset(tmp_path, ScanOptions(skip_bad=True))
    assert [p for p, _ in scan.skipped] == [str(bad)]
    assert scan.skipped[0][1]  # a reason
    assert bad not in {s.path for s in scan.val}
    assert scan.counts()["val"] == {"cat": 2, "dog": 2}
    assert scan.to_manifest()["skipped"] == [[str(bad), scan.skipped[0][1]]]
    assert snapshot(tmp_path) == before  # 13. never moved, renamed or "repaired"


def test_truncated_jpeg_is_not_loaded_leniently(tmp_path: Path) -> None:
    from PIL import ImageFile

    train_val(tmp_path)
    _truncated_jpeg(tmp_path / "train" / "cat" / "t.jpg")
    with pytest.raises(DatasetError, match="t.jpg"):
        scan_dataset(tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_many_bad_files_are_reported_in_one_error(tmp_path: Path) -> None:
    train_val(tmp_path, {"cat": 40, "dog": 40})
    for i in range(8):
        (tmp_path / "train" / "cat" / f"z{i}.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"^8 unreadable image file\(s\).*and 3 more") as ei:
        scan_dataset(tmp_path, ScanOptions(workers=2))
    assert str(tmp_path / "train" / "cat" / "z0.jpg") in str(ei.value)


def test_skip_bad_that_empties_val_class_fails_before_training(tmp_path: Path) -> None:
    train_val(tmp_path, {"cat": 3, "dog": 3}, val={"cat": 1, "dog": 2})
    (tmp_path / "val" / "cat" / "0.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"validation needs at least 1.*'cat': 0"):
        scan_dataset(tmp_path, ScanOptions(skip_bad=True))


# ---- 2./3. other extensions, hidden entries ----------------------------------------------------


def test_other_extensions_are_ignored_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train_val(tmp_path)
    for name in ("README", "notes.txt", "Thumbs.db", "labels.csv"):
        (tmp_path / "train" / "cat" / name).write_text("x")
    (tmp_path / "val" / "dog" / "desktop.ini").write_text("x")
    (tmp_path / "train" / "stray.txt").write_text("x")
    (tmp_path / "README.md").write_text("about this dataset")
    img(tmp_path / "train" / "cat" / "UPPER.JPG", fmt="JPEG")  # extensions are case-insensitive
    img(tmp_path / "train" / "cat" / "x.webp", fmt="WEBP")
    img(tmp_path / "train" / "cat" / "x.tif", fmt="TIFF")
    img(tmp_path / "train" / "cat" / "x.bmp", fmt="BMP")
    img(tmp_path / "train" / "cat" / "x.gif", fmt="GIF")
    img(tmp_path / "train" / "cat" / "saved.jfif", fmt="JPEG")  # Chrome's "Save image" name on Windows
    with caplog.at_level(logging.WARNING, logger="edgemap.data"):
        scan = scan_dataset(tmp_path)
    assert scan.ignored == {"cat": 4, "dog": 1, ".": 1}
    assert scan.counts()["train"]["cat"] == 4 + 6
    assert ("ignored 6 file(s): 1 outside the class folders (no class: an image there is not used); 5 not read as images "
            "in class folders (cat 4, dog 1; (no extension) 1, .csv 1, .db 1, .ini 1, .txt 1)") in caplog.text
    assert "convert" not in caplog.text  # nothing there looks like a photo
    # an image left beside the class folders has no class: it was called a non-image file
    img(tmp_path / "train" / "IMG_0001.jpg", fmt="JPEG")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgemap.data"):
        assert scan_dataset(tmp_path).ignored["."] == 2
    assert "2 outside the class folders (no class: an image there is not used)" in caplog.text
    assert scan.to_manifest()["ignored"] == scan.ignored
    # photos in a format that is not read were "non-image" files: their kind, and what is read, are named
    for i in range(3):
        (tmp_path / "train" / "dog" / f"IMG_{i}.HEIC").write_bytes(b"ftypheic")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgemap.data"):
        scan_dataset(tmp_path)
    assert "(cat 4, dog 4; .heic 3, (no extension) 1, .csv 1, .db 1, .ini 1, …); only .bmp, .gif, " in caplog.text
    assert ".webp files are read: convert the others to use them" in caplog.text


def test_hidden_files_and_folders_are_never_classes_or_samples(tmp_path: Path) -> None:
    train_val(tmp_path)
    junk = b"\x00\x05\x16\x07AppleDouble"  # would fail decoding if it were scanned
    for split in ("train", "val"):
        (tmp_path / split / ".DS_Store").write_bytes(junk)
        (tmp_path / split / "cat" / ".DS_Store").write_bytes(junk)
        (tmp_path / split / "cat" / "._0.png").write_bytes(junk)
        img(tmp_path / split / ".ipynb_checkpoints" / "x.png")
        img(tmp_path / split / "__MACOSX" / "cat" / "y.png")
        img(tmp_path / split / "cat" / ".ipynb_checkpoints" / "z.png")
        img(tmp_path / split / ".hidden_class" / "w.png")
    (tmp_path / ".git").mkdir()
    (tmp_path / "__MACOSX").mkdir()
    scan = scan_dataset(tmp_path)
    assert scan.classes == ["cat", "dog"]
    assert scan.counts() == {"train": {"cat": 4, "dog": 3}, "val": {"cat": 2, "dog": 2}, "test": {}}
    assert scan.ignored == {} and scan.skipped == []
    assert not any(part.startswith(".") or part == "__MACOSX" for s in scan.train + scan.val for part in s.path.parts[-3:])


def test_hidden_entries_in_single_folder_layout(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 3, "b": 3})
    img(tmp_path / ".ipynb_checkpoints" / "a.png")
    img(tmp_path / "__MACOSX" / "a" / "b.png")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    assert scan_dataset(tmp_path).classes == ["a", "b"]


# ---- 4.-7. structure errors --------------------------------------------------------------------


def test_class_folder_with_no_images(tmp_path: Path) -> None:
    train_val(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "README.txt").write_text("todo")
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DatasetError, match=r"train/bird: class folder has no images"):
        scan_dataset(tmp_path)


def test_empty_val_class_folder(tmp_path: Path) -> None:
    train_val(tmp_path)
    for p in (tmp_path / "val" / "dog").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"val/dog: class folder has no images"):
        scan_dataset(tmp_path)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope: dataset folder not found"):
        scan_dataset(tmp_path / "nope")


def test_root_is_a_file(tmp_path: Path) -> None:
    f = img(tmp_path / "one.png")
    with pytest.raises(DatasetError, match="is a file, not a dataset folder"):
        scan_dataset(f)


def test_root_with_no_class_folders(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    img(tmp_path / "b.png")
    with pytest.raises(DatasetError, match="no class folders found"):
        scan_dataset(tmp_path)


def test_empty_train_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    make_classes(tmp_path / "val", {"a": 1, "b": 1})
    with pytest.raises(DatasetError, match=r"train: no class folders found"):
        scan_dataset(tmp_path)


def test_only_one_class(tmp_path: Path) -> None:
    make_classes(tmp_path, {"only": 5})
    with pytest.raises(DatasetError, match="only one class.*at least two"):
        scan_dataset(tmp_path)


def test_train_and_val_class_sets_differ(tmp_path: Path) -> None:
    train_val(tmp_path, {"cat": 2, "dog": 2, "eel": 2}, val={"cat": 1, "dog": 1, "fox": 1, "gnu": 1})
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    msg = str(ei.value)
    assert "missing in val: ['eel']" in msg and "not in train: ['fox', 'gnu']" in msg
    assert str(tmp_path / "val") in msg


def test_val_labels_follow_the_training_class_index(tmp_path: Path) -> None:
    train_val(tmp_path, {"b": 2, "a": 2, "c": 2}, val={"c": 1, "a": 1, "b": 1})
    scan = scan_dataset(tmp_path)
    assert scan.classes == ["a", "b", "c"]
    assert [(s.path.parent.name, s.label) for s in scan.val] == [("a", 0), ("b", 1), ("c", 2)]


def test_train_without_val(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 3, "b": 3})
    with pytest.raises(DatasetError, match=r"found train/ but no val/"):
        scan_dataset(tmp_path)


def test_val_without_train(tmp_path: Path) -> None:
    make_classes(tmp_path / "validation", {"a": 3, "b": 3})
    with pytest.raises(DatasetError, match=r"validation folder but no .*train"):
        scan_dataset(tmp_path)


def test_ambiguous_val_folders(tmp_path: Path) -> None:
    train_val(tmp_path)
    make_classes(tmp_path / "validation", {"cat": 1, "dog": 1})
    with pytest.raises(DatasetError, match="ambiguous split folders"):
        scan_dataset(tmp_path)


def test_val_empty_in_single_folder_layout(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DatasetError, match="--val-split 0 leaves no validation"):
        scan_dataset(tmp_path, ScanOptions(val_split=0.0))


def test_class_too_small_to_split(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 1, "b": 6})
    with pytest.raises(DatasetError, match=r"class 'a' has 1 image"):
        scan_dataset(tmp_path)


def test_val_below_min_val_per_class(tmp_path: Path) -> None:
    train_val(tmp_path, {"cat": 5, "dog": 5}, val={"cat": 3, "dog": 1})
    assert scan_dataset(tmp_path, ScanOptions(min_val_per_class=1))
    with pytest.raises(DatasetError, match=r"at least 2 .*'dog': 1"):
        scan_dataset(tmp_path, ScanOptions(min_val_per_class=2))


@pytest.mark.parametrize("bad", [{"val_split": 1.0}, {"val_split": -0.1}, {"min_val_per_class": 0}, {"max_pixels": 0}, {"workers": 0}])
def test_bad_options(bad: dict) -> None:
    with pytest.raises(DatasetError):
        ScanOptions(**bad)


# ---- 10. decompression bombs -------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR declares width x height but holds almost no data (tiny on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb_header_is_refused(tmp_path: Path) -> None:
    train_val(tmp_path)
    bomb = tmp_path / "train" / "cat" / "bomb.png"
    _png_header_only(bomb, 100_000, 100_000)  # 10 G pixels declared, ~100 bytes on disk
    assert bomb.stat().st_size < 200
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    assert str(bomb) in str(ei.value) and "decompression" in str(ei.value)
    scan = scan_dataset(tmp_path, ScanOptions(skip_bad=True))
    assert scan.skipped[0][0] == str(bomb) and "decompression" in scan.skipped[0][1]


def test_decompression_limit_is_configurable(tmp_path: Path) -> None:
    train_val(tmp_path)
    big = img(tmp_path / "train" / "dog" / "big.png", size=(100, 100))
    with pytest.raises(DatasetError, match=r"big.png.*10,000 pixels exceeds the limit of 5,000"):
        scan_dataset(tmp_path, ScanOptions(max_pixels=5_000))
    assert big in {s.path for s in scan_dataset(tmp_path, ScanOptions(max_pixels=10_000)).train}


# ---- 11. names with spaces and non-ASCII -------------------------------------------------------


def test_unicode_and_space_names(odd_tmp: Path) -> None:
    root = odd_tmp / "jeu de données"
    for split, n in (("train", 3), ("val", 1)):
        img(root / split / "café au lait" / f"photo {n} é.jpg", fmt="JPEG")
        img(root / split / "café au lait" / "日本 写真.png")
        img(root / split / "日本" / "a b.png")
        img(root / split / "日本" / "ü.webp")
    scan = scan_dataset(root)
    assert scan.classes == ["café au lait", "日本"]
    assert scan.counts()["train"] == {"café au lait": 2, "日本": 2}
    m = json.loads(json.dumps(scan.to_manifest(), ensure_ascii=False))
    assert m["root"] == str(root) and m["classes"] == scan.classes
    assert rescan_for_run(m).fingerprint == scan.fingerprint


def test_nfc_and_nfd_class_names_are_one_class(tmp_path: Path) -> None:
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    make_classes(tmp_path / "train", {nfc: 2, "tea": 2})
    make_classes(tmp_path / "val", {nfd: 1, "tea": 1})  # as copied from macOS
    scan = scan_dataset(tmp_path)
    assert scan.classes == [nfc, "tea"]
    assert scan.counts()["val"] == {nfc: 1, "tea": 1}


# ---- 12. symlinks ------------------------------------------------------------------------------


def test_symlinked_files_are_followed_and_kept_as_listed(tmp_path: Path) -> None:
    root = train_val(tmp_path / "data")
    target = img(tmp_path / "dog pics" / "real.png", seed=42)
    img(tmp_path / "elsewhere" / "real.png", seed=43)
    link = root / "train" / "dog" / "linked.png"
    link.symlink_to(target)
    (root / "train" / "linked_class").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "val" / "linked_class").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    # the same real folder twice would be a loop guard hit; give val its own copy
    (root / "val" / "linked_class").unlink()
    img(root / "val" / "linked_class" / "v.png")
    scan = scan_dataset(root)
    assert scan.classes == ["cat", "dog", "linked_class"]
    paths = {s.path for s in scan.train}
    assert link in paths  # path as listed, not the target
    assert root / "train" / "linked_class" / "real.png" in paths
    assert target not in paths


def test_one_file_in_two_splits_or_two_classes_is_refused(tmp_path: Path) -> None:
    """val/<class> linked to train/<class> made validation the training set, silently; a file linked into another
    class gave one image two labels."""
    root = train_val(tmp_path / "a")
    shutil.rmtree(root / "val" / "cat")
    (root / "val" / "cat").symlink_to(root / "train" / "cat", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"image\(s\) are the same file \(a symlink or hard link\) as an image of "
                                           r"training.*val/cat/.* \(val, cat\) is .*train/cat/.* \(train, cat\)"):
        scan_dataset(root)
    root = train_val(tmp_path / "b")
    (root / "train" / "dog" / "also_a_cat.png").symlink_to(next((root / "train" / "cat").iterdir()))
    with pytest.raises(DatasetError, match=r"1 image\(s\) are the same file.*\(train, dog\) is .*\(train, cat\)"):
        scan_dataset(root)
    root = train_val(tmp_path / "c")  # a hard link is the same file too
    os.link(next((root / "train" / "dog").iterdir()), root / "val" / "dog" / "linked.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) are the same file.*\(val, dog\) is .*\(train, dog\)"):
        scan_dataset(root)
    root = train_val(tmp_path / "d")  # test -> val: no separate test set, but nothing of training leaks
    (root / "test").symlink_to(root / "val", target_is_directory=True)
    assert len(scan_dataset(root).test) == 4


def test_an_unlabelled_test_folder_beside_train_and_val_is_still_ignored(tmp_path: Path) -> None:
    """Kaggle's layout (train/<class>, val/<class>, test/*.jpg without labels) trained before and still does."""
    root = train_val(tmp_path / "k")
    img(root / "test" / "0001.png")
    scan = scan_dataset(root)
    assert scan.layout == "train/val" and scan.test == []


def test_byte_identical_copies_across_splits_and_classes_are_reported(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """Copies (not links) of training images in val, or of one class's image in another, were not mentioned."""
    root = tmp_path / "d"
    make_classes(root / "train", {"cat": 4, "dog": 3})
    for i, c in enumerate(("cat", "dog")):
        img(root / "val" / c / "fresh.png", seed=1000 + i)
    shutil.copy(root / "train" / "cat" / "0.png", root / "val" / "cat" / "copied.png")
    shutil.copy(root / "train" / "cat" / "1.png", root / "train" / "dog" / "cat_or_dog.png")
    scan = scan_dataset(root)
    copies = scan.copies()
    assert copies["val_in_train"]["count"] == 1 and copies["two_classes"]["count"] == 1 and "test_in_train" not in copies
    assert scan.to_manifest()["copies"] == copies
    with caplog.at_level("WARNING", logger="edgemap.data"):
        scan.warn_copies()
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "1 validation image(s) have the same bytes as a training image" in text
    assert "1 image(s) have the same bytes as an image of another class" in text
    shutil.rmtree(root / "val" / "cat")
    img(root / "val" / "cat" / "new.png", seed=77)
    (root / "train" / "dog" / "cat_or_dog.png").unlink()
    assert scan_dataset(root).copies() == {}


def test_a_class_folder_linked_to_another_class_is_refused_by_name(tmp_path: Path) -> None:
    """kitty -> cat ended in "class folder has no images" (the loop guard had already visited cat)."""
    root = train_val(tmp_path / "d")
    (root / "train" / "kitty").symlink_to(root / "train" / "cat", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"train/kitty: links to the class folder .*train/cat: one folder cannot be "
                                           r"two classes \('cat' and 'kitty'\)"):
        scan_dataset(root)


@pytest.mark.parametrize("name", ["test", "Test", "train", "valid", "VALIDATION"])
def test_a_class_named_like_a_split_is_refused_not_dropped(tmp_path: Path, name: str) -> None:
    """DATA/{test,prod,dev}/*.png trained on prod and dev only, and counted test's images as non-images."""
    for cls in (name, "prod", "dev"):
        for i in range(4):
            img(tmp_path / cls / f"{i}.png", seed=i)
    with pytest.raises(DatasetError, match=rf"{name}: holds images directly, like a class folder, but '{name}' is a "
                                           r"split name.*rename that class folder"):
        scan_dataset(tmp_path)


def test_split_named_classes_together_still_get_the_rename_hint(tmp_path: Path) -> None:
    """train + valid (both classes) skipped the check; test + Test said "keep only one of them" (delete a class)."""
    for cls in ("train", "valid", "other"):
        for i in range(3):
            img(tmp_path / "a" / cls / f"{i}.png", seed=i)
    with pytest.raises(DatasetError, match=r"a/train: holds images directly.*rename that class folder"):
        scan_dataset(tmp_path / "a")
    for cls in ("test", "Test", "dog"):
        for i in range(3):
            img(tmp_path / "b" / cls / f"{i}.png", seed=i)
    with pytest.raises(DatasetError, match=r"ambiguous split folders \['Test', 'test'\].*if these are class folders, "
                                           r"rename them"):
        scan_dataset(tmp_path / "b")


def test_broken_symlink_with_image_extension(tmp_path: Path) -> None:
    train_val(tmp_path)
    dangling = tmp_path / "train" / "cat" / "gone.jpg"
    dangling.symlink_to(tmp_path / "does-not-exist.jpg")
    with pytest.raises(DatasetError, match=r"gone.jpg \(broken symlink"):
        scan_dataset(tmp_path)
    scan = scan_dataset(tmp_path, ScanOptions(skip_bad=True))
    assert scan.skipped == [(str(dangling), "broken symlink: its target does not exist")]


def test_symlink_loops_do_not_hang(tmp_path: Path) -> None:
    root = train_val(tmp_path / "data")
    (root / "train" / "cat" / "loop").symlink_to(root / "train" / "cat", target_is_directory=True)
    (root / "train" / "dog" / "up").symlink_to(root, target_is_directory=True)
    (root / "val" / "dog" / "self").symlink_to("self")  # a link to itself: ELOOP
    result: list = []
    t = threading.Thread(target=lambda: result.append(scan_dataset(root)), daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "scan hung on a symlink loop"
    scan = result[0]
    # the loops add nothing twice, and the link to the root does not pull val images into train
    assert scan.counts() == {"train": {"cat": 4, "dog": 3}, "val": {"cat": 2, "dog": 2}, "test": {}}


def test_class_folder_linking_to_its_split_is_a_clear_error(tmp_path: Path) -> None:
    train_val(tmp_path)
    (tmp_path / "train" / "zz").symlink_to(tmp_path / "train", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"train/zz: symlink loop"):
        scan_dataset(tmp_path)


def test_links_across_classes_or_splits_are_not_followed(tmp_path: Path) -> None:
    train_val(tmp_path)
    (tmp_path / "train" / "cat" / "more").symlink_to(tmp_path / "val" / "cat", target_is_directory=True)
    (tmp_path / "train" / "dog" / "cats").symlink_to(tmp_path / "train" / "cat", target_is_directory=True)
    scan = scan_dataset(tmp_path)
    assert scan.counts()["train"] == {"cat": 4, "dog": 3}


# ---- 13. never modified; fingerprint and rescan ------------------------------------------------


def test_dataset_is_never_modified(tmp_path: Path) -> None:
    root = train_val(tmp_path / "data")
    _truncated_jpeg(root / "train" / "cat" / "t.jpg")
    (root / "train" / "cat" / "notes.txt").write_text("x")
    (root / "val" / ".DS_Store").write_bytes(b"x")
    before = snapshot(root)
    with pytest.raises(DatasetError):
        scan_dataset(root)
    scan = scan_dataset(root, ScanOptions(skip_bad=True))
    rescan_for_run(scan.to_manifest())
    assert snapshot(root) == before
    assert sorted(os.listdir(tmp_path)) == ["data"]  # nothing written beside it either


def test_rescan_for_run_returns_the_same_lists(tmp_path: Path) -> None:
    make_classes(tmp_path / "d", {"a": 6, "b": 7})
    bad = tmp_path / "d" / "a" / "bad.png"
    bad.write_bytes(b"")
    scan = scan_dataset(tmp_path / "d", ScanOptions(val_split=0.3, seed=5, skip_bad=True))
    record = json.loads(json.dumps(scan.to_manifest()))
    assert record["options"]["seed"] == 5 and record["layout"] == "split"
    again = rescan_for_run(record)
    assert (again.train, again.val, again.test) == (scan.train, scan.val, scan.test)
    assert again.classes == scan.classes and again.fingerprint == scan.fingerprint
    assert bad not in {s.path for s in again.train + again.val}
    assert again.skipped == scan.skipped  # same files, same reasons


@pytest.mark.parametrize("change", ["same_size_edit", "add", "remove", "rewrite"])
def test_rescan_refuses_a_changed_dataset(tmp_path: Path, change: str) -> None:
    root = train_val(tmp_path)
    record = scan_dataset(root).to_manifest()
    target = root / "train" / "cat" / "0.png"
    if change == "same_size_edit":  # same size, new bytes: only the content fingerprint can tell
        data = bytearray(target.read_bytes())
        data[-20] ^= 0xFF
        target.write_bytes(bytes(data))
    elif change == "add":
        img(root / "val" / "dog" / "new.png")
    elif change == "remove":
        target.unlink()
    else:
        img(target, seed=99, size=(9, 9))
    with pytest.raises(DatasetError, match="dataset changed since training"):
        rescan_for_run(record)


def test_touched_or_copied_back_files_are_still_the_same_dataset(tmp_path: Path) -> None:
    """New mtimes with the same bytes (touch, cp without -p, git checkout) must not lock a trained run."""
    import shutil

    root = train_val(tmp_path)
    record = json.loads(json.dumps(scan_dataset(root).to_manifest()))
    target = root / "train" / "cat" / "0.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    shutil.copy(root / "val" / "dog" / "0.png", tmp_path / "copy.png")
    (root / "val" / "dog" / "0.png").unlink()
    shutil.copy(tmp_path / "copy.png", root / "val" / "dog" / "0.png")  # restored: same bytes, new mtime
    again = rescan_for_run(record)
    assert again.fingerprint != record["fingerprint"] and again.content_fingerprint() == record["content_fingerprint"]


def test_rescan_of_a_removed_dataset(tmp_path: Path) -> None:
    record = scan_dataset(train_val(tmp_path / "d")).to_manifest()
    for p in sorted((tmp_path / "d").rglob("*"), key=lambda p: -len(p.parts)):
        p.unlink() if p.is_file() else p.rmdir()
    (tmp_path / "d").rmdir()
    with pytest.raises(DatasetError, match="is gone"):
        rescan_for_run(record)


@pytest.mark.parametrize("record", [{}, {"root": "/x"}, "nope", {"root": "/x", "fingerprint": "f", "options": {"val_split": 7}}])
def test_rescan_with_a_malformed_record(record: object) -> None:
    with pytest.raises(ManifestError):
        rescan_for_run(record)  # type: ignore[arg-type]


def test_to_manifest_is_json_and_complete(tmp_path: Path) -> None:
    scan = scan_dataset(train_val(tmp_path), ScanOptions(max_pixels=None))
    m = scan.to_manifest()
    assert json.loads(json.dumps(m)) == m
    assert {"root", "layout", "options", "counts", "fingerprint", "skipped", "ignored"} <= set(m)
    assert m["options"]["max_pixels"] is None
    assert rescan_for_run(m).options == scan.options


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_datasets_scan(odd_tmp: Path) -> None:
    from edgemap.cli import app

    root = train_val(odd_tmp / "d")
    (root / "train" / "cat" / "z.jpg").write_bytes(b"")
    runner = CliRunner()
    r = runner.invoke(app, ["datasets", "scan", str(root)])
    assert r.exit_code == 2 and "z.jpg" in r.output and "--skip-bad" in r.output
    out = odd_tmp / "scan.json"
    r = runner.invoke(app, ["datasets", "scan", str(root), "--skip-bad", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output and "2 classes, 11 images" in r.output
    assert json.loads(out.read_text(encoding="utf-8"))["skipped"][0][0] == str(root / "train" / "cat" / "z.jpg")
    r = runner.invoke(app, ["datasets", "scan", str(root), "--skip-bad", "--val-split", "0", "--seed", "3"],
                      env={"COLUMNS": "300"})
    assert r.exit_code == 0 and "--seed 3" in r.output, r.output
    assert "--val-split" not in r.output.split("next:")[1], r.output  # train/val ignores it; finetune refuses 0


def test_progress_bar_on_a_tty_gives_the_same_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    import edgemap.data.scan as scan_mod

    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    root = train_val(tmp_path, {"cat": 20, "dog": 20})
    plain = scan_dataset(root, ScanOptions(workers=2))
    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.setattr(scan_mod, "_PROGRESS_MIN", 10)
    shown = scan_dataset(root, ScanOptions(workers=2))
    assert "checking images" in fake.getvalue()
    assert (shown.train, shown.val, shown.fingerprint) == (plain.train, plain.val, plain.fingerprint)


def test_class_folders_that_only_hold_the_same_sub_folders_are_warned_about(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """DATA/batch1/{cat,dog} + DATA/batch2/{cat,dog} trained the classes batch1 and batch2 without a word."""
    for batch in ("batch1", "batch2"):
        make_classes(tmp_path / batch, {"cat": 3, "dog": 3})
    with caplog.at_level(logging.WARNING, logger="edgemap.data"):
        scan = scan_dataset(tmp_path)
    assert scan.classes == ["batch1", "batch2"]
    assert "every class folder (batch1, batch2) holds only the same sub-folders (cat, dog)" in caplog.text
    caplog.clear()
    make_classes(tmp_path / "batch2" / "cat", {"extra": 1})  # sub-folders that differ: a real nested layout
    (tmp_path / "batch1" / "loose.png").write_bytes((tmp_path / "batch1" / "cat" / "0.png").read_bytes())
    with caplog.at_level(logging.WARNING, logger="edgemap.data"):
        scan_dataset(tmp_path)
    assert "same sub-folders" not in caplog.text


def test_the_copy_aware_split_keeps_the_validation_share_and_old_runs_keep_their_split(tmp_path: Path) -> None:
    """One image copied 60 times among 40: validation took 61 of 100 (the first group in hash order, whatever its size);
    and runs recorded before the rule changed must rescan to the files and split they were made from."""
    import json

    big = tmp_path / "big"
    make_classes(big, {"a": 40, "b": 5})
    for i in range(60):
        shutil.copy(big / "a" / "0.png", big / "a" / f"copy{i}.png")
    for seed in range(5):
        counts = scan_dataset(big, ScanOptions(val_split=0.2, seed=seed)).counts()
        assert counts["val"]["a"] <= 20 and counts["train"]["a"] >= 80, (seed, counts)
    same = tmp_path / "same"  # one image copied: no unseen image can exist; it trains (the copies warning says so)
    make_classes(same, {"b": 4})
    (same / "a").mkdir()
    for i in range(4):
        shutil.copy(same / "b" / "0.png", same / "a" / f"{i}.png")
    assert scan_dataset(same).counts()["val"]["a"] == 1
    # a run recorded without a rule is read with rule 1: no .jfif, copies split by path, as when it was made
    old = tmp_path / "old"
    make_classes(old, {"a": 12, "b": 5})
    for i in range(3):
        shutil.copy(old / "a" / f"{i}.png", old / "a" / f"{i} (1).png")
    img(old / "a" / "saved.jfif", fmt="JPEG")
    made = scan_dataset(old, ScanOptions(rule=1)).to_manifest()
    made["options"].pop("rule")  # as edgemap.json was written before the field existed
    again = rescan_for_run(json.loads(json.dumps(made)))
    assert again.options.rule == 1 and again.fingerprint == made["fingerprint"]
    assert not any(s.path.suffix == ".jfif" for s in again.train + again.val)
    assert scan_dataset(old).options.rule == 2 and any(s.path.suffix == ".jfif" for s in scan_dataset(old).train +
                                                       scan_dataset(old).val)


def test_a_scan_reads_each_files_bytes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images of one size (BMPs, raw camera dumps) were read twice: by the split's copy check, then again for the
    training digests and the content fingerprint that finetune records."""
    import edgemap.data.scan as scan_mod

    for c in ("cat", "dog"):
        for i in range(6):
            img(tmp_path / c / f"{i}.bmp", seed=i + (c == "dog") * 10)  # one size: every file may be a copy
    reads: list[Path] = []
    real = scan_mod.file_sha256

    def counted(path: str | Path) -> str:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(scan_mod, "file_sha256", counted)
    scan = scan_dataset(tmp_path)
    assert len(reads) == 12  # the copy check read them all
    digests, fingerprint = scan.train_digests(), scan.content_fingerprint()
    assert len(reads) == 12, sorted(reads)  # and nothing again
    monkeypatch.setattr(scan_mod, "file_sha256", real)
    fresh = scan_dataset(tmp_path)
    fresh._read.clear()  # digests read now, from the files: the same as the reused ones
    assert (fresh.train_digests(), fresh.content_fingerprint()) == (digests, fingerprint)


def test_a_changed_test_split_leaves_the_model_standing_but_not_a_changed_training_set(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Labelled photos added to test/ made every later command refuse the run ("dataset changed since training ...
    train a new run"); the model depends on train and val only. Runs recorded before (no model fingerprint) keep
    the strict check."""
    from edgemap.data.scan import rescan_for_run

    train_val(tmp_path)
    make_classes(tmp_path / "test", {"cat": 2, "dog": 2})
    record = scan_dataset(tmp_path).to_manifest()
    img(tmp_path / "test" / "cat" / "new.png", seed=99)
    with caplog.at_level(logging.WARNING, logger="edgemap.data"):
        scan = rescan_for_run(record)
    assert scan.test_changed == "test 5 images, was 4" and len(scan.test) == 5
    assert "the test split changed since training (test 5 images, was 4); training and validation did not" in caplog.text
    old = {k: v for k, v in record.items() if k != "model_fingerprint"}
    with pytest.raises(DatasetError, match="dataset changed since training"):
        rescan_for_run(old)
    # a copy of a training image added as a "new" test photo: said (it would be scored as unseen)
    shutil.copy(next((tmp_path / "train" / "cat").iterdir()), tmp_path / "test" / "cat" / "copy.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgemap.data"):
        rescan_for_run(record)
    assert re.search(r"\d+ test image\(s\) have the same bytes as a training image: test accuracy counts them as "
                     r"unseen \(e\.g\. ", caplog.text), caplog.text
    (tmp_path / "test" / "cat" / "copy.png").unlink()
    # the test split removed: refused (eval would score the validation split as unseen)
    shutil.move(tmp_path / "test", tmp_path.parent / f"{tmp_path.name}-test-aside")
    with pytest.raises(DatasetError, match=r"test 0 images, was 4"):
        rescan_for_run(record)
    shutil.move(tmp_path.parent / f"{tmp_path.name}-test-aside", tmp_path / "test")
    # training changed too: that is said first, not the test split (which alone would be accepted)
    img(tmp_path / "train" / "cat" / "extra.png", seed=77)
    with pytest.raises(DatasetError, match=r"\(training or validation images changed .*; train 8 images, was 7"):
        rescan_for_run(record)
    (tmp_path / "train" / "cat" / "extra.png").unlink()
    img(tmp_path / "val" / "dog" / "new.png", seed=98)
    with pytest.raises(DatasetError, match=r"dataset changed since training: .*val 5 images, was 4, test 5 images"):
        rescan_for_run(record)
    # a class renamed since: said as such (the counts alone did not tell why)
    for split in ("train", "val", "test"):
        (tmp_path / split / "dog").rename(tmp_path / split / "hound")
    with pytest.raises(DatasetError, match=r"\(classes added: hound; classes gone: dog"):
        rescan_for_run(record)
    for split in ("train", "val", "test"):
        (tmp_path / split / "hound").rename(tmp_path / split / "dog")
    # an empty val/<class>: removing it (as advised) only led to "classes differ from train"
    for f in (tmp_path / "val" / "cat").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="validation needs images of every class: add some, or remove 'cat' from"):
        scan_dataset(tmp_path)
