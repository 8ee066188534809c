"""Helpers shared by the package and docker tests: a tiny exported run and fresh venvs.

Also holds the cheap unit tests of those helpers' assumptions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["cat", "dög", "日本"]
SIZE = 32
#: Probability tolerance between the installed wheel and in-process eval on the same artifact.
#: Same runtime, same uint8 input: only the batch composition differs (the CLI batches 16, eval
#: batches 32), which changes ORT's reduction order by a few float32 ulps of the logits.
PROB_TOL = 1e-5
#: OpenVINO runs fp32 models in bf16 on AMX/AVX512-BF16 CPUs by default: logits keep ~3 significant digits.
PROB_TOL_OPENVINO = 2e-2


def make_images(root: Path, per_class: int = 4, seed: int = 0) -> list[Path]:
    """A folder dataset DATA/{train,val}/<class>/ of small varied images (colours, gradients, noise, modes)."""
    rng = np.random.default_rng(seed)
    out = []
    for split in ("train", "val"):
        for ci, cname in enumerate(CLASSES):
            d = root / split / cname
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = 24 + 7 * i, 40 - 3 * i
                base = np.zeros((h, w, 3), np.float32)
                base[..., ci] = 200
                base += np.linspace(0, 55 * (i % 3), w, dtype=np.float32)[None, :, None]
                base += rng.normal(0, 20, size=base.shape)
                arr = np.clip(base, 0, 255).astype(np.uint8)
                im = Image.fromarray(arr)
                name = f"{split} img é {i}"
                if i % 4 == 1:
                    p = d / f"{name}.jpg"
                    exif = Image.Exif()
                    exif[0x0112] = 6  # EXIF orientation: rotate 90°; the shared preprocessing applies it
                    im.save(p, quality=90, exif=exif)
                elif i % 4 == 2:
                    p = d / f"{name}.png"
                    im.convert("RGBA").save(p)
                elif i % 4 == 3:
                    p = d / f"{name}.png"
                    im.convert("L").save(p)
                else:
                    p = d / f"{name}.png"
                    im.save(p)
                out.append(p)
    return out


def add_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path))
    for k, v in props.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(m, str(path))


def make_tiny_run(run_path: Path, data: Path | None = None, head_scale: float = 40.0):
    """A run dir with weights_best and an fp32 ``model.onnx`` carrying edgemap metadata.

    Stands in for ``edgemap finetune`` + ``edgemap export`` at 32 px with the tiny backbone.
    The head is scaled so predictions are confident (no near-ties that a float ulp could flip).
    """
    import torch
    from safetensors.torch import save_file

    from edgemap.manifest import RunDir
    from edgemap.model import build_classifier
    from edgemap.runtime import metadata as K
    from edgemap.runtime.preprocess import PreprocessContract

    contract = PreprocessContract(SIZE, SIZE)
    run = RunDir.create(run_path, backbone={"name": "tiny"}, classes=CLASSES, contract=contract)
    net = build_classifier("tiny", len(CLASSES), contract, pretrained=False, seed=0).eval()
    with torch.no_grad():
        net.head.weight.mul_(head_scale)
    (run_path / "weights").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run_path / "weights" / "best.safetensors"))
    run.add_artifact("weights_best", run_path / "weights" / "best.safetensors", stage="finetune")
    p = run_path / "model.onnx"
    torch.onnx.export(net, torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8), str(p), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    add_metadata(p, {
        K.SCHEMA: K.METADATA_SCHEMA_VERSION, K.CLASSES: json.dumps(CLASSES), K.PREPROCESS: json.dumps(contract.to_dict()),
        K.BACKBONE: "tiny", K.RUN: run_path.name, K.PRECISION: "fp32", K.FORMAT: "fp32",
        K.INPUT: json.dumps({"name": "images", "layout": "NHWC", "dtype": "uint8", "shape": [-1, SIZE, SIZE, 3]}),
    })
    run.add_artifact("onnx_fp32", p, stage="export", precision="fp32", format="fp32")
    return run


def add_mode_images(val_dir: Path, seed: int = 1) -> list[Path]:
    """Extra validation images of the export fixture's classes in other modes and odd names
    (RGBA, grayscale, EXIF-rotated JPEG), so the wheel's preprocessing is compared on them too."""
    from _export_fixtures import CLASSES as EXPORT_CLASSES
    from _export_fixtures import pattern

    rng = np.random.default_rng(seed)
    out = []
    for label, cname in enumerate(EXPORT_CLASSES):
        d = val_dir / cname
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(pattern(label, rng, 48))
        exif = Image.Exif()
        exif[0x0112] = 6
        for p, img, kw in ((d / "photo é 1.jpg", im, {"quality": 92, "exif": exif}),
                           (d / "alpha 日本.png", im.convert("RGBA"), {}),
                           (d / "grey one.png", im.convert("L"), {})):
            img.save(p, **kw)
            out.append(p)
    return out


def make_exported_run(root: Path, steps: int = 100):
    """A trained tiny run exported by the real ``edgemap export --int8`` (fp32 + QOperator + QDQ).

    Returns (run, validation image paths)."""
    from _export_fixtures import make_run, write_dataset

    from edgemap.export import ExportOptions, export

    data = write_dataset(root / "data", n_train=24, n_val=6)
    add_mode_images(data / "val")
    run, _ = make_run(root / "run", data, steps=steps)
    export(run, ExportOptions(int8=True, calib_size=24))
    val = sorted(p for p in (data / "val").rglob("*") if p.is_file())
    return run, val


def fresh_venv(path: Path) -> Path:
    """``python -m venv`` (never --system-site-packages); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True)
    py = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    assert py.exists()
    return py


def pip_install(py: Path, *args: str) -> None:
    """pip install into a venv (packages come from the pip cache / configured index)."""
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"pip install {args} failed:\n{proc.stdout}\n{proc.stderr}")


def venv_env(py: Path) -> dict[str, str]:
    """Environment for running a venv's commands: its bin first, no PYTHONPATH leaking edgemap in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = str(py.parent) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(py.parent.parent)
    return env


def test_images_cover_modes(tmp_path: Path) -> None:
    paths = make_images(tmp_path, per_class=4)
    modes = {Image.open(p).mode for p in paths}
    assert {"RGB", "RGBA", "L"} <= modes
    assert len(paths) == 2 * 4 * len(CLASSES)
