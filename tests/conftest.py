"""Shared fixtures: the bundled real sample (Rotterdam, SpaceNet 6 via solaris, Apache-2.0)."""

from __future__ import annotations

import os
import shutil

# The Triton kernels run under Triton's interpreter where no GPU is: the switch must be set before
# anything (torch, timm) imports triton, so it is set here, before the test modules are collected.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from importlib.resources import files  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import rasterio  # noqa: E402

DATA = files("geoupsample") / "data"


@pytest.fixture(scope="session")
def rotterdam_ms() -> np.ndarray:
    """``[4, 300, 300]`` float32 (red, green, blue, NIR) at 1 m."""
    with rasterio.open(DATA / "rotterdam_ms.tif") as src:
        return src.read()


@pytest.fixture(scope="session")
def rotterdam_pan() -> np.ndarray:
    """``[1, 600, 600]`` uint16 panchromatic at 0.5 m, same bounds as the MS image."""
    with rasterio.open(DATA / "rotterdam_pan.tif") as src:
        return src.read()


#: Variables dask.distributed's LocalCluster sets in the *parent's* environment for its workers
#: and leaves behind (OMP_NUM_THREADS=1, ...): later subprocesses would compute with one thread
#: while this process uses all cores, so float results (and journal digests) would differ.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "MALLOC_TRIM_THRESHOLD_")


@pytest.fixture(autouse=True)
def _restore_thread_environment():
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
