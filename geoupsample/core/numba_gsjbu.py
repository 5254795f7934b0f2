"""Fused CPU kernels (Numba) for the GSJBU fit and render.

The maths is that of :mod:`geoupsample.core.gsjbu` written out per pixel instead of as the
bilinear form ``phi @ psi``: for HR pixel ``p`` in LR cell ``n`` and neighbour ``q = n + k``,

    logit(p, q) = -0.5 (a_q dx^2 + 2 b_q dx dy + c_q dy^2) - R_q ||G(p) - Gbar(q)||^2

with ``(dy, dx) = p - mu_q`` in HR pixels and ``(a, b, c, R)`` the coefficient maps of
:func:`geoupsample.core.gsjbu.kernel_coefficients`. The weights are a softmax over the valid
neighbours (inside the image, with a valid guide pixel), and ``out(p) = sum_q w(p, q) X(q)``.

Each kernel works cell by cell: it gathers the ``K`` neighbours' coefficients, cell means and
values once into small local arrays, then loops over the cell's pixels with everything in cache,
the neighbours innermost so that the loops vectorise. Nothing of size ``[cells, K]`` is written
to memory: the torch path's ``psi`` (``(6 + d) K`` numbers per cell, built, stored,
differentiated and scattered back) cost about 2 µs per cell and step on two cores, most of a
fit at x2, where a cell holds 4 pixels.

* :func:`fit_step` — the gradient of a step's L1 loss over a lattice of cells and a set of
  phases in each, with respect to the coefficient maps ``[4, h, w]`` (each thread adds into its
  own copy: no races);
* :func:`adam_step` — that gradient through :func:`coefficients` to the raw parameters, the Adam
  update, and the coefficient maps of the updated parameters, in one pass over the cells;
* :func:`render` — ``[C, H, W]`` from ``[C, h, w]`` values.

Float32 throughout; parallel over cell rows (``numba.prange``) on as many threads as torch uses
(:func:`sync_threads`). Compiled on first use and cached on disk beside this module
(``cache=True``): later processes load the machine code instead of compiling it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

#: Logit given to excluded neighbours (their weight is exactly 0 after the softmax).
EXCLUDED = -1e30
#: The kernels read the guide's bands four at a time (zero-padded to a multiple of four).
BAND_BLOCK = 4


def sync_threads() -> int:
    """Run the kernels on as many threads as torch uses (at most Numba's pool); returns it."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


#: Below this :func:`exp_neg` gives 0 (``e^-87`` is about float32's smallest normal number).
EXP_FLOOR = -87.0
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@numba.njit(cache=True, fastmath=True, inline="always")
def exp_neg(x):
    """``e^x`` in float32 for ``x <= 0``; 0 below :data:`EXP_FLOOR`.

    Written with arithmetic and selects only, so that loops over it vectorise (libm's ``expf``
    is a scalar call: 1.8 ns against 0.5 ns per value here, and a softmax over 49 neighbours
    per pixel is mostly exponentials). ``x = (n + f) ln 2`` with ``n`` a whole number and
    ``|f| <= 1/2``: ``e^(f ln 2)`` by its Taylor series to degree 6 (relative error below
    1.2e-7), times ``2^n`` built from the bits of ``-n <= 126`` as a product of exact powers of
    two. Measured against float64 ``exp`` over ``[-31.9, 0]``: at most 2e-6 relative, all of it
    from rounding ``x log2(e)`` in float32 at the far end (1e-7 near 0).
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


#: Channels above which :func:`render` writes each pixel's channels together (``[H, W, C]``) and
#: vectorises over them; below, over the neighbours.
CHANNELS_LAST = 16


@dataclass(frozen=True)
class CellTensors:
    """A prepared guide as the kernels read it (numpy views of the fit's tensors, float32).

    Attributes:
        gbar: ``[d4, h, w]`` cell means of the normalised guide, its ``d`` bands zero-padded
            to a multiple of :data:`BAND_BLOCK`.
        cell_valid: ``[h, w]`` bool, cells with a valid guide pixel.
        guide_cells: ``[h * w, P, d4]`` the normalised guide in cell layout (padded alike).
        pixel_valid: ``[h * w, P]`` bool, valid pixels (False on padding and nodata).
        local_y, local_x: ``[h, Py]``, ``[w, Px]`` pixel centre minus cell centre (HR px).
        row_index, col_index: ``[h, Py]``, ``[w, Px]`` int64 HR row / column of each phase,
            -1 on padding.
        sy, sx: HR pixels per LR cell; radius: neighbourhood radius in LR cells.
        hr_shape: ``(H, W)``; bands: ``d``, the guide's bands before padding.
    """

    gbar: np.ndarray
    cell_valid: np.ndarray
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
        d = int(prep.gbar.shape[0])
        pad = -d % BAND_BLOCK
        gbar, guide_cells = prep.gbar, prep.guide_cells
        if pad:
            gbar = torch.nn.functional.pad(gbar, (0, 0, 0, 0, 0, pad))
            guide_cells = torch.nn.functional.pad(guide_cells, (0, pad))
        return cls(
            gbar=_np(gbar), cell_valid=_np(prep.cell_valid),
            guide_cells=_np(guide_cells), pixel_valid=_np(prep.pixel_valid),
            local_y=_np(rows.local), local_x=_np(cols.local),
            row_index=np.where(rows.valid.numpy(), rows.index.numpy(), -1),
            col_index=np.where(cols.valid.numpy(), cols.index.numpy(), -1),
            sy=float(rows.scale), sx=float(cols.scale), radius=int(prep.radius),
            hr_shape=layout.hr_shape, bands=d,
        )  # fmt: skip

    @property
    def lr_shape(self) -> tuple[int, int]:
        return self.cell_valid.shape

    @property
    def n_phases(self) -> int:
        return int(self.pixel_valid.shape[1])


@numba.njit(cache=True, fastmath=True, inline="always")
def _coefficients_of(p0, p1, p2, p3, range_factor):
    """``(a, b, c, R, inv_x, inv_y, cos, sin, dtheta)`` of one cell's raw parameters (see
    :func:`geoupsample.core.gsjbu.kernel_coefficients`; ``dtheta`` = d theta / d p2), with
    the vectorisable :func:`exp_`, :func:`tanh_` and :func:`sincos_pi`."""
    inv_x = exp_(np.float32(-2.0) * p0)
    inv_y = exp_(np.float32(-2.0) * p1)
    th = tanh_(p2)
    sin, cos = sincos_pi(th)
    a = cos * cos * inv_x + sin * sin * inv_y
    c = sin * sin * inv_x + cos * cos * inv_y
    b = cos * sin * (inv_x - inv_y)
    r = range_factor * exp_(np.float32(-2.0) * p3)
    return a, b, c, r, inv_x, inv_y, cos, sin, np.float32(math.pi) * (np.float32(1.0) - th * th)


@numba.njit(cache=True, fastmath=True, inline="always")
def _store_coefficients(params, range_factor, i, j, coef, aux):
    """Write cell ``(i, j)``'s coefficients into ``coef [4, h, w]`` and the terms of their
    derivatives (``inv_x, inv_y, cos, sin, dtheta``) into ``aux [5, h, w]``."""
    a, b, c, r, inv_x, inv_y, cos, sin, dtheta = _coefficients_of(
        params[0, i, j], params[1, i, j], params[2, i, j], params[3, i, j], range_factor)
    coef[0, i, j] = a
    coef[1, i, j] = b
    coef[2, i, j] = c
    coef[3, i, j] = r
    aux[0, i, j] = inv_x
    aux[1, i, j] = inv_y
    aux[2, i, j] = cos
    aux[3, i, j] = sin
    aux[4, i, j] = dtheta


@numba.njit(cache=True, fastmath=True, parallel=True)
def _coefficients(params, range_factor, coef, aux):
    h, w = params.shape[1:]
    for i in numba.prange(h):
        for j in range(w):
            _store_coefficients(params, range_factor, i, j, coef, aux)


def coefficients(params: np.ndarray, bands: int, aux: np.ndarray | None = None) -> np.ndarray:
    """``[4, h, w]`` float32 maps ``(a, b, c, R)`` of raw ``params [4, h, w]`` for a guide of
    ``bands`` bands (:func:`geoupsample.core.gsjbu.kernel_coefficients`, in float32); ``aux
    [5, h, w]``, if given, receives the terms of their derivatives for :func:`adam_step`."""
    sync_threads()
    params = np.ascontiguousarray(params, np.float32)
    coef = np.empty(params.shape, np.float32)
    if aux is None:
        aux = np.empty((5, *params.shape[1:]), np.float32)
    _coefficients(params, np.float32(1.5 / bands), coef, aux)
    return coef


@numba.njit(cache=True, fastmath=True, parallel=True)
def _adam_step(params, m1, m2, grad, scale, step_size, b1, b2, inv_correction, eps,
               range_factor, coef, aux):  # fmt: skip
    h, w = params.shape[1:]
    threads = grad.shape[0]
    for i in numba.prange(h):
        gc = np.empty(4, np.float32)
        gp = np.empty(4, np.float32)
        for j in range(w):
            for c in range(4):
                total = np.float32(0.0)
                for t in range(threads):
                    total += grad[t, c, i, j]
                    grad[t, c, i, j] = 0.0
                gc[c] = total * scale
            b = coef[1, i, j]
            inv_x, inv_y, cos, sin = aux[0, i, j], aux[1, i, j], aux[2, i, j], aux[3, i, j]
            g_ix = gc[0] * cos * cos + gc[2] * sin * sin + gc[1] * cos * sin
            g_iy = gc[0] * sin * sin + gc[2] * cos * cos - gc[1] * cos * sin
            gp[0] = np.float32(-2.0) * inv_x * g_ix
            gp[1] = np.float32(-2.0) * inv_y * g_iy
            gp[2] = aux[4, i, j] * (np.float32(2.0) * b * (gc[2] - gc[0])
                                    + (cos * cos - sin * sin) * (inv_x - inv_y) * gc[1])
            gp[3] = np.float32(-2.0) * coef[3, i, j] * gc[3]
            for c in range(4):
                m1[c, i, j] = b1 * m1[c, i, j] + (np.float32(1.0) - b1) * gp[c]
                m2[c, i, j] = b2 * m2[c, i, j] + (np.float32(1.0) - b2) * gp[c] * gp[c]
                denom = math.sqrt(m2[c, i, j]) * inv_correction + eps
                params[c, i, j] -= step_size * m1[c, i, j] / denom
            _store_coefficients(params, range_factor, i, j, coef, aux)


@dataclass
class AdamState:
    """Adam (``torch.optim.Adam``'s update, no weight decay) on raw parameters ``[4, h, w]``
    whose loss is known through the coefficient maps: see :func:`adam_step`. ``coef`` holds the
    coefficient maps of ``params`` (``aux`` the terms of their derivatives)."""

    params: np.ndarray
    lr: float
    eps: float
    bands: int
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 0

    def __post_init__(self) -> None:
        self.params = np.ascontiguousarray(self.params, np.float32)
        self.m1 = np.zeros_like(self.params)
        self.m2 = np.zeros_like(self.params)
        self.aux = np.empty((5, *self.params.shape[1:]), np.float32)
        self.coef = coefficients(self.params, self.bands, self.aux)


def adam_step(state: AdamState, grad: np.ndarray, scale: float) -> None:
    """One Adam step of ``state.params`` in place from the gradient with respect to the
    coefficient maps, ``scale`` times the sum of ``grad [threads, 4, h, w]`` (zeroed for the
    next step); ``state.coef`` then holds the maps of the new parameters."""
    sync_threads()
    state.steps += 1
    b1, b2 = state.betas
    step_size = state.lr / (1 - b1**state.steps)
    inv_correction = 1 / math.sqrt(1 - b2**state.steps)
    f32 = np.float32
    _adam_step(state.params, state.m1, state.m2, grad, f32(scale), f32(step_size), f32(b1),
               f32(b2), f32(inv_correction), f32(state.eps), f32(1.5 / state.bands),
               state.coef, state.aux)  # fmt: skip


@numba.njit(cache=True, fastmath=True, inline="always")
def _gather(i, j, radius, sy, sx, coef, gbar, cell_valid, nb_coef, nb_g, nb_my, nb_mx, nb_bias):
    """The neighbours of cell ``(i, j)`` into the local arrays (``nb_bias``: 0, or
    :data:`EXCLUDED` outside the image or without a valid guide pixel); returns how many are
    valid."""
    h, w = cell_valid.shape
    d = gbar.shape[0]
    k = 0
    count = 0
    for di in range(-radius, radius + 1):
        for dj in range(-radius, radius + 1):
            qi, qj = i + di, j + dj
            nb_my[k] = np.float32(di * sy)
            nb_mx[k] = np.float32(dj * sx)
            if 0 <= qi < h and 0 <= qj < w and cell_valid[qi, qj]:
                count += 1
                nb_bias[k] = 0.0
                for c in range(4):
                    nb_coef[c, k] = coef[c, qi, qj]
                for b in range(d):
                    nb_g[b, k] = gbar[b, qi, qj]
            else:
                nb_bias[k] = EXCLUDED
                for c in range(4):
                    nb_coef[c, k] = 0.0
                for b in range(d):
                    nb_g[b, k] = 0.0
            k += 1
    return count


@numba.njit(cache=True, fastmath=True, inline="always")
def _weights(yl, xl, gp, nb_coef, nb_g, nb_my, nb_mx, nb_bias, wts, dist2):
    """Softmax weights of one pixel into ``wts`` and its squared range distances to each
    neighbour's cell mean into ``dist2``; excluded neighbours get weight 0.

    The guide's bands come in blocks of four (:data:`BAND_BLOCK`, zero-padded), so that each
    loop over the neighbours does enough work per element to vectorise well: 25 ns per pixel
    for 49 neighbours and 4 bands, against 48 ns with a loop per band.
    """
    kk = wts.shape[0]
    for k in range(kk):
        dx = xl - nb_mx[k]
        dy = yl - nb_my[k]
        wts[k] = (np.float32(-0.5) * (nb_coef[0, k] * dx * dx + nb_coef[2, k] * dy * dy)
                  - nb_coef[1, k] * dx * dy + nb_bias[k])
    for blk in range(gp.shape[0] // BAND_BLOCK):
        b = BAND_BLOCK * blk
        g0, g1, g2, g3 = gp[b], gp[b + 1], gp[b + 2], gp[b + 3]
        for k in range(kk):
            t0 = g0 - nb_g[b, k]
            t1 = g1 - nb_g[b + 1, k]
            t2 = g2 - nb_g[b + 2, k]
            t3 = g3 - nb_g[b + 3, k]
            r2 = t0 * t0 + t1 * t1 + t2 * t2 + t3 * t3
            r2 = r2 if blk == 0 else dist2[k] + r2
            dist2[k] = r2
    top = np.float32(EXCLUDED)
    for k in range(kk):
        lg = wts[k] - nb_coef[3, k] * dist2[k]
        wts[k] = lg
        top = max(top, lg)
    total = np.float32(0.0)
    for k in range(kk):
        e = exp_neg(wts[k] - top)
        wts[k] = e
        total += e
    inv = np.float32(1.0) / total
    for k in range(kk):
        wts[k] *= inv


@numba.njit(cache=True, fastmath=True, inline="always")
def _weighted_bands(wts, nb_g, out):
    """``out[b] = sum_k wts[k] nb_g[b, k]`` for every band, four at a time."""
    kk = wts.shape[0]
    for blk in range(out.shape[0] // BAND_BLOCK):
        b = BAND_BLOCK * blk
        o0 = o1 = o2 = o3 = np.float32(0.0)
        for k in range(kk):
            wk = wts[k]
            o0 += wk * nb_g[b, k]
            o1 += wk * nb_g[b + 1, k]
            o2 += wk * nb_g[b + 2, k]
            o3 += wk * nb_g[b + 3, k]
        out[b] = o0
        out[b + 1] = o1
        out[b + 2] = o2
        out[b + 3] = o3


@numba.njit(cache=True, fastmath=True, parallel=True)
def _fit_step(coef, gbar, cell_valid, guide_cells, pixel_valid, local_y, local_x, sy, sx,
              radius, bands, oy, ox, ty, tx, phases, detail, grad, loss, count):  # fmt: skip
    h, w = cell_valid.shape
    d4 = gbar.shape[0]
    n_px = local_x.shape[1]
    kk = (2 * radius + 1) ** 2
    m = phases.shape[0]
    rows = (h - oy + ty - 1) // ty
    cols = (w - ox + tx - 1) // tx
    for a in numba.prange(rows):
        t = numba.get_thread_id()
        i = oy + a * ty
        nb_coef = np.empty((4, kk), np.float32)
        nb_g = np.empty((d4, kk), np.float32)
        nb_my = np.empty(kk, np.float32)
        nb_mx = np.empty(kk, np.float32)
        nb_bias = np.empty(kk, np.float32)
        acc = np.empty((4, kk), np.float32)
        wts = np.empty((m, kk), np.float32)
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
            if not cell_valid[i, j]:
                continue
            _gather(i, j, radius, sy, sx, coef, gbar, cell_valid, nb_coef, nb_g, nb_my, nb_mx,
                    nb_bias)  # fmt: skip
            n_used = 0
            mean[:] = 0.0
            for s in range(m):  # forward: weights and reconstruction of each sampled pixel
                p = phases[s]
                used[s] = pixel_valid[cell, p]
                if not used[s]:
                    continue
                n_used += 1
                gp = guide_cells[cell, p]
                _weights(local_y[i, p // n_px], local_x[j, p % n_px], gp, nb_coef, nb_g, nb_my,
                         nb_mx, nb_bias, wts[s], dist2[s])  # fmt: skip
                _weighted_bands(wts[s], nb_g, ren[s])
                for b in range(d4):
                    err[s, b] = ren[s, b] - gp[b]
                    mean[b] += err[s, b]
            if n_used == 0 or (detail and n_used < 2):
                continue
            if detail:  # the cell's mean error is back-projection's to fix, not the kernels'
                for b in range(d4):
                    mean[b] /= n_used
            else:
                mean[:] = 0.0
            sign_mean[:] = 0.0
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
            if detail:  # through the mean: d|e_s| / d r_s' = sign_s (delta_ss' - 1 / n)
                for b in range(d4):
                    sign_mean[b] /= n_used
            else:
                sign_mean[:] = 0.0
            acc[:] = 0.0
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
                for k in range(kk):
                    g = wts[s, k] * gl[k]
                    dx = xl - nb_mx[k]
                    dy = yl - nb_my[k]
                    acc[0, k] -= np.float32(0.5) * g * dx * dx
                    acc[1, k] -= g * dx * dy
                    acc[2, k] -= np.float32(0.5) * g * dy * dy
                    acc[3, k] -= g * dist2[s, k]
            k = 0
            for di in range(-radius, radius + 1):
                for dj in range(-radius, radius + 1):
                    if nb_bias[k] == 0.0:
                        for c in range(4):
                            grad[t, c, i + di, j + dj] += acc[c, k]
                    k += 1
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
    within cells). Divide by ``count`` for the mean.

    Args:
        coef: ``[4, h, w]`` float32 coefficient maps ``(a, b, c, R)``.
        prep: the guide in cell layout (:class:`CellTensors`).
        grad: ``[threads, 4, h, w]`` float32: each thread adds the gradient of the loss sum
            with respect to ``coef`` into its own slice.
    """
    oy, ox, ty, tx = (int(v) for v in lattice)
    loss = np.zeros(grad.shape[0], np.float64)
    count = np.zeros(grad.shape[0], np.int64)
    _fit_step(coef, prep.gbar, prep.cell_valid, prep.guide_cells, prep.pixel_valid,
              prep.local_y, prep.local_x, prep.sy, prep.sx, prep.radius, prep.bands, oy, ox,
              ty, tx, phases, bool(detail), grad, loss, count)  # fmt: skip
    return float(loss.sum()), int(count.sum())


@numba.njit(cache=True, fastmath=True, parallel=True)
def _render(coef, gbar, cell_valid, guide_cells, pixel_valid, local_y, local_x, row_index,
            col_index, sy, sx, radius, values, out):  # fmt: skip
    """``values [h, w, C]`` -> ``out [H, W, C]`` (any strides)."""
    h, w = cell_valid.shape
    d = gbar.shape[0]
    n_py = local_y.shape[1]
    n_px = local_x.shape[1]
    n_c = values.shape[2]
    kk = (2 * radius + 1) ** 2
    channels_last = n_c > CHANNELS_LAST
    for i in numba.prange(h):
        nb_coef = np.empty((4, kk), np.float32)
        nb_g = np.empty((d, kk), np.float32)
        nb_my = np.empty(kk, np.float32)
        nb_mx = np.empty(kk, np.float32)
        nb_bias = np.empty(kk, np.float32)
        nb_v = np.empty((n_c, kk), np.float32)  # by channel: sums over the neighbours
        nb_vt = np.empty((kk, n_c), np.float32)  # by neighbour: sums over the channels
        acc = np.empty(n_c, np.float32)
        wts = np.empty(kk, np.float32)
        dist2 = np.empty(kk, np.float32)
        for j in range(w):
            cell = i * w + j
            valid = _gather(i, j, radius, sy, sx, coef, gbar, cell_valid, nb_coef, nb_g, nb_my,
                            nb_mx, nb_bias)  # fmt: skip
            k = 0
            for di in range(-radius, radius + 1):
                for dj in range(-radius, radius + 1):
                    inside = nb_bias[k] == 0.0
                    for c in range(n_c):
                        v = values[i + di, j + dj, c] if inside else np.float32(0.0)
                        if channels_last:
                            nb_vt[k, c] = v
                        else:
                            nb_v[c, k] = v
                    k += 1
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
                    if valid == 0 or not pixel_valid[cell, p]:
                        for c in range(n_c):
                            out[y, x, c] = np.nan
                        continue
                    _weights(yl, local_x[j, px], guide_cells[cell, p], nb_coef, nb_g, nb_my,
                             nb_mx, nb_bias, wts, dist2)  # fmt: skip
                    if channels_last:
                        acc[:] = 0.0
                        for k in range(kk):
                            wk = wts[k]
                            if wk != 0.0:
                                for c in range(n_c):
                                    acc[c] += wk * nb_vt[k, c]
                        for c in range(n_c):
                            out[y, x, c] = acc[c]
                    else:
                        for c in range(n_c):
                            total = np.float32(0.0)
                            for k in range(kk):
                                total += wts[k] * nb_v[c, k]
                            out[y, x, c] = total


def render(coef: np.ndarray, prep: CellTensors, values: torch.Tensor) -> torch.Tensor:
    """Render ``values [C, h, w]`` (finite) at every pixel of ``prep``'s grid with the kernels
    of ``coef [4, h, w]``: ``[C, H, W]`` float32, NaN where the guide is invalid."""
    sync_threads()
    c = values.shape[0]
    hr = prep.hr_shape
    vals = _np(values)
    if c > CHANNELS_LAST:  # each pixel writes its C values at once
        out = np.empty((*hr, c), np.float32)
        _render(coef, prep.gbar, prep.cell_valid, prep.guide_cells, prep.pixel_valid,
                prep.local_y, prep.local_x, prep.row_index, prep.col_index, prep.sy, prep.sx,
                prep.radius, np.ascontiguousarray(np.moveaxis(vals, 0, -1)), out)  # fmt: skip
        return torch.from_numpy(out).permute(2, 0, 1).contiguous()
    out = np.empty((c, *hr), np.float32)
    _render(coef, prep.gbar, prep.cell_valid, prep.guide_cells, prep.pixel_valid, prep.local_y,
            prep.local_x, prep.row_index, prep.col_index, prep.sy, prep.sx, prep.radius,
            np.moveaxis(vals, 0, -1), np.moveaxis(out, 0, -1))  # fmt: skip
    return torch.from_numpy(out)


def _np(t: torch.Tensor) -> np.ndarray:
    """A contiguous numpy view of a CPU tensor (float32 for floating ones)."""
    t = t.detach()
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    return t.contiguous().numpy()
