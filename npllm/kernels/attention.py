"""Numba twins of :mod:`npllm.equations.attention`: grouped-query attention, prefill and decode.

The NumPy version repeats each key/value head for its group of query heads (``repeat_kv``) and
then runs ``softmax(q k^T / sqrt(Dh) + M) v`` as whole-array operations over every query and
every key. The twin computes the same numbers with less work:

- no copies of K and V: query head h reads key/value head h // (H / K) where it is (the head
  axis of q is split into [K, H / K] and K and V get a broadcast axis of length 1);
- the two products q k^T and p v stay with BLAS (NumPy's ``matmul`` over the stacked heads),
  the fastest code for them; the softmax between them, with the scale and the mask, is one
  Numba pass over each row of scores, in place, with a vectorised exponential
  (``kernels/_math.py``);
- causality: the queries are taken in blocks of ``ROWS``, and each block only against the keys
  that some of its rows may see. With the causal mask that skips nearly half of both products
  and of the softmax. Skipped keys have mask float32 min (or -inf): their softmax weight is
  exactly 0 in the NumPy version too (see :func:`_visible_keys`), so nothing changes.
"""
import numba
import numpy as np

from npllm.equations._checks import positive_int
from npllm.kernels._args import float32_array as as_array
from npllm.kernels._math import exp_inplace, row_max, total
from npllm.kernels._parallel import SERIAL_ATTENTION_BELOW

