"""A minimal Adam for the fit's single parameter tensor.

The update is ``torch.optim.Adam``'s (betas 0.9 / 0.999, eps 1e-8, no weight decay), written out
because constructing a ``torch.optim`` optimizer imports ``torch._dynamo`` on first use: about
1.5 s and 100+ MB in a fresh process, more than a whole 224 x 224 fit costs.
"""

from __future__ import annotations

import math

import torch


class Adam:
    """Adam on one tensor, updated in place from its ``.grad``."""

    def __init__(
        self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:  # fmt: skip
        self.param, self.lr, self.betas, self.eps = param, float(lr), betas, float(eps)
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        """One update from ``param.grad`` (which is then cleared)."""
        grad = self.param.grad
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))
        self.param.grad = None
