"""Pretrained backbones (registry in :mod:`edgemap.backbones.registry`)."""

from edgemap.backbones.registry import (
    BackboneSpec,
    build_backbone,
    count_params,
    get_spec,
    list_backbones,
    register_backbone,
    weights_available,
)

__all__ = [
    "BackboneSpec",
    "build_backbone",
    "count_params",
    "get_spec",
    "list_backbones",
    "register_backbone",
    "weights_available",
]
