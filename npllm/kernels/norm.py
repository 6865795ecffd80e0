"""Numba twin of :func:`npllm.equations.rms_norm` (lecture 003: RMSNorm)."""
import numba
import numpy as np

from npllm.equations._checks import as_array, require
from npllm.kernels._parallel import SERIAL_BELOW


@numba.njit(cache=True, fastmath=False)
def _rms_norm_row(x, weight, eps, out):
    """out = x * (1 / sqrt(mean(x^2) + eps)) * weight for one row x [D], in the NumPy order."""
    D = x.shape[0]
    # The squares are float32 products, as in NumPy; their sum is kept in float64, because a
    # float32 running sum over D terms loses accuracy (NumPy's pairwise sum does not).
    total = 0.0
    for d in range(D):
        total += x[d] * x[d]
    variance = np.float32(total / D)
    scale = np.float32(1.0) / np.sqrt(variance + eps)
    for d in range(D):
        out[d] = x[d] * scale * weight[d]


@numba.njit(cache=True, fastmath=False, parallel=True)
def _rms_norm_parallel(x, weight, eps, out):
    for i in numba.prange(x.shape[0]):
        _rms_norm_row(x[i], weight, eps, out[i])


@numba.njit(cache=True, fastmath=False)
def _rms_norm_serial(x, weight, eps, out):
    for i in range(x.shape[0]):
        _rms_norm_row(x[i], weight, eps, out[i])


def rms_norm(x, weight, eps):
    """Numba twin of :func:`npllm.equations.rms_norm`: x [..., D], weight [D] -> [..., D]."""
    x = as_array(x, "x", "[..., D]")
    weight = as_array(weight, "weight", "[D]")
    require(weight.shape == x.shape[-1:],
            f"weight must have shape [D] = {x.shape[-1:]} to match x, got {weight.shape}")
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    run = _rms_norm_serial if rows.size < SERIAL_BELOW else _rms_norm_parallel
    run(rows, np.ascontiguousarray(weight), np.float32(eps), out)
    return out.reshape(x.shape)
