"""The GSJBU weights as a per-cell bilinear form, and the kernels that use them.

For HR pixel ``p`` in LR cell ``n`` and a neighbour ``q = n + k`` (``K = (2r+1)^2`` offsets), the
log-weight of DESIGN.md §2 is

    log w(p, q) = -0.5 d^T Sigma_q^-1 d  -  (3 / d_bands) ||G(p) - Gbar(q)||^2 / (2 sigma_r(q)^2)

with ``d = p - mu_q``. (The factor ``3 / d_bands`` keeps ``sigma_r`` calibrated as for an RGB
guide whatever the band count; it is 1 for three bands.) Measured from the centre of cell ``n``,
``p`` sits at ``(yl, xl)`` and ``q``'s centre at ``(k_y * sy, k_x * sx)``; subtracting ``Gbar(n)``
from both guide values leaves the range distance unchanged and keeps the numbers small.
Expanding the two quadratic forms, the log-weight is an inner product of a per-pixel feature
vector ``phi(p)`` and a per-(cell, neighbour) coefficient vector ``psi(n, k)``:

    phi(p)   = [xl^2, xl*yl, yl^2, xl, yl, 1, |u|^2, u_1 .. u_d]        u = G(p) - Gbar(n)
    psi(n,k) = [-a/2, -b, -c/2, a*mx + b*my, c*my + b*mx,
                -(a mx^2 + 2 b mx my + c my^2)/2 - R |v|^2 + mask,  -R,  2 R v_1 .. 2 R v_d]

where ``[[a, b], [b, c]] = Sigma_q^-1`` in (x, y) order, ``(my, mx)`` the neighbour's centre offset,
``v = Gbar(q) - Gbar(n)``, ``R = 3 / (2 d_bands sigma_r(q)^2)`` and ``mask`` is 0, or -inf for
neighbours outside the image or with no valid guide pixel. So all logits of a cell are one small
matmul ``[P, F] @ [F, K]``, the softmax runs over ``K``, and rendering ``C`` channels is another
matmul ``[P, K] @ [K, C]``. Memory stays at O(H W F) for ``phi`` plus one chunk of cells.

Parameters per LR cell (raw, unconstrained), stacked as ``params[4, h, w]``:
``log sigma_x``, ``log sigma_y`` (HR pixels), ``theta_raw`` with ``theta = pi * tanh(theta_raw)``
(radians, from the +x axis (columns) towards +y (rows, downwards)), ``log sigma_r`` (units of the
normalised guide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from geoupsample.core.layout import CellLayout

#: Number of spatial features in ``phi`` before the guide features.
N_SPATIAL = 6
#: Index of the constant feature in ``phi`` / the bias row in ``psi``.
CONST = 5
#: Rough element budget of one chunk's ``[cells, P, K]`` tensors.
CHUNK_ELEMENTS = 1 << 21
#: Most weight elements ``[cells, P, K]`` :class:`RenderCells` keeps for its backward (128 MB
#: in float32; a sampled fit step's); beyond, the backward recomputes them chunk by chunk.
KEEP_WEIGHTS_ELEMENTS = 1 << 25


def initial_params(
    lr_shape: tuple[int, int],
    scale: tuple[float, float],
    sigma_r: float = 0.12,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[4, h, w]`` raw parameters at the paper's initial values.

    ``sigma_x = sx`` and ``sigma_y = sy`` (about one LR pixel), ``theta = 0``, ``sigma_r``.
    """
    h, w = lr_shape
    sy, sx = scale
    values = torch.tensor([math.log(sx), math.log(sy), 0.0, math.log(sigma_r)], dtype=dtype)
    return values.to(device)[:, None, None].expand(4, h, w).clone()


