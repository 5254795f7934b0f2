"""Write the bundled time-series sample ``geoupsample/data/naip_<date>.tif``: a 240 x 240 px
(1.2 km) crop of four NAIP dates (fields, ponds, a road) on one grid, from
../shared/data/naip-series (MIT License, Copyright (c) 2020 Qiusheng Wu; see
``geoupsample/data/ATTRIBUTION.md``).

Run from the repository root: ``python benchmarks/make_naip_sample.py``.
"""

from __future__ import annotations

import os

import rasterio
from _naip import aligned_dates
from rasterio.windows import Window

DATES = ("2010-06-29", "2014-07-20", "2017-08-27", "2020-08-31")
#: The crop, in the rows and columns of the aligned series (see ``_naip.COMMON``).
CROP = Window(640, 400, 240, 240)
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "geoupsample",
                    "data")  # fmt: skip


def main() -> None:
    dates, stack, profile = aligned_dates()
    rows, cols = CROP.toslices()
    transform = rasterio.windows.transform(CROP, profile["transform"])
    profile.update(width=int(CROP.width), height=int(CROP.height), transform=transform,
                   tiled=True, blockxsize=128, blockysize=128, compress="deflate", predictor=2,
                   interleave="pixel")  # fmt: skip
    for date in DATES:
        data = stack[dates.index(date)][:, rows, cols]
        path = os.path.join(DATA, f"naip_{date.replace('-', '')}.tif")
        with rasterio.open(path, "w", **profile) as out:
            out.write(data)
            for i, name in enumerate(("red", "green", "blue", "nir"), 1):
                out.set_band_description(i, name)
            out.update_tags(ACQUISITION_DATE=date, SOURCE="NAIP m_4709963_se_14_1, "
                            "opengeos/data (MIT), reprojected onto the 2020-08-31 grid")
        print(path, os.path.getsize(path))


if __name__ == "__main__":
    main()
