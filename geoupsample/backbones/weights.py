"""Loading weights safely and offline: local files and the user's existing caches only.

Nothing here downloads. Pickled checkpoints are read with ``torch.load(weights_only=True)``, which
refuses arbitrary Python objects; safetensors files are recognised by their header, whatever
their extension.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .base import WeightsNotFoundError

#: What a user passes to get weights, quoted in every "no weights" error.
WEIGHTS_HINT = (
    "pass a local weight file (weights=FILE, CLI: --weights FILE; safetensors or a PyTorch state "
    "dict), or random weights for a smoke test (random_init=True, CLI: --random-init)"
)

#: Keys under which training checkpoints commonly nest the model's state dict, in priority order.
_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


def is_safetensors(path: Path) -> bool:
    """True when ``path`` starts with a safetensors header (u64 length, then a JSON object)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= 100_000_000 and n < path.stat().st_size


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or a PyTorch checkpoint, safely, on the CPU.

    Checkpoints that nest the weights (``{"state_dict": ...}``, ``{"model": ...}``, EMA weights)
    are unwrapped, and a ``module.`` prefix (from DataParallel) is removed.

    Raises:
        WeightsNotFoundError: the file does not exist.
        ValueError: the file is neither safetensors nor a weights-only PyTorch state dict.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsNotFoundError(f"weight file not found: {p}; {WEIGHTS_HINT}")
    if is_safetensors(p):
        from safetensors.torch import load_file

        obj: Any = load_file(str(p), device="cpu")
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types
            raise ValueError(
                f"cannot read {p} as weights: it is neither a safetensors file nor a PyTorch state "
                f"dict loadable with torch.load(weights_only=True) ({type(err).__name__}: {err})"
            ) from err
    for _ in range(3):
        if isinstance(obj, Mapping):
            nested = next((k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
            if nested is None:
                break
            obj = obj[nested]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{p} holds no state dict (a mapping from parameter names to tensors)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def cached_pretrained_file(pretrained_cfg: Mapping[str, Any]) -> Path | None:
    """Path of already-downloaded weights for a timm pretrained config, or None. Never downloads.

    Looks in the Hugging Face hub cache (``HF_HOME`` / ``HF_HUB_CACHE``) for the config's
    ``hf_hub_id`` and in torch hub's checkpoint folder for its ``url``. ``HF_HUB_OFFLINE=1`` is set
    in the process environment (if unset) so that later hub calls stay offline too.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = (
            [pretrained_cfg.get("hf_hub_filename")] if pretrained_cfg.get("hf_hub_filename") else []
        )
        names += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(hub_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    url = pretrained_cfg.get("url")
    if isinstance(url, str) and url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        if candidate.is_file():
            return candidate
    return None


def describe_source(pretrained_cfg: Mapping[str, Any]) -> str:
    """A short human description of where a pretrained config's weights would come from."""
    src = {k: pretrained_cfg.get(k) for k in ("hf_hub_id", "url") if pretrained_cfg.get(k)}
    return json.dumps(src) if src else "no published weights"