def kernel_coefficients(params: torch.Tensor, bands: int) -> tuple[torch.Tensor, ...]:
    """Inverse-covariance entries ``(a, b, c)`` and range factor ``R`` from raw ``params``.

    Args:
        params: ``[4, h, w]`` raw parameters (see module docstring).
        bands: number of guide bands ``d``.

    Returns:
        ``a, b, c, R``, each ``[h, w]``; ``Sigma^-1 = [[a, b], [b, c]]`` in (x, y) order, in
        1 / HR pixel^2; ``R = 3 / (2 d sigma_r^2)``.
    """
    inv_x = torch.exp(-2.0 * params[0])
    inv_y = torch.exp(-2.0 * params[1])
    theta = math.pi * torch.tanh(params[2])
    cos, sin = torch.cos(theta), torch.sin(theta)
    a = cos * cos * inv_x + sin * sin * inv_y
    c = sin * sin * inv_x + cos * cos * inv_y
    b = cos * sin * (inv_x - inv_y)
    r = (1.5 / bands) * torch.exp(-2.0 * params[3])
    return a, b, c, r


def windows(maps: torch.Tensor, radius: int, i0: int = 0, i1: int | None = None) -> torch.Tensor:
    """The ``(2 radius + 1)^2`` neighbourhood of each cell of LR rows ``[i0, i1)`` as a strided
    view ``[C, i1 - i0, w, 2 radius + 1, 2 radius + 1]`` of the zero-padded maps (zero outside
    the image): ``[c, i, j, di + radius, dj + radius]`` is cell ``(i0 + i + di, j + dj)``.

    A view, not a copy: copying it into a contiguous tensor is the gather (about 10x faster on
    the CPU than ``F.unfold`` followed by a transposing copy).

    Args:
        maps: ``[C, h, w]`` LR rasters.
    """
    c, h, w = maps.shape
    i1 = h if i1 is None else i1
    k = 2 * radius + 1
    lo, hi = i0 - radius, i1 + radius  # LR rows needed, possibly outside [0, h)
    band = maps[:, max(lo, 0) : min(hi, h)]
    band = F.pad(band, (radius, radius, max(0, -lo), max(0, hi - h))).contiguous()
    rows, cols = band.shape[1:]
    return band.as_strided((c, i1 - i0, w, k, k), (rows * cols, cols, 1, cols, 1))


def neighbours(maps: torch.Tensor, radius: int, i0: int = 0, i1: int | None = None) -> torch.Tensor:
    """The ``K`` neighbours of each cell of LR rows ``[i0, i1)``, zero outside the image.

    Args:
        maps: ``[C, h, w]`` LR rasters.
    Returns:
        ``[cells, K, C]`` with cells of the band flattened row-major and ``k`` in unfold order
        (``k = (di + radius) (2 radius + 1) + (dj + radius)``).
    """
    view = windows(maps, radius, i0, i1)
    c, rows, w, k, _ = view.shape
    return view.permute(1, 2, 3, 4, 0).reshape(rows * w, k * k, c)


