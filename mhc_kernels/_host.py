"""Host-side integer helpers for the kernel launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions whose host calls cost about
15 us each through Triton's call wrapper (profiled on the CPU machine); an mHC layer's launchers make
dozens of such calls per step, so they use these plain versions.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
