"""The task model: a backbone, a new classifier head, and the input contract inside.

``forward`` takes what a device has after decode + resize: a uint8 RGB batch
(N, H, W, 3). It casts, transposes and normalises itself, so the exported ONNX graph
carries the preprocessing and nothing on the device can differ from training.
"""

from __future__ import annotations

import torch
from torch import nn

from edgemap.backbones import build_backbone
from edgemap.runtime.preprocess import PreprocessContract


class ClassifierNet(nn.Module):
    """backbone.forward_features → dropout → Linear(num_features, num_classes)."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, contract: PreprocessContract, dropout: float = 0.2,
                 head: str = "_fc"):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)
        self.register_buffer("mean", torch.tensor(contract.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(contract.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # Drop the backbone's ImageNet head (named by its BackboneSpec): the task head replaces it.
        if hasattr(self.backbone, head):
            setattr(self.backbone, head, nn.Identity())

    def normalize(self, x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 → (N, 3, H, W) float normalised (the in-graph preprocessing)."""
        x = x_uint8_nhwc.permute(0, 3, 1, 2).to(torch.float32)
        return (x - self.mean) * self.inv_std

    def features(self, x_norm: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x_norm)

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(feats))

    def forward_normalized(self, x_norm: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x_norm))

    def forward(self, x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        return self.forward_normalized(self.normalize(x_uint8_nhwc))


def build_classifier(
    backbone: str, num_classes: int, contract: PreprocessContract, pretrained: bool = True, seed: int = 0, dropout: float = 0.2
) -> ClassifierNet:
    """Backbone (pretrained unless told otherwise) + a freshly initialised head (seeded)."""
    spec, bb = build_backbone(backbone, pretrained=pretrained, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        net = ClassifierNet(bb, spec.num_features, num_classes, contract, dropout=dropout, head=spec.head)
    return net


def load_classifier(run_dir, which: str = "weights_best") -> ClassifierNet:  # noqa: ANN001
    """Rebuild the trained model of a run directory from its manifest and safetensors weights."""
    from safetensors.torch import load as load_bytes

    from edgemap.errors import ExportError, ManifestError, ModelIntegrityError

    if which not in run_dir.artifacts:
        raise ExportError(f"{run_dir.path}: no trained weights ('{which}') recorded; run `edgemap finetune` to completion first")
    path, data = run_dir.artifact_bytes(which)  # loaded from the very bytes whose sha256 was checked
    dropout = run_dir.data.get("options", {}).get("finetune", {}).get("dropout", 0.2)  # checked by validate_manifest
    net = build_classifier(run_dir.backbone, len(run_dir.classes), run_dir.contract, pretrained=False,
                           dropout=float(dropout))
    try:
        state = load_bytes(data)  # safetensors: never unpickles
    except Exception as e:  # SafetensorError, OSError: a corrupt file or a pickle renamed .safetensors
        raise ModelIntegrityError(f"{path}: not a valid safetensors weights file ({e}); re-run `edgemap finetune`") from e
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ: the manifest's classes or backbone are not what these weights were
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:2]
        raise ManifestError(
            f"{path}: weights do not fit the run's {len(run_dir.classes)} classes and backbone {run_dir.backbone} "
            f"({'; '.join(shapes) or e}); was {run_dir.manifest_path} edited? Restore it, or re-run `edgemap finetune`"
        ) from None
    if missing or unexpected:
        raise ExportError(f"{path}: weights do not fit backbone {run_dir.backbone} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net.eval()
