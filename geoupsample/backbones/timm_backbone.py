"""``timm:<model>``: features from any timm model, ViT-style patch tokens or CNN stages.

The model is built with timm's ``features_only=True`` and ``out_indices=(layer,)``: for
transformers (ViT, DeiT, DINOv2 with or without register tokens, EVA, ...) timm returns the
patch tokens of block ``layer`` with the class/register (prefix) tokens stripped, reshaped to the
``[C, H / patch, W / patch]`` grid (``dynamic_img_size=True`` so any tile size that is a multiple
of the patch works); for CNNs it returns stage ``layer``. Negative layers count from the end
(``-1``: last block / deepest stage).

Multispectral input: choose bands (``bands=[...]``, indices or band names) so the stem sees the
channels it was trained on, or let timm adapt the stem to ``d`` channels (``adapt_stem=True``;
timm's own ``in_chans`` adaptation: pretrained RGB filters repeated cyclically and rescaled).
The input is normalised per band as ``(x - mean) / std``; by default with the model's pretrained
config (ImageNet-style, for values scaled to [0, 1]), cycled over the bands like the stem's
filters; or with the user's own ``mean``/``std`` in the input's units.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg

from .base import Backbone, BackboneError, BandCountError, WeightsNotFoundError
from .weights import WEIGHTS_HINT, cached_pretrained_file, describe_source, read_state_dict

#: Below this fraction of the model's tensors found in a weight file, the file is refused.
_MIN_MATCHED = 0.9

#: Seed of ``random_init`` weights (drawn from it in a forked generator).
RANDOM_INIT_SEED = 0


def resolve_bands(
    bands: Sequence[int | str] | None, band_names: Sequence[str] | None
) -> list[int] | None:
    """Band choice as 0-based indices; names are matched case-insensitively to ``band_names``."""
    if bands is None:
        return None
    out: list[int] = []
    names = [n.lower() for n in band_names] if band_names is not None else None
    for b in bands:
        if isinstance(b, str) and not b.lstrip("-").isdigit():
            if names is None:
                raise BackboneError(
                    f"band {b!r} given by name but the input's band names are unknown"
                )
            if b.lower() not in names:
                raise BackboneError(f"no band named {b!r}; the bands are {list(band_names or [])}")
            out.append(names.index(b.lower()))
        else:
            idx = int(b)
            if idx < 0:
                raise BackboneError(f"band indices are 0-based and non-negative, got {idx}")
            out.append(idx)
    if not out:
        raise BackboneError("bands=[] chooses no band")
    if names is not None and max(out) >= len(names):
        raise BackboneError(f"band index {max(out)} out of range for {len(names)} bands")
    return out


def _cycle(values: Sequence[float], n: int) -> list[float]:
    return [float(values[i % len(values)]) for i in range(n)]


class _Held(logging.Handler):
    """A logging handler that keeps the records it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _held_timm_logs() -> Iterator[list[logging.LogRecord]]:
    """Hold back what timm logs while the model is built (with a weight file of another model,
    a list of every one of its keys, kilobytes long): the caller passes the records on with
    :func:`_release` once the weights are accepted, or drops them for its own error."""
    logger = logging.getLogger("timm")
    held, propagate = _Held(), logger.propagate
    logger.addHandler(held)
    logger.propagate = False
    try:
        yield held.records
    finally:
        logger.removeHandler(held)
        logger.propagate = propagate


def _release(records: list[logging.LogRecord]) -> None:
    """Log held records as timm would have."""
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


