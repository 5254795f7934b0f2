"""Fused Triton kernels for the GSJBU render and fit step (fp32 accumulation).

The maths is that of :mod:`geoupsample.core.gsjbu`: for cell ``n``, phase ``p`` and neighbour
``k``, ``logits[n, p, k] = phi[n, p, :] @ psi[n, :, k]`` (``F = 6 + d`` terms), the weights are a
softmax over ``k``, and ``out[n, p, :] = sum_k w[n, p, k] * values[n, k, :]``. The kernels here
compute that cell by cell without ever writing the ``[n, P, K]`` weights to global memory:

* :func:`render` — one program per (cell, block of phases): logits by ``F`` rank-1 updates in
  fp32, a stable softmax over the whole (padded) ``K`` axis held in registers, then
  ``w @ values`` tile by tile over the channels (``tl.dot``; fp16/bf16 values use the tensor cores
  with fp32 accumulation, fp32 values an fp32 product).
* :func:`fit_loss_and_grad` — one program per cell: forward, masked L1 loss and backward fused
  (L1 is per pixel, so a phase block's gradient is known as soon as its output is); ``grad_psi``
  ``[F, K]`` accumulates over the phase blocks in registers and is written once.
* :func:`build_psi` — ``psi`` straight from the raw parameters of each cell's neighbours (one
  kernel), differentiable: its backward is one gather kernel (no atomics).
* :class:`AdamFit` — a whole Adam step of the fit in three kernels (``psi``; loss, valid-pixel
  count and ``grad_psi``; then the parameter gradient with the Adam update applied in place),
  with no autograd graph and no host synchronisation; the same update as ``torch.optim.Adam``.

Masked neighbours carry ``-inf`` in ``psi``'s constant row (``phi``'s constant feature is always 1).
A pixel whose neighbours are all masked gets all-zero weights here (the torch path gives NaN;
such pixels are invalid and masked downstream either way).

Kernels run on CUDA tensors; on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``
set before this module is imported), for tests. :func:`available` says which applies.
"""

from __future__ import annotations

import os

import torch

from geoupsample.core.layout import CellLayout

try:  # Triton is optional: the torch path in gsjbu.py is the fallback.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None
    tl = None

