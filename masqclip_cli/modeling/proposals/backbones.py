"""The backbone registry of the proposal network: a backbone is one decorated builder in one file.

To add one, write ``masqclip_cli/modeling/proposals/backbone_<name>.py``::

    from masqclip_cli.modeling.proposals.backbones import register_backbone

    @register_backbone("mynet")
    def build_mynet(config: dict) -> torch.nn.Module:
        ...  # a module mapping (B, 3, H, W) to {"res2": ..., "res5": ...}, with out_channels and strides dicts

and select it with ``"backbone": {"type": "mynet", ...}`` in a proposal config. Modules named ``backbone*`` in
this package are found and imported the first time a backbone is built, so no other file changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "build_backbone", "register_backbone"]

#: Backbone builders by ``backbone.type``: ``config (the backbone section) -> nn.Module`` whose forward maps
#: ``(B, 3, Hp, Wp)`` to ``{"res2": ..., "res5": ...}`` and which has ``out_channels`` and ``strides`` dicts.
BACKBONES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {}
#: The type of a backbone section that names none (the official detectron2 ResNet).
DEFAULT_BACKBONE = "resnet"
_discovered = False


def register_backbone(name: str) -> Callable[[Callable[[Mapping[str, Any]], nn.Module]],
                                             Callable[[Mapping[str, Any]], nn.Module]]:
    """Decorator: register a backbone builder under ``name`` (a second builder of one name is a ValueError)."""

    def decorate(builder: Callable[[Mapping[str, Any]], nn.Module]) -> Callable[[Mapping[str, Any]], nn.Module]:
        if name in BACKBONES and BACKBONES[name] is not builder:
            raise ValueError(f"a backbone named {name!r} is already registered")
        BACKBONES[name] = builder
        return builder

    return decorate


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    package = importlib.import_module("masqclip_cli.modeling.proposals")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("backbone") and info.name != "backbones":
            importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


def build_backbone(config: Mapping[str, Any]) -> nn.Module:
    """The backbone a proposal config's ``backbone`` section describes (``type``, default ``resnet``)."""
    _discover()
    kind = str(config.get("type", DEFAULT_BACKBONE))
    if kind not in BACKBONES:
        raise ValueError(f"unknown backbone type {kind!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[kind](config)
