"""Host-side helpers for the kernel launchers, which run on every call of a launch-bound layer.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions whose host calls cost about
15 us each through Triton's call wrapper (profiled on the CPU machine); an mHC layer's launchers make
dozens of such calls per step, so they use these plain versions. The GPU's multiprocessor count,
which sizes persistent and split grids, is looked up once per device. Partial sums written per
block are added by :func:`add_parts`, which launches nothing for a single block.
"""

from __future__ import annotations

import functools

import torch

MAX_FUSED_STREAMS = 8  # the most streams n the fused kernels are built and compile-checked for
# the projection's columns (W = n^2 + 2n, padded: n <= 4) whose launches were swept on a GPU
# (coefficients.triton.GPU_TILES), and for which ``auto`` takes the Triton projection
SWEPT_COLUMNS = 32


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device`` (looked up once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)


def rows(t: torch.Tensor, *tail: int) -> torch.Tensor:
    """``t.reshape(-1, *tail)``, or ``t`` itself when it is shaped so already: on a tensor that
    needs its gradient a reshape adds an autograd view node each way (a few us of host time each),
    and the layer hands the kernels tensors in their layout."""
    return t if t.dim() == len(tail) + 1 and t.shape[1:] == tail else t.reshape(-1, *tail)


def shaped(t: torch.Tensor, shape) -> torch.Tensor:
    """``t.reshape(shape)``, or ``t`` itself when it has that shape (see :func:`rows`)."""
    return t if t.shape == shape else t.reshape(shape)


def add_parts(t: torch.Tensor) -> torch.Tensor:
    """The partial sums ``t: (parts, ...)`` that a kernel's programs wrote per block, added over
    ``parts``; one part as it is (a view: no launch for a grid with one block per row)."""
    return t[0] if t.shape[0] == 1 else t.sum(0)
