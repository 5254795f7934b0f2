"""A PCA of low-res features, fitted once on a sample of a scene so that every tile projects
its features the same way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from geoupsample.inputs import InputError


@dataclass(frozen=True)
class PCA:
    """A PCA of LR features: ``mean [C]`` and ``components [K, C]`` (rows orthonormal)."""

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray

    @classmethod
    def fit(cls, samples: np.ndarray, k: int) -> PCA:
        """Fit on ``samples [N, C]`` (finite rows only); ``k <= min(N, C)``."""
        x = torch.from_numpy(samples[np.isfinite(samples).all(1)]).double()
        if x.shape[0] < 2:
            raise InputError("too few valid feature cells to fit a PCA")
        k = int(k)
        if not 1 <= k <= min(x.shape):
            raise InputError(f"--pca must be between 1 and {min(x.shape)} here, got {k}")
        mean = x.mean(0)
        _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
        # one sign per component (its largest entry positive): SVD signs are arbitrary
        peak = vt.abs().argmax(1, keepdim=True)
        vt = vt * torch.sign(vt.gather(1, peak))
        var = s**2
        return cls(mean.numpy(), vt[:k].numpy(), (var[:k] / var.sum()).numpy())

    def transform(self, feats: np.ndarray) -> np.ndarray:
        """``[C, h, w]`` -> ``[K, h, w]`` float32 (NaN cells stay NaN)."""
        c, h, w = feats.shape
        flat = feats.reshape(c, -1).astype(np.float64) - self.mean[:, None]
        return (self.components @ flat).reshape(-1, h, w).astype(np.float32)
