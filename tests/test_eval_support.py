"""Helpers (no tests) shared by test_eval*, test_bench* and test_sessions: a small trained run.

A generated 6-class colour dataset (PNG files, 32 px), the `tiny` backbone trained for a few
hundred SGD steps, then ONNX fp32 + int8 (QOperator and QDQ) artifacts made by
``edgemap.export``.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
from _export_fixtures import sgd_train
from PIL import Image

from edgemap.manifest import RunDir
from edgemap.runtime.preprocess import PreprocessContract

#: each class's hue; the run's classes in the order the scanner gives them (sorted), as `edgemap finetune` makes them
HUES = {"red": 0 / 6, "yellow": 1 / 6, "green": 2 / 6, "cyan": 3 / 6, "blue": 4 / 6, "magenta": 5 / 6}
CLASSES = sorted(HUES)
SIZE = 32


def make_images(root: Path, n_per_class: int, seed: int) -> list[tuple[Path, int]]:
    """Noisy images whose mean hue says the class; written as PNG under root/<class>/."""
    rng = np.random.default_rng(seed)
    out = []
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            hue = (HUES[name] + rng.normal(0, 0.06)) % 1.0
            r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0))
            img = np.array([r, g, b]) * 255 + rng.normal(0, 40, (SIZE + 8, SIZE + 4, 3))
            p = root / name / f"img {i:03d}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
            out.append((p, k))
    return out


def load_arrays(samples: list[tuple[Path, int]], contract: PreprocessContract) -> tuple[np.ndarray, np.ndarray]:
    from edgemap.runtime.preprocess import preprocess_batch

    return preprocess_batch([p for p, _ in samples], contract), np.array([y for _, y in samples], np.int64)


def build_trained_run(base: Path, steps: int = 150, seed: int = 0) -> tuple[RunDir, dict[str, list]]:
    """Dataset under base/data, run under base/run: trained tiny net + weights_best."""
    import torch
    from safetensors.torch import save_file

    from edgemap.model import build_classifier

    data = base / "data"
    splits = {
        "train": make_images(data / "train", 24, seed),
        "val": make_images(data / "val", 8, seed + 1),
        "test": make_images(data / "test", 10, seed + 2),
    }
    from edgemap.data.scan import scan_dataset

    contract = PreprocessContract(SIZE, SIZE)
    scan = scan_dataset(data)
    assert scan.classes == sorted(CLASSES)
    run = RunDir.create(
        base / "run", backbone={"name": "tiny"}, classes=CLASSES, contract=contract, dataset=scan.to_manifest(),
    )
    torch.manual_seed(seed)
    net = build_classifier("tiny", len(CLASSES), contract, pretrained=False, seed=seed)
    x, y = load_arrays(splits["train"], contract)
    sgd_train(net, torch.from_numpy(x), torch.from_numpy(y), steps, seed)
    (run.path / "weights").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run.path / "weights" / "best.safetensors"))
    run.add_artifact("weights_best", run.path / "weights" / "best.safetensors", stage="finetune")
    run.set_stage("finetune", "done")
    return run, splits


def export_run(run: RunDir) -> None:
    """fp32 + int8 (qoperator, qdq) ONNX artifacts through the real export stage (parity + accuracy gate)."""
    from edgemap.export import ExportOptions, export

    export(run.path, ExportOptions(int8=True, max_drop=5.0))  # 48 val images: one flip is 2 points
    run.data = RunDir.load(run.path).data


_BUILT: dict[str, tuple[RunDir, dict[str, list]]] = {}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, dict[str, list]]:
    """A trained + exported tiny run in a folder whose path has a space, é and 日本.

    Built once per test session (cached here: the modules importing this fixture share it).
    """
    if "run" not in _BUILT:
        base = tmp_path_factory.mktemp("eval") / "runs é 日本"
        base.mkdir()
        run, splits = build_trained_run(base)
        export_run(run)
        _BUILT["run"] = (run, splits)
    run, splits = _BUILT["run"]
    return RunDir.load(run.path), splits
