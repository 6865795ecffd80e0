"""Numba twin of :func:`npllm.equations.apply_rope` (lecture 003: RoPE, Hugging Face layout)."""
import numba
import numpy as np

from npllm.equations._checks import as_array, require
from npllm.kernels._parallel import SERIAL_BELOW


@numba.njit(cache=True, fastmath=False)
def _rope_row(x, cos, sin, out):
    """out = x cos + rotate_half(x) sin for one row x [Dh], rotate_half(x) = [-x2, x1].

    Written per half so that rotate_half is never built; each output is the same two float32
    products and one sum as in NumPy (a + (-b) c equals a - b c exactly), so the results are
    identical, not merely close.
    """
    half = x.shape[0] // 2
    for i in range(half):
        out[i] = x[i] * cos[i] - x[i + half] * sin[i]
    for i in range(half, 2 * half):
        out[i] = x[i] * cos[i] + x[i - half] * sin[i]


@numba.njit(cache=True, fastmath=False, parallel=True)
def _rope_parallel(x, cos, sin, out):
    # x [N, Dh] rows; cos, sin [M, Dh] with N a multiple of M: row i uses angle row i % M
    # (M = T when every head and sequence shares the positions, M = N otherwise).
    for i in numba.prange(x.shape[0]):
        _rope_row(x[i], cos[i % cos.shape[0]], sin[i % sin.shape[0]], out[i])


@numba.njit(cache=True, fastmath=False)
def _rope_serial(x, cos, sin, out):
    for i in range(x.shape[0]):
        _rope_row(x[i], cos[i % cos.shape[0]], sin[i % sin.shape[0]], out[i])


def apply_rope(x, cos, sin):
    """Numba twin of :func:`npllm.equations.apply_rope`: x [..., T, Dh], cos, sin [..., T, Dh]
    broadcastable to x -> [..., T, Dh]."""
    x = as_array(x, "x", "[..., T, Dh]")
    cos = as_array(cos, "cos", "[..., T, Dh]")
    sin = as_array(sin, "sin", "[..., T, Dh]")
    T, Dh = x.shape[-2:]
    require(Dh % 2 == 0, f"x must have an even head width Dh (RoPE rotates pairs), got shape {x.shape}")
    require(cos.shape == sin.shape, f"cos and sin must have the same shape, got {cos.shape} and {sin.shape}")
    try:
        fits = cos.shape[-1] == Dh and np.broadcast_shapes(cos.shape, x.shape) == x.shape
    except ValueError:
        fits = False
    require(fits, f"cos and sin must be [..., T, Dh] broadcastable to x {x.shape}, got {cos.shape}")
    if cos.shape[-2] == T and cos.size == T * Dh:
        # The usual case, one angle table [T, Dh] for all heads: passed once, not repeated.
        cos, sin = cos.reshape(T, Dh), sin.reshape(T, Dh)
    else:
        cos, sin = np.broadcast_to(cos, x.shape), np.broadcast_to(sin, x.shape)
    rows = np.ascontiguousarray(x).reshape(-1, Dh)
    cos = np.ascontiguousarray(cos).reshape(-1, Dh)
    sin = np.ascontiguousarray(sin).reshape(-1, Dh)
    out = np.empty_like(rows)
    (_rope_serial if rows.size < SERIAL_BELOW else _rope_parallel)(rows, cos, sin, out)
    return out.reshape(x.shape)
