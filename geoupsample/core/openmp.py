"""OpenMP threads that sleep when they wait, so that runs sharing a CPU do not collapse.

torch's CPU kernels and the Numba kernels (on Numba's OpenMP threading layer) run on GNU
OpenMP, whose idle threads by default spin for a while before they sleep. A fit alternates
short parallel regions with serial work, so its threads spin a good part of the time; alone
on the machine that costs nothing, but beside another job the spinning threads take the cores
the other job's working threads need. Measured on the 2-core development machine,
``python benchmarks/threads.py -n 3`` (``geoupsample upsample``, gsjbu, 4096² at x8, medians):
alone 22.6 s spinning against 20.9 s passive; two runs side by side 55.4 s each spinning (2.45x
one run alone) against 36.1 s passive (1.72x; a fair share of two cores is 2x); beside two
busy-looping processes 51.9 s against 37.2 s.

:func:`prefer_passive_waits` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets a
policy already (yours wins: ``OMP_WAIT_POLICY=ACTIVE`` restores spinning). GNU OpenMP reads it
when it is loaded, so it must run before torch is imported: ``import geoupsample`` does it first
thing; in a script that imports torch before geoupsample, set the variable yourself.
"""

from __future__ import annotations

import os

#: The wait policy set when the environment gives none.
DEFAULT_WAIT_POLICY = "PASSIVE"


def prefer_passive_waits() -> str:
    """Set ``OMP_WAIT_POLICY`` to :data:`DEFAULT_WAIT_POLICY` unless it is set; returns the
    policy in force."""
    return os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)
