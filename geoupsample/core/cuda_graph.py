"""Replay a fit step as a CUDA graph: one launch per step instead of a hundred-odd small ones.

A fit step of the back-projected objective (:mod:`geoupsample.core.objective`) is a chain of
small operations, forward and backward: on a GPU each is a kernel launch of a few microseconds of
work and several of Python, autograd and launch overhead, so small fits are bound by the host.
The step's shapes do not change from step to step (the sampled phases are a fixed number of
indices, copied into one buffer), so the step is run eagerly a few times (warm-up: buffers
allocated, Triton kernels compiled), recorded once as a CUDA graph and replayed for the
remaining steps. What the step must do to be recorded: no host reads of device values, no
Python numbers that change between steps (:class:`geoupsample.core.adam.Adam` with ``steps``).

``GEOUPSAMPLE_CUDA_GRAPHS=0`` turns the graphs off (every step eager).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

#: Environment variable: ``0`` runs every fit step eagerly on CUDA.
ENV = "GEOUPSAMPLE_CUDA_GRAPHS"
#: Eager steps before the capture (the first allocates the workspace and compiles kernels).
WARMUP_STEPS = 2

Step = Callable[[torch.Tensor | None], torch.Tensor]


def enabled(device: torch.device, steps: int) -> bool:
    """Whether a fit of ``steps`` steps on ``device`` replays its steps as a CUDA graph."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    return device.type == "cuda" and steps > WARMUP_STEPS + 1


class GraphedStep:
    """Calls ``step(phases) -> loss`` eagerly ``WARMUP_STEPS`` times, then records it once as a
    CUDA graph and replays that: each call copies ``phases`` (``[m]`` int64 on the device, or
    ``None`` every time) into the graph's buffer, replays, and returns a copy of the loss.

    The warm-up and the recording run on a side stream, as CUDA graphs require; the caller's
    stream waits for them. Replays run on the caller's current stream.
    """

    def __init__(self, step: Step, device: torch.device) -> None:
        self.step, self.device = step, device
        self.calls = 0
        self.stream = torch.cuda.Stream(device)  # warm-up and recording: one stream
        self.graph: torch.cuda.CUDAGraph | None = None
        self.phases: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None

    def __call__(self, phases: torch.Tensor | None) -> torch.Tensor:
        self.calls += 1
        if self.graph is None and self.calls <= WARMUP_STEPS:
            return self._on_side_stream(lambda: self.step(phases).detach())
        if self.graph is None:
            self.phases = None if phases is None else phases.clone()
            graph = torch.cuda.CUDAGraph()

            def record() -> torch.Tensor:
                # capture_begin/end, not torch.cuda.graph(): that also runs gc.collect() and
                # empties the allocator's cache at every capture, i.e. once per tile in a
                # whole-scene run (and every buffer is cudaMalloc'ed again after it).
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    loss = self.step(self.phases).detach()
                finally:
                    graph.capture_end()
                return loss

            self.loss = self._on_side_stream(record)  # recorded, not run: replayed below
            self.graph = graph
        elif phases is not None:
            self.phases.copy_(phases)
        self.graph.replay()
        return self.loss.clone()

    def _on_side_stream(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            out = fn()
        caller.wait_stream(self.stream)
        return out
