"""Shared fixtures: the bundled real sample (Rotterdam, SpaceNet 6 via solaris, Apache-2.0)."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
import rasterio

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
