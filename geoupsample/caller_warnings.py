"""Warnings attributed to the user's line, however deep in the package they are raised.

``warnings.warn(..., stacklevel=n)`` needs the depth of the call, which the scene functions'
wrappers (option groups, threads) change. :func:`warn_caller` walks up to the first frame
outside ``geoupsample`` and ``tiling``, so that a warning shows the user's file and line.
"""

from __future__ import annotations

import os
import sys
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
#: Source folders whose frames are the package's own (skipped when attributing a warning).
INTERNAL = (_HERE + os.sep, os.path.join(os.path.dirname(_HERE), "tiling") + os.sep)


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first calling frame outside the package."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
