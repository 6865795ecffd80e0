"""Numba twin of :func:`npllm.equations.rms_norm` (lecture 003: RMSNorm)."""
import numba
import numpy as np

from npllm.kernels._args import float32_array as as_array
from npllm.kernels._math import sum_of_squares
from npllm.kernels._parallel import SERIAL_BELOW


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _rms_norm_row(x, weight, eps, out):
    """out = x * (1 / sqrt(mean(x^2) + eps)) * weight for one row x [D], in the NumPy order."""
    D = x.shape[0]
    # The squares are float32 products, as in NumPy; their sum is kept in float64, because a
    # float32 running sum over D terms loses accuracy (NumPy's pairwise sum does not).
    variance = np.float32(sum_of_squares(x) / D)
    scale = np.float32(1.0) / np.sqrt(variance + eps)
    for d in range(D):
        out[d] = x[d] * scale * weight[d]


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True, error_model="numpy")
def _rms_norm_parallel(x, weight, eps, out):
    for i in numba.prange(x.shape[0]):
        _rms_norm_row(x[i], weight, eps, out[i])


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _rms_norm_serial(x, weight, eps, out):
    for i in range(x.shape[0]):
        _rms_norm_row(x[i], weight, eps, out[i])


def rms_norm(x, weight, eps):
    """Numba twin of :func:`npllm.equations.rms_norm`: x [..., D], weight [D] -> [..., D]."""
    x = as_array(x, "x", "[..., D]")
    weight = as_array(weight, "weight", "[D]")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must have shape [D] = {x.shape[-1:]} to match x, got {weight.shape}")
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    run = _rms_norm_serial if rows.size < SERIAL_BELOW else _rms_norm_parallel
    run(rows, np.ascontiguousarray(weight), np.float32(eps), out)
    return out.reshape(x.shape)