def cell_means(
    guide_cells: torch.Tensor, pixel_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Area average of the guide over the valid pixels of each cell.

    Args:
        guide_cells: ``[h, w, P, d]`` guide in cell layout.
        pixel_valid: ``[h, w, P]`` bool.
    Returns:
        ``gbar [d, h, w]`` (0 for cells with no valid pixel) and ``cell_valid [h, w]`` bool.
    """
    m = pixel_valid.to(guide_cells.dtype)[..., None]
    count = m.sum(2)
    gbar = (guide_cells * m).sum(2) / count.clamp_min(1)
    return gbar.permute(2, 0, 1).contiguous(), count[..., 0] > 0


def build_phi(
    layout: CellLayout, guide_cells: torch.Tensor, pixel_valid: torch.Tensor, gbar: torch.Tensor
) -> torch.Tensor:
    """Per-pixel features ``phi`` ``[n, P, 6 + d]`` (see the module docstring).

    Invalid pixels (padding, nodata) get zeros except the constant feature, which stays 1 so that
    masked (-inf) neighbours multiply a 1, never a 0.
    """
    h, w, p, d = guide_cells.shape
    dtype, device = guide_cells.dtype, guide_cells.device
    py, px = layout.rows.n_phase, layout.cols.n_phase
    yl = layout.rows.local.to(device, dtype)[:, None, :, None].expand(h, w, py, px).reshape(h, w, p)
    xl = layout.cols.local.to(device, dtype)[None, :, None, :].expand(h, w, py, px).reshape(h, w, p)
    u = guide_cells - gbar.permute(1, 2, 0)[:, :, None, :]
    m = pixel_valid.to(dtype)
    yl, xl = yl * m, xl * m
    u = u * m[..., None]
    phi = torch.empty(h, w, p, N_SPATIAL + 1 + d, dtype=dtype, device=device)
    phi[..., 0] = xl * xl
    phi[..., 1] = xl * yl
    phi[..., 2] = yl * yl
    phi[..., 3] = xl
    phi[..., 4] = yl
    phi[..., CONST] = 1.0
    phi[..., N_SPATIAL] = (u * u).sum(-1)
    phi[..., N_SPATIAL + 1 :] = u
    return phi.reshape(h * w, p, -1)


@dataclass(frozen=True)
class PsiGeometry:
    """The parts of ``psi`` fixed by the guide and the layout (built once per fit).

    Attributes:
        dy, dx: ``[K]`` neighbour-centre offsets in HR pixels.
        v: ``[d, n, K]`` ``Gbar(q) - Gbar(n)`` for each cell ``n`` and neighbour ``q``.
        bias: ``[n, K]`` ``mask``: 0, or -inf for neighbours outside the image or invalid.
        vv: ``[n, K]`` ``|v|^2``.
        lr_shape: ``(h, w)``.
        radius: neighbourhood radius in LR pixels.
    """

    dy: torch.Tensor
    dx: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor
    vv: torch.Tensor
    lr_shape: tuple[int, int]
    radius: int


def psi_geometry(
    gbar: torch.Tensor,
    cell_valid: torch.Tensor,
    layout: CellLayout,
    radius: int,
    dtype: torch.dtype | None = None,
    rows: tuple[int, int] | None = None,
) -> PsiGeometry:
    """:class:`PsiGeometry` of ``gbar [d, h, w]`` and ``cell_valid [h, w]`` (in ``dtype``), for
    the cells of LR rows ``rows = (i0, i1)`` (all rows by default)."""
    dtype = dtype or gbar.dtype
    d, h, w = gbar.shape
    i0, i1 = rows or (0, h)
    g = gbar.to(dtype)
    cells = (i1 - i0) * w
    here = g[:, i0:i1].reshape(d, cells, 1)
    v = windows(g, radius, i0, i1).reshape(d, cells, -1) - here  # [d, cells, K]
    valid_nb = windows(cell_valid.to(dtype)[None], radius, i0, i1).reshape(cells, -1) > 0.5
    # A cell deep inside a nodata area (a scene collar, a cloud mask) has no valid neighbour:
    # all -inf would make its softmax NaN, and the NaN would reach valid cells through the
    # gradient, Adam and the neighbours' shared coefficient maps. Its pixels are invalid (NaN
    # out, no loss), so any finite weights do: it keeps all its neighbours.
    valid_nb |= ~valid_nb.any(1, keepdim=True)
    bias = torch.zeros(valid_nb.shape, dtype=dtype, device=gbar.device)
    bias = bias.masked_fill(~valid_nb, float("-inf"))
    dy, dx = (t.to(gbar.device, dtype) for t in layout.offsets(radius))
    return PsiGeometry(dy, dx, v, bias, (v * v).sum(0), (h, w), int(radius))


@dataclass
class Workspace:
    """Buffers one fit reuses from step to step: ``psi [n, 6 + d, K]`` and its gradient.

    Allocated fresh at every step they came as new pages from the kernel (about 45 MB each for
    a 1152² tile at x8, above any allocator's cache): measured over a 50-step fit of such a
    tile, 125-233 k page faults and 0.35-1.4 s of kernel time, against 37-43 k and 0.1 s with
    the buffers reused. A workspace belongs to one fit; fits running at once have their own.
    """

    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of ``shape`` with ``like``'s dtype and device, reused under ``name`` (its
        contents are whatever the last step left: callers overwrite every element)."""
        buf = self.buffers.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != like.dtype or (
                buf.device != like.device):  # fmt: skip
            buf = self.buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf.view(shape)  # a new tensor object per step: no autograd state carried over


class AssemblePsi(torch.autograd.Function):
    """``psi [n, 6 + d, K]`` from the coefficient maps ``[4, h, w]`` (a, b, c, R) of the cells.

    Each cell's row of ``psi`` is linear in its neighbours' ``(a, b, c, R)``, so the backward is
    written out: four ``[n, K]`` gradients folded back onto the cells (the adjoint of the
    neighbour gather). Both directions write every ``[n, K]`` plane in place (``out=``,
    ``addcmul_``) into buffers of the fit's workspace: no temporaries. At small scales (x2: a
    cell per 4 HR pixels) this assembly is most of a fit step's memory traffic.
    """

    @staticmethod
    def forward(ctx, coef, geom, workspace):  # type: ignore[override]
        ctx.geom, ctx.workspace = geom, workspace
        return psi_of_coefficients(coef, geom, workspace=workspace)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        planes = _buffer(ctx.workspace, "coef_nb_grad", (4,) + tuple(ctx.geom.bias.shape), grad)
        return gather_adjoint(psi_planes_grad(grad, ctx.geom, planes), ctx.geom), None, None


def psi_of_coefficients(
    coef: torch.Tensor,
    geom: PsiGeometry,
    rows: tuple[int, int] | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``psi [cells, 6 + d, K]`` of the cells of LR rows ``rows = (i0, i1)`` (all by default,
    ``geom`` of the same cells) from the coefficient maps ``coef [4, h, w]`` (a, b, c, R; not
    differentiable: :class:`AssemblePsi` is), into ``workspace``'s buffers if given."""
    n_cells, k = geom.bias.shape
    nb = _buffer(workspace, "coef_nb", (4, n_cells, k), coef)
    neighbour_planes(coef, geom.radius, nb, rows)
    psi = _buffer(workspace, "psi", (n_cells, N_SPATIAL + 1 + geom.v.shape[0], k), coef)
    return assemble_psi(nb, geom, psi)


def assemble_psi(nb: torch.Tensor, geom: PsiGeometry, psi: torch.Tensor) -> torch.Tensor:
    """Write ``psi [n, 6 + d, K]`` of ``n`` cells from their neighbours' coefficients
    ``nb [4, n, K]`` (planes a, b, c, R) and the cells' ``geom``; returns ``psi``.

    Every ``[n, K]`` plane is written in place (``out=``, ``addcmul_``): no temporaries.
    """
    a, b, c, r = nb.unbind(0)
    dx, dy = geom.dx, geom.dy
    torch.mul(a, -0.5, out=psi[:, 0])
    torch.neg(b, out=psi[:, 1])
    torch.mul(c, -0.5, out=psi[:, 2])
    torch.mul(a, dx, out=psi[:, 3]).addcmul_(b, dy)
    torch.mul(c, dy, out=psi[:, 4]).addcmul_(b, dx)
    const = torch.mul(a, -0.5 * dx * dx, out=psi[:, CONST])
    const.addcmul_(b, -dx * dy).addcmul_(c, -0.5 * dy * dy)
    const.addcmul_(r, geom.vv, value=-1.0).add_(geom.bias)
    torch.neg(r, out=psi[:, N_SPATIAL])
    r2 = r.mul(2.0)
    for j, v in enumerate(geom.v.unbind(0)):
        torch.mul(v, r2, out=psi[:, N_SPATIAL + 1 + j])
    return psi


def psi_planes_grad(grad: torch.Tensor, geom: PsiGeometry, planes: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`assemble_psi`: the gradient ``planes [4, n, K]`` of the neighbours'
    coefficients from the gradient ``grad [n, 6 + d, K]`` of ``psi``; returns ``planes``."""
    dx, dy = geom.dx, geom.dy
    g = grad.unbind(1)  # each [n, K]
    g5 = g[CONST]
    ga, gb, gc, gr = planes.unbind(0)
    torch.mul(g[3], dx, out=ga).add_(g[0], alpha=-0.5).addcmul_(g5, -0.5 * dx * dx)
    torch.mul(g[3], dy, out=gb).addcmul_(g[4], dx).sub_(g[1]).addcmul_(g5, -dx * dy)
    torch.mul(g[4], dy, out=gc).add_(g[2], alpha=-0.5).addcmul_(g5, -0.5 * dy * dy)
    torch.neg(g[N_SPATIAL], out=gr).addcmul_(geom.vv, g5, value=-1.0)
    for j, v in enumerate(geom.v.unbind(0)):
        gr.addcmul_(g[N_SPATIAL + 1 + j], v, value=2.0)
    return planes


def _buffer(
    workspace: Workspace | None, name: str, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    """A tensor of ``shape`` like ``like``: the workspace's buffer ``name``, or a fresh one."""
    if workspace is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return workspace.get(name, shape, like)


def neighbour_planes(
    maps: torch.Tensor, radius: int, out: torch.Tensor, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """The ``K`` neighbours of the cells of LR rows ``rows = (i0, i1)`` (all by default) as
    planes: ``maps [C, h, w]`` -> ``out [C, cells, K]`` (zero outside the image; ``k`` in unfold
    order): :func:`neighbours` with the channel axis first, so that each channel's ``[cells, K]``
    plane is contiguous."""
    view = windows(maps, radius, *(rows or (0, maps.shape[1])))
    out.view(view.shape).copy_(view)
    return out


def add_gathered(planes: torch.Tensor, padded: torch.Tensor, radius: int, i0: int = 0) -> None:
    """Adjoint of :func:`neighbour_planes` for rows from ``i0``: add each value of
    ``planes [C, cells, K]`` to the cell it was gathered from, in ``padded [C, h + 2 radius,
    w + 2 radius]`` (the maps with a frame of ``radius``; one shifted add per offset: about 2x
    faster on the CPU than ``F.fold``)."""
    k = 2 * radius + 1
    c, rows_p, cols_p = padded.shape
    w = cols_p - 2 * radius
    rows = planes.shape[1] // w
    by_offset = planes.view(c, rows, w, k * k)
    for di in range(k):
        for dj in range(k):
            padded[:, i0 + di : i0 + di + rows, dj : dj + w] += by_offset[..., di * k + dj]


def gather_adjoint(planes: torch.Tensor, geom: PsiGeometry) -> torch.Tensor:
    """Adjoint of :func:`neighbour_planes` over all rows: ``[C, n, K]`` -> ``[C, h, w]``."""
    h, w = geom.lr_shape
    r = geom.radius
    full = torch.zeros(planes.shape[0], h + 2 * r, w + 2 * r, dtype=planes.dtype,
                       device=planes.device)  # fmt: skip
    add_gathered(planes, full, r)
    return full[:, r : r + h, r : r + w]


def build_psi(
    params: torch.Tensor,
    gbar: torch.Tensor,
    cell_valid: torch.Tensor,
    layout: CellLayout,
    radius: int,
    geometry: PsiGeometry | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Per-(cell, neighbour) coefficients ``psi`` ``[n, 6 + d, K]``; differentiable in params.

    Args:
        params: ``[4, h, w]`` raw parameters.
        gbar: ``[d, h, w]`` cell means of the normalised guide.
        cell_valid: ``[h, w]`` bool, False for cells without a valid guide pixel.
        geometry: :func:`psi_geometry` of the other arguments, to reuse across steps.
        workspace: a fit's :class:`Workspace`: ``psi`` is written into its buffer (valid until
            the next call with it), not a fresh tensor.
    """
    if geometry is None:
        geometry = psi_geometry(gbar, cell_valid, layout, radius, params.dtype)
    coef = torch.stack(kernel_coefficients(params, gbar.shape[0]))
    return AssemblePsi.apply(coef, geometry, workspace)


def rows_per_chunk(layout: CellLayout, width: int) -> int:
    """LR cell rows per chunk so that a chunk's ``[cells, P, width]`` stays near the budget."""
    per_row = layout.cols.n_lr * layout.n_phases * max(width, 1)
    return max(1, CHUNK_ELEMENTS // per_row)


def chunk_weights(phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Softmax weights ``[cells, P, K]`` from ``phi [cells, P, F]`` and ``psi [cells, F, K]``."""
    return torch.softmax(torch.bmm(phi, psi), dim=-1)


def softmax_backward(
    w: torch.Tensor, grad_w: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Gradient of the logits of ``out = softmax(logits) @ values`` (``w [..., K]``).

    ``grad_w = grad_out @ values^T``; the softmax needs ``sum_k w_k grad_w_k``, which equals
    ``sum_c grad_out_c out_c`` (the rendered values ``out [..., C]`` are ``w @ values``), a
    reduction over the few channels instead of the ``K`` neighbours. Overwrites ``grad_w`` (a
    temporary of the caller) with the result.
    """
    dot = (grad_out * out).sum(-1, keepdim=True)
    return grad_w.sub_(dot).mul_(w)


def psi_grad(
    phi: torch.Tensor,
    w: torch.Tensor,
    grad_out: torch.Tensor,
    values_t: torch.Tensor,
    out: torch.Tensor,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient ``[cells, F, K]`` of ``psi`` for ``out = w @ values`` with ``w =
    softmax_K(phi @ psi)``, from the gradient ``grad_out [cells, P, C]`` of ``out``.

    Args:
        phi: ``[cells, P, F]``; w: ``[cells, P, K]``; out: ``[cells, P, C]``.
        values_t: the values transposed, ``[cells, C, K]`` (any strides).
        into: where to write the result (a fit's buffer), else a new tensor.
    """
    grad_logits = softmax_backward(w, torch.bmm(grad_out, values_t), grad_out, out)
    return torch.bmm(phi.transpose(1, 2), grad_logits, out=into)


class RenderCells(torch.autograd.Function):
    """``out[n, P, C] = softmax_K(phi @ psi) @ values``, recomputing the weights in backward.

    Nothing of size ``[n, P, K]`` is saved for backward: the weights are rebuilt chunk by chunk,
    so autograd memory is that of the inputs. Differentiable in ``psi`` and ``values``.
    Inputs: ``psi [n, F, K]``, ``values [n, K, C]`` (each cell's neighbour values),
    ``phi [n, P, F]`` (constant).
    """

    @staticmethod
    def forward(ctx, psi, values, phi, chunk, workspace):  # type: ignore[override]
        ctx.chunk, ctx.workspace = chunk, workspace
        out = torch.empty(
            phi.shape[0], phi.shape[1], values.shape[2], dtype=phi.dtype, device=phi.device
        )
        # a sampled fit step's weights are small: keep them for backward rather than recompute
        keep = phi.shape[0] * phi.shape[1] * psi.shape[2] <= KEEP_WEIGHTS_ELEMENTS and any(
            ctx.needs_input_grad[:2]
        )
        ctx.weights = []
        for s in range(0, phi.shape[0], chunk):
            e = s + chunk
            w = chunk_weights(phi[s:e], psi[s:e])
            torch.bmm(w, values[s:e], out=out[s:e])
            if keep:
                ctx.weights.append(w)
        ctx.save_for_backward(psi, values, phi, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        psi, values, phi, out = ctx.saved_tensors
        grad_psi = None
        if ctx.needs_input_grad[0]:
            ws = ctx.workspace
            grad_psi = torch.empty_like(psi) if ws is None else ws.get("grad_psi", psi.shape, psi)
        grad_values = torch.empty_like(values) if ctx.needs_input_grad[1] else None
        kept, ctx.weights = ctx.weights, []
        for i, s in enumerate(range(0, phi.shape[0], ctx.chunk)):
            e = s + ctx.chunk
            w = kept[i] if kept else chunk_weights(phi[s:e], psi[s:e])
            g = grad_out[s:e]
            if grad_psi is not None:
                psi_grad(phi[s:e], w, g, values[s:e].transpose(1, 2), out[s:e], grad_psi[s:e])
            if grad_values is not None:
                torch.bmm(w.transpose(1, 2), g, out=grad_values[s:e])
        return grad_psi, grad_values, None, None, None


def render_cells(
    psi: torch.Tensor,
    values: torch.Tensor,
    phi: torch.Tensor,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Differentiable rendering in cell layout (see :class:`RenderCells`): ``[n, P, C]``.

    With a fit's ``workspace`` the gradient of ``psi`` goes into its buffer.
    """
    chunk = max(1, CHUNK_ELEMENTS // (phi.shape[1] * max(psi.shape[2], values.shape[2])))
    return RenderCells.apply(psi, values, phi, chunk, workspace)


def fit_loss_and_grad(
    psi: torch.Tensor,
    phi: torch.Tensor,
    values: torch.Tensor,
    target: torch.Tensor,
    target_valid: torch.Tensor,
    phases: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked L1 loss of rebuilding the guide, and its gradient with respect to ``psi``.

    Forward and backward are fused chunk by chunk (L1 is per pixel, so each chunk's gradient is
    known as soon as its output is): the weights are computed once per step and never stored.

    Args:
        psi: ``[n, F, K]`` coefficients (no grad needed).
        phi: ``[n, P, F]`` pixel features.
        values: ``[n, K, d]`` each cell's neighbour cell means.
        target: ``[n, P, d]`` the normalised guide in cell layout.
        target_valid: ``[n, P]`` bool, pixels that count in the loss.
        phases: optional phase indices ``[m]``; the loss then uses only these phases.

    Returns:
        ``(loss, grad_psi)``: mean absolute error over valid pixels and bands; ``[n, F, K]``.
    """
    if phases is not None:
        phi = phi.index_select(1, phases)
        target = target.index_select(1, phases)
        target_valid = target_valid.index_select(1, phases)
    count = target_valid.sum() * target.shape[2]
    inv_count = 1.0 / count.clamp_min(1).to(phi.dtype)
    grad_psi = torch.empty_like(psi)
    total = torch.zeros((), dtype=torch.float64, device=phi.device)
    chunk = max(1, CHUNK_ELEMENTS // (phi.shape[1] * psi.shape[2]))
    values = values.contiguous()
    values_t = values.transpose(1, 2).contiguous()
    for s in range(0, phi.shape[0], chunk):
        e = s + chunk
        w = chunk_weights(phi[s:e], psi[s:e])
        rendered = torch.bmm(w, values[s:e])
        diff = rendered - target[s:e]
        m = target_valid[s:e, :, None]
        diff = torch.where(m, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
        total += diff.abs().sum(dtype=torch.float64)
        grad_out = torch.sign(diff) * inv_count
        psi_grad(phi[s:e], w, grad_out, values_t[s:e], rendered, grad_psi[s:e])
    return (total * inv_count.double()).to(phi.dtype), grad_psi
