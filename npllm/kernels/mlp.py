"""Numba twin of :func:`npllm.equations.swiglu` (lecture 003: the gate of the SwiGLU MLP)."""
import numba
import numpy as np

from npllm.equations._checks import as_array, require
from npllm.kernels._parallel import SERIAL_BELOW


@numba.njit(cache=True, fastmath=False)
def _swiglu_row(gate, up, out):
    """out = silu(gate) * up = gate / (1 + e^{-gate}) * up, one element at a time.

    Fused: NumPy makes three temporaries of size F (e^{-g}, 1 + e^{-g}, silu(g)); this reads
    gate and up once and writes out once. For gate < -88, e^{-gate} overflows to inf and
    gate / inf = -0: the correct limit, as in the NumPy version.
    """
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (np.float32(1.0) + np.exp(-g)) * up[i]


@numba.njit(cache=True, fastmath=False, parallel=True)
def _swiglu_parallel(gate, up, out):
    for i in numba.prange(gate.shape[0]):
        _swiglu_row(gate[i], up[i], out[i])


@numba.njit(cache=True, fastmath=False)
def _swiglu_serial(gate, up, out):
    for i in range(gate.shape[0]):
        _swiglu_row(gate[i], up[i], out[i])


def swiglu(gate, up):
    """Numba twin of :func:`npllm.equations.swiglu`: gate, up [..., F] -> [..., F]."""
    gate = as_array(gate, "gate", "[..., F]")
    up = as_array(up, "up", "[..., F]")
    require(gate.shape == up.shape, f"gate and up must have the same shape, got {gate.shape} and {up.shape}")
    F = gate.shape[-1]
    g = np.ascontiguousarray(gate).reshape(-1, F)
    u = np.ascontiguousarray(up).reshape(-1, F)
    out = np.empty_like(g)
    (_swiglu_serial if g.size < SERIAL_BELOW else _swiglu_parallel)(g, u, out)
    return out.reshape(gate.shape)