#: True when Triton imported.
HAS_TRITON = triton is not None
#: True when the kernels below were built for Triton's interpreter (runs on CPU tensors).
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: Allowed values of ``precision`` for fp32 products (``tl.dot``'s ``input_precision``).
PRECISIONS = ("ieee", "tf32", "tf32x3")


def available(device: torch.device | str, interpreter: bool = False) -> bool:
    """Whether the Triton kernels can run on ``device``.

    True when Triton imports and ``device`` is CUDA (with a GPU visible); for a CPU device only
    when the kernels were built under ``TRITON_INTERPRET=1`` *and* ``interpreter`` is True (an
    explicit opt-in: the interpreter is for tests, and slow).
    """
    if not HAS_TRITON:
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and INTERPRET and interpreter


def _pow2(x: int, lo: int = 16) -> int:
    """Smallest power of two ``>= max(x, lo)`` (``tl.dot`` needs every dimension >= 16)."""
    return max(lo, 1 << max(0, int(x) - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def _cell_weights(
        phi_ptr,
        psi_ptr,
        cell,
        rows,
        mask_p,
        offs_k,
        mask_k,
        s_phi_n,
        s_phi_p,
        s_phi_f,
        s_psi_n,
        s_psi_f,
        s_psi_k,
        F: tl.constexpr,
    ):
        """Softmax weights ``[BLOCK_P, BLOCK_K]`` (fp32) of phase rows ``rows`` of ``cell``.

        Padded phases/neighbours and all-masked rows get weight 0 (never NaN).
        """
        phi_row = phi_ptr + cell * s_phi_n + rows * s_phi_p
        psi_row = psi_ptr + cell * s_psi_n + offs_k * s_psi_k
        # Padded phases read phi = 1 (not 0): 0 * -inf would be NaN; their rows are dropped below.
        a = tl.load(phi_row, mask=mask_p, other=1.0).to(tl.float32)
        b = tl.load(psi_row, mask=mask_k, other=0.0).to(tl.float32)
        logits = a[:, None] * b[None, :]
        for f in tl.static_range(1, F):
            a = tl.load(phi_row + f * s_phi_f, mask=mask_p, other=1.0).to(tl.float32)
            b = tl.load(psi_row + f * s_psi_f, mask=mask_k, other=0.0).to(tl.float32)
            logits += a[:, None] * b[None, :]
        keep = mask_p[:, None] & mask_k[None, :]
        logits = tl.where(keep, logits, float("-inf"))
        m = tl.max(logits, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(logits - m[:, None])
        e = tl.where(keep, e, 0.0)
        s = tl.sum(e, axis=1)
        s = tl.where(s == 0.0, 1.0, s)
        return e / s[:, None]

    @triton.jit(do_not_specialize=["P", "K", "C"])
    def _render_kernel(
        phi_ptr,
        psi_ptr,
        val_ptr,
        out_ptr,
        P,
        K,
        C,
        s_phi_n,
        s_phi_p,
        s_phi_f,
        s_psi_n,
        s_psi_f,
        s_psi_k,
        s_val_n,
        s_val_k,
        s_val_c,
        s_out_n,
        s_out_p,
        s_out_c,
        F: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        LOWP: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """``out[n, p, c] = sum_k softmax_k(phi[n, p] @ psi[n])[k] * values[n, k, c]``.

        Grid: ``(n_cells, cdiv(P, BLOCK_P))``.
        """
        cell = tl.program_id(0).to(tl.int64)
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = _cell_weights(
            phi_ptr, psi_ptr, cell, offs_p, mask_p, offs_k, mask_k,
            s_phi_n, s_phi_p, s_phi_f, s_psi_n, s_psi_f, s_psi_k, F,
        )  # fmt: skip
        if LOWP:
            w_in = w.to(val_ptr.dtype.element_ty)
        val_base = val_ptr + cell * s_val_n + offs_k[:, None] * s_val_k
        out_base = out_ptr + cell * s_out_n + offs_p[:, None] * s_out_p
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            v = tl.load(
                val_base + offs_c[None, :] * s_val_c,
                mask=mask_k[:, None] & mask_c[None, :],
                other=0.0,
            )
            if LOWP:
                acc = tl.dot(w_in, v, out_dtype=tl.float32)
            else:
                acc = tl.dot(w, v.to(tl.float32), input_precision=PRECISION)
            tl.store(
                out_base + offs_c[None, :] * s_out_c,
                acc.to(out_ptr.dtype.element_ty),
                mask=mask_p[:, None] & mask_c[None, :],
            )

    @triton.jit(do_not_specialize=["M"])
    def _count_kernel(
        tvalid_ptr,
        phases_ptr,
        count_ptr,
        M,
        s_tv_n,
        s_tv_p,
        BLOCK_P: tl.constexpr,
        HAS_PHASES: tl.constexpr,
    ):
        """``count += number of valid target pixels of this cell`` (grid ``(n_cells,)``)."""
        cell = tl.program_id(0).to(tl.int64)
        total = tl.zeros([BLOCK_P], dtype=tl.int32)
        for p0 in range(0, M, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs < M
            if HAS_PHASES:
                rows = tl.load(phases_ptr + offs, mask=mask_p, other=0)
            else:
                rows = offs
            tv = tl.load(tvalid_ptr + cell * s_tv_n + rows * s_tv_p, mask=mask_p, other=0)
            total += (tv != 0).to(tl.int32)
        tl.atomic_add(count_ptr, tl.sum(total, axis=0))

    @triton.jit(do_not_specialize=["M", "K"])
    def _fit_kernel(
        phi_ptr,
        psi_ptr,
        val_ptr,
        tgt_ptr,
        tvalid_ptr,
        phases_ptr,
        count_ptr,
        inv_count_ptr,
        loss_ptr,
        grad_ptr,
        M,
        K,
        s_phi_n,
        s_phi_p,
        s_phi_f,
        s_psi_n,
        s_psi_f,
        s_psi_k,
        s_val_n,
        s_val_k,
        s_val_d,
        s_tgt_n,
        s_tgt_p,
        s_tgt_d,
        s_tv_n,
        s_tv_p,
        s_g_n,
        s_g_f,
        s_g_k,
        F: tl.constexpr,
        D: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_PHASES: tl.constexpr,
        PRECISION: tl.constexpr,
        SCALED: tl.constexpr = True,
    ):
        """Masked L1 loss of one cell (sum, unscaled) and its ``grad_psi [F, K]``.

        Grid: ``(n_cells,)``. ``M`` phases are used: ``phases[0:M]`` when ``HAS_PHASES``, else
        ``0..M-1``. The gradient is that of ``sum |diff| * inv_count`` (the mean over the valid
        pixels and bands), as in :func:`geoupsample.core.gsjbu.fit_loss_and_grad`, with
        ``inv_count = 1 / max(count * D, 1)`` rounded to fp32 (``count`` from
        :func:`_count_kernel`); program 0 also writes it to ``inv_count_ptr``. The ``D`` bands
        are few: their products are unrolled rank-1 updates (a padded ``tl.dot`` would waste 4x).

        With ``SCALED=False`` the kernel counts the valid pixels itself (``count += ...``, atomic)
        and writes the gradient of ``sum |diff|`` (signs, no ``inv_count``): the caller scales
        it once the count is complete (:class:`AdamFit` does so in its Adam kernel).
        """
        cell = tl.program_id(0).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        offs_f = tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        if SCALED:
            total = tl.maximum(tl.load(count_ptr) * D, 1).to(tl.float32)
            inv_count = tl.math.div_rn(tl.full([], 1.0, tl.float32), total)
            if tl.program_id(0) == 0:
                tl.store(inv_count_ptr, inv_count)
        else:
            inv_count = 1.0
            n_valid = tl.zeros([BLOCK_P], dtype=tl.int32)
        val_base = val_ptr + cell * s_val_n + offs_k * s_val_k
        grad = tl.zeros([BLOCK_F, BLOCK_K], dtype=tl.float32)
        loss = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, M, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs < M
            if HAS_PHASES:
                rows = tl.load(phases_ptr + offs, mask=mask_p, other=0)
            else:
                rows = offs
            w = _cell_weights(
                phi_ptr, psi_ptr, cell, rows, mask_p, offs_k, mask_k,
                s_phi_n, s_phi_p, s_phi_f, s_psi_n, s_psi_f, s_psi_k, F,
            )  # fmt: skip
            tv = tl.load(tvalid_ptr + cell * s_tv_n + rows * s_tv_p, mask=mask_p, other=0)
            counted = tv != 0
            if not SCALED:
                n_valid += counted.to(tl.int32)
            tgt_base = tgt_ptr + cell * s_tgt_n + rows * s_tgt_p
            grad_w = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
            for e in tl.static_range(D):
                v_e = tl.load(val_base + e * s_val_d, mask=mask_k, other=0.0).to(tl.float32)
                out_e = tl.sum(w * v_e[None, :], axis=1)  # [BLOCK_P]
                tgt_e = tl.load(tgt_base + e * s_tgt_d, mask=mask_p, other=0.0).to(tl.float32)
                diff = tl.where(counted, out_e - tgt_e, 0.0)
                loss += tl.abs(diff)
                g = tl.where(diff > 0.0, inv_count, tl.where(diff < 0.0, -inv_count, 0.0))
                grad_w += g[:, None] * v_e[None, :]
            grad_l = w * (grad_w - tl.sum(w * grad_w, axis=1)[:, None])
            phi_t = tl.load(
                phi_ptr + cell * s_phi_n + rows[None, :] * s_phi_p + offs_f[:, None] * s_phi_f,
                mask=mask_f[:, None] & mask_p[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_F, BLOCK_P]
            grad += tl.dot(phi_t, grad_l, input_precision=PRECISION)
        tl.store(loss_ptr + cell, tl.sum(loss, axis=0))
        if not SCALED:
            tl.atomic_add(count_ptr, tl.sum(n_valid, axis=0))
        tl.store(
            grad_ptr + cell * s_g_n + offs_f[:, None] * s_g_f + offs_k[None, :] * s_g_k,
            grad.to(grad_ptr.dtype.element_ty),
            mask=mask_f[:, None] & mask_k[None, :],
        )

    @triton.jit
    def _tanh(x):
        """``tanh`` from ``exp`` (Triton has none), stable for any ``x``."""
        t = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - t) / (1.0 + t)
        return tl.where(x < 0.0, -y, y)

    @triton.jit(do_not_specialize=["h", "w", "K", "sy", "sx", "range_factor"])
    def _psi_kernel(
        par_ptr,
        gbar_ptr,
        cvalid_ptr,
        psi_ptr,
        h,
        w,
        K,
        sy,
        sx,
        range_factor,
        s_par_f,
        s_gbar_d,
        s_psi_n,
        s_psi_f,
        s_psi_k,
        D: tl.constexpr,
        RADIUS: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """``psi[n, :, k]`` of :func:`geoupsample.core.gsjbu.build_psi`, from raw ``params``.

        Grid: ``(h * w,)``. ``params [4, h, w]``, ``gbar [d, h, w]`` and ``cell_valid [h, w]``
        are row-major over the cells (``s_*`` give the stride between their leading planes).
        """
        cell = tl.program_id(0)
        i = cell // w
        j = cell % w
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        ky = offs_k // (2 * RADIUS + 1) - RADIUS
        kx = offs_k % (2 * RADIUS + 1) - RADIUS
        qi = i + ky
        qj = j + kx
        inside = mask_k & (qi >= 0) & (qi < h) & (qj >= 0) & (qj < w)
        q = tl.where(inside, qi * w + qj, 0)
        p0 = tl.load(par_ptr + q, mask=inside, other=0.0).to(tl.float32)
        p1 = tl.load(par_ptr + s_par_f + q, mask=inside, other=0.0).to(tl.float32)
        p2 = tl.load(par_ptr + 2 * s_par_f + q, mask=inside, other=0.0).to(tl.float32)
        p3 = tl.load(par_ptr + 3 * s_par_f + q, mask=inside, other=0.0).to(tl.float32)
        inv_x = tl.exp(-2.0 * p0)
        inv_y = tl.exp(-2.0 * p1)
        theta = 3.141592653589793 * _tanh(p2)
        cos = tl.cos(theta)
        sin = tl.sin(theta)
        # Outside the image the torch path pads the coefficient maps with zeros: do the same.
        a = tl.where(inside, cos * cos * inv_x + sin * sin * inv_y, 0.0)
        c = tl.where(inside, sin * sin * inv_x + cos * cos * inv_y, 0.0)
        b = tl.where(inside, cos * sin * (inv_x - inv_y), 0.0)
        r = tl.where(inside, range_factor * tl.exp(-2.0 * p3), 0.0)
        valid = tl.load(cvalid_ptr + q, mask=inside, other=0) != 0
        # No valid neighbour at all (deep in a nodata collar): keep them all, as the torch path
        # does (gsjbu.psi_geometry): an all -inf row would be NaN in a torch softmax.
        valid = valid | (mask_k & (tl.sum(valid.to(tl.int32), axis=0) == 0))
        dy = ky.to(tl.float32) * sy
        dx = kx.to(tl.float32) * sx
        out = psi_ptr + cell.to(tl.int64) * s_psi_n + offs_k * s_psi_k
        vv = tl.zeros([BLOCK_K], dtype=tl.float32)
        for e in tl.static_range(D):
            g_n = tl.load(gbar_ptr + e * s_gbar_d + cell).to(tl.float32)
            g_q = tl.load(gbar_ptr + e * s_gbar_d + q, mask=inside, other=0.0).to(tl.float32)
            v = g_q - g_n
            vv += v * v
            tl.store(out + (7 + e) * s_psi_f, 2.0 * r * v, mask=mask_k)
        const = -0.5 * (a * dx * dx + 2.0 * b * dx * dy + c * dy * dy) - r * vv
        const = tl.where(valid, const, float("-inf"))
        tl.store(out, -0.5 * a, mask=mask_k)
        tl.store(out + s_psi_f, -b, mask=mask_k)
        tl.store(out + 2 * s_psi_f, -0.5 * c, mask=mask_k)
        tl.store(out + 3 * s_psi_f, a * dx + b * dy, mask=mask_k)
        tl.store(out + 4 * s_psi_f, c * dy + b * dx, mask=mask_k)
        tl.store(out + 5 * s_psi_f, const, mask=mask_k)
        tl.store(out + 6 * s_psi_f, -r, mask=mask_k)

    @triton.jit(
        do_not_specialize=[
            "h", "w", "K", "sy", "sx", "range_factor", "lerp1", "beta2", "one_minus_beta2",
            "step_size", "bc2_sqrt", "eps",
        ]
    )  # fmt: skip
    def _psi_grad_kernel(
        par_ptr,
        gbar_ptr,
        gpsi_ptr,
        gpar_ptr,
        h,
        w,
        K,
        sy,
        sx,
        range_factor,
        s_par_f,
        s_gbar_d,
        s_g_n,
        s_g_f,
        s_g_k,
        s_gpar_f,
        m_ptr,
        v_ptr,
        count_ptr,
        inv_count_ptr,
        lerp1,
        beta2,
        one_minus_beta2,
        step_size,
        bc2_sqrt,
        eps,
        D: tl.constexpr,
        RADIUS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ADAM: tl.constexpr,
    ):
        """``grad_params[:, q]`` from ``grad_psi``: the adjoint of :func:`_psi_kernel`.

        Grid: ``(h * w,)``. Cell ``q`` is neighbour ``k`` of cell ``n = q - offset(k)``; its
        coefficient gradients gather ``grad_psi[n, :, k]`` over ``k`` (no atomics), then go
        through ``q``'s own ``(a, b, c, R)`` <- ``params`` map.

        With ``ADAM``, the gradient is not stored: an Adam step is applied in place to ``params``
        and its moments ``m``, ``v`` (same layout as ``params``), with the update of
        ``torch.optim.Adam`` (``step_size = -lr / (1 - beta1^t)``,
        ``bc2_sqrt = sqrt(1 - beta2^t)``). Program ``q`` reads and writes only cell ``q``'s
        parameters, so the in-place update is race-free. ``grad_psi`` is then unscaled (from
        :func:`_fit_kernel` with ``SCALED=False``): the gradient is multiplied here by
        ``inv_count = 1 / max(count * D, 1)``, which program 0 also writes to ``inv_count_ptr``.
        """
        cell = tl.program_id(0)
        i = cell // w
        j = cell % w
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        ky = offs_k // (2 * RADIUS + 1) - RADIUS
        kx = offs_k % (2 * RADIUS + 1) - RADIUS
        ni = i - ky
        nj = j - kx
        inside = mask_k & (ni >= 0) & (ni < h) & (nj >= 0) & (nj < w)
        n = tl.where(inside, ni * w + nj, 0)
        gp = gpsi_ptr + n.to(tl.int64) * s_g_n + offs_k * s_g_k
        g0 = tl.load(gp, mask=inside, other=0.0).to(tl.float32)
        g1 = tl.load(gp + s_g_f, mask=inside, other=0.0).to(tl.float32)
        g2 = tl.load(gp + 2 * s_g_f, mask=inside, other=0.0).to(tl.float32)
        g3 = tl.load(gp + 3 * s_g_f, mask=inside, other=0.0).to(tl.float32)
        g4 = tl.load(gp + 4 * s_g_f, mask=inside, other=0.0).to(tl.float32)
        g5 = tl.load(gp + 5 * s_g_f, mask=inside, other=0.0).to(tl.float32)
        g6 = tl.load(gp + 6 * s_g_f, mask=inside, other=0.0).to(tl.float32)
        dy = ky.to(tl.float32) * sy
        dx = kx.to(tl.float32) * sx
        da = tl.sum(-0.5 * g0 + g3 * dx - 0.5 * g5 * dx * dx, axis=0)
        db = tl.sum(-g1 + g3 * dy + g4 * dx - g5 * dx * dy, axis=0)
        dc = tl.sum(-0.5 * g2 + g4 * dy - 0.5 * g5 * dy * dy, axis=0)
        dr_k = -g6
        vv = tl.zeros([BLOCK_K], dtype=tl.float32)
        for e in tl.static_range(D):
            g_q = tl.load(gbar_ptr + e * s_gbar_d + cell).to(tl.float32)
            g_n = tl.load(gbar_ptr + e * s_gbar_d + n, mask=inside, other=0.0).to(tl.float32)
            v = g_q - g_n
            vv += v * v
            ge = tl.load(gp + (7 + e) * s_g_f, mask=inside, other=0.0).to(tl.float32)
            dr_k += 2.0 * ge * v
        dr = tl.sum(dr_k - g5 * vv, axis=0)
        p0 = tl.load(par_ptr + cell).to(tl.float32)
        p1 = tl.load(par_ptr + s_par_f + cell).to(tl.float32)
        p2 = tl.load(par_ptr + 2 * s_par_f + cell).to(tl.float32)
        p3 = tl.load(par_ptr + 3 * s_par_f + cell).to(tl.float32)
        inv_x = tl.exp(-2.0 * p0)
        inv_y = tl.exp(-2.0 * p1)
        t = _tanh(p2)
        theta = 3.141592653589793 * t
        cos = tl.cos(theta)
        sin = tl.sin(theta)
        cc = cos * cos
        ss = sin * sin
        cs = cos * sin
        g_inv_x = da * cc + dc * ss + db * cs
        g_inv_y = da * ss + dc * cc - db * cs
        g_theta = 2.0 * cs * (inv_y - inv_x) * (da - dc) + (cc - ss) * (inv_x - inv_y) * db
        r = range_factor * tl.exp(-2.0 * p3)
        g_p0 = -2.0 * inv_x * g_inv_x
        g_p1 = -2.0 * inv_y * g_inv_y
        g_p2 = g_theta * 3.141592653589793 * (1.0 - t * t)
        g_p3 = -2.0 * r * dr
        if ADAM:
            total = tl.maximum(tl.load(count_ptr) * D, 1).to(tl.float32)
            inv_count = tl.math.div_rn(tl.full([], 1.0, tl.float32), total)
            if cell == 0:
                tl.store(inv_count_ptr, inv_count)
            g_p0 = g_p0 * inv_count
            g_p1 = g_p1 * inv_count
            g_p2 = g_p2 * inv_count
            g_p3 = g_p3 * inv_count
            _adam(par_ptr, m_ptr, v_ptr, cell, g_p0, p0, lerp1, beta2, one_minus_beta2,
                  step_size, bc2_sqrt, eps)  # fmt: skip
            _adam(par_ptr, m_ptr, v_ptr, s_par_f + cell, g_p1, p1, lerp1, beta2,
                  one_minus_beta2, step_size, bc2_sqrt, eps)  # fmt: skip
            _adam(par_ptr, m_ptr, v_ptr, 2 * s_par_f + cell, g_p2, p2, lerp1, beta2,
                  one_minus_beta2, step_size, bc2_sqrt, eps)  # fmt: skip
            _adam(par_ptr, m_ptr, v_ptr, 3 * s_par_f + cell, g_p3, p3, lerp1, beta2,
                  one_minus_beta2, step_size, bc2_sqrt, eps)  # fmt: skip
        else:
            tl.store(gpar_ptr + cell, g_p0)
            tl.store(gpar_ptr + s_gpar_f + cell, g_p1)
            tl.store(gpar_ptr + 2 * s_gpar_f + cell, g_p2)
            tl.store(gpar_ptr + 3 * s_gpar_f + cell, g_p3)

    @triton.jit
    def _adam(par_ptr, m_ptr, v_ptr, off, g, p, lerp1, beta2, one_minus_beta2, step_size,
              bc2_sqrt, eps):  # fmt: skip
        """One Adam update of the scalar at ``off`` (as torch's foreach Adam, no weight decay)."""
        m = tl.load(m_ptr + off)
        v = tl.load(v_ptr + off)
        m = m + lerp1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        denom = tl.sqrt(v) / bc2_sqrt + eps
        tl.store(m_ptr + off, m)
        tl.store(v_ptr + off, v)
        tl.store(par_ptr + off, p + step_size * (m / denom))


def render_config(k: int, lowp: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_K, BLOCK_P, BLOCK_C, num_warps)`` of the render kernel for ``K`` neighbours.

    Chosen so that sm_90 builds keep everything in registers (no spill to the stack up to
    K = 128, checked with ``cuobjdump -res-usage``): fp32 products run on the FMA units and need
    their operands whole in registers; 16-bit ones (``lowp``) go through the tensor cores.
    """
    block_k = _pow2(k)
    if lowp:
        block_p, block_c, num_warps = (64 if block_k <= 64 else 32), 64, 8
    else:
        block_p, block_c, num_warps = (32 if block_k <= 64 else 16), 32, 4
    if block_k >= 256:
        block_c //= 2
    return block_k, block_p, block_c, num_warps


def fit_config(k: int, m: int | None = None) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_P, num_warps)`` of the fit kernel for ``K`` neighbours, ``m`` phases.

    No spill on sm_90 up to K = 256. ``BLOCK_P`` is no larger than ``m`` needs (16 sampled
    phases would otherwise fill half of a 32-row block with padding).
    """
    block_k = _pow2(k)
    block_p = 32 if block_k <= 64 else 16
    if m is not None:
        block_p = min(block_p, _pow2(m))
    return block_k, block_p, (4 if block_k <= 32 else 8)


def _as_uint8(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 without a copy (a view); other dtypes as they are."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _check(phi: torch.Tensor, psi: torch.Tensor) -> None:
    """Raise unless ``phi [n, P, F]`` and ``psi [n, F, K]`` are float32 where the kernels run."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use the torch path (gsjbu.py)")
    if phi.ndim != 3 or psi.ndim != 3 or phi.shape[0] != psi.shape[0]:
        raise ValueError(f"phi [n, P, F] and psi [n, F, K] expected; got {phi.shape}, {psi.shape}")
    if phi.shape[2] != psi.shape[1]:
        raise ValueError(f"phi has {phi.shape[2]} features but psi {psi.shape[1]}")
    if phi.dtype != torch.float32 or psi.dtype != torch.float32:
        raise TypeError(f"the Triton kernels take float32 phi/psi; got {phi.dtype}, {psi.dtype}")
    if phi.device != psi.device or not available(phi.device, interpreter=True):
        raise RuntimeError(
            f"the Triton kernels cannot run on {phi.device} (CUDA, or CPU under TRITON_INTERPRET=1)"
        )


def render(
    phi: torch.Tensor,
    psi: torch.Tensor,
    values: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    precision: str = "ieee",
    block_c: int | None = None,
) -> torch.Tensor:
    """Fused ``bmm(gsjbu.chunk_weights(phi, psi), values)``: ``[n, P, C]``.

    Args:
        phi: ``[n, P, F]`` float32 pixel features (constant feature 1).
        psi: ``[n, F, K]`` float32 coefficients (``-inf`` in the constant row for masked
            neighbours); any strides.
        values: ``[n, K, C]`` float32, float16 or bfloat16; 16-bit values are multiplied on the
            tensor cores with the weights rounded to their dtype and fp32 accumulation.
        out_dtype: output dtype (default float32).
        precision: ``tl.dot`` input precision for fp32 values: ``"ieee"`` (exact fp32 products,
            default), ``"tf32"`` (faster, ~1e-3 relative) or ``"tf32x3"``.
        block_c: channels per tile (a power of two >= 16; default: 32 for fp32 values, 64 for
            16-bit ones).

    Returns:
        ``[n, P, C]`` the rendered values.
    """
    _check(phi, psi)
    n, p, f = phi.shape
    k = psi.shape[2]
    if values.ndim != 3 or values.shape[:2] != (n, k):
        raise ValueError(f"values must be [n, K, C] = [{n}, {k}, C]; got {tuple(values.shape)}")
    if values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"values must be float32, float16 or bfloat16; got {values.dtype}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    c = values.shape[2]
    out = torch.empty(n, p, c, dtype=out_dtype or torch.float32, device=phi.device)
    if out.numel() == 0:
        return out
    lowp = values.dtype != torch.float32
    block_k, block_p, auto_c, num_warps = render_config(k, lowp)
    block_c = _pow2(min(block_c or auto_c, c))
    grid = (n, triton.cdiv(p, block_p))
    _render_kernel[grid](
        phi, psi, values, out, p, k, c,
        *phi.stride(), *psi.stride(), *values.stride(), *out.stride(),
        F=f, BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_C=block_c,
        LOWP=lowp, PRECISION=precision, num_warps=num_warps,
    )  # fmt: skip
    return out


def fit_loss_and_grad(
    psi: torch.Tensor,
    phi: torch.Tensor,
    values: torch.Tensor,
    target: torch.Tensor,
    target_valid: torch.Tensor,
    phases: torch.Tensor | None = None,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`geoupsample.core.gsjbu.fit_loss_and_grad`: masked L1 loss and ``grad_psi``.

    Args:
        psi: ``[n, F, K]`` float32 coefficients (any strides).
        phi: ``[n, P, F]`` float32 pixel features.
        values: ``[n, K, d]`` each cell's neighbour cell means.
        target: ``[n, P, d]`` the normalised guide in cell layout.
        target_valid: ``[n, P]`` bool, pixels that count in the loss.
        phases: optional phase indices ``[m]``; the loss then uses only these phases.
        precision: ``tl.dot`` input precision (see :func:`render`).

    Returns:
        ``(loss, grad_psi)``: the mean absolute error over valid pixels and bands (0-d, float32),
        and ``[n, F, K]`` float32 with ``psi``'s strides. Nothing is synchronised with the host.
    """
    _check(phi, psi)
    n, p, f = phi.shape
    k = psi.shape[2]
    d = values.shape[2]
    if values.shape != (n, k, d) or target.shape != (n, p, d) or target_valid.shape != (n, p):
        raise ValueError(
            f"shapes disagree: phi {tuple(phi.shape)}, psi {tuple(psi.shape)}, values "
            f"{tuple(values.shape)}, target {tuple(target.shape)}, "
            f"target_valid {tuple(target_valid.shape)}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    tvalid = _as_uint8(target_valid)
    if phases is not None:
        phases = phases.to(device=phi.device, dtype=torch.int64).contiguous()
    m = p if phases is None else phases.numel()
    if n == 0 or m == 0:
        zero = torch.zeros((), dtype=torch.float32, device=phi.device)
        return zero, torch.zeros_like(psi)
    grad_psi = torch.empty_like(psi)
    partial = torch.empty(n, dtype=torch.float32, device=phi.device)
    inv_count = torch.empty(1, dtype=torch.float32, device=phi.device)
    count = torch.zeros(1, dtype=torch.int32, device=phi.device)
    block_k, block_p, num_warps = fit_config(k, m)
    phases_arg = phases if phases is not None else count  # never read without phases
    _count_kernel[(n,)](
        tvalid, phases_arg, count, m, *tvalid.stride(),
        BLOCK_P=block_p, HAS_PHASES=phases is not None, num_warps=1,
    )  # fmt: skip
    _fit_kernel[(n,)](
        phi, psi, values, target, tvalid, phases_arg,
        count, inv_count, partial, grad_psi, m, k,
        *phi.stride(), *psi.stride(), *values.stride(), *target.stride(),
        *tvalid.stride(), *grad_psi.stride(),
        F=f, D=d, BLOCK_F=_pow2(f), BLOCK_P=block_p, BLOCK_K=block_k,
        HAS_PHASES=phases is not None, PRECISION=precision, num_warps=num_warps,
    )  # fmt: skip
    loss = partial.sum(dtype=torch.float64) * inv_count.double()[0]
    return loss.to(torch.float32), grad_psi


class _PsiFromParams(torch.autograd.Function):
    """``psi [n, F, K]`` from ``params [4, h, w]`` in one kernel; backward in one more."""

    @staticmethod
    def forward(ctx, params, gbar, cell_valid, scale, radius):  # type: ignore[override]
        d, h, w = gbar.shape
        k = (2 * radius + 1) ** 2
        psi = torch.empty(h * w, 7 + d, k, dtype=torch.float32, device=params.device)
        ctx.save_for_backward(params, gbar)
        ctx.geometry = (scale, radius)
        _psi_kernel[(h * w,)](
            params, gbar, cell_valid, psi, h, w, k, float(scale[0]), float(scale[1]),
            1.5 / d, params.stride(0), gbar.stride(0), *psi.stride(),
            D=d, RADIUS=radius, BLOCK_K=_pow2(k, 2), num_warps=1 if k <= 64 else 2,
        )  # fmt: skip
        return psi

    @staticmethod
    def backward(ctx, grad_psi):  # type: ignore[override]
        params, gbar = ctx.saved_tensors
        (sy, sx), radius = ctx.geometry
        d, h, w = gbar.shape
        k = (2 * radius + 1) ** 2
        grad_params = torch.empty_like(params)
        _psi_grad_kernel[(h * w,)](
            params, gbar, grad_psi, grad_params, h, w, k, float(sy), float(sx), 1.5 / d,
            params.stride(0), gbar.stride(0), *grad_psi.stride(), grad_params.stride(0),
            grad_params, grad_params, grad_params, grad_params, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0,
            D=d, RADIUS=radius, BLOCK_K=_pow2(k, 2), ADAM=False,
            num_warps=1 if k <= 64 else 2,
        )  # fmt: skip
        return grad_params, None, None, None, None


def build_psi(
    params: torch.Tensor,
    gbar: torch.Tensor,
    cell_valid: torch.Tensor,
    layout: CellLayout,
    radius: int,
) -> torch.Tensor:
    """Fused :func:`geoupsample.core.gsjbu.build_psi`: ``psi [n, 6 + d, K]``, differentiable.

    One kernel builds every cell's coefficients straight from the raw parameters of its
    neighbours (no ``[4 + d, K, n]`` unfold); the backward is one gather kernel (each cell sums
    the gradients of the ``K`` cells that see it as a neighbour) through the parameter map.

    Args:
        params: ``[4, h, w]`` float32 raw parameters.
        gbar: ``[d, h, w]`` cell means of the normalised guide.
        cell_valid: ``[h, w]`` bool.
        layout: the cell layout (gives the scale).
        radius: neighbourhood radius in LR cells.

    Returns:
        ``[h * w, 6 + d, K]`` float32, contiguous.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use gsjbu.build_psi")
    if params.dtype != torch.float32 or not available(params.device, interpreter=True):
        raise RuntimeError(
            f"Triton build_psi takes float32 on CUDA; got {params.dtype}, {params.device}"
        )
    if params.shape[0] != 4 or params.shape[1:] != gbar.shape[1:]:
        raise ValueError(
            f"params [4, h, w] and gbar [d, h, w] expected; got "
            f"{tuple(params.shape)}, {tuple(gbar.shape)}"
        )
    return _PsiFromParams.apply(
        params.contiguous(),
        gbar.to(torch.float32).contiguous(),
        _as_uint8(cell_valid.contiguous()),
        layout.scale,
        int(radius),
    )


class AdamFit:
    """Adam on the GSJBU parameters, each step three fused kernels and no host synchronisation.

    One :meth:`step` does what one iteration of :func:`geoupsample.core.kernels.fit` does with
    ``torch.optim.Adam(lr, betas, eps)``: ``psi`` from the parameters (:func:`_psi_kernel`),
    the masked L1 loss and an unscaled ``grad_psi`` with the valid-pixel count
    (:func:`_fit_kernel`, ``SCALED=False``), then the gradient of the parameters, its scaling by
    ``1 / count`` and the Adam update in place (:func:`_psi_grad_kernel`, ``ADAM=True``). No
    autograd graph, no optimizer object, no torch op per step: three launches instead of ~40.
    The per-step losses are reduced only when :meth:`history` is called.

    Args:
        params: ``[4, h, w]`` float32 raw parameters (copied; read the result from
            :attr:`params`).
        gbar: ``[d, h, w]`` cell means; ``cell_valid``: ``[h, w]`` bool.
        layout, radius: the cell layout and neighbourhood radius.
        phi: ``[n, P, F]``; ``values``: ``[n, K, d]``; ``target``: ``[n, P, d]``;
            ``target_valid``: ``[n, P]`` bool (as for :func:`fit_loss_and_grad`).
        lr, betas, eps: Adam's settings (torch's defaults).
    """

    #: Steps whose counters are allocated (and zeroed) at once.
    BLOCK_STEPS = 64

    def __init__(
        self,
        params: torch.Tensor,
        gbar: torch.Tensor,
        cell_valid: torch.Tensor,
        layout: CellLayout,
        radius: int,
        phi: torch.Tensor,
        values: torch.Tensor,
        target: torch.Tensor,
        target_valid: torch.Tensor,
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        _check(phi, phi.new_empty(phi.shape[0], phi.shape[2], 1))
        if params.dtype != torch.float32 or params.device != phi.device:
            raise RuntimeError(f"AdamFit takes float32 params on {phi.device}; got "
                               f"{params.dtype} on {params.device}")  # fmt: skip
        self.params = params.detach().contiguous().clone()
        self.m = torch.zeros_like(self.params)
        self.v = torch.zeros_like(self.params)
        self.gbar = gbar.to(torch.float32).contiguous()
        self.cell_valid = _as_uint8(cell_valid.contiguous())
        self.scale = layout.scale
        self.radius = int(radius)
        self.phi, self.values = phi, values
        self.target, self.target_valid = target, _as_uint8(target_valid)
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.steps = 0
        self._partials: list[torch.Tensor] = []  # [n] loss sums, one per step
        self._counts: list[torch.Tensor] = []  # [BLOCK_STEPS] int32 blocks of valid counts
        self._invs: list[torch.Tensor] = []  # [BLOCK_STEPS] float32 blocks of 1 / count

    def step(self, phases: torch.Tensor | None = None) -> None:
        """One Adam step (phases: optional ``[m]`` phase indices of this step's loss)."""
        d, h, w = self.gbar.shape
        n, p, f = self.phi.shape
        k = (2 * self.radius + 1) ** 2
        dev = self.params.device
        if phases is not None:
            phases = phases.to(device=dev, dtype=torch.int64).contiguous()
        m = p if phases is None else phases.numel()
        # One 16-byte slot per step, so that every step's pointers have the same alignment (Triton
        # specialises kernels on it) and a block of steps needs a single fill.
        slot = 4 * (self.steps % self.BLOCK_STEPS)
        if slot == 0:
            size = 4 * self.BLOCK_STEPS
            self._counts.append(torch.zeros(size, dtype=torch.int32, device=dev))
            self._invs.append(torch.ones(size, dtype=torch.float32, device=dev))
        count, inv = self._counts[-1][slot:], self._invs[-1][slot:]
        psi = torch.empty(n, f, k, dtype=torch.float32, device=dev)
        grad_psi = torch.empty_like(psi)
        partial = torch.zeros(n, dtype=torch.float32, device=dev) if m == 0 else psi.new_empty(n)
        self._partials.append(partial)
        sy, sx = (float(s) for s in self.scale)
        block_k = _pow2(k, 2)
        warps = 1 if k <= 64 else 2
        _psi_kernel[(n,)](
            self.params, self.gbar, self.cell_valid, psi, h, w, k, sy, sx, 1.5 / d,
            self.params.stride(0), self.gbar.stride(0), *psi.stride(),
            D=d, RADIUS=self.radius, BLOCK_K=block_k, num_warps=warps,
        )  # fmt: skip
        if m:
            fit_k, block_p, fit_warps = fit_config(k, m)
            tv = self.target_valid
            _fit_kernel[(n,)](
                self.phi, psi, self.values, self.target, tv,
                phases if phases is not None else count, count, inv, partial, grad_psi, m, k,
                *self.phi.stride(), *psi.stride(), *self.values.stride(),
                *self.target.stride(), *tv.stride(), *grad_psi.stride(),
                F=f, D=d, BLOCK_F=_pow2(f), BLOCK_P=block_p, BLOCK_K=fit_k,
                HAS_PHASES=phases is not None, PRECISION="ieee", SCALED=False,
                num_warps=fit_warps,
            )  # fmt: skip
        else:
            grad_psi.zero_()
        self.steps += 1
        beta1, beta2 = self.betas
        # The scalars exactly as torch's (non-capturable) Adam computes them, in Python floats.
        step_size = -(self.lr / (1 - beta1**self.steps))
        bc2_sqrt = (1 - beta2**self.steps) ** 0.5
        _psi_grad_kernel[(n,)](
            self.params, self.gbar, grad_psi, self.params, h, w, k, sy, sx, 1.5 / d,
            self.params.stride(0), self.gbar.stride(0), *grad_psi.stride(),
            self.params.stride(0), self.m, self.v, count, inv, 1 - beta1, beta2, 1 - beta2,
            step_size, bc2_sqrt, self.eps, D=d, RADIUS=self.radius, BLOCK_K=block_k,
            ADAM=True, num_warps=warps,
        )  # fmt: skip

    def history(self) -> list[float]:
        """The loss before each step so far (one host synchronisation)."""
        if not self.steps:
            return []
        sums = torch.stack(self._partials).sum(1, dtype=torch.float64)
        inv = torch.cat(self._invs)[::4][: self.steps].double()
        return (sums * inv).to(torch.float32).tolist()
