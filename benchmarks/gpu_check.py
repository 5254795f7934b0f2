"""GSJBU on a CUDA GPU against the CPU: same function, same quality (run on a machine with a GPU).

The test suite checks the Triton kernels step by step on tiny cases (compiled on a GPU, or
interpreted on the CPU). This script checks whole fits and renders at real sizes:

1. render: the same fitted parameters rendered on the CPU (torch path) and on CUDA (Triton path,
   and the torch path on CUDA), for a continuous band, 64 random feature channels and 8-class
   probabilities (the probability preset); relative L2 error against the CPU, NaN count;
2. fit: kernels fitted on the CPU and on CUDA (both objectives; Triton and torch on CUDA): the
   first loss (same parameters, so it must agree to rounding), the final loss, and the Wald PSNR
   of NIR-from-RGB on the Rotterdam samples (``../shared/data``; a fit is iterative and the paths
   round differently, so parameters may drift apart, but the quality must not).

    python benchmarks/gpu_check.py            # needs CUDA
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from quality import CROP, DATA, SCALE, area_down, psnr, read, unit_scale  # benchmarks/quality.py

import geoupsample as gu
from geoupsample.core import backend
from geoupsample.core.kernels import Kernels


def set_backend(choice: str) -> None:
    os.environ[backend.ENV] = choice


def scene(index: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB guide [3, 296, 296] float32, NIR [1, 296, 296] float64), scaled as quality.py does."""
    ms = unit_scale(read(DATA / f"ms{index}.tif"))[:, :CROP, :CROP]
    return ms[:3].astype(np.float32), ms[3:4]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    ok = torch.isfinite(ref)
    return float((a[ok] - ref[ok]).norm() / ref[ok].norm())


def on(k: Kernels, device: str) -> Kernels:
    return Kernels(params=k.params.to(device), guide=k.guide.to(device),
                   valid=k.valid.to(device), radius=k.radius)


def check_render(guide: np.ndarray, nir: np.ndarray) -> None:
    h = CROP // SCALE
    set_backend("auto")
    k = gu.fit(guide, (h, h), device="cpu")
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(8, h, h)).astype(np.float32) * 2)
    rasters = {
        "nir": (torch.from_numpy(area_down(nir, SCALE).astype(np.float32)), "auto"),
        "features64": (torch.randn(64, h, h, generator=torch.Generator().manual_seed(0)), "auto"),
        "probs8": (torch.softmax(logits, 0), "probabilities"),
    }
    print("render, same parameters, relative L2 error against the CPU (NaN in output):")
    for name, (x, kind) in rasters.items():
        ref = k.render(x, kind=kind)
        row = []
        for choice in ("triton", "torch"):
            set_backend(choice)
            kc = on(k, "cuda")
            out = kc.render(x.cuda(), kind=kind)
            torch.cuda.synchronize()
            nan_extra = int(torch.isnan(out).sum().cpu()) - int(torch.isnan(ref).sum())
            row.append(f"cuda/{choice} {rel(out, ref):.2e} ({nan_extra:+d} NaN)")
        set_backend("auto")
        print(f"  {name:<11} " + "   ".join(row))


def check_fit(index: int, guide: np.ndarray, nir: np.ndarray) -> None:
    h = CROP // SCALE
    x = area_down(nir, SCALE).astype(np.float32)
    for objective in ("back_projected", "plain"):
        runs = {"cpu/torch": ("cpu", "auto"), "cuda/triton": ("cuda", "triton"),
                "cuda/torch": ("cuda", "torch")}
        cells = []
        for label, (device, choice) in runs.items():
            set_backend(choice)
            t0 = time.perf_counter()
            k = gu.fit(guide, (h, h), device=device, objective=objective)
            out = k.render(torch.from_numpy(x).to(device))
            if device == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - t0
            out = out.cpu().numpy() if isinstance(out, torch.Tensor) else out
            hist = k.loss_history
            cells.append(f"{label}: loss {hist[0]:.6f} -> {hist[-1]:.6f}, "
                         f"PSNR {psnr(out, nir):.3f} dB ({took:.2f} s)")
        set_backend("auto")
        print(f"  ms{index} {objective}:\n    " + "\n    ".join(cells))


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          f"{torch.cuda.get_device_name()}")
    guide, nir = scene(1)
    check_render(guide, nir)
    print("fit (first loss: same parameters; PSNR: NIR from RGB x8, Wald):")
    for index in (1, 2, 3):
        check_fit(index, *scene(index))


if __name__ == "__main__":
    main()
