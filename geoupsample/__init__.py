"""geoupsample: guided upsampling of coarse rasters to the resolution of remote-sensing imagery.

>>> import geoupsample as gu
>>> k = gu.fit(guide, lr_shape=(h, w))        # guide [d, H, W]  ->  gu.Kernels
>>> hr = k.render(x)                           # x [C, h, w]      ->  [C, H, W]
>>> hr = gu.upsample(x, guide, method="gsjbu") # or nearest | bilinear | bicubic | jbu
>>> ks = gu.fit_series([guide_2019, guide_2020], (h, w))  # a date's kernels from the one before
>>> hrs = gu.render_series(ks, [x_2019, x_2020], [guide_2019, guide_2020])  # consistent in time
"""

from geoupsample.core.allocator import tune_allocator
from geoupsample.core.guide import GuideStats, guide_stats
from geoupsample.core.kernels import Kernels, fit
from geoupsample.core.methods import list_methods, register_method, upsample
from geoupsample.core.series import fit_series, render_series
from geoupsample.options import OutputOptions, RenderOptions, TilingOptions

__version__ = "0.1.0"

#: The built-in methods, fastest first.
METHODS: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "jbu", "gsjbu")

__all__ = [
    "METHODS",
    "GuideStats",
    "Kernels",
    "OutputOptions",
    "RenderOptions",
    "TilingOptions",
    "__version__",
    "fit",
    "fit_series",
    "guide_stats",
    "list_methods",
    "register_method",
    "render_series",
    "tune_allocator",
    "upsample",
]
