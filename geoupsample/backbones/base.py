"""The backbone contract shared by every feature extractor.

A backbone maps a tile of ``d`` bands on the high-resolution (HR) grid, ``[d, H, W]`` (or a batch
``[B, d, H, W]``), to low-resolution (LR) features ``[C, h, w]`` (or ``[B, C, h, w]``) with
``h = H // stride`` and ``w = W // stride``. LR cell ``(i, j)`` covers the HR pixels
``[i * stride, (i + 1) * stride) x [j * stride, (j + 1) * stride)``, so its centre sits at HR pixel
``(i + 0.5) * stride - 0.5``, the convention of :mod:`geoupsample.core`. Tiles must measure a
multiple of :attr:`Backbone.patch_size` on both axes; the tiling engine sizes them so.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import nn

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


class BackboneError(ValueError):
    """A backbone was asked for something it cannot do (unknown name, bad band choice, ...)."""


class BandCountError(BackboneError):
    """The number of input bands does not match what the model or its weights expect."""


class WeightsNotFoundError(FileNotFoundError):
    """No weights where the user pointed (a missing file, or a model not in the local cache)."""


class Backbone(nn.Module):
    """Base class: a module from HR tiles ``[(B,) d, H, W]`` to LR features ``[(B,) C, h, w]``.

    Subclasses set :attr:`in_chans` (the ``d`` a tile must have, or None),
    :attr:`num_features` (``C``) and :attr:`stride` (HR pixels per LR cell), and implement
    :meth:`_features` on a float32 batch ``[B, d, H, W]`` whose sides are multiples of
    :attr:`patch_size`.
    """

    #: Number of bands the input tile must have (``d``); None when any count with the needed
    #: bands is accepted.
    in_chans: int | None
    #: Number of output feature channels (``C``).
    num_features: int
    #: HR pixels per LR cell along each axis.
    stride: int
    #: Whether the channels are in different units (band statistics beside indices), so that a
    #: PCA must standardise them first; an embedding's channels share one.
    mixed_units: bool = False

    @property
    def context_margin(self) -> int:
        """HR pixels beyond a tile's own that the features of its cells depend on, when read
        window by window (0: none; a model's receptive field is the engine's halo's business)."""
        return 0

    @property
    def patch_size(self) -> int:
        """Tile sides must be a multiple of this (HR pixels). Equal to :attr:`stride`."""
        return self.stride

    def feature_names(self, d: int | None = None) -> list[str]:
        """Names of the ``C`` output channels (band descriptions of a features raster)."""
        return [f"feature_{i}" for i in range(self.num_features)]

    def lr_shape(self, height: int, width: int) -> tuple[int, int]:
        """The LR grid ``(h, w)`` of a tile of ``height x width`` HR pixels."""
        self._check_size(height, width)
        return height // self.stride, width // self.stride

    def _check_size(self, height: int, width: int) -> None:
        p = self.patch_size
        if height % p or width % p or height < p or width < p:
            raise BackboneError(
                f"tile of {height}x{width} px is not a positive multiple of the backbone's patch "
                f"size {p}: crop or pad it to a multiple of {p} (the tiling engine does this)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LR features of a tile ``[d, H, W]`` -> ``[C, h, w]`` or a batch ``[B, d, H, W]``."""
        if x.ndim not in (3, 4):
            raise BackboneError(
                f"expected a tile [d, H, W] or a batch [B, d, H, W], got {tuple(x.shape)}"
            )
        batched = x.ndim == 4
        xb = x if batched else x.unsqueeze(0)
        self._check_bands(int(xb.shape[1]))
        self._check_size(int(xb.shape[-2]), int(xb.shape[-1]))
        out = self._features(xb.float())
        expected = (xb.shape[-2] // self.stride, xb.shape[-1] // self.stride)
        if tuple(out.shape[-2:]) != expected:
            raise BackboneError(
                f"{type(self).__name__} returned a {tuple(out.shape[-2:])} grid for a "
                f"{tuple(xb.shape[-2:])} tile, expected {expected} at stride {self.stride}"
            )
        return out if batched else out[0]

    def _check_bands(self, d: int) -> None:
        """Raise :class:`BandCountError` unless a tile of ``d`` bands is acceptable."""
        if self.in_chans is not None and d != self.in_chans:
            raise BandCountError(
                f"{type(self).__name__} was built for {self.in_chans} band(s) but the tile has {d}"
            )

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def extract(self, tile: ArrayT) -> ArrayT:
        """Inference helper: features of a numpy or torch tile, returned as the same array type.

        Runs without gradients on the module's device; numpy in gives float32 numpy out.
        """
        was_numpy = isinstance(tile, np.ndarray)
        x = torch.from_numpy(np.ascontiguousarray(tile)) if was_numpy else tile
        device = next((p.device for p in self.parameters()), None)
        if device is None:
            device = next((b.device for b in self.buffers()), x.device)
        was_training = self.training
        self.eval()
        try:
            out = self(x.to(device=device, dtype=torch.float32))
        finally:
            self.train(was_training)
        if was_numpy:
            return out.detach().cpu().numpy().astype(np.float32, copy=False)
        return out.to(tile.device)
