"""A minimal Adam for the fit's single parameter tensor.

The update is ``torch.optim.Adam``'s (betas 0.9 / 0.999, eps 1e-8, no weight decay), written out
because constructing a ``torch.optim`` optimizer imports ``torch._dynamo`` on first use: about
1.5 s and 100+ MB in a fresh process, more than a whole 224 x 224 fit costs.
"""

from __future__ import annotations

import math

import torch


class Adam:
    """Adam on one tensor, updated in place from its ``.grad``.

    With ``steps`` given, the step is *capturable* (:mod:`geoupsample.core.cuda_graph`): the
    bias corrections of steps ``1..steps`` are tabulated on the parameter's device up front and
    the step counter lives there too, so a step recorded once as a CUDA graph and replayed
    applies each replay's own corrections. Without ``steps`` they are Python numbers.
    """

    def __init__(
        self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, steps: int | None = None,
    ) -> None:  # fmt: skip
        self.param, self.lr, self.betas, self.eps = param, float(lr), betas, float(eps)
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0
        self._table: torch.Tensor | None = None  # [steps, 2]: -step size, 1 / sqrt(1 - b2^t)
        if steps is not None:
            b1, b2 = betas
            t = torch.arange(1, int(steps) + 1, dtype=torch.float64)
            table = torch.stack([-self.lr / (1 - b1**t), (1 - b2**t).rsqrt()], dim=1)
            self._table = table.to(param.device, param.dtype)
            self._t = torch.zeros(1, dtype=torch.long, device=param.device)

    @torch.no_grad()
    def step(self) -> None:
        """One update from ``param.grad`` (which is then cleared)."""
        grad = self.param.grad
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        if self._table is None:
            denom = (self.v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
            self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))
        else:  # no host values: the same work at every replay of a captured step
            step_size, inv_correction = self._table.index_select(0, self._t)[0]
            self._t.add_(1)
            denom = (self.v.sqrt() * inv_correction).add_(self.eps)
            self.param.addcdiv_(self.m * step_size, denom)
        self.param.grad = None
