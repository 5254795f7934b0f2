"""geoupsample.core.allocator: glibc malloc tuning for the fit's large temporaries."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import geoupsample as gu
from geoupsample.core import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

#: Fits a small real-shaped guide, prints whether the tuning is on and the fitted parameters.
CHILD = """
import sys, numpy as np, torch
import geoupsample as gu
on = gu.tune_allocator()
g = torch.Generator().manual_seed(3)
guide = torch.rand(3, 96, 96, generator=g, dtype=torch.float32)
k = gu.fit(guide, (12, 12), iters=5)
np.save(sys.argv[1], k.params.numpy())
print(on)
"""


def _child(tmp_path, switch: str) -> tuple[str, np.ndarray]:
    out = tmp_path / f"params_{switch}.npy"
    env = {**os.environ, allocator.ENV_SWITCH: switch}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(out)], env=env, capture_output=True, text=True,
        check=True, timeout=300,
    )  # fmt: skip
    return res.stdout.strip().splitlines()[-1], np.load(out)


@pytest.mark.skipif(not GLIBC, reason="the tuning applies to glibc only")
def test_tuning_applies_once_and_fits_are_bit_identical_with_and_without(tmp_path):
    on, params_on = _child(tmp_path, "1")
    off, params_off = _child(tmp_path, "0")
    assert (on, off) == ("True", "False")
    np.testing.assert_array_equal(params_on, params_off)


def test_switch_values():
    before = os.environ.get(allocator.ENV_SWITCH)
    try:
        for value, enabled in (("0", False), ("off", False), ("No", False), ("1", True)):
            os.environ[allocator.ENV_SWITCH] = value
            assert allocator.allocator_tuning_enabled() is enabled
    finally:
        if before is None:
            os.environ.pop(allocator.ENV_SWITCH, None)
        else:
            os.environ[allocator.ENV_SWITCH] = before


def test_repeated_calls_return_the_first_answer():
    first = gu.tune_allocator()
    assert gu.tune_allocator() is first
    assert first is (GLIBC and allocator.allocator_tuning_enabled())
