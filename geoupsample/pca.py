"""A PCA of low-res features, fitted once on a sample of a scene so that every tile projects
its features the same way.

Features in one unit (a model's embedding) are reduced as they are (covariance PCA); features in
mixed units (the ``spectral`` backbone's band means in digital numbers beside NDVI in [-1, 1])
are standardised first (correlation PCA), or the components would be the largest-valued bands
alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from geoupsample.inputs import InputError


@dataclass(frozen=True)
class PCA:
    """A PCA of LR features: ``mean [C]``, ``scale [C]`` (the features are divided by it after
    centring: their standard deviations, or ones) and ``components [K, C]`` (rows orthonormal);
    ``explained [K]`` the share of the (scaled) variance each component holds."""

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    scale: np.ndarray

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
