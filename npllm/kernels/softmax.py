"""Numba twins of :func:`npllm.equations.softmax` and :func:`npllm.equations.log_softmax`."""
import numba
import numpy as np

from npllm.equations._checks import as_array
from npllm.kernels._parallel import SERIAL_BELOW


@numba.njit(cache=True, fastmath=False)
def _row_max(x):
    top = x[0]
    for j in range(1, x.shape[0]):
        top = max(top, x[j])
    return top


@numba.njit(cache=True, fastmath=False)
def _softmax_row(x, out):
    """out = e^{x - max} / sum(e^{x - max}) for one row x [V]."""
    top = _row_max(x)
    total = 0.0  # float64: a float32 running sum over V ~ 50,000 terms would lose digits
    for j in range(x.shape[0]):
        out[j] = np.exp(x[j] - top)
        total += out[j]
    total32 = np.float32(total)
    for j in range(x.shape[0]):
        out[j] /= total32


@numba.njit(cache=True, fastmath=False)
def _log_softmax_row(x, out):
    """out = (x - max) - log(sum(e^{x - max})) for one row x [V] (logsumexp)."""
    top = _row_max(x)
    total = 0.0
    for j in range(x.shape[0]):
        total += np.exp(x[j] - top)
    log_total = np.log(np.float32(total))
    for j in range(x.shape[0]):
        out[j] = (x[j] - top) - log_total


@numba.njit(cache=True, fastmath=False, parallel=True)
def _softmax_parallel(x, out):
    for i in numba.prange(x.shape[0]):
        _softmax_row(x[i], out[i])


@numba.njit(cache=True, fastmath=False)
def _softmax_serial(x, out):
    for i in range(x.shape[0]):
        _softmax_row(x[i], out[i])


@numba.njit(cache=True, fastmath=False, parallel=True)
def _log_softmax_parallel(x, out):
    for i in numba.prange(x.shape[0]):
        _log_softmax_row(x[i], out[i])


@numba.njit(cache=True, fastmath=False)
def _log_softmax_serial(x, out):
    for i in range(x.shape[0]):
        _log_softmax_row(x[i], out[i])


def _by_rows(x, axis, serial, parallel):
    """Run a row kernel over every row along ``axis`` of x (moved last, then restored)."""
    x = np.moveaxis(as_array(x, "x", "[..., V]"), axis, -1)
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    (serial if rows.size < SERIAL_BELOW else parallel)(rows, out)
    return np.moveaxis(out.reshape(x.shape), -1, axis)


def softmax(x, axis=-1):
    """Numba twin of :func:`npllm.equations.softmax`: x [..., V] -> [..., V] along ``axis``."""
    return _by_rows(x, axis, _softmax_serial, _softmax_parallel)


def log_softmax(x, axis=-1):
    """Numba twin of :func:`npllm.equations.log_softmax`: x [..., V] -> [..., V] along ``axis``."""
    return _by_rows(x, axis, _log_softmax_serial, _log_softmax_parallel)
