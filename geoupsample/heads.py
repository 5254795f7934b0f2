"""Heads: low-resolution features -> low-resolution class probabilities.

:class:`LinearProbe` is multinomial logistic (softmax) regression fitted on LR features
``[C, h, w]`` under soft labels ``[K, h, w]`` (per-class coverage fractions, see
:func:`geoupsample.labels.rasterize_fractions`). Each LR cell is one sample whose target is its
class mixture (fractions divided by their sum) and whose weight is its labelled share (the sum), so
half-labelled cells count half and unlabelled cells not at all. Features are standardised with the
training mean and standard deviation; the loss is the weighted mean cross-entropy plus
``weight_decay / 2 * ||W||^2``, minimised by full-batch L-BFGS in float64 from zero weights.
The result depends only on the data and the seed (which only draws the subsample when there are
more than ``max_samples`` labelled cells).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

#: Tag stored in saved probes, checked on load.
FORMAT = "geoupsample.linear_probe/1"

#: A class labelled over fewer low-res cells than this in all (summed coverage) is warned
#: about: a polygon smaller than a cell trains a class the probe almost never predicts.
MIN_CLASS_CELLS = 1.0


class HeadError(ValueError):
    """A head cannot be fitted or applied to the given arrays."""


def _as_tensor(a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    return torch.from_numpy(np.asarray(a))


def _stack_samples(arrays: Any, name: str) -> torch.Tensor:
    """``[C, h, w]``, ``[B, C, h, w]`` or a sequence of ``[C, h, w]`` -> samples ``[N, C]``."""
    if isinstance(arrays, (list, tuple)):
        parts = [_stack_samples(a, name) for a in arrays]
        if len({p.shape[1] for p in parts}) > 1:
            raise HeadError(f"{name}: the arrays have different channel counts")
        return torch.cat(parts) if parts else torch.zeros(0, 0)
    t = _as_tensor(arrays).double()
    if t.ndim == 3:
        return t.reshape(t.shape[0], -1).T
    if t.ndim == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    raise HeadError(
        f"{name}: expected [C, h, w], [B, C, h, w] or a list of them, got {tuple(t.shape)}"
    )


class LinearProbe:
    """Softmax regression from LR features to class probabilities (see the module docstring).

    Args:
        weight_decay: L2 penalty on the weights (not the biases), on standardised features.
        max_iter: L-BFGS iterations.
        class_weight: ``None`` or ``"balanced"`` (each class's total weight made equal).
        max_samples: at most this many labelled cells are used (a seeded random subset).
        seed: seed of that subset.
    """

    def __init__(
        self,
        *,
        weight_decay: float = 1e-3,
        max_iter: int = 200,
        class_weight: str | None = None,
        max_samples: int = 100_000,
        seed: int = 0,
    ) -> None:
        if weight_decay < 0:
            raise HeadError("weight_decay must be >= 0")
        if class_weight not in (None, "balanced"):
            raise HeadError(f"class_weight must be None or 'balanced', got {class_weight!r}")
        self.weight_decay = float(weight_decay)
        self.max_iter = int(max_iter)
        self.class_weight = class_weight
        self.max_samples = int(max_samples)
        self.seed = int(seed)
        self.classes: tuple[str, ...] = ()
        self.weight: torch.Tensor | None = None  # [K, C], on standardised features
        self.bias: torch.Tensor | None = None  # [K]
        self.mean: torch.Tensor | None = None  # [C]
        self.std: torch.Tensor | None = None  # [C]
        self.n_samples = 0
        #: How the features are laid out (set by :mod:`geoupsample.segmentation`, saved with
        #: the probe): ``{"path": "probabilities"}`` (cell features), or ``{"path":
        #: "features", "pixel": P, "cells": C}`` (P features of the pixel's own, then C cell
        #: features brought to the pixel by the kernels). Empty: cell features.
        self.layout: dict[str, Any] = {}
        #: The cross-validation's findings (:class:`geoupsample.probe_selection.CrossValidation`
        #: as a dict), when the probe was fitted with it.
        self.cv: dict[str, Any] | None = None

    @property
    def fitted(self) -> bool:
        return self.weight is not None

    @property
    def num_features(self) -> int:
        self._require_fitted()
        assert self.weight is not None
        return int(self.weight.shape[1])

    @property
    def num_classes(self) -> int:
        self._require_fitted()
        assert self.weight is not None
        return int(self.weight.shape[0])

    def _require_fitted(self) -> None:
        if self.weight is None:
            raise HeadError("the probe is not fitted: call fit() or LinearProbe.load()")

    def _params(self) -> dict[str, Any]:
        keys = ("weight_decay", "max_iter", "class_weight", "max_samples", "seed")
        return {k: getattr(self, k) for k in keys}

    def fit(
        self,
        features: Any,
        fractions: Any,
        *,
        classes: Sequence[str] | None = None,
        init: LinearProbe | None = None,
    ) -> LinearProbe:
        """Fit on LR features under soft labels.

        Args:
            features: ``[C, h, w]``, ``[B, C, h, w]`` or a list of ``[C, h, w]`` (numpy or torch).
            fractions: matching ``[K, h, w]`` / ``[B, K, h, w]`` / list: per-class coverage in
                [0, 1]. Cells with no coverage or non-finite features are left out.
            classes: class names (K of them); default ``"0" .. "K-1"``.
            init: start from this probe's weights (fitted on the same samples with another
                weight decay: a regularisation path converges in a few steps), not from zero.

        Raises:
            HeadError: shapes disagree, fewer than two classes have labelled cells, no samples.
        """
        x = _stack_samples(features, "features")
        y = _stack_samples(fractions, "fractions")
        if x.shape[0] != y.shape[0]:
            raise HeadError(
                f"features give {x.shape[0]} cells but fractions {y.shape[0]}: they must share "
                "the LR grid"
            )
        k = y.shape[1]
        names = tuple(str(c) for c in classes) if classes is not None else tuple(map(str, range(k)))
        if len(names) != k:
            raise HeadError(f"{len(names)} class names for {k} fraction bands")
        if not torch.isfinite(y).all() or (y < 0).any():
            raise HeadError("fractions must be finite and >= 0")
        cover = y.sum(1)
        keep = (cover > 1e-9) & torch.isfinite(x).all(1)
        x, y, cover = x[keep], y[keep], cover[keep]
        labelled = y.sum(0)  # each class's coverage in cells, over all cells (not the sample)
        if x.shape[0] > self.max_samples:
            gen = torch.Generator().manual_seed(self.seed)
            pick = torch.randperm(x.shape[0], generator=gen)[: self.max_samples].sort().values
            x, y, cover = x[pick], y[pick], cover[pick]
        target = y / cover[:, None]
        mass = (target * cover[:, None]).sum(0)
        present = int((mass > 0).sum())
        if present < 2:
            raise HeadError(
                f"labelled cells cover {present} class(es) "
                f"({[names[i] for i in range(k) if mass[i] > 0]}): a classifier needs at least two"
            )
        if present < k:
            absent = [names[i] for i in range(k) if mass[i] <= 0]
            warnings.warn(
                f"no labelled cells for classes {absent}: they get low probability", stacklevel=2
            )
        scarce = [f"{names[i]} ({float(labelled[i]):.2g})" for i in range(k)
                  if 0 < labelled[i] < MIN_CLASS_CELLS]  # fmt: skip
        if scarce:
            warnings.warn(
                f"classes labelled over less than {MIN_CLASS_CELLS:g} low-res cell in all (cells "
                f"of coverage): {', '.join(scarce)}; too little to learn from, so they will "
                "rarely be predicted: label more of them", stacklevel=2
            )
        weight = cover.clone()
        if self.class_weight == "balanced":
            cw = torch.where(mass > 0, mass.sum() / (present * mass.clamp_min(1e-12)), 0.0)
            weight = weight * (target * cw).sum(1)
        weight = weight / weight.sum()

        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        z = (x - mean) / std

        if init is not None and init.weight is not None and init.bias is not None and tuple(
                init.weight.shape) == (k, x.shape[1]):
            w = init.weight.detach().clone().requires_grad_(True)
            b = init.bias.detach().clone().requires_grad_(True)
        else:
            w = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
            b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1.0,
            max_iter=self.max_iter,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
        decay = self.weight_decay

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logp = torch.log_softmax(z @ w.T + b, dim=1)
            loss = -(weight * (target * logp).sum(1)).sum() + 0.5 * decay * (w * w).sum()
            loss.backward()
            return loss

        # small problems: one thread (OpenMP wake-ups dominate, badly on a busy machine)
        threads = torch.get_num_threads()
        small = z.shape[0] * z.shape[1] * k < 20_000_000
        try:
            if small:
                torch.set_num_threads(1)
            opt.step(closure)
        finally:
            if small:
                torch.set_num_threads(threads)
        self.classes = names
        self.weight, self.bias = w.detach().clone(), b.detach().clone()
        self.mean, self.std = mean, std
        self.n_samples = int(x.shape[0])
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores ``[B, K, h, w]`` (float64) of features ``[B, C, h, w]`` (any float)."""
        self._require_fitted()
        assert self.weight is not None and self.bias is not None
        assert self.mean is not None and self.std is not None
        if features.shape[1] != self.num_features:
            raise HeadError(
                f"the probe was fitted on {self.num_features} feature channels, got "
                f"{features.shape[1]}: use the same backbone and layer as for fitting"
            )
        dev = features.device
        f = features.double()
        z = (f - self.mean.to(dev)[None, :, None, None]) / self.std.to(dev)[None, :, None, None]
        out = torch.einsum("kc,bchw->bkhw", self.weight.to(dev), z)
        return out + self.bias.to(dev)[None, :, None, None]

    def predict_proba(self, features: ArrayT) -> ArrayT:
        """Class probabilities ``[K, h, w]`` (or ``[B, K, h, w]``) of LR features, float32.

        Same array type as the input; cells with non-finite features get NaN probabilities.
        """
        was_numpy = isinstance(features, np.ndarray)
        t = torch.from_numpy(features) if was_numpy else features
        if t.ndim not in (3, 4):
            raise HeadError(f"expected features [C, h, w] or [B, C, h, w], got {tuple(t.shape)}")
        batched = t.ndim == 4
        with torch.no_grad():
            p = torch.softmax(self.logits(t if batched else t[None]), dim=1).float()
        p = p if batched else p[0]
        return p.numpy() if was_numpy else p  # type: ignore[return-value]

    def predict(self, features: ArrayT) -> ArrayT:
        """Most probable class index ``[h, w]`` (or ``[B, h, w]``), int64; -1 in cells with
        non-finite features (NaN probabilities), never a made-up class."""
        p = self.predict_proba(features)
        axis = p.ndim - 3
        if isinstance(p, np.ndarray):
            cls = p.argmax(axis=axis)
            return np.where(np.isnan(p).any(axis=axis), -1, cls)  # type: ignore[return-value]
        cls = p.argmax(dim=axis)
        return torch.where(p.isnan().any(dim=axis), -1, cls)  # type: ignore[return-value]

    # ------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fitted probe to a safetensors file (tensors plus JSON metadata)."""
        self._require_fitted()
        from safetensors.torch import save_file

        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        meta = {
            "format": FORMAT,
            "classes": json.dumps(list(self.classes)),
            "params": json.dumps(self._params()),
            "n_samples": str(self.n_samples),
            "layout": json.dumps(self.layout),
            "cv": json.dumps(self.cv),
        }
        p = Path(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LinearProbe:
        """Read a probe written by :meth:`save`."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise HeadError(f"probe file not found: {p}")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as err:
            raise HeadError(f"cannot read {p} as a saved probe: {err}") from err
        if meta.get("format") != FORMAT:
            raise HeadError(f"{p} is not a {FORMAT} file (format {meta.get('format')!r})")
        probe = cls(**json.loads(meta["params"]))
        probe.classes = tuple(json.loads(meta["classes"]))
        probe.weight, probe.bias = tensors["weight"], tensors["bias"]
        probe.mean, probe.std = tensors["mean"], tensors["std"]
        probe.n_samples = int(meta.get("n_samples", 0))
        probe.layout = json.loads(meta.get("layout", "{}"))
        probe.cv = json.loads(meta.get("cv", "null"))
        return probe

    def __repr__(self) -> str:
        state = (
            f"classes={list(self.classes)}, num_features={self.num_features}"
            if self.fitted
            else "unfitted"
        )
        return f"LinearProbe({state}, weight_decay={self.weight_decay})"
