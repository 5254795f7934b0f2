"""A PCA of low-res features, fitted once on a sample of a scene so that every tile projects
its features the same way.

Features in one unit (a model's embedding) are reduced as they are (covariance PCA); features in
mixed units (the ``spectral`` backbone's band means in digital numbers beside NDVI in [-1, 1])
are standardised first (correlation PCA), or the components would be the largest-valued bands
alone.

A PCA is fitted on a sample of the whole scene (never of an area of interest alone: runs on
adjacent AOIs would project differently and could not be mosaicked), each component's sign
fixed by a rule (its largest loading positive), and can be saved (:meth:`PCA.save`, JSON) and
reused on other runs and scenes (:meth:`PCA.load`), so that their components mean the same.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from geoupsample.inputs import InputError


@dataclass(frozen=True)
class PCA:
    """A PCA of LR features: ``mean [C]``, ``scale [C]`` (the features are divided by it after
    centring: their standard deviations, or ones) and ``components [K, C]`` (rows orthonormal);
    ``explained [K]`` the share of the (scaled) variance each component holds; ``about``: what
    it was fitted on (the backbone, the scene), as saved with it."""

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    scale: np.ndarray
    about: dict[str, Any] = field(default_factory=dict, compare=False)

    #: The ``format`` of a saved PCA.
    FORMAT = "geoupsample-pca/1"

    @property
    def n_features(self) -> int:
        return int(self.components.shape[1])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the PCA to ``path`` (JSON: its arrays as lists, and :attr:`about`), atomically."""
        state = {"format": self.FORMAT, "about": self.about, "mean": self.mean.tolist(),
                 "scale": self.scale.tolist(), "components": self.components.tolist(),
                 "explained": self.explained.tolist()}  # fmt: skip
        path = os.fspath(path)
        tmp = f"{path}.partial"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PCA:
        """Read a PCA written by :meth:`save`; a clear error for another or a broken file."""
        path = os.fspath(path)
        try:
            with open(path) as f:
                state = json.load(f)
        except FileNotFoundError:
            raise InputError(f"the PCA file {path} does not exist (write one with --save-pca "
                             "FILE on a run with --pca K)") from None
        except (OSError, ValueError) as err:
            raise InputError(f"{path} is not a geoupsample PCA file: {err}") from None
        if not isinstance(state, dict) or state.get("format") != cls.FORMAT:
            raise InputError(f"{path} is not a geoupsample PCA file (format {cls.FORMAT}); "
                             "write one with --save-pca")
        try:
            arrays = {k: np.asarray(state[k], dtype=np.float64)
                      for k in ("mean", "scale", "components", "explained")}  # fmt: skip
        except (KeyError, ValueError, TypeError) as err:
            raise InputError(f"{path} is an incomplete PCA file ({err})") from None
        c = arrays["mean"].shape
        if (arrays["components"].ndim != 2 or arrays["components"].shape[1:] != c
                or arrays["scale"].shape != c
                or arrays["explained"].shape != arrays["components"].shape[:1]):
            raise InputError(f"{path} holds a PCA whose arrays do not fit together")
        return cls(arrays["mean"], arrays["components"], arrays["explained"], arrays["scale"],
                   dict(state.get("about") or {}))  # fmt: skip

    @classmethod
    def fit(cls, samples: np.ndarray, k: int, standardize: bool = False) -> PCA:
        """Fit on ``samples [N, C]`` (finite rows only); ``k <= min(N, C)``. ``standardize``:
        divide every feature by its standard deviation first (correlation PCA, for features in
        different units); a constant feature is left unscaled."""
        x = torch.from_numpy(samples[np.isfinite(samples).all(1)]).double()
        if x.shape[0] < 2:
            raise InputError("too few valid feature cells to fit a PCA")
        k = int(k)
        if not 1 <= k <= min(x.shape):
            raise InputError(f"--pca must be between 1 and {min(x.shape)} here, got {k}")
        mean = x.mean(0)
        scale = torch.ones_like(mean)
        if standardize:
            std = x.std(0)
            scale = torch.where(std > 1e-12 * x.abs().amax(0).clamp_min(1.0), std, scale)
        _, s, vt = torch.linalg.svd((x - mean) / scale, full_matrices=False)
        # one sign per component (its largest entry positive): SVD signs are arbitrary
        peak = vt.abs().argmax(1, keepdim=True)
        vt = vt * torch.sign(vt.gather(1, peak))
        var = s**2
        return cls(mean.numpy(), vt[:k].numpy(), (var[:k] / var.sum()).numpy(), scale.numpy())

    def transform(self, feats: np.ndarray) -> np.ndarray:
        """``[C, h, w]`` -> ``[K, h, w]`` float32 (NaN cells stay NaN)."""
        c, h, w = feats.shape
        flat = (feats.reshape(c, -1).astype(np.float64) - self.mean[:, None]) / self.scale[:, None]
        return (self.components @ flat).reshape(-1, h, w).astype(np.float32)
