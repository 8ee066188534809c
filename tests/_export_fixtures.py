"""Trained run directories for the export tests, generated on the fly (no binary fixtures).

A 3-class dataset of coloured patterns (red/green/blue dominant, with noise and a random
rectangle) is written as PNGs, scanned with the real scanner, and a ``tiny`` classifier is
trained on it for a few hundred SGD steps, so export/parity/int8 work on a model that
actually predicts something.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from edgemap.manifest import RunDir
from edgemap.runtime.preprocess import PreprocessContract

CLASSES = ["bright", "dark", "mid"]  # sorted, as the scanner orders them
_LEVEL = {0: (175, 225), 1: (15, 65), 2: (95, 145)}


def pattern(label: int, rng: np.random.Generator, size: int = 32, flat: bool = False) -> np.ndarray:
    """One uint8 RGB image of class ``label``: its brightness level, noise and a small patch.

    ``flat``: a flat mid-grey image instead (127: all zeros after normalisation). A
    calibration set of those is deliberately bad: every activation range it measures is a
    small fraction of what real images produce, so int8 saturates exactly where the classes
    differ (in brightness) and predicts one class for everything.
    """
    if flat:
        return np.full((size, size, 3), 127, np.uint8)
    lo, hi = _LEVEL[label]
    img = rng.integers(lo, hi, (size, size, 1)) + rng.integers(-25, 26, (size, size, 3))
    y0, x0 = rng.integers(0, size - 8, 2)
    img[y0 : y0 + 6, x0 : x0 + 6] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(root: Path, n_train: int = 40, n_val: int = 12, seed: int = 0, size: int = 32,
                  flat_train: bool = False) -> Path:
    """DATA/train/<class>/*.png + DATA/val/<class>/*.png."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(pattern(label, rng, size, flat=flat_train and split == "train")).save(d / f"{i:03d}.png")
    return root


def sgd_train(net, x, y, steps: int, seed: int) -> None:  # noqa: ANN001 - torch objects
    """A few hundred plain SGD steps on uint8 NHWC tensors: a non-random model in seconds."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def make_run(run_path: Path, data_root: Path, backbone: str = "tiny", size: int = 32, steps: int = 300,
             state: dict | None = None, seed: int = 0) -> tuple[RunDir, dict]:
    """Scan ``data_root``, create a run dir, train (or reuse ``state``) and record ``weights_best``."""
    import torch
    from safetensors.torch import save_file

    from edgemap.backbones import get_spec
    from edgemap.data.scan import scan_dataset
    from edgemap.export.calibration import load_images
    from edgemap.model import build_classifier

    scan = scan_dataset(data_root)
    spec = get_spec(backbone)
    contract = PreprocessContract(size, size, crop_pct=1.0, interpolation=spec.interpolation, mean=spec.mean, std=spec.std)
    run = RunDir.create(run_path, backbone={"name": backbone}, classes=scan.classes, contract=contract,
                        options={"finetune": {"dropout": 0.2}}, dataset=scan.to_manifest())
    net = build_classifier(backbone, len(scan.classes), contract, pretrained=backbone != "tiny", seed=seed)
    if state is None:
        x = torch.from_numpy(load_images(scan.train, contract))
        y = torch.tensor([s.label for s in scan.train])
        sgd_train(net, x, y, steps, seed)
        state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    weights = run.path / "weights" / "best.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(weights))
    run.add_artifact("weights_best", weights, stage="finetune")
    run.set_stage("finetune", "done")
    return run, state
