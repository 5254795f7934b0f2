"""Feature extractors ("backbones") behind one registry: ``create(name, **kwargs)``.

Names:

- ``"spectral"``: weight-free per-cell band statistics and spectral indices, and their means
  over the neighbouring cells (:class:`~geoupsample.backbones.spectral.SpectralBackbone`);
  works offline on any machine.
- ``"timm:<model>"``: any timm model, ViT-style patch tokens or CNN stages
  (:class:`~geoupsample.backbones.timm_backbone.TimmBackbone`); weights from a local file,
  the user's Hugging Face cache, or random (``random_init=True``) for smoke tests.

Every backbone maps a tile ``[d, H, W]`` (or ``[B, d, H, W]``) to LR features ``[C, h, w]`` with
``h = H / stride``; see :class:`~geoupsample.backbones.base.Backbone` for the grid convention.
More schemes can be added with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Backbone, BackboneError, BandCountError, WeightsNotFoundError
from .spectral import SpectralBackbone
from .timm_backbone import TimmBackbone
from .weights import read_state_dict

__all__ = [
    "Backbone",
    "BackboneError",
    "BandCountError",
    "SpectralBackbone",
    "TimmBackbone",
    "WeightsNotFoundError",
    "available",
    "create",
    "read_state_dict",
    "register",
]

#: scheme -> factory(argument after the colon or None, **kwargs)
_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register(scheme: str) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator registering ``factory(arg: str | None, **kwargs) -> Backbone`` under ``scheme``.

    ``create("scheme:arg")`` then calls ``factory("arg", ...)``; ``create("scheme")`` passes None.
    """

    def deco(factory: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _REGISTRY[scheme] = factory
        return factory

    return deco


def available() -> list[str]:
    """Registered schemes, e.g. ``["spectral", "timm"]``."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> Backbone:
    """Build a backbone by name: ``"spectral"`` or ``"timm:<model>"`` (see the module docstring).

    Keyword arguments go to the backbone's constructor. Raises :class:`BackboneError` for an
    unknown name, with the names that exist.
    """
    scheme, sep, arg = name.partition(":")
    factory = _REGISTRY.get(scheme.strip().lower())
    if factory is None or (sep and not arg.strip()):
        raise BackboneError(
            f"unknown backbone {name!r}; use 'spectral' or 'timm:<model name>' "
            "(e.g. 'timm:vit_small_patch14_reg4_dinov2', 'timm:resnet18')"
        )
    return factory(arg.strip() if sep else None, **kwargs)


@register("spectral")
def _spectral(arg: str | None, **kwargs: Any) -> Backbone:
    if arg is not None:
        raise BackboneError(f"'spectral' takes no model name, got 'spectral:{arg}'")
    return SpectralBackbone(**kwargs)


@register("timm")
def _timm(arg: str | None, **kwargs: Any) -> Backbone:
    if arg is None:
        raise BackboneError("name the timm model: 'timm:<model>', e.g. 'timm:resnet18'")
    return TimmBackbone(arg, **kwargs)
