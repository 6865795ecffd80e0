"""Numba twin of :func:`npllm.equations.apply_rope` (lecture 003: RoPE, Hugging Face layout)."""
import numba
import numpy as np

from npllm.kernels._args import float32_array as as_array
from npllm.kernels._parallel import SERIAL_BELOW


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def rope_row(x, cos, sin, out):
    """out = x cos + rotate_half(x) sin for one vector x [Dh] (one head of one token) and its
    angles cos, sin [Dh]; rotate_half(x) = [-x2, x1].

    Written per half so that rotate_half is never built; each output is the same two float32
    products and one sum as in NumPy (a + (-b) c equals a - b c exactly), so the results are
    identical, not merely close.
    """
    half = x.shape[0] // 2
    for i in range(half):
        out[i] = x[i] * cos[i] - x[i + half] * sin[i]
    for i in range(half, x.shape[0]):
        out[i] = x[i] * cos[i] + x[i - half] * sin[i]


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _rope_head(x, cos, sin, out, a, n):
    """RoPE for every row t of head n of x [A, N, T, Dh] (:func:`rope_row`), with the angles cos,
    sin [A or 1, T, Dh] shared by the heads."""
    c = a % cos.shape[0]
    for t in range(x.shape[2]):
        rope_row(x[a, n, t], cos[c, t], sin[c, t], out[a, n, t])


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True, error_model="numpy")
def _rope_parallel(x, cos, sin, out):
    for i in numba.prange(x.shape[0] * x.shape[1]):
        _rope_head(x, cos, sin, out, i // x.shape[1], i % x.shape[1])


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _rope_serial(x, cos, sin, out):
    for i in range(x.shape[0] * x.shape[1]):
        _rope_head(x, cos, sin, out, i // x.shape[1], i % x.shape[1])


def apply_rope(x, cos, sin):
    """Numba twin of :func:`npllm.equations.apply_rope`: x [..., T, Dh], cos, sin [..., T, Dh]
    broadcastable to x -> [..., T, Dh].

    The usual case, angles [B or 1, 1, T, Dh] for x [B, n, T, Dh] (shared by the n heads), is
    passed as [B or 1, T, Dh]: the angles are not repeated for each head.
    """
    x = as_array(x, "x", "[..., T, Dh]")
    cos = as_array(cos, "cos", "[..., T, Dh]")
    sin = as_array(sin, "sin", "[..., T, Dh]")
    T, Dh = x.shape[-2:]
    if (x.ndim == 4 and cos.shape == sin.shape and cos.shape[1:] == (1, T, Dh)
            and cos.shape[0] in (1, x.shape[0]) and Dh % 2 == 0):
        # The forward pass's call, x [B, n, T, Dh] and angles [B or 1, 1, T, Dh], without the
        # general checks below (they cost more than the kernel when decoding one token).
        out = np.empty(x.shape, np.float32)
        run = _rope_serial if x.size < SERIAL_BELOW else _rope_parallel
        run(np.ascontiguousarray(x), np.ascontiguousarray(cos[:, 0]),
            np.ascontiguousarray(sin[:, 0]), out)
        return out
    if Dh % 2:
        raise ValueError(f"x must have an even head width Dh (RoPE rotates pairs), got shape {x.shape}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {cos.shape} and {sin.shape}")
    try:
        fits = cos.shape[-1] == Dh and np.broadcast_shapes(cos.shape, x.shape) == x.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"cos and sin must be [..., T, Dh] broadcastable to x {x.shape}, got {cos.shape}")
    # Four axes [A, N, T, Dh] for the kernel; the angles [A or 1, T, Dh], shared over N.
    x4 = np.ascontiguousarray(x).reshape((-1,) + ((1,) + x.shape[-3:] if x.ndim < 3 else x.shape[-3:]))
    lead = (1,) * (x.ndim - cos.ndim) + cos.shape[:-2]  # cos's leading axes, aligned with x's
    if x.ndim >= 3 and lead[-1] == 1 and cos.shape[-2] == T and (
            np.prod(lead[:-1]) == 1 or lead[:-1] == x.shape[:-3]):
        angles = (-1 if np.prod(lead[:-1]) > 1 else 1, T, Dh)
    else:  # angles that differ per head (or shorter x): one row of angles per row of x
        cos, sin = np.broadcast_to(cos, x.shape), np.broadcast_to(sin, x.shape)
        x4 = x4.reshape(-1, 1, T, Dh)
        angles = (-1, T, Dh)
    cos = np.ascontiguousarray(cos).reshape(angles)
    sin = np.ascontiguousarray(sin).reshape(angles)
    out = np.empty(x4.shape, np.float32)
    (_rope_serial if x.size < SERIAL_BELOW else _rope_parallel)(x4, cos, sin, out)
    return out.reshape(x.shape)
