"""Scalar and row operations that LLVM can vectorise: e^x, a row's maximum, a row's sum.

Numba compiles with ``fastmath=False``, so LLVM keeps NumPy's float semantics: it never
reorders a sum and never replaces a function by an approximation. Two things then stay scalar:

- ``np.exp`` compiles to one call of the C library's ``expf`` per element (no SIMD, about
  2 ns each). Softmax over the attention scores, the log-softmax of the LM head and the SiLU
  gate take ~90 million exponentials in a forward pass over 512 tokens: the largest cost
  outside the matrix products. :func:`exp32` computes e^x with the classic recipe (Cephes
  ``expf``): write x = k ln 2 + r with |r| <= ln 2 / 2, approximate e^r by a degree-6
  polynomial, and multiply by 2^k, built directly as the bits of a float32 (exponent field
  k + 127). No calls and no branches, so a loop of it becomes SIMD code (~0.6 ns per element).
  The result is within 1 ulp of the correctly rounded value (NumPy's own float32 exp is within
  2 ulp); below ``X_MIN`` it is 0 where NumPy gives a subnormal number (under 1.2e-38).
- a running maximum or sum is a chain of dependent operations, done one at a time.
  :func:`row_max` keeps eight independent running maxima instead; :func:`total` adds in
  float64 and lets the compiler reorder the additions (see there).

Editing this file: Numba's on-disk cache (``cache=True``) is keyed by each function's own
file, so the kernels in the other files that call these functions keep their compiled copies
of the old versions. Delete ``npllm/kernels/__pycache__/*.nbi`` and ``*.nbc`` after a change.

One trap: LLVM vectorises ``out[j] = f(x[j])`` only after checking at run time that ``out``
and ``x`` do not overlap, and runs the scalar loop when they do, even when they are the same
array. Loops that work in place therefore read and write through the *same variable*
(:func:`exp_inplace`), which LLVM can see needs no check.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LOG2E = np.float32(1.44269504088896341)
LN2_HI = np.float32(0.693359375)   # ln 2 = LN2_HI + LN2_LO; k * LN2_HI is exact for |k| < 2^9
LN2_LO = np.float32(-2.12194440e-4)
P0, P1, P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
P3, P4, P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
X_MIN = np.float32(-87.33654)  # e^X_MIN is float32's smallest normal number
X_MAX = np.float32(88.72283)   # e^x overflows to inf above


@intrinsic
def bits_to_float32(typingctx, bits):
    """The float32 whose 32 bits are those of the int32 ``bits`` (C's ``memcpy`` between the
    two types): ``bits_to_float32((k + 127) << 23)`` is 2^k, for -126 <= k <= 127."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def exp32(v):
    """e^v for a float32 v: range reduction by ln 2, a polynomial, and 2^k from its bits."""
    c = min(max(v, X_MIN), X_MAX)
    k = np.floor(c * LOG2E + np.float32(0.5))      # the nearest integer to v / ln 2
    r = c - k * LN2_HI - k * LN2_LO                 # |r| <= ln 2 / 2, computed exactly
    p = ((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5
    p = p * r * r + r + np.float32(1.0)             # e^r
    # 2^k: k = 128 (v just below X_MAX) does not fit in the exponent: 2^127, and p doubled.
    top = min(k, np.float32(127.0))
    p = (p + p * (k - top)) * bits_to_float32((np.int32(top) + np.int32(127)) << np.int32(23))
    return np.float32(0.0) if v < X_MIN else (np.float32(np.inf) if v > X_MAX else p)


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def exp_inplace(x, shift):
    """x[j] <- e^{x[j] - shift} for a float32 row x whose elements are at most ``shift`` (its
    maximum: the softmax's shifted scores). e^v for v <= 0 as :func:`exp32` computes it, less
    the work for large v (overflow, 2^128); NaN and -inf still give NaN and 0."""
    for j in range(x.shape[0]):
        v = x[j] - shift
        c = max(v, X_MIN)
        k = np.floor(c * LOG2E + np.float32(0.5))
        r = c - k * LN2_HI - k * LN2_LO
        p = ((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5
        p = (p * r * r + r + np.float32(1.0)) * bits_to_float32(
            (np.int32(k) + np.int32(127)) << np.int32(23))
        x[j] = np.float32(0.0) if v < X_MIN else p


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def total(x):
    """sum(x) of a float32 row, added in float64.

    The compiler may reorder these additions (fastmath "reassoc", on this function and
    :func:`sum_of_squares` only): it then adds many terms at once with SIMD instead of one after the other. Any order
    of adding float32 numbers in float64 gives the same sum up to float64 rounding, far below
    what a float32 result can show (NumPy's own pairwise float32 sum is less exact).
    """
    result = 0.0
    for j in range(x.shape[0]):
        result += x[j]
    return result


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def sum_of_squares(x):
    """sum(x * x) of a float32 row: float32 squares (as NumPy's x * x), added in float64 in
    any order (see :func:`total`)."""
    result = 0.0
    for j in range(x.shape[0]):
        result += x[j] * x[j]
    return result


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def row_max(x):
    """max(x) for a float32 row x [n] (-inf for an empty row), eight running maxima at a time.

    One running maximum is a chain of dependent comparisons, one per element; eight independent
    ones run side by side. NaN is not propagated as by NumPy; the callers subtract the maximum
    from every element, so a NaN in the row still makes the whole softmax NaN, as in NumPy.
    """
    n = x.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(-np.inf)
    full = n - n % 8
    for j in range(0, full, 8):
        m0, m1, m2, m3 = max(m0, x[j]), max(m1, x[j + 1]), max(m2, x[j + 2]), max(m3, x[j + 3])
        m4, m5, m6, m7 = max(m4, x[j + 4]), max(m5, x[j + 5]), max(m6, x[j + 6]), max(m7, x[j + 7])
    result = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for j in range(full, n):
        result = max(result, x[j])
    return result
