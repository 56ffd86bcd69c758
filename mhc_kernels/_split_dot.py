"""Float32-accurate matrix products on bf16 tensor cores, for Triton kernels.

A float32 value splits exactly into three bfloat16 parts of 8 significand bits each
(:func:`bf16_parts`); the product of two bf16 parts is exact in float32, so ``a @ b`` is the sum of
the parts' products, each a bf16 ``tl.dot`` accumulating in float32. Of the nine products of two
split operands the three smallest (mid lo, lo mid, lo lo) are below 2^-24 of the product and are
left out: six dots, three when ``a`` is bf16 already (bf16 streams). The coefficient projection
and the fused stream gradient use it for their sums over W = n^2 + 2n or K = n C, which as float32
FMAs bounded them (benchmarks/README.md).

The interpreter's bf16 ``tl.dot`` gives wrong results (Triton 3.9), so there the parts go to the dot
in float32 (``PARTS_FP32``): the same exact products, the same code path otherwise.
"""

import triton
import triton.language as tl

from ._host import next_power_of_2
from .sinkhorn.triton import interpreting

MIN_DOT = 16  # a tl.dot's least size along each of its dimensions


def dot_width(size: int) -> int:
    """``size`` padded to a ``tl.dot`` dimension: a power of two, at least ``MIN_DOT``."""
    return max(MIN_DOT, next_power_of_2(size))


def parts_fp32() -> bool:
    """Whether products take their 16-bit operands in float32 (``PARTS_FP32``, :func:`mma`): under
    the interpreter, whose bf16 ``tl.dot`` is wrong."""
    return interpreting()


def dot_options(mma: bool) -> dict:
    """The constexprs a kernel passes on to :func:`dot_f32`: ``MMA`` as asked, ``PARTS_FP32``
    under the interpreter."""
    return {"MMA": mma, "PARTS_FP32": parts_fp32()}


@triton.jit
def parts16(x, dt: tl.constexpr):
    """float32 ``x`` as ``hi + mid + lo``, three tensors of the 16-bit dtype ``dt``. bf16: 8
    significand bits each, 24 in all, float32's (exact for normal numbers; :func:`bf16_parts`).
    fp16: 11 bits each, exact but where ``lo`` falls below fp16's normal range (2^-14), which
    keeps it to 2^-24: an error under 2^-25 for ``x`` up to 2. ``x`` already of dtype ``dt`` is
    its own ``hi``."""
    hi = x.to(dt)
    rest = x.to(tl.float32) - hi.to(tl.float32)  # exact
    mid = rest.to(dt)
    return hi, mid, (rest - mid.to(tl.float32)).to(dt)


@triton.jit
def bf16_parts(x):
    """float32 ``x`` as ``hi + mid + lo``, three bfloat16 tensors holding 8 significand bits each:
    24 bits, float32's (exact for normal numbers). ``x`` already bfloat16 is its own ``hi``."""
    return parts16(x, tl.bfloat16)


@triton.jit
def mma(a, b, acc, PARTS_FP32: tl.constexpr):
    """``acc + a @ b`` for 16-bit operands (bf16 parts, or 16-bit streams): on tensor cores, or
    with the operands in float32 (the interpreter, whose bf16 ``tl.dot`` is wrong: the same
    products, exact in float32)."""
    if PARTS_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def dot_by_parts(a, b_hi, b_mid, b_lo, acc, PARTS_FP32: tl.constexpr):
    """``acc + a @ b`` for ``b`` given as its three bf16 parts (``bf16_parts``, split once by the
    caller): a bf16 ``a`` as it is, three dots; a float32 ``a`` split into its parts, six (the three
    products below 2^-24 of the product left out). The small terms first, each part dropped after
    its last use."""
    if a.dtype == tl.bfloat16:
        acc = mma(a, b_lo, acc, PARTS_FP32)
        acc = mma(a, b_mid, acc, PARTS_FP32)
        return mma(a, b_hi, acc, PARTS_FP32)
    a_hi, a_mid, a_lo = bf16_parts(a)
    acc = mma(a_lo, b_hi, acc, PARTS_FP32)
    acc = mma(a_hi, b_lo, acc, PARTS_FP32)
    acc = mma(a_mid, b_mid, acc, PARTS_FP32)
    acc = mma(a_mid, b_hi, acc, PARTS_FP32)
    acc = mma(a_hi, b_mid, acc, PARTS_FP32)
    return mma(a_hi, b_hi, acc, PARTS_FP32)


@triton.jit
def dot_f32(a, b, acc, MMA: tl.constexpr, PARTS_FP32: tl.constexpr):
    """``acc + a @ b`` as accurate as float32 FMAs. ``MMA``: on bf16 tensor cores, every float32
    operand split into three bf16 parts (``bf16_parts``; bf16 operands are used as they are):
    products of bf16 parts are exact in float32, and of the nine products of two split operands
    the three dropped (mid lo, lo mid, lo lo) are below 2^-24 of the product, so six dots (three
    for a bf16 ``a``) accumulate in float32 what float32 FMAs would, at tensor-core speed
    (``dot_by_parts``). Without ``MMA``: float32 FMAs (``input_precision="ieee"``)."""
    if not MMA:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    b_hi, b_mid, b_lo = bf16_parts(b)
    return dot_by_parts(a, b_hi, b_mid, b_lo, acc, PARTS_FP32)