class TimmBackbone(Backbone):
    """LR features from a timm model (see the module docstring for the conventions).

    Args:
        model_name: timm model name, optionally with a pretrained tag
            (``"vit_small_patch14_reg4_dinov2.lvd142m"``, ``"resnet18"``).
        in_chans: bands of the input tile (``d``). Defaults to ``len(band_names)`` if given,
            else to the number of chosen bands, else 3.
        bands: bands fed to the model, 0-based indices or names from ``band_names``; default all.
        band_names: names of the input tile's bands (e.g. ``("red", "green", "blue", "nir")``).
        layer: timm ``out_indices`` entry: transformer block or CNN stage; negative from the end.
        weights: local weight file (safetensors, or a state dict read with
            ``torch.load(weights_only=True)``).
        pretrained: use the model's published weights if they are already in the user's Hugging
            Face (or torch hub) cache; never downloads.
        random_init: random weights, for smoke tests; seeded (:data:`RANDOM_INIT_SEED`), so that
            every run, worker and ``--resume`` gets the same ones. Exactly one weight source must
            be chosen.
        adapt_stem: allow a stem whose weights have a different channel count than the chosen
            bands to be adapted by timm; otherwise that mismatch is an error.
        mean, std: per-band normalisation in the input's units (one value or one per model band);
            default: the model's pretrained config, cycled over the bands.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size=``).
    """

    def __init__(
        self,
        model_name: str,
        *,
        in_chans: int | None = None,
        bands: Sequence[int | str] | None = None,
        band_names: Sequence[str] | None = None,
        layer: int = -1,
        weights: str | Path | None = None,
        pretrained: bool = False,
        random_init: bool = False,
        adapt_stem: bool = False,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if not timm.is_model(model_name):
            raise BackboneError(
                f"unknown timm model {model_name!r}; list names with timm.list_models('*vit*')"
            )
        chosen = sum(bool(v) for v in (weights is not None, pretrained, random_init))
        if chosen != 1:
            what = "more than one weight source chosen" if chosen else "no weights chosen"
            raise BackboneError(
                f"{what} for timm:{model_name}: {WEIGHTS_HINT}, or pretrained=True to use weights "
                "already in your Hugging Face cache"
            )
        if band_names is not None and in_chans is not None and len(band_names) != in_chans:
            raise BandCountError(f"{len(band_names)} band names given for in_chans={in_chans}")
        self.band_names = tuple(band_names) if band_names is not None else None
        band_idx = resolve_bands(bands, band_names)
        if in_chans is None:
            in_chans = (
                len(band_names) if band_names is not None else (3 if band_idx is None else None)
            )
        if band_idx is not None and in_chans is not None and max(band_idx) >= in_chans:
            raise BackboneError(
                f"band index {max(band_idx)} out of range for {in_chans} input bands"
            )
        self.in_chans = in_chans  # type: ignore[assignment]  # None: any tile with the chosen bands
        self.bands = band_idx
        model_chans = len(band_idx) if band_idx is not None else int(in_chans or 3)
        self.model_name = model_name
        self.layer = int(layer)

        cfg = get_pretrained_cfg(model_name)
        cfg_dict: dict[str, Any] = cfg.to_dict() if cfg is not None else {}
        state_dict: dict[str, torch.Tensor] | None = None
        self.weights_source = "random"
        if weights is not None:
            state_dict = read_state_dict(weights)
            self.weights_source = str(weights)
        elif pretrained:
            found = cached_pretrained_file(cfg_dict)
            if found is None:
                raise WeightsNotFoundError(
                    f"pretrained weights of {model_name} ({describe_source(cfg_dict)}) are not in "
                    f"the local Hugging Face or torch hub cache, and nothing is downloaded: "
                    f"{WEIGHTS_HINT}"
                )
            state_dict = read_state_dict(found)
            self.weights_source = str(found)

        kwargs: dict[str, Any] = dict(
            features_only=True, out_indices=(self.layer,), in_chans=model_chans, **model_kwargs
        )
        if state_dict is not None:
            weight_chans = self._weight_chans(state_dict, cfg_dict, model_chans)
            if weight_chans != model_chans and not adapt_stem:
                raise BandCountError(
                    f"the weights of {model_name} expect {weight_chans} input band(s) but "
                    f"{model_chans} band(s) are fed to it: choose {weight_chans} bands "
                    "(bands=[...], CLI: --model-bands) or let timm adapt the stem "
                    "(adapt_stem=True, CLI: --adapt-stem)"
                )
            size = tuple(cfg_dict.get("input_size") or (3, 224, 224))
            kwargs.update(
                pretrained=True,
                pretrained_cfg_overlay=dict(
                    state_dict=state_dict, input_size=(weight_chans, *size[1:])
                ),
            )
        if state_dict is not None:  # before timm lists every unexpected key of it
            self._check_not_larger(state_dict, model_chans, model_kwargs)
        # timm logs every key of a weight file it cannot use: held back, and dropped when
        # _check_loaded refuses the file (its error says it in one line)
        with _held_timm_logs() as timm_logs:
            try:
                with torch.random.fork_rng(devices=[]):  # the caller's generator is left as is
                    torch.manual_seed(RANDOM_INIT_SEED)  # random_init: the same weights every run
                    self.model = self._build(model_name, kwargs)
            except IndexError:  # timm looks out_indices up in its list of feature layers
                raise BackboneError(
                    f"{model_name} has no layer {self.layer}: pass a smaller index (blocks or "
                    "stages count from 0) or a negative one (-1 = the last)"
                ) from None
        if state_dict is not None:
            self._check_loaded(state_dict)
        _release(timm_logs)

        info = self.model.feature_info
        self.stride = int(info.reduction()[-1])
        self.num_features = int(info.channels()[-1])
        mean_v = mean if mean is not None else cfg_dict.get("mean", (0.0,))
        std_v = std if std is not None else cfg_dict.get("std", (1.0,))
        self.register_buffer("mean", self._per_band(mean_v, model_chans, "mean", mean is not None))
        self.register_buffer("std", self._per_band(std_v, model_chans, "std", std is not None))
        if bool((self.std <= 0).any()):
            raise BackboneError("std must be positive for every band")
        self.eval()

    @staticmethod
    def _build(model_name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
        try:  # transformers: accept any tile size that is a multiple of the patch
            return timm.create_model(model_name, dynamic_img_size=True, **kwargs)
        except TypeError as err:
            if "dynamic_img_size" not in str(err):
                raise
        except RuntimeError as err:
            raise BackboneError(
                f"timm could not build {model_name} with these weights: {err}"
            ) from err
        try:
            return timm.create_model(model_name, **kwargs)
        except RuntimeError as err:
            raise BackboneError(
                f"timm could not build {model_name} with these weights: {err}"
            ) from err

    @staticmethod
    def _weight_chans(sd: dict[str, torch.Tensor], cfg: dict[str, Any], model_chans: int) -> int:
        """Input channels the weights' first convolution was trained on (model_chans if unknown)."""
        first = cfg.get("first_conv")
        names = (first,) if isinstance(first, str) else tuple(first or ())
        for name in names:
            w = sd.get(f"{name}.weight")
            if w is not None and w.ndim == 4:
                return int(w.shape[1])
        return model_chans

    def _check_loaded(self, sd: dict[str, torch.Tensor]) -> None:
        """Refuse weight files matching too little of the model (timm loads features leniently)."""
        own = [k[len("model.") :] if k.startswith("model.") else k for k in self.model.state_dict()]
        own = [k for k in own if not k.endswith("num_batches_tracked")]
        matched = sum(k in sd for k in own)
        if own and matched < _MIN_MATCHED * len(own):
            missing = [k for k in own if k not in sd][:5]
            raise BackboneError(
                f"the weight file matches only {matched} of the {len(own)} tensors of "
                f"{self.model_name} (missing e.g. {missing}): is it for this model?"
            )

    def _check_not_larger(self, sd: dict[str, torch.Tensor], chans: int,
                          model_kwargs: dict[str, Any]) -> None:
        """Refuse weight files with many tensors the whole model (head included) does not have:
        a deeper model's weights (resnet34 for resnet18) would otherwise load into the shallower
        one's layers and leave the rest unused. A few extra tensors (a checkpoint's mask token,
        training leftovers) are allowed. The model is built on the meta device (no memory)."""
        try:
            with torch.device("meta"):
                whole = timm.create_model(self.model_name, in_chans=chans, **model_kwargs)
        except Exception:  # noqa: BLE001 - a model timm cannot build there: nothing to compare
            return
        own = {k for k in whole.state_dict() if not k.endswith("num_batches_tracked")}
        if sum(k in sd for k in own) < _MIN_MATCHED * len(own):
            return  # another model altogether: _check_loaded says so once it is built
        extra = [k for k in sd if k not in own and not k.endswith("num_batches_tracked")]
        if len(extra) > (1 - _MIN_MATCHED) * len(sd):
            raise BackboneError(
                f"the weight file has {len(extra)} of its {len(sd)} tensors that "
                f"{self.model_name} does not have (e.g. {extra[:3]}): it is for another, "
                "larger model; pass that model's name or this model's weights"
            )

    @staticmethod
    def _per_band(values: Sequence[float] | float, n: int, what: str, given: bool) -> torch.Tensor:
        vals = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
        if given and len(vals) not in (1, n):
            raise BandCountError(f"{what} has {len(vals)} values for {n} model band(s)")
        return torch.tensor(_cycle(vals, n), dtype=torch.float32).view(1, n, 1, 1)

    def _check_bands(self, d: int) -> None:
        if self.in_chans is not None and d != self.in_chans:
            hint = "" if self.bands is None else f" (bands {self.bands} are then chosen from them)"
            raise BandCountError(
                f"timm:{self.model_name} was built for tiles of {self.in_chans} band(s){hint} but "
                f"the tile has {d}: pass in_chans={d}, or choose bands with bands=[...]"
            )
        if self.bands is not None and max(self.bands) >= d:
            raise BandCountError(f"band {max(self.bands)} chosen but the tile has only {d} bands")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.bands is not None:
            x = x[:, self.bands]
        x = (x - self.mean) / self.std
        try:
            out = self.model(x)[-1]
        except (AssertionError, RuntimeError) as err:
            raise BackboneError(
                f"timm:{self.model_name} failed on a {tuple(x.shape[-2:])} tile ({err}); models "
                "with a fixed input size need tiles of that size (or img_size=... if the model "
                "takes it)"
            ) from err
        if str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC"):
            out = out.permute(0, 3, 1, 2)  # e.g. Swin's stages are channels-last
        return out

    def extra_repr(self) -> str:
        return (
            f"model={self.model_name}, layer={self.layer}, bands={self.bands}, "
            f"stride={self.stride}, num_features={self.num_features}, weights={self.weights_source}"
        )
