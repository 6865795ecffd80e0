"""Numba twins of :mod:`npllm.equations.attention`: grouped-query attention, prefill and decode.

The NumPy version repeats each key/value head for its group of query heads (``repeat_kv``) and
then runs ``softmax(q k^T / sqrt(Dh) + M) v`` as three whole-array operations, each writing an
[H, T, S] or [H, T, Dh] result to memory. The kernel computes the same numbers without the
copies: query head h reads key/value head h // (H / K) in place, and each block of query rows
goes through scores, softmax and the weighted sum of values while its scores are still in cache.
"""
import numba
import numpy as np

from npllm.equations._checks import as_array, positive_int
from npllm.kernels._parallel import SERIAL_ATTENTION_BELOW

MASKED = np.finfo(np.float32).min
ROWS = 8     # query rows that share each key and value they load; a block of rows is one task
KEYS = 256   # keys per tile of the score computation: a tile of scores stays in the L1 cache


@numba.njit(cache=True, fastmath=False)
def _axpy(a, x, y):
    """y += a x. The loop has no reduction, so LLVM vectorises it without reordering any sum."""
    for j in range(x.shape[0]):
        y[j] += a * x[j]


@numba.njit(cache=True, fastmath=False)
def _transpose(k, kT):
    """kT[d, j] = k[j, d]: keys [S, Dh] -> [Dh, S], a tile of 16 keys at a time so that the
    rows being read stay in cache while their columns are written out."""
    S, Dh = k.shape
    for j0 in range(0, S, 16):
        for d in range(Dh):
            for j in range(j0, min(j0 + 16, S)):
                kT[d, j] = k[j, d]


@numba.njit(cache=True, fastmath=False)
def _visible_keys(mask_row):
    """The keys [first, last) outside of which this row's mask is the float32 minimum (or -inf).

    Those keys can be skipped without changing a bit: their score plus mask rounds to float32
    min (or -inf) while the row maximum is at least one ulp of float32 min (2e31) higher, so
    e^{score - max} is exactly 0 in the NumPy version too. The causal mask makes this skip half
    the work. A row with every key masked (a padding query) is computed in full, as NumPy does:
    a uniform average (or NaN if the mask is all -inf).
    """
    S = mask_row.shape[0]
    first = 0
    while first < S and mask_row[first] <= MASKED:
        first += 1
    if first == S:
        return 0, S
    last = S
    while mask_row[last - 1] <= MASKED:
        last -= 1
    return first, last


@numba.njit(cache=True, fastmath=False)
def _attention_rows(q, kT, v, mask, scale, out):
    """out = softmax(q k^T * scale + mask) v for a block of R query rows of one head.

    q [R, Dh], kT [Dh, S] (the keys transposed), v [S, Dv], mask [R, S] or [1, S] (one mask
    row for all rows) -> out [R, Dv].
    """
    R, Dh = q.shape
    first = np.empty(R, np.int64)
    last = np.empty(R, np.int64)
    for r in range(R):
        first[r], last[r] = _visible_keys(mask[r % mask.shape[0]])
    lo, hi = first.min(), last.max()  # the keys that some row of the block can see

    # Scores q k^T over keys [lo, hi). With the keys transposed, the innermost loop runs over
    # keys: each step adds q[r, d] times a row of kT to a row of scores (an axpy), which
    # vectorises under fastmath=False, where a dot product over d would be a sequential sum.
    # Each score still adds its Dh products in the order d = 0, 1, ..., Dh - 1.
    s = np.zeros((R, hi - lo), np.float32)
    for j0 in range(lo, hi, KEYS):
        j1 = min(j0 + KEYS, hi)
        for d in range(Dh):
            for r in range(R):
                _axpy(q[r, d], kT[d, j0:j1], s[r, j0 - lo:j1 - lo])

    # Softmax numerators e^{x - max} of x = score * scale + mask, and their sum. Keys outside
    # this row's [first, last) get weight 0 (see _visible_keys).
    total = np.empty(R, np.float32)
    for r in range(R):
        row = s[r]
        a, b = first[r] - lo, last[r] - lo
        row[:a] = 0.0
        row[b:] = 0.0
        m = mask[r % mask.shape[0], lo:hi]
        top = np.float32(-np.inf)
        for j in range(a, b):
            row[j] = row[j] * scale + m[j]
            top = max(top, row[j])
        acc = 0.0  # float64, as in the other softmax kernels
        for j in range(a, b):
            row[j] = np.exp(row[j] - top)
            acc += row[j]
        total[r] = acc

    # out = (sum_j e_j v_j) / (sum_j e_j): the softmax's division is done once per output
    # instead of once per key. Each row of v is loaded once for the whole block of rows.
    out[:, :] = 0.0
    for j in range(lo, hi):
        for r in range(R):
            _axpy(s[r, j - lo], v[j], out[r])
    for r in range(R):
        for e in range(out.shape[1]):
            out[r, e] /= total[r]


