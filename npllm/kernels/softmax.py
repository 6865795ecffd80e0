"""Numba twins of :func:`npllm.equations.softmax` and :func:`npllm.equations.log_softmax`, and
the LM head fused with the log-softmax at the target tokens (:func:`lm_head_log_probs`)."""
import numba
import numpy as np

from npllm.kernels._args import float32_array as as_array
from npllm.kernels._math import exp_inplace, row_max, total
from npllm.kernels._parallel import SERIAL_BELOW


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _row_max(x):
    top = x[0]
    for j in range(1, x.shape[0]):
        top = max(top, x[j])
    return top


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
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


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _log_softmax_row(x, out):
    """out = (x - max) - log(sum(e^{x - max})) for one row x [V] (logsumexp)."""
    top = _row_max(x)
    total = 0.0
    for j in range(x.shape[0]):
        total += np.exp(x[j] - top)
    log_total = np.log(np.float32(total))
    for j in range(x.shape[0]):
        out[j] = (x[j] - top) - log_total


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True, error_model="numpy")
def _softmax_parallel(x, out):
    for i in numba.prange(x.shape[0]):
        _softmax_row(x[i], out[i])


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _softmax_serial(x, out):
    for i in range(x.shape[0]):
        _softmax_row(x[i], out[i])


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True, error_model="numpy")
def _log_softmax_parallel(x, out):
    for i in numba.prange(x.shape[0]):
        _log_softmax_row(x[i], out[i])


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
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


# -- the LM head and the log-softmax at the targets, fused ----------------------------------------

@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _logsumexp_task(i, logits, v0, targets, top, total_exp, picked):
    """Fold row i of a block of logits [N, C] (vocabulary entries v0..v0 + C) into that row's
    running maximum ``top`` and sum of e^{logit - top}, and keep its target's logit.

    When the block raises the maximum, the sum so far is scaled by e^{old - new} (the
    streaming logsumexp), so the result is the log-sum-exp of every block seen. The block is
    overwritten (it is scratch).
    """
    x = logits[i]
    t = targets[i] - v0
    if 0 <= t < x.shape[0]:
        picked[i] = x[t]
    m = max(top[i], row_max(x))
    if m == -np.inf:
        return  # every logit so far is -inf: e^{-inf} adds 0 (and e^{-inf - (-inf)} is NaN)
    if m > top[i]:
        total_exp[i] *= np.exp(np.float64(top[i]) - np.float64(m))  # 0 for the first block
        top[i] = m
    exp_inplace(x, m)
    total_exp[i] += total(x)


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True, error_model="numpy")
def _logsumexp_parallel(logits, v0, targets, top, total_exp, picked):
    for i in numba.prange(logits.shape[0]):
        _logsumexp_task(i, logits, v0, targets, top, total_exp, picked)


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _logsumexp_serial(logits, v0, targets, top, total_exp, picked):
    for i in range(logits.shape[0]):
        _logsumexp_task(i, logits, v0, targets, top, total_exp, picked)


def lm_head_log_probs(c, W, targets, columns=None, slices=1, map=map):
    r"""Numba twin of the composition ``token_log_probs(lm_head(c, W), targets)``
    (:func:`npllm.equations.lm_head_log_probs`): c [..., T, D], W [V, D], targets int [..., T]
    -> [..., T].

    .. math::
        \log P(y \mid c) = W_y \cdot c - \log \sum_{v} e^{W_v \cdot c}

    The logits are computed a block of ``columns`` vocabulary entries at a time (one BLAS
    product of every row with a slice of W, as fast as the whole product) and folded into each
    row's running maximum and sum of exponentials (the streaming logsumexp), so the [..., T, V]
    logits never exist at once: for 512 tokens and V = 49,152 that is 100 MB not allocated.
    Then, as in the NumPy version, ``(logit_y - max) - log(sum)`` in float32.

    ``slices``: the vocabulary is cut into that many equal slices, whose maxima and sums
    (:func:`_vocabulary_sums`) are merged at the end as the blocks are; ``map(fn, slices)``
    computes them (the engine passes one that runs them on several threads at once: each
    thread then reads its slice of W once for every row).
    """
    c = as_array(c, "c", "[..., D]")
    W = as_array(W, "W", "[V, D]")
    targets = np.asarray(targets)
    V, D = W.shape
    if c.shape[-1] != D:
        raise ValueError(f"W must have shape [V, D] with D = {c.shape[-1]} to match c, got {W.shape}")
    if targets.shape != c.shape[:-1] or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integers of shape {c.shape[:-1]} to match c, got "
                         f"{targets.dtype} {targets.shape}")
    if targets.size and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"targets must be token ids in [0, V) = [0, {V})")
    rows = np.ascontiguousarray(c).reshape(-1, D)
    wanted = targets.reshape(-1).astype(np.int64)
    n = max(1, min(int(slices), V))
    cuts = [V * j // n for j in range(n + 1)]
    sums = list(map(lambda j: _vocabulary_sums(rows, W, wanted, cuts[j], cuts[j + 1], columns),
                    range(n)))
    top = np.max([m for m, _, _ in sums], axis=0)
    # Each slice's sum of e^{logit - its max}, rescaled to the common max (as one block is
    # rescaled when a later block raises the max); a target's logit is in exactly one slice.
    # A slice whose logits are all -inf has max -inf and sum 0 (_logsumexp_task): it adds 0.
    total_exp = sum(t * np.exp(m.astype(np.float64) - top) for m, t, _ in sums)
    picked = sum(p for _, _, p in sums)
    out = (picked - top) - np.log(total_exp.astype(np.float32))
    return out.reshape(targets.shape)


def _vocabulary_sums(rows, W, wanted, first, last, columns=None):
    """For rows [N, D] and the vocabulary entries [first, last) of W: each row's largest logit
    (float32 [N]), its sum of e^{logit - largest} (float64 [N]) and its target's logit (float32
    [N]; 0 where the target is outside the slice)."""
    N = rows.shape[0]
    # ~1M logits per block (4 MB, read again from cache by the log-softmax; for 512 rows as
    # fast as the whole product, which would take 100 MB); never fewer than 1,024 columns.
    columns = columns or max(1024, min(last - first, (1 << 20) // max(N, 1)))
    top = np.full(N, -np.inf, np.float32)
    total_exp = np.zeros(N, np.float64)
    picked = np.zeros(N, np.float32)
    for v0 in range(first, last, columns):
        block = rows @ W[v0:min(v0 + columns, last)].T  # [N, C] logits of this block
        run = _logsumexp_serial if block.size < SERIAL_BELOW else _logsumexp_parallel
        run(block, v0, wanted, top, total_exp, picked)
    return top, total_exp, picked
