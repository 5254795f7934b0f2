"""Small real segmentation models for the ``predict`` tests: torch nets exported to ONNX and
TorchScript, and a model that kills the dask worker running it once."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from geoupsample.user_model import SegmentationModel


def make_net(bands: int = 4, classes: int = 3, kernel: int = 1, stride: int = 1,
             seed: int = 0) -> torch.nn.Module:
    """A small fully convolutional net: ``kernel`` x ``kernel`` convolutions (1: each pixel on
    its own), an output ``stride`` (strided convolutions), ``classes`` logits."""
    torch.manual_seed(seed)
    pad = kernel // 2
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(bands, 8, kernel, padding=pad),
                                     torch.nn.ReLU()]  # fmt: skip
    s = stride
    while s > 1:
        layers += [torch.nn.Conv2d(8, 8, 2, stride=2), torch.nn.ReLU()]
        s //= 2
    layers.append(torch.nn.Conv2d(8, classes, kernel, padding=pad))
    net = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():  # larger weights: decided, varied classes
        for p in net.parameters():
            p.mul_(3.0)
    return net


def identity_net(bands: int) -> torch.nn.Module:
    """Logits equal to the (prepared) input bands: softmax of the input."""
    conv = torch.nn.Conv2d(bands, bands, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(bands)[:, :, None, None])
    return conv.eval()


def export_onnx(net: torch.nn.Module, path: str, bands: int, size: int | None = None,
                batch: int | None = None) -> str:
    """``net`` as an ONNX file: a fixed ``size`` x ``size`` input (and a fixed ``batch``), or
    any size and batch (``size`` None)."""
    example = torch.rand(batch or 1, bands, size or 64, size or 64)
    dynamic = None
    if size is None:
        dynamic = {"image": {0: "batch", 2: "height", 3: "width"},
                   "logits": {0: "batch", 2: "h", 3: "w"}}  # fmt: skip
    elif batch is None:
        dynamic = {"image": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example, path, dynamo=False, input_names=["image"],
                          output_names=["logits"], dynamic_axes=dynamic)  # fmt: skip
    return path


def export_torchscript(net: torch.nn.Module, path: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(net).save(path)
    return path


def whole_array(net: torch.nn.Module, x: np.ndarray, multiple: int = 1) -> np.ndarray:
    """Softmax probabilities of ``net`` on the whole prepared array ``x [C, H, W]`` in one call
    (zero-padded to a multiple of ``multiple``)."""
    _, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, -h % multiple), (0, -w % multiple)))
    with torch.no_grad():
        out = torch.softmax(net(torch.from_numpy(xp)[None].float()), 1)[0].numpy()
    return out[:, :h, :w]


class KillOnce(SegmentationModel):
    """A model that ends the (dask worker) process running it the first time it is called
    anywhere but in the process that made it; ``marker`` records that it did."""

    def __init__(self, data: bytes, name: str, marker: str) -> None:
        super().__init__(data, name, "cpu")
        self.marker, self.parent = marker, os.getpid()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if os.getpid() != self.parent:
            try:  # atomic: exactly one worker dies, once
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
        return super().__call__(batch)
