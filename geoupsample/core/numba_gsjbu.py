"""Fused CPU kernels (Numba) for the GSJBU fit and render.

The maths is that of :mod:`geoupsample.core.gsjbu` written out per pixel instead of as the
bilinear form ``phi @ psi``: for HR pixel ``p`` in LR cell ``n`` and neighbour ``q = n + k``,

    logit(p, q) = -0.5 (a_q dx^2 + 2 b_q dx dy + c_q dy^2) - R_q ||G(p) - Gbar(q)||^2

with ``(dy, dx) = p - mu_q`` in HR pixels and ``(a, b, c, R)`` the coefficient maps of
:func:`geoupsample.core.gsjbu.kernel_coefficients`. The weights are a softmax over the valid
neighbours (inside the image, with a valid guide pixel), and ``out(p) = sum_q w(p, q) X(q)``.

Each kernel works cell by cell: it gathers the ``K`` neighbours' coefficients, cell means and
values once into small local arrays, then loops over the cell's pixels with everything in cache.
Nothing of size ``[cells, K]`` is written to memory: the torch path's ``psi`` (``(6 + d) K``
numbers per cell, built, stored, differentiated and scattered back) cost about 2 µs per cell and
step on two cores, most of a fit at x2, where a cell holds 4 pixels.

Written for the vectoriser: the loops over the neighbours hold straight-line code (the guide's
bands four at a time, :data:`BAND_BLOCK`; exponentials by :func:`exp_neg`, not libm's scalar
call), and the LR maps carry a frame of ``radius`` cells (:func:`padded`) so that gathering a
neighbourhood has no bounds to test.

* :func:`fit_step` — the gradient of a step's L1 loss over a lattice of cells and a set of
  phases in each, with respect to the coefficient maps (each thread adds into its own copy:
  no races);
* :func:`adam_step` — that gradient through :func:`coefficients` to the raw parameters, the Adam
  update, and the coefficient maps of the updated parameters, in one pass over the cells;
* :func:`render` — ``[C, H, W]`` from ``[C, h, w]`` values.

Float32 throughout; parallel over cell rows (``numba.prange``) on as many threads as torch uses
(:func:`sync_threads`). Compiled on first use and cached on disk beside this module
(``cache=True``): later processes load the machine code instead of compiling it.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import numba
import numpy as np
import torch

#: Logit given to excluded neighbours (their weight is exactly 0 after the softmax).
EXCLUDED = -1e30
#: The kernels read the guide's bands four at a time (zero-padded to a multiple of four).
BAND_BLOCK = 4
#: Most channels that :func:`render` renders fused; more are rendered as :func:`weights` times
#: the channels (a batched matrix product, BLAS), which does better for many channels (1024^2,
#: x8, 64 channels: 0.26 s against 0.52 fused; 6 channels: 0.07 s fused, 0.09 through torch).
CHANNELS_LAST = 16
#: Below this :func:`exp_neg` gives 0 (``e^-87`` is about float32's smallest normal number).
EXP_FLOOR = -87.0
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

_LAUNCH = threading.Lock()
_SERIAL: list[bool] = []  # [True] once known that parallel kernels must not run concurrently


def sync_threads() -> int:
    """Run the kernels on as many threads as torch uses (at most Numba's pool); returns it.
    Numba's thread count, like torch's, belongs to the calling thread."""
    torch_threads = torch.get_num_threads()
    n = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    _keep_torch_threads(torch_threads)
    return n


def _keep_torch_threads(threads: int) -> None:
    """Put torch's thread count back to ``threads``: on Numba's OpenMP threading layer, which
    shares the OpenMP runtime with torch, starting the layer and launching a kernel set the
    calling thread's OpenMP count (a run asked for one thread went on with all)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@numba.njit(cache=True, parallel=True)
def _probe(out):
    for i in numba.prange(out.shape[0]):
        out[i] = i


def launch() -> contextlib.AbstractContextManager:
    """A context for calling a parallel kernel: a lock when Numba's threading layer cannot run
    parallel kernels from several threads at once (its ``workqueue`` layer, where neither
    OpenMP nor TBB is found; it would abort the process), else nothing. Whole-scene runs
    compute tiles in several threads."""
    if not _SERIAL:
        # the layer is chosen at the first parallel launch
        threads = torch.get_num_threads()
        sync_threads()
        _probe(np.empty(2, np.int64))
        _keep_torch_threads(threads)
        _SERIAL.append(numba.threading_layer() == "workqueue")
    return _LAUNCH if _SERIAL[0] else contextlib.nullcontext()


# --- vectorisable elementary functions ------------------------------------------------------
@numba.njit(cache=True, fastmath=True, inline="always")
def exp_neg(x):
    """``e^x`` in float32 for ``x <= 0``; 0 below :data:`EXP_FLOOR`.

    Written with arithmetic and selects only, so that loops over it vectorise (libm's ``expf``
    is a scalar call: 1.8 ns against 0.5 ns per value here, and a softmax over 49 neighbours
    per pixel is mostly exponentials). ``x = (n + f) ln 2`` with ``n`` a whole number and
    ``|f| <= 1/2``: ``e^(f ln 2)`` by its Taylor series to degree 6 (relative error below
    1.2e-7), times ``2^n`` built from the bits of ``-n <= 126`` as a product of exact powers of
    two. Measured against float64 ``exp``: 1e-7 relative near 0, 5e-6 near -87, all of it from
    rounding ``x log2(e)`` in float32.
    """
    t = max(x, np.float32(EXP_FLOOR)) * np.float32(_LOG2E)
    n = np.float32(math.floor(t + np.float32(0.5)))
    g = (t - n) * np.float32(_LN2)
    p = np.float32(1.0) + g * (np.float32(1.0) + g * (np.float32(1 / 2) + g * (
        np.float32(1 / 6) + g * (np.float32(1 / 24) + g * (np.float32(1 / 120)
                                                         + g * np.float32(1 / 720))))))
    m = np.int32(-n)
    p *= np.float32(1.0) if m & 1 == 0 else np.float32(2.0**-1)
    p *= np.float32(1.0) if (m >> 1) & 1 == 0 else np.float32(2.0**-2)
    p *= np.float32(1.0) if (m >> 2) & 1 == 0 else np.float32(2.0**-4)
    p *= np.float32(1.0) if (m >> 3) & 1 == 0 else np.float32(2.0**-8)
    p *= np.float32(1.0) if (m >> 4) & 1 == 0 else np.float32(2.0**-16)
    p *= np.float32(1.0) if (m >> 5) & 1 == 0 else np.float32(2.0**-32)
    p *= np.float32(1.0) if (m >> 6) & 1 == 0 else np.float32(2.0**-64)
    return p if x > np.float32(EXP_FLOOR) else np.float32(0.0)


@numba.njit(cache=True, fastmath=True, inline="always")
def exp_(x):
    """``e^x`` in float32 for ``|x| < 87`` (:func:`exp_neg` of ``-|x|``, inverted for
    ``x > 0``)."""
    e = exp_neg(-abs(x))
    return e if x <= 0 else np.float32(1.0) / e


@numba.njit(cache=True, fastmath=True, inline="always")
def tanh_(x):
    """``tanh(x)`` in float32 from :func:`exp_neg` (absolute error about 1e-7)."""
    e = exp_neg(np.float32(-2.0) * abs(x))
    t = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    return t if x >= 0 else -t


@numba.njit(cache=True, fastmath=True, inline="always")
def sincos_pi(u):
    """``(sin(pi u), cos(pi u))`` in float32 for ``|u| <= 1``: Taylor series of degree 13 and
    12 on ``|v| <= 1/2`` (truncation below 1e-8) after ``pi u = pi - pi v`` for ``|u| > 1/2``."""
    a = abs(u)
    big = a > np.float32(0.5)
    v = np.float32(1.0) - a if big else a
    z = v * v
    sin_v = v * (np.float32(3.141592653589793) + z * (np.float32(-5.167712780049969) + z * (
        np.float32(2.550164039877345) + z * (np.float32(-0.5992645293207919) + z * (
            np.float32(0.08214588661112819) + z * (np.float32(-0.007370430945714348)
                                                   + z * np.float32(0.00046630280576761234)))))))
    cos_v = np.float32(1.0) + z * (np.float32(-4.934802200544679) + z * (
        np.float32(4.058712126416768) + z * (np.float32(-1.3352627688545893) + z * (
            np.float32(0.2353306303588932) + z * (np.float32(-0.025806891390014057)
                                                  + z * np.float32(0.0019295743094039231))))))
    return (sin_v if u >= 0 else -sin_v), (-cos_v if big else cos_v)


# --- the guide in cell layout ---------------------------------------------------------------
def padded(maps: np.ndarray, radius: int, fill=0) -> np.ndarray:
    """``maps [..., h, w]`` inside a frame of ``radius`` cells of ``fill``:
    ``[..., h + 2 radius, w + 2 radius]``, cell ``(i, j)`` at ``(i + radius, j + radius)``."""
    pad = [(0, 0)] * (maps.ndim - 2) + [(radius, radius), (radius, radius)]
    return np.pad(maps, pad, constant_values=fill)


@dataclass(frozen=True)
class CellTensors:
    """A prepared guide as the kernels read it (float32 numpy arrays).

    Attributes:
        gbar: ``[d4, h + 2r, w + 2r]`` cell means of the normalised guide, its ``d`` bands
            zero-padded to a multiple of :data:`BAND_BLOCK`, in a frame of ``r = radius``
            cells (:func:`padded`).
        valid: ``[h + 2r, w + 2r]`` bool, cells with a valid guide pixel (False on the frame).
        guide_cells: ``[h * w, P, d4]`` the normalised guide in cell layout (bands padded).
        pixel_valid: ``[h * w, P]`` bool, valid pixels (False on padding and nodata).
        local_y, local_x: ``[h, Py]``, ``[w, Px]`` pixel centre minus cell centre (HR px).
        row_index, col_index: ``[h, Py]``, ``[w, Px]`` int64 HR row / column of each phase,
            -1 on padding.
        sy, sx: HR pixels per LR cell; radius: neighbourhood radius in LR cells.
        hr_shape: ``(H, W)``; bands: ``d``, the guide's bands before padding.
    """

    gbar: np.ndarray
    valid: np.ndarray
    guide_cells: np.ndarray
    pixel_valid: np.ndarray
    local_y: np.ndarray
    local_x: np.ndarray
    row_index: np.ndarray
    col_index: np.ndarray
    sy: float
    sx: float
    radius: int
    hr_shape: tuple[int, int]
    bands: int

    @classmethod
    def of(cls, prep) -> CellTensors:
        """From a :class:`geoupsample.core.kernels._Prepared` on the CPU."""
        layout = prep.layout
        rows, cols = layout.rows, layout.cols
        r = int(prep.radius)
        d = int(prep.gbar.shape[0])
        pad = -d % BAND_BLOCK
        gbar, guide_cells = prep.gbar, prep.guide_cells
        if pad:
            gbar = torch.nn.functional.pad(gbar, (0, 0, 0, 0, 0, pad))
            guide_cells = torch.nn.functional.pad(guide_cells, (0, pad))
        return cls(
            gbar=padded(_np(gbar), r), valid=padded(_np(prep.cell_valid), r, False),
            guide_cells=_np(guide_cells), pixel_valid=_np(prep.pixel_valid),
            local_y=_np(rows.local), local_x=_np(cols.local),
            row_index=np.where(rows.valid.numpy(), rows.index.numpy(), -1),
            col_index=np.where(cols.valid.numpy(), cols.index.numpy(), -1),
            sy=float(rows.scale), sx=float(cols.scale), radius=r, hr_shape=layout.hr_shape,
            bands=d,
        )  # fmt: skip

    @property
    def lr_shape(self) -> tuple[int, int]:
        r = self.radius
        return (self.valid.shape[0] - 2 * r, self.valid.shape[1] - 2 * r)

    @property
    def n_phases(self) -> int:
        return int(self.pixel_valid.shape[1])


# --- kernel coefficients and the Adam step --------------------------------------------------
@numba.njit(cache=True, fastmath=True, inline="always")
def _coefficients_of(p0, p1, p2, p3, range_factor):
    """``(a, b, c, R, inv_x, inv_y, cos, sin, dtheta)`` of one cell's raw parameters (see
    :func:`geoupsample.core.gsjbu.kernel_coefficients`; ``dtheta`` = d theta / d p2)."""
    inv_x = exp_(np.float32(-2.0) * p0)
    inv_y = exp_(np.float32(-2.0) * p1)
    th = tanh_(p2)
    sin, cos = sincos_pi(th)
    a = cos * cos * inv_x + sin * sin * inv_y
    c = sin * sin * inv_x + cos * cos * inv_y
    b = cos * sin * (inv_x - inv_y)
    r = range_factor * exp_(np.float32(-2.0) * p3)
    return a, b, c, r, inv_x, inv_y, cos, sin, np.float32(math.pi) * (np.float32(1.0) - th * th)


@numba.njit(cache=True, fastmath=True, parallel=True)
def _coefficients(params, range_factor, coef, aux):
    h, w = params.shape[1:]
    for i in numba.prange(h):
        for j in range(w):
            a, b, c, r, inv_x, inv_y, cos, sin, dtheta = _coefficients_of(
                params[0, i, j], params[1, i, j], params[2, i, j], params[3, i, j],
                range_factor)  # fmt: skip
            coef[0, i, j], coef[1, i, j], coef[2, i, j], coef[3, i, j] = a, b, c, r
            aux[0, i, j], aux[1, i, j], aux[2, i, j], aux[3, i, j] = inv_x, inv_y, cos, sin
            aux[4, i, j] = dtheta


def coefficients(params: np.ndarray, bands: int, radius: int,
                 aux: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The coefficient maps ``(a, b, c, R)`` of raw ``params [4, h, w]`` for a guide of
    ``bands`` bands (:func:`geoupsample.core.gsjbu.kernel_coefficients`, in float32), in a
    frame of ``radius`` zeros: ``[4, h + 2 radius, w + 2 radius]``. ``aux [9, h, w]``, if
    given, receives the maps unframed (4) and the terms of their derivatives (5) for
    :func:`adam_step`."""
    sync_threads()
    params = np.ascontiguousarray(params, np.float32)
    if aux is None:
        aux = np.empty((9, *params.shape[1:]), np.float32)
    with launch():
        _coefficients(params, np.float32(1.5 / bands), aux[:4], aux[4:])
    return padded(aux[:4], radius)


@numba.njit(cache=True, fastmath=True, parallel=True)
def _sum_gradients(grad, scale, radius, out):
    """``out [4, h, w] = scale * sum_t grad[t]`` over the framed ``grad [T, 4, h + 2r, w + 2r]``,
    which is zeroed."""
    h, w = out.shape[1:]
    for i in numba.prange(h):
        for c in range(4):
            total = out[c, i]
            total[:] = 0.0
            for t in range(grad.shape[0]):
                row = grad[t, c, i + radius]
                for j in range(w):
                    total[j] += row[j + radius]
                    row[j + radius] = 0.0
            for j in range(w):
                total[j] *= scale


@numba.njit(cache=True, fastmath=True, parallel=True)
def _adam_step(params, m1, m2, gc, step_size, b1, b2, inv_correction, eps, range_factor, coef,
               aux):  # fmt: skip
    """Row by row, the loop over a row's cells straight-line code only, so that it vectorises
    (bound by memory traffic: about 150 bytes per cell; with :func:`_sum_gradients` in the same
    kernel it did not vectorise, and ran 13 times slower)."""
    h, w = params.shape[1:]
    one = np.float32(1.0)
    two = np.float32(2.0)
    for i in numba.prange(h):
        for j in range(w):
            ga, gb, gcc, gr = gc[0, i, j], gc[1, i, j], gc[2, i, j], gc[3, i, j]
            inv_x, inv_y, cos, sin = aux[0, i, j], aux[1, i, j], aux[2, i, j], aux[3, i, j]
            g_ix = ga * cos * cos + gcc * sin * sin + gb * cos * sin
            g_iy = ga * sin * sin + gcc * cos * cos - gb * cos * sin
            g0 = -two * inv_x * g_ix
            g1 = -two * inv_y * g_iy
            g2 = aux[4, i, j] * (two * coef[1, i, j] * (gcc - ga)
                                 + (cos * cos - sin * sin) * (inv_x - inv_y) * gb)
            g3 = -two * coef[3, i, j] * gr
            a0 = b1 * m1[0, i, j] + (one - b1) * g0
            a1 = b1 * m1[1, i, j] + (one - b1) * g1
            a2 = b1 * m1[2, i, j] + (one - b1) * g2
            a3 = b1 * m1[3, i, j] + (one - b1) * g3
            v0 = b2 * m2[0, i, j] + (one - b2) * g0 * g0
            v1 = b2 * m2[1, i, j] + (one - b2) * g1 * g1
            v2 = b2 * m2[2, i, j] + (one - b2) * g2 * g2
            v3 = b2 * m2[3, i, j] + (one - b2) * g3 * g3
            m1[0, i, j], m1[1, i, j], m1[2, i, j], m1[3, i, j] = a0, a1, a2, a3
            m2[0, i, j], m2[1, i, j], m2[2, i, j], m2[3, i, j] = v0, v1, v2, v3
            p0 = params[0, i, j] - step_size * a0 / (math.sqrt(v0) * inv_correction + eps)
            p1 = params[1, i, j] - step_size * a1 / (math.sqrt(v1) * inv_correction + eps)
            p2 = params[2, i, j] - step_size * a2 / (math.sqrt(v2) * inv_correction + eps)
            p3 = params[3, i, j] - step_size * a3 / (math.sqrt(v3) * inv_correction + eps)
            params[0, i, j], params[1, i, j], params[2, i, j], params[3, i, j] = p0, p1, p2, p3
            a, b, c, r, inv_x, inv_y, cos, sin, dtheta = _coefficients_of(p0, p1, p2, p3,
                                                                          range_factor)
            coef[0, i, j], coef[1, i, j], coef[2, i, j], coef[3, i, j] = a, b, c, r
            aux[0, i, j], aux[1, i, j], aux[2, i, j], aux[3, i, j] = inv_x, inv_y, cos, sin
            aux[4, i, j] = dtheta


@dataclass
class AdamState:
    """Adam (``torch.optim.Adam``'s update, no weight decay) on raw parameters ``[4, h, w]``
    whose loss is known through the coefficient maps (see :func:`adam_step`). ``coef`` holds
    the maps of ``params`` in a frame of ``radius`` zeros, ``aux`` the maps unframed and the
    terms of their derivatives."""

    params: np.ndarray
    lr: float
    eps: float
    bands: int
    radius: int
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 0

    def __post_init__(self) -> None:
        self.params = np.ascontiguousarray(self.params, np.float32)
        self.m1 = np.zeros_like(self.params)
        self.m2 = np.zeros_like(self.params)
        self.aux = np.empty((9, *self.params.shape[1:]), np.float32)
        self.coef = coefficients(self.params, self.bands, self.radius, self.aux)
        self.grad = np.empty_like(self.params)  # the summed gradient of a step

    def gradient_buffer(self, threads: int) -> np.ndarray:
        """Zeros ``[threads, 4, h + 2 radius, w + 2 radius]`` for :func:`fit_step`."""
        return np.zeros((threads, *self.coef.shape), np.float32)


def adam_step(state: AdamState, grad: np.ndarray, scale: float) -> None:
    """One Adam step of ``state.params`` in place from the gradient with respect to the
    coefficient maps, ``scale`` times the sum of ``grad`` (:meth:`AdamState.gradient_buffer`;
    zeroed for the next step); ``state.coef`` then holds the maps of the new parameters."""
    sync_threads()
    state.steps += 1
    b1, b2 = state.betas
    step_size = state.lr / (1 - b1**state.steps)
    inv_correction = 1 / math.sqrt(1 - b2**state.steps)
    f32 = np.float32
    r = state.radius
    with launch():
        _sum_gradients(grad, f32(scale), r, state.grad)
        _adam_step(state.params, state.m1, state.m2, state.grad, f32(step_size), f32(b1),
                   f32(b2), f32(inv_correction), f32(state.eps), f32(1.5 / state.bands),
                   state.aux[:4], state.aux[4:])  # fmt: skip
    h, w = state.params.shape[1:]
    state.coef[:, r : r + h, r : r + w] = state.aux[:4]


# --- per cell and per pixel -----------------------------------------------------------------
@numba.njit(cache=True, fastmath=True, inline="always")
def _offsets(radius, sy, sx, row_stride, nb_my, nb_mx, nb_at):
    """Each neighbour's centre offset from the cell's, in HR pixels (``nb_my``, ``nb_mx``), and
    its place in a framed map flattened with ``row_stride`` cells per row, from the top-left
    corner of the neighbourhood (``nb_at``)."""
    width = 2 * radius + 1
    for di in range(width):
        for dj in range(width):
            k = di * width + dj
            nb_my[k] = np.float32((di - radius) * sy)
            nb_mx[k] = np.float32((dj - radius) * sx)
            nb_at[k] = di * row_stride + dj


@numba.njit(cache=True, fastmath=True, inline="always")
def _flat_maps(coef, gbar, valid, radius):
    """``(w, row_stride, coef [4, n], gbar [d4, n], valid [n])``: the framed maps flattened,
    ``w`` the LR width and ``row_stride`` the framed one."""
    w = valid.shape[1] - 2 * radius
    return (w, w + 2 * radius, coef.reshape(4, -1), gbar.reshape(gbar.shape[0], -1),
            valid.reshape(-1))  # fmt: skip


@numba.njit(cache=True, fastmath=True, inline="always")
def _neighbourhood(radius, sy, sx, row_stride, d4):
    """A thread's arrays for one cell's neighbours: ``(coef [4, K], gbar [d4, K], my [K],
    mx [K], at [K], bias [K])``, the offsets (:func:`_offsets`) filled in."""
    kk = (2 * radius + 1) ** 2
    nb_my = np.empty(kk, np.float32)
    nb_mx = np.empty(kk, np.float32)
    nb_at = np.empty(kk, np.int64)
    _offsets(radius, sy, sx, row_stride, nb_my, nb_mx, nb_at)
    return (np.empty((4, kk), np.float32), np.empty((d4, kk), np.float32), nb_my, nb_mx, nb_at,
            np.empty(kk, np.float32))  # fmt: skip


@numba.njit(cache=True, fastmath=True, inline="always")
def _gather(base, nb_at, coef, gbar, valid, nb_coef, nb_g, nb_bias):
    """The neighbours of the cell whose neighbourhood starts at ``base`` in the flattened framed
    maps (``coef [4, n]``, ``gbar [d4, n]``, ``valid [n]``) into the local arrays (``nb_bias``:
    0, or :data:`EXCLUDED` outside the image or without a valid guide pixel); returns how many
    are valid. One loop over the neighbours through their offsets ``nb_at`` (gathers, no
    branches): 4x faster than loops over the neighbourhood's rows and columns."""
    kk = nb_at.shape[0]
    count = 0
    for k in range(kk):
        q = base + nb_at[k]
        ok = valid[q]
        nb_bias[k] = np.float32(0.0) if ok else np.float32(EXCLUDED)
        count += 1 if ok else 0
        nb_coef[0, k] = coef[0, q]
        nb_coef[1, k] = coef[1, q]
        nb_coef[2, k] = coef[2, q]
        nb_coef[3, k] = coef[3, q]
    for b in range(gbar.shape[0]):
        for k in range(kk):
            nb_g[b, k] = gbar[b, base + nb_at[k]]
    return count


@numba.njit(cache=True, fastmath=True, inline="always")
def _weights(yl, xl, guide_cells, cell, p, nb_coef, nb_g, nb_my, nb_mx, nb_bias, wts, dist2, s):
    """Unnormalised softmax weights of pixel ``p`` of ``cell`` into ``wts[s]`` (their sum's
    inverse is returned: the weights are ``wts[s] * inv``) and its squared range distances to
    each neighbour's cell mean into ``dist2[s]``; excluded neighbours get weight 0.

    The guide's bands come in blocks of four (:data:`BAND_BLOCK`, zero-padded), so that each
    loop over the neighbours does enough work per element to vectorise well: 25 ns per pixel
    for 49 neighbours and 4 bands, against 48 ns with a loop per band. Arrays are indexed, never
    sliced: a view of an array shared by the threads updates its reference count atomically,
    and those counts bounced between the cores. The weights are left unnormalised: a pass
    over them cost a third of this function's time (each pass waits on the one before), and
    their users scale one sum per pixel instead.
    """
    kk = wts.shape[1]
    for k in range(kk):
        dx = xl - nb_mx[k]
        dy = yl - nb_my[k]
        wts[s, k] = (np.float32(-0.5) * (nb_coef[0, k] * dx * dx + nb_coef[2, k] * dy * dy)
                     - nb_coef[1, k] * dx * dy + nb_bias[k])
    for blk in range(guide_cells.shape[2] // BAND_BLOCK):
        b = BAND_BLOCK * blk
        g0, g1 = guide_cells[cell, p, b], guide_cells[cell, p, b + 1]
        g2, g3 = guide_cells[cell, p, b + 2], guide_cells[cell, p, b + 3]
        for k in range(kk):
            t0 = g0 - nb_g[b, k]
            t1 = g1 - nb_g[b + 1, k]
            t2 = g2 - nb_g[b + 2, k]
            t3 = g3 - nb_g[b + 3, k]
            r2 = t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3
            r2 = r2 if blk == 0 else dist2[s, k] + r2
            dist2[s, k] = r2
    top = np.float32(EXCLUDED)
    for k in range(kk):
        lg = wts[s, k] - nb_coef[3, k] * dist2[s, k]
        wts[s, k] = lg
        top = max(top, lg)
    total = np.float32(0.0)
    for k in range(kk):
        e = exp_neg(wts[s, k] - top)
        wts[s, k] = e
        total += e
    return np.float32(1.0) / total


@numba.njit(cache=True, fastmath=True, inline="always")
def _weighted_bands(wts, s, inv, nb_g, out):
    """``out[s, b] = inv * sum_k wts[s, k] nb_g[b, k]`` for every band, four at a time."""
    kk = wts.shape[1]
    for blk in range(out.shape[1] // BAND_BLOCK):
        b = BAND_BLOCK * blk
        o0 = o1 = o2 = o3 = np.float32(0.0)
        for k in range(kk):
            wk = wts[s, k]
            o0 += wk * nb_g[b, k]
            o1 += wk * nb_g[b + 1, k]
            o2 += wk * nb_g[b + 2, k]
            o3 += wk * nb_g[b + 3, k]
        out[s, b] = o0 * inv
        out[s, b + 1] = o1 * inv
        out[s, b + 2] = o2 * inv
        out[s, b + 3] = o3 * inv


# --- the fit step ---------------------------------------------------------------------------
@numba.njit(cache=True, fastmath=True, parallel=True)
def _fit_step(coef, gbar, valid, guide_cells, pixel_valid, local_y, local_x, sy, sx, radius,
              bands, oy, ox, ty, tx, phases, detail, grad, loss, count):  # fmt: skip
    h = valid.shape[0] - 2 * radius
    w, row_stride, coef_flat, gbar_flat, valid_flat = _flat_maps(coef, gbar, valid, radius)
    d4 = gbar.shape[0]
    n_px = local_x.shape[1]
    kk = (2 * radius + 1) ** 2
    m = phases.shape[0]
    rows = (h - oy + ty - 1) // ty
    cols = (w - ox + tx - 1) // tx
    centre = radius * row_stride + radius
    grad_flat = grad.reshape(grad.shape[0], 4, -1)
    for a in numba.prange(rows):
        t = numba.get_thread_id()
        i = oy + a * ty
        nb_coef, nb_g, nb_my, nb_mx, nb_at, nb_bias = _neighbourhood(radius, sy, sx, row_stride,
                                                                     d4)  # fmt: skip
        acc = np.empty((4, kk), np.float32)
        wts = np.empty((m, kk), np.float32)  # unnormalised: the weights are wts[s] * inv[s]
        inv = np.empty(m, np.float32)
        dist2 = np.empty((m, kk), np.float32)
        gl = np.empty(kk, np.float32)
        err = np.empty((m, d4), np.float32)  # rendered minus target, then the loss's sign
        ren = np.empty((m, d4), np.float32)  # the rendered bands
        gout = np.empty(d4, np.float32)  # the gradient of the loss with respect to them
        used = np.empty(m, np.bool_)
        mean = np.empty(d4, np.float32)
        sign_mean = np.empty(d4, np.float32)
        row_loss = 0.0
        row_count = 0
        for bcol in range(cols):
            j = ox + bcol * tx
            cell = i * w + j
            base = i * row_stride + j
            if not valid_flat[base + centre]:
                continue
            _gather(base, nb_at, coef_flat, gbar_flat, valid_flat, nb_coef, nb_g, nb_bias)
            n_used = 0
            for b in range(d4):
                mean[b] = 0.0
            for s in range(m):  # forward: weights and reconstruction of each sampled pixel
                p = phases[s]
                used[s] = pixel_valid[cell, p]
                if not used[s]:
                    continue
                n_used += 1
                inv[s] = _weights(local_y[i, p // n_px], local_x[j, p % n_px], guide_cells,
                                  cell, p, nb_coef, nb_g, nb_my, nb_mx, nb_bias, wts, dist2, s)
                _weighted_bands(wts, s, inv[s], nb_g, ren)
                for b in range(d4):
                    err[s, b] = ren[s, b] - guide_cells[cell, p, b]
                    mean[b] += err[s, b]
            if n_used == 0 or (detail and n_used < 2):
                continue
            for b in range(d4):  # detail: the cell's mean error is back-projection's to fix
                mean[b] = mean[b] / n_used if detail else np.float32(0.0)
                sign_mean[b] = 0.0
            for s in range(m):
                if not used[s]:
                    continue
                for b in range(bands):
                    e = err[s, b] - mean[b]
                    row_loss += abs(e)
                    sg = np.float32(1.0) if e > 0 else (np.float32(-1.0) if e < 0
                                                       else np.float32(0.0))  # fmt: skip
                    err[s, b] = sg
                    sign_mean[b] += sg
                for b in range(bands, d4):
                    err[s, b] = 0.0
                row_count += bands
            for b in range(d4):  # through the mean: d|e_s| / d r_s' = sign_s (delta_ss' - 1 / n)
                sign_mean[b] = sign_mean[b] / n_used if detail else np.float32(0.0)
            for c in range(4):
                for k in range(kk):
                    acc[c, k] = 0.0
            for s in range(m):  # backward: the gradient of each neighbour's (a, b, c, R)
                if not used[s]:
                    continue
                p = phases[s]
                yl = local_y[i, p // n_px]
                xl = local_x[j, p % n_px]
                dot = np.float32(0.0)
                for b in range(d4):
                    gout[b] = err[s, b] - sign_mean[b]
                    dot += gout[b] * ren[s, b]
                for k in range(kk):
                    gl[k] = -dot
                for blk in range(d4 // BAND_BLOCK):
                    b = BAND_BLOCK * blk
                    g0, g1, g2, g3 = gout[b], gout[b + 1], gout[b + 2], gout[b + 3]
                    for k in range(kk):
                        gl[k] += (g0 * nb_g[b, k] + g1 * nb_g[b + 1, k] + g2 * nb_g[b + 2, k]
                                  + g3 * nb_g[b + 3, k])  # fmt: skip
                scale = inv[s]
                for k in range(kk):
                    g = wts[s, k] * scale * gl[k]
                    dx = xl - nb_mx[k]
                    dy = yl - nb_my[k]
                    acc[0, k] -= np.float32(0.5) * g * dx * dx
                    acc[1, k] -= g * dx * dy
                    acc[2, k] -= np.float32(0.5) * g * dy * dy
                    acc[3, k] -= g * dist2[s, k]
            for c in range(4):  # excluded neighbours have weight 0: their acc is 0
                for k in range(kk):
                    grad_flat[t, c, base + nb_at[k]] += acc[c, k]
        loss[t] += row_loss
        count[t] += row_count


def fit_step(
    coef: np.ndarray,
    prep: CellTensors,
    lattice: tuple[int, int, int, int],
    phases: np.ndarray,
    detail: bool,
    grad: np.ndarray,
) -> tuple[float, int]:
    """Add the gradient of one step's masked L1 loss to ``grad``; return ``(loss sum, count)``.

    The loss is the sum of ``|error|`` over the valid pixels and bands of the cells
    ``(oy + a ty, ox + b tx)`` of ``lattice = (oy, ox, ty, tx)`` and the phases ``phases``
    (``[m]`` int64, ``py * Px + px``) of each; the error is the guide rebuilt from its cell means
    minus the guide, with each cell's mean error over its sampled pixels taken out when
    ``detail`` (back-projection fixes the cell means: the kernels are judged on the detail
    within cells; cells with fewer than two such pixels are left out). Divide by ``count``
    for the mean.

    Args:
        coef: the coefficient maps in their frame (:func:`coefficients`).
        prep: the guide in cell layout (:class:`CellTensors`).
        grad: ``[threads, 4, h + 2 radius, w + 2 radius]`` float32: each thread adds the
            gradient of the loss sum with respect to ``coef`` into its own slice.
    """
    oy, ox, ty, tx = (int(v) for v in lattice)
    loss = np.zeros(grad.shape[0], np.float64)
    count = np.zeros(grad.shape[0], np.int64)
    with launch():
        _fit_step(coef, prep.gbar, prep.valid, prep.guide_cells, prep.pixel_valid, prep.local_y,
                  prep.local_x, prep.sy, prep.sx, prep.radius, prep.bands, oy, ox, ty, tx,
                  np.ascontiguousarray(phases, np.int64), bool(detail), grad, loss,
                  count)  # fmt: skip
    return float(loss.sum()), int(count.sum())


# --- the render -----------------------------------------------------------------------------
@numba.njit(cache=True, fastmath=True, parallel=True)
def _render(coef, gbar, valid, guide_cells, pixel_valid, local_y, local_x, row_index,
            col_index, sy, sx, radius, values, out):  # fmt: skip
    """``values [C, h + 2r, w + 2r]`` (framed) -> ``out [C, H, W]``."""
    h = valid.shape[0] - 2 * radius
    w, row_stride, coef_flat, gbar_flat, valid_flat = _flat_maps(coef, gbar, valid, radius)
    d4 = gbar.shape[0]
    n_py = local_y.shape[1]
    n_px = local_x.shape[1]
    n_c = values.shape[0]
    kk = (2 * radius + 1) ** 2
    values_flat = values.reshape(n_c, -1)
    for i in numba.prange(h):
        nb_coef, nb_g, nb_my, nb_mx, nb_at, nb_bias = _neighbourhood(radius, sy, sx, row_stride,
                                                                     d4)  # fmt: skip
        nb_v = np.empty((n_c, kk), np.float32)
        wts = np.empty((1, kk), np.float32)
        dist2 = np.empty((1, kk), np.float32)
        for j in range(w):
            cell = i * w + j
            base = i * row_stride + j
            n_valid = _gather(base, nb_at, coef_flat, gbar_flat, valid_flat, nb_coef, nb_g,
                              nb_bias)  # fmt: skip
            for c in range(n_c):
                for k in range(kk):
                    nb_v[c, k] = values_flat[c, base + nb_at[k]]
            for py in range(n_py):
                y = row_index[i, py]
                if y < 0:
                    continue
                yl = local_y[i, py]
                for px in range(n_px):
                    x = col_index[j, px]
                    if x < 0:
                        continue
                    p = py * n_px + px
                    if n_valid == 0 or not pixel_valid[cell, p]:
                        for c in range(n_c):
                            out[c, y, x] = np.nan
                        continue
                    inv = _weights(yl, local_x[j, px], guide_cells, cell, p, nb_coef, nb_g,
                                   nb_my, nb_mx, nb_bias, wts, dist2, 0)  # fmt: skip
                    for c in range(n_c):  # per channel, a sum over the neighbours
                        total = np.float32(0.0)
                        for k in range(kk):
                            total += wts[0, k] * nb_v[c, k]
                        out[c, y, x] = total * inv


def render(coef: np.ndarray, prep: CellTensors, values: torch.Tensor) -> torch.Tensor:
    """Render ``values [C, h, w]`` (finite; a few channels) at every pixel of ``prep``'s grid
    with the kernels of the framed coefficient maps ``coef`` (:func:`coefficients`):
    ``[C, H, W]`` float32, NaN where the guide is invalid. Each pixel's channels are sums over
    its neighbours; for many channels :func:`weights` and a matrix product do better."""
    sync_threads()
    out = np.empty((values.shape[0], *prep.hr_shape), np.float32)
    with launch():
        _render(coef, prep.gbar, prep.valid, prep.guide_cells, prep.pixel_valid, prep.local_y,
                prep.local_x, prep.row_index, prep.col_index, prep.sy, prep.sx, prep.radius,
                padded(_np(values), prep.radius), out)  # fmt: skip
    return torch.from_numpy(out)


@numba.njit(cache=True, fastmath=True, parallel=True)
def _weights_of_rows(coef, gbar, valid, guide_cells, pixel_valid, local_y, local_x, sy, sx,
                     radius, i0, i1, out):  # fmt: skip
    w, row_stride, coef_flat, gbar_flat, valid_flat = _flat_maps(coef, gbar, valid, radius)
    d4 = gbar.shape[0]
    n_px = local_x.shape[1]
    n_p = pixel_valid.shape[1]
    kk = (2 * radius + 1) ** 2
    for a in numba.prange(i1 - i0):
        i = i0 + a
        nb_coef, nb_g, nb_my, nb_mx, nb_at, nb_bias = _neighbourhood(radius, sy, sx, row_stride,
                                                                     d4)  # fmt: skip
        wts = np.empty((1, kk), np.float32)
        dist2 = np.empty((1, kk), np.float32)
        for j in range(w):
            cell = i * w + j
            n_valid = _gather(i * row_stride + j, nb_at, coef_flat, gbar_flat, valid_flat,
                              nb_coef, nb_g, nb_bias)  # fmt: skip
            row = a * w + j
            for p in range(n_p):
                if n_valid == 0 or not pixel_valid[cell, p]:  # masked later
                    for k in range(kk):
                        out[row, p, k] = 0.0
                    continue
                inv = _weights(local_y[i, p // n_px], local_x[j, p % n_px], guide_cells, cell,
                               p, nb_coef, nb_g, nb_my, nb_mx, nb_bias, wts, dist2, 0)
                for k in range(kk):
                    out[row, p, k] = wts[0, k] * inv


def weights(coef: np.ndarray, prep: CellTensors, rows: tuple[int, int]) -> torch.Tensor:
    """The softmax weights ``[cells, P, K]`` of the cells of LR rows ``rows = (i0, i1)`` (cells
    row-major, neighbours in unfold order); 0 for invalid pixels and padded phases."""
    sync_threads()
    i0, i1 = (int(v) for v in rows)
    w = prep.lr_shape[1]
    kk = (2 * prep.radius + 1) ** 2
    out = np.empty(((i1 - i0) * w, prep.n_phases, kk), np.float32)
    with launch():
        _weights_of_rows(coef, prep.gbar, prep.valid, prep.guide_cells, prep.pixel_valid,
                         prep.local_y, prep.local_x, prep.sy, prep.sx, prep.radius, i0, i1,
                         out)  # fmt: skip
    return torch.from_numpy(out)


def _np(t: torch.Tensor) -> np.ndarray:
    """A contiguous numpy view of a CPU tensor (float32 for floating ones)."""
    t = t.detach()
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    return t.contiguous().numpy()
