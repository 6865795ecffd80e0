"""Numba twin of :func:`npllm.equations.swiglu` (lecture 003: the gate of the SwiGLU MLP)."""
import numba
import numpy as np

from npllm.kernels._args import float32_array as as_array
from npllm.kernels._math import exp32
from npllm.kernels._parallel import SERIAL_BELOW


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _swiglu_row(gate, up, out):
    """out = silu(gate) * up = gate / (1 + e^{-gate}) * up, one element at a time.

    Fused: NumPy makes three temporaries of size F (e^{-g}, 1 + e^{-g}, silu(g)); this reads
    gate and up once and writes out once, with the vectorised e^x of ``_math.py``. For
    gate < -88, e^{-gate} overflows to inf and gate / inf = -0: the correct limit, as in the
    NumPy version.
    """
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (np.float32(1.0) + exp32(-g)) * up[i]


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True, error_model="numpy")
def _swiglu_parallel(both, out):
    """both [N, 2F]: each row is [gate row, up row] -> out [N, F]."""
    F = out.shape[1]
    for i in numba.prange(out.shape[0]):
        _swiglu_row(both[i, :F], both[i, F:], out[i])


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _swiglu_serial(both, out):
    F = out.shape[1]
    for i in range(out.shape[0]):
        _swiglu_row(both[i, :F], both[i, F:], out[i])


def swiglu(gate, up):
    """Numba twin of :func:`npllm.equations.swiglu`: gate, up [..., F] -> [..., F].

    The forward pass computes gate and up in one matrix product, [..., 2F], and hands its two
    halves: then the kernel reads that array in place (see :func:`_halves`).
    """
    gate = as_array(gate, "gate", "[..., F]")
    up = as_array(up, "up", "[..., F]")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {gate.shape} and {up.shape}")
    F = gate.shape[-1]
    both = _halves(gate, up)
    if both is None:  # one C-contiguous array [N, 2F]: the kernel's loops are vectorised so
        both = np.concatenate([gate.reshape(-1, F), up.reshape(-1, F)], axis=1)
    out = np.empty((both.shape[0], F), np.float32)
    (_swiglu_serial if out.size < SERIAL_BELOW else _swiglu_parallel)(both, out)
    return out.reshape(gate.shape)


def _halves(gate, up):
    """The C-contiguous [N, 2F] array whose rows are [gate row, up row], if gate and up are its
    two halves (views of the fused gate/up projection); otherwise None."""
    parent, F = gate.base, gate.shape[-1]
    if (parent is None or parent is not up.base or not parent.flags.c_contiguous
            or parent.dtype != np.float32 or parent.size != 2 * gate.size or F == 0):
        return None
    both = parent.reshape(-1, 2 * F)
    start = both.ctypes.data
    if (gate.ctypes.data != start or up.ctypes.data != start + 4 * F or gate.strides[-1] != 4
            or gate.ndim > 1 and gate.strides[-2] != 8 * F
            or gate.strides != up.strides):
        return None
    return both
