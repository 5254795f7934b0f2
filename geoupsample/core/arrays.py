"""Conversion between numpy arrays and torch tensors at the public boundary."""

from __future__ import annotations

import numpy as np
import torch


def as_tensor(value: object, name: str) -> torch.Tensor:
    """``value`` as a torch tensor (numpy arrays are wrapped without a copy where possible).

    Raises:
        TypeError: for anything that is not a numpy array, torch tensor or nested sequence of
            numbers.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a numeric array; got dtype {value.dtype}")
        if isinstance(value, np.ma.MaskedArray):  # rasterio's read(masked=True)
            value = without_mask(value)
        if not value.dtype.isnative:  # big-endian data from netCDF/HDF5 readers
            value = value.astype(value.dtype.newbyteorder("="))
        if value.dtype.kind == "u" and value.dtype.itemsize > 1:  # uint16/32/64: widen
            value = value.astype(np.float64 if value.dtype.itemsize > 2 else np.float32)
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)):
        try:
            return torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be numeric: {err}") from err
    raise TypeError(f"{name} must be a numpy array or a torch tensor; got {type(value).__name__}")


def without_mask(value: np.ma.MaskedArray) -> np.ndarray:
    """A numeric masked array as a plain one whose masked entries are NaN (missing, as
    everywhere in the API): float64 stays float64, other numbers become float32 when anything
    is masked."""
    mask = np.ma.getmaskarray(value)
    if not mask.any():
        return np.ma.getdata(value)
    dtype = np.float64 if value.dtype == np.float64 else np.float32
    return value.astype(dtype).filled(np.nan)


def float_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def like_input(result: torch.Tensor, template: object) -> torch.Tensor | np.ndarray:
    """Return ``result`` as the same kind of array as ``template`` (numpy in, numpy out; a
    masked array in, a masked array out, masked where the result is NaN)."""
    if isinstance(template, torch.Tensor):
        return result
    out = result.detach().cpu().numpy()
    if isinstance(template, np.ma.MaskedArray):
        return np.ma.masked_invalid(out, copy=False)
    return out