MASKED = np.finfo(np.float32).min
ROWS = 64  # query rows per block: smaller skips more of the causal triangle, larger feeds BLAS
           # bigger products


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _visible_keys(mask_row):
    """The keys [first, last) outside of which this row's mask is the float32 minimum (or -inf).

    Those keys can be skipped without changing a bit: their score plus mask rounds to float32
    min (or -inf) while the row maximum is at least one ulp of float32 min (2e31) higher, so
    e^{score - max} is exactly 0 in the NumPy version too. A row with every key masked (a
    padding query) is computed in full, as NumPy does: a uniform average (or NaN if the mask is
    all -inf).
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


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _key_range(mask, t0, t1):
    """The keys [lo, hi) that some query row t0 <= t < t1 may see, over every batch row and head
    of ``mask`` [B or 1, H or 1, T or 1, S]."""
    S = mask.shape[3]
    lo, hi = S, 0
    rows = range(t0, t1) if mask.shape[2] > 1 else range(1)
    for b in range(mask.shape[0]):
        for h in range(mask.shape[1]):
            for t in rows:
                first, last = _visible_keys(mask[b, h, t])
                lo, hi = min(lo, first), max(hi, last)
    return lo, hi


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _softmax_row(x, m, scale):
    """x <- softmax(x * scale + m) for one row of scores x [W] and its mask row m [W].

    The normalisation multiplies by 1 / sum instead of dividing by the sum: a vector division
    costs several multiplications, for at most one ulp of difference."""
    for j in range(x.shape[0]):
        x[j] = x[j] * scale + m[j]
    exp_inplace(x, row_max(x))
    inverse = np.float32(1.0) / np.float32(total(x))
    for j in range(x.shape[0]):
        x[j] *= inverse


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _softmax_task(i, s, mask, scale, t0, lo):
    """Row i of the scores s [B, K, R, G, W]: query t0 + r of head kv * G + g, against keys
    lo..lo + W."""
    B, K, R, G, W = s.shape
    b, kv, r, g = i // (K * R * G), i // (R * G) % K, i // G % R, i % G
    # The mask's batch, head and query axes have length 1 when they are shared (broadcast).
    m = mask[b % mask.shape[0], (kv * G + g) % mask.shape[1],
             t0 + r if mask.shape[2] > 1 else 0, lo:lo + W]
    _softmax_row(s[b, kv, r, g], m, scale)


@numba.njit(cache=True, nogil=True, fastmath=False, parallel=True, error_model="numpy")
def _softmax_parallel(s, mask, scale, t0, lo):
    """s [B, K, R, G, W] <- softmax(s * scale + mask) along W, every row in place."""
    for i in numba.prange(s.shape[0] * s.shape[1] * s.shape[2] * s.shape[3]):
        _softmax_task(i, s, mask, scale, t0, lo)


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _softmax_serial(s, mask, scale, t0, lo):
    for i in range(s.shape[0] * s.shape[1] * s.shape[2] * s.shape[3]):
        _softmax_task(i, s, mask, scale, t0, lo)


def _scores(q, kT):
    """q k^T for the queries of each key/value head, q [B, K, R * G, Dh], and its keys
    transposed, kT [B, K, Dh, W] (a view of k: no copy, no repeat) -> [B, K, R * G, W]."""
    return np.matmul(q, kT)


def _attention(q, k, v, mask):
    """q [B, H, T, Dh], k, v [B, K, S, Dh], mask [B or 1, H or 1, T or 1, S] -> [B, H, T, Dh]
    (a view of a [B, T, H, Dh] array: merge_heads is then free)."""
    B, H, T, Dh = q.shape
    K, S = k.shape[1:3]
    G = H // K
    q = q.reshape(B, K, G, T, Dh)  # head h = kv * G + g, as repeat_kv pairs them
    kT = np.swapaxes(k, -1, -2)    # [B, K, Dh, S]: a view, no copy
    out = np.empty((B, T, K, G, Dh), np.float32)
    scale = np.float32(Dh ** -0.5)  # as the NumPy version: (q k^T) * Dh ** -0.5
    run = _softmax_serial if B * H * T * S * Dh < SERIAL_ATTENTION_BELOW else _softmax_parallel
    for t0 in range(0, T, ROWS):
        t1 = min(t0 + ROWS, T)
        R = t1 - t0
        lo, hi = _key_range(mask, t0, t1)
        # The G query heads of a key/value head, rows (t, g): one matrix [R * G, Dh], so each
        # product is one call of BLAS per key/value head, with G times the rows.
        rows = q[:, :, :, t0:t1].transpose(0, 1, 3, 2, 4).reshape(B, K, R * G, Dh)
        s = _scores(rows, kT[..., lo:hi])  # [B, K, R * G, hi - lo]
        run(s.reshape(B, K, R, G, hi - lo), mask, scale, t0, lo)
        o = np.matmul(s, v[:, :, lo:hi])  # [B, K, R * G, Dh]
        out[:, t0:t1] = o.reshape(B, K, R, G, Dh).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, T, H, Dh).transpose(0, 2, 1, 3)


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
    lead_q = _batch_axis(q, lead)
    out = _attention(lead_q, _batch_axis(k, lead), _batch_axis(v, lead),
                     np.ascontiguousarray(_batch_axis(mask, lead)))
    return out.reshape(lead + out.shape[1:])


def decode_attention(q, k_cache, v_cache, length):
    """Numba twin of :func:`npllm.equations.decode_attention`: one new token against a KV cache.

    q [..., H, 1, Dh], k_cache, v_cache [..., K, S_max, Dh], the first ``length`` positions
    filled -> [..., H, 1, Dh].

    No mask, as in the NumPy version: the new token may see every filled position. The H / K
    query heads of a group then ask the same question of the same keys, so they are one
    product of H / K query rows with the group's keys: each key and value is read once for the
    whole group, and nothing past ``length`` is read.
    """
    if (type(q) is type(k_cache) is type(v_cache) is np.ndarray and type(length) is int
            and q.dtype == k_cache.dtype == v_cache.dtype == np.float32
            and q.ndim == k_cache.ndim == 4 and k_cache.shape == v_cache.shape
            and q.shape[0] == k_cache.shape[0] and q.shape[2] == 1
            and q.shape[3] == k_cache.shape[3] and q.shape[1] % k_cache.shape[1] == 0
            and 1 <= length <= k_cache.shape[2]):
        # The forward pass's call, q [B, H, 1, Dh] and the caches [B, K, S_max, Dh], without
        # the general checks below (they cost more than the work when decoding one token).
        (B, H, _, Dh), K = q.shape, k_cache.shape[1]
        return _decode(q.reshape(B, K, H // K, Dh), k_cache, v_cache, length).reshape(q.shape)
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
    lead = q.shape[:-3]
    if k_cache.shape[:-3] != lead:
        lead = np.broadcast_shapes(lead, k_cache.shape[:-3])
    G = H // K
    rows = _batch_axis(q, lead).reshape(-1, K, G, Dh)  # [B, K, G, Dh]: head h = kv * G + g
    out = _decode(rows, _batch_axis(k_cache, lead), _batch_axis(v_cache, lead), length)
    return out.reshape(lead + (H, 1, Dh))


def _decode(rows, k_cache, v_cache, length):
    """rows [B, K, G, Dh] (the G query heads of each key/value head), caches [B, K, S_max, Dh]
    -> [B, K, G, Dh]: softmax(rows k^T / sqrt(Dh)) v over the first ``length`` positions."""
    B, K, G, Dh = rows.shape
    k = k_cache[:, :, :length]  # views of the filled positions
    v = v_cache[:, :, :length]
    s = _scores(rows, np.swapaxes(k, -1, -2))  # [B, K, G, length]
    no_mask = np.zeros((1, 1, 1, length), np.float32)
    run = _softmax_serial if rows.size * length < SERIAL_ATTENTION_BELOW else _softmax_parallel
    run(s.reshape(-1, K, 1, G, length), no_mask, np.float32(Dh ** -0.5), 0, 0)
    return np.matmul(s, v)  # [B, K, G, Dh]