@numba.njit(cache=True, fastmath=False)
def _attention_task(task, q, kT, v, mask, scale, out):
    """One task of the loop over tasks: ROWS query rows of one head of one batch row."""
    B, H, T, _ = q.shape
    group = H // kT.shape[1]
    n_blocks = (T + ROWS - 1) // ROWS
    b, h, block = task // (H * n_blocks), task // n_blocks % H, task % n_blocks
    t0, t1 = block * ROWS, min(block * ROWS + ROWS, T)
    # Grouped-query attention without repeat_kv: query head h reads key/value head
    # h // (H / K) where it is, instead of a copy of it made for each of the H / K heads.
    kv = h // group
    # The mask's batch, head and query axes have length 1 when they are shared (broadcast).
    m = mask[b % mask.shape[0], h % mask.shape[1]]
    m = m[t0:t1] if m.shape[0] == T else m
    _attention_rows(q[b, h, t0:t1], kT[b, kv], v[b, kv], m, scale, out[b, h, t0:t1])


@numba.njit(cache=True, fastmath=False, parallel=True)
def _attention_parallel(q, k, v, mask, scale, out):
    """q [B, H, T, Dh], k [B, K, S, Dh], v [B, K, S, Dv], mask [B or 1, H or 1, T or 1, S]
    -> out [B, H, T, Dv]."""
    B, H, T, _ = q.shape
    K, S, Dh = k.shape[1:]
    kT = np.empty((B, K, Dh, S), np.float32)  # see _attention_rows: keys transposed, once
    for bk in numba.prange(B * K):
        _transpose(k[bk // K, bk % K], kT[bk // K, bk % K])
    for task in numba.prange(B * H * ((T + ROWS - 1) // ROWS)):
        _attention_task(task, q, kT, v, mask, scale, out)


@numba.njit(cache=True, fastmath=False)
def _attention_serial(q, k, v, mask, scale, out):
    B, H, T, _ = q.shape
    K, S, Dh = k.shape[1:]
    kT = np.empty((B, K, Dh, S), np.float32)
    for bk in range(B * K):
        _transpose(k[bk // K, bk % K], kT[bk // K, bk % K])
    for task in range(B * H * ((T + ROWS - 1) // ROWS)):
        _attention_task(task, q, kT, v, mask, scale, out)


@numba.njit(cache=True, fastmath=False)
def _decode_task(task, q, k_cache, v_cache, length, scale, out):
    """The G = H / K query heads of one key/value head (one task) against the filled cache."""
    K, Dh = k_cache.shape[1], k_cache.shape[3]
    b, kv = task // K, task % K
    kT = np.empty((Dh, length), np.float32)
    _transpose(k_cache[b, kv, :length], kT)
    no_mask = np.zeros((1, length), np.float32)
    _attention_rows(q[b, kv], kT, v_cache[b, kv, :length], no_mask, scale, out[b, kv])


@numba.njit(cache=True, fastmath=False, parallel=True)
def _decode_parallel(q, k_cache, v_cache, length, scale, out):
    """q [B, K, G, Dh], k_cache, v_cache [B, K, S_max, Dh] -> out [B, K, G, Dh]."""
    for task in numba.prange(q.shape[0] * q.shape[1]):
        _decode_task(task, q, k_cache, v_cache, length, scale, out)


@numba.njit(cache=True, fastmath=False)
def _decode_serial(q, k_cache, v_cache, length, scale, out):
    for task in range(q.shape[0] * q.shape[1]):
        _decode_task(task, q, k_cache, v_cache, length, scale, out)


def _attention(q, k, v, mask):
    """The kernel on arrays with one batch axis: q [B, H, T, Dh], k, v [B, K, S, Dh], mask
    [B or 1, H or 1, T or 1, S] -> [B, H, T, Dh]."""
    B, H, T, Dh = q.shape
    out = np.empty(q.shape[:3] + v.shape[-1:], np.float32)
    scale = np.float32(Dh ** -0.5)  # as the NumPy version: (q k^T) * Dh ** -0.5
    work = B * H * T * k.shape[-2] * Dh
    run = _attention_serial if work < SERIAL_ATTENTION_BELOW else _attention_parallel
    # k may be a strided view (a KV cache): it is read once, to transpose it. v is read once
    # per block of rows: a contiguous copy first is cheaper than strided reads each time.
    run(np.ascontiguousarray(q), k, np.ascontiguousarray(v), np.ascontiguousarray(mask), scale, out)
    return out


def _batch_axis(x, lead):
    """x [*lead', ...] -> [B or 1, ...]: its leading axes broadcast to ``lead`` and made one.
    Arrays whose leading axes are already ``lead`` (or all 1) are reshaped, not copied."""
    x = x.reshape((1,) * (len(lead) + 3 - x.ndim) + x.shape)
    if x.shape[:-3] != lead and np.prod(x.shape[:-3]) != 1:
        x = np.broadcast_to(x, lead + x.shape[-3:])
    return x.reshape((-1,) + x.shape[-3:])


def grouped_query_attention(q, k, v, mask=None):
    """Numba twin of :func:`npllm.equations.grouped_query_attention` (same arguments and numbers).

    q [..., H, T, Dh], k, v [..., K, S, Dh] with H a multiple of K, mask broadcastable to
    [..., H, T, S] (e.g. [B, 1, T, S] or [T, S]) or None -> [..., H, T, Dh].
    """
    q = as_array(q, "q", "[..., H, T, Dh]")
    k = as_array(k, "k", "[..., K, S, Dh]")
    v = as_array(v, "v", "[..., K, S, Dh]")
    (H, T, Dh), (K, S, _) = q.shape[-3:], k.shape[-3:]
    # `if`, not require(): these run for every layer of every decoded token, and require's
    # message would be formatted each time.
    if H % K:
        raise ValueError(f"the query heads H must be a multiple of the key/value heads K, got H={H}, K={K}")
    if Dh != k.shape[-1]:
        raise ValueError(f"q and k must have the same head width Dh, got {Dh} and {k.shape[-1]}")
    if k.shape[-3:-1] != v.shape[-3:-1]:
        raise ValueError(f"k and v must have the same heads K and key positions S, got {k.shape} and {v.shape}")
    mask = np.zeros((1, S), np.float32) if mask is None else as_array(mask, "mask", "[..., T, S]")
    try:
        lead = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3], mask.shape[:-3])
        fits = np.broadcast_shapes(mask.shape, lead + (H, T, S)) == lead + (H, T, S)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"mask must be broadcastable to [..., H, T, S] = {(H, T, S)} with the batch "
                         f"axes of q, k and v, got shape {mask.shape}")
    if mask.shape[-1] != S:  # a mask shared by all keys: the kernel reads whole rows
        mask = np.broadcast_to(mask, mask.shape[:-1] + (S,))
    out = _attention(_batch_axis(q, lead), _batch_axis(k, lead), _batch_axis(v, lead),
                     _batch_axis(mask, lead))
    return out.reshape(lead + out.shape[1:])


def decode_attention(q, k_cache, v_cache, length):
    """Numba twin of :func:`npllm.equations.decode_attention`: one new token against a KV cache.

    q [..., H, 1, Dh], k_cache, v_cache [..., K, S_max, Dh], the first ``length`` positions
    filled -> [..., H, 1, Dh].

    No mask, as in the NumPy version: the new token may see every filled position. The H / K
    query heads of a group then ask the same question of the same keys, so they are passed to
    the kernel as H / K query rows of a single head: each key and value is loaded once for the
    whole group.
    """
    q = as_array(q, "q", "[..., H, 1, Dh]")
    k_cache = as_array(k_cache, "k_cache", "[..., K, S_max, Dh]")
    v_cache = as_array(v_cache, "v_cache", "[..., K, S_max, Dh]")
    (H, _, Dh), (K, S_max, _) = q.shape[-3:], k_cache.shape[-3:]
    length = positive_int(length, "length")
    if q.shape[-2] != 1:
        raise ValueError(f"q must have shape [..., H, 1, Dh] (one new token), got {q.shape}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {k_cache.shape} and {v_cache.shape}")
    if length > S_max:
        raise ValueError(f"length must be at most the cache size S_max = {S_max}, got {length}")
    if H % K:
        raise ValueError(f"the query heads H must be a multiple of the key/value heads K, got H={H}, K={K}")
    if Dh != k_cache.shape[-1]:
        raise ValueError(f"q and k_cache must have the same head width Dh, got {Dh} and {k_cache.shape[-1]}")
    lead = np.broadcast_shapes(q.shape[:-3], k_cache.shape[:-3])
    rows = _batch_axis(q, lead).reshape(-1, K, H // K, Dh)  # [B, K, H / K, Dh]: head h = kv, g
    # The caches are passed whole (no copy): the kernel reads their first `length` positions.
    k_cache = np.ascontiguousarray(_batch_axis(k_cache, lead))
    v_cache = np.ascontiguousarray(_batch_axis(v_cache, lead))
    out = np.empty_like(rows)
    run = _decode_serial if rows.size * length < SERIAL_ATTENTION_BELOW else _decode_parallel
    run(np.ascontiguousarray(rows), k_cache, v_cache, length, np.float32(Dh ** -0.5), out)
    return out.reshape(lead + (H, 1, Dh))
