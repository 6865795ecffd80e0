"""Attention (lectures 002, 003, 004): causal scaled dot-product attention, heads, grouped-query attention.

Each token's query is compared with the keys of the tokens it may see (itself and earlier ones:
the causal mask); the softmax of the scaled scores weights an average of their values. Several
heads do this in parallel on slices of width Dh. Grouped-query attention (SmolLM2: 9 query heads,
3 key/value heads) lets each key/value head serve a group of H / K query heads, which makes the
KV cache K / H the size.
"""
import numpy as np

from ._checks import as_array, positive_int, require
from .softmax import softmax

# What masked positions get: the float32 minimum, not -inf, so that a row with every position
# masked gives a uniform softmax instead of 0/0 = NaN (as transformers does).
MASKED = np.finfo(np.float32).min


def causal_mask(T, S=None):
    r"""Additive causal mask (lectures 002, 004; transformers' causal mask, ``is_causal=True``).

    .. math::
        M_{ij} = \begin{cases} 0 & j \le S - T + i \\ \text{float32 min} & \text{otherwise} \end{cases}

    -> [T, S]. Query i is the token at position S - T + i: with a KV cache holding S - T earlier
    tokens, the T new queries see all cached keys and the new keys up to their own position.
    S defaults to T.
    """
    T = positive_int(T, "T")
    S = T if S is None else positive_int(S, "S")
    require(S >= T, f"S (key positions) must be >= T (query positions), got S={S}, T={T}")
    visible = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)
    return np.where(visible, np.float32(0.0), MASKED)


def attention_pattern(q, k, mask=None):
    r"""The attention weights (lectures 002, 003: the per-layer attention maps).

    .. math::
        A = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{D_h}} + M\right)

    q [..., T, Dh], k [..., S, Dh], mask broadcastable to [..., T, S] (e.g. :func:`causal_mask`)
    -> [..., T, S], each row a distribution over key positions. The scale is applied as
    ``* Dh ** -0.5``, as transformers' ``eager_attention_forward`` does.
    """
    q = as_array(q, "q", "[..., T, Dh]")
    k = as_array(k, "k", "[..., S, Dh]")
    require(q.shape[-1] == k.shape[-1],
            f"q and k must have the same head width Dh, got {q.shape[-1]} and {k.shape[-1]}")
    scores = (q @ np.swapaxes(k, -1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + as_array(mask, "mask", "[..., T, S]")
    return softmax(scores)


def scaled_dot_product_attention(q, k, v, mask=None):
    r"""Scaled dot-product attention (lectures 002, 004; ``F.scaled_dot_product_attention``).

    .. math::
        \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{D_h}} + M\right) V

    q [..., T, Dh], k, v [..., S, Dh], mask broadcastable to [..., T, S] -> [..., T, Dh].
    Without a mask every query sees every key: pass ``causal_mask(T, S)`` for a decoder.
    """
    k = as_array(k, "k", "[..., S, Dh]")
    v = as_array(v, "v", "[..., S, Dh]")
    require(k.shape[-2] == v.shape[-2],
            f"k and v must have the same key positions S, got {k.shape} and {v.shape}")
    return attention_pattern(q, k, mask) @ v


def repeat_kv(x, n_rep):
    r"""Repeat each key/value head for its group of query heads (lecture 002; HF ``repeat_kv``).

    .. math::
        \tilde K_h = K_{\lfloor h / n_{rep} \rfloor},\qquad h = 0, \dots, K\,n_{rep} - 1

    x [..., K, S, Dh] -> [..., K * n_rep, S, Dh]; each head appears n_rep times in a row
    (``torch.repeat_interleave`` on the head axis).
    """
    x = as_array(x, "x", "[..., K, S, Dh]")
    n_rep = positive_int(n_rep, "n_rep")
    return x if n_rep == 1 else np.repeat(x, n_rep, axis=-3)


def grouped_query_attention(q, k, v, mask=None):
    r"""Multi-head attention with grouped key/value heads (lecture 002; HF ``LlamaAttention``).

    .. math::
        O_h = \mathrm{softmax}\!\left(\frac{Q_h K_{g(h)}^\top}{\sqrt{D_h}} + M\right) V_{g(h)},
        \qquad g(h) = \lfloor h / (H / K) \rfloor

    q [..., H, T, Dh], k, v [..., K, S, Dh] with H a multiple of K, mask broadcastable to
    [..., T, S] -> [..., H, T, Dh]. K = H is ordinary multi-head attention, K = 1 multi-query.
    """
    q = as_array(q, "q", "[..., H, T, Dh]")
    k = as_array(k, "k", "[..., K, S, Dh]")
    v = as_array(v, "v", "[..., K, S, Dh]")
    H, K = q.shape[-3], k.shape[-3]
    require(H % K == 0, f"the query heads H must be a multiple of the key/value heads K, got H={H}, K={K}")
    return scaled_dot_product_attention(q, repeat_kv(k, H // K), repeat_kv(v, H // K), mask)


def decode_attention(q, k_cache, v_cache, length):
    r"""Attention of one new token against a KV cache (lecture 002: the KV cache).

    .. math::
        o_h = \mathrm{softmax}\!\left(\frac{q_h K_{g(h),\,<length}^\top}{\sqrt{D_h}}\right) V_{g(h),\,<length}

    q [..., H, 1, Dh], k_cache, v_cache [..., K, S_max, Dh], of which the first ``length``
    positions are filled (the new token's own key included) -> [..., H, 1, Dh]. The new token is
    the last one, so it may see every filled position: no mask. Equals the last row of full
    causal attention over those positions.
    """
    q = as_array(q, "q", "[..., H, 1, Dh]")
    require(q.shape[-2] == 1, f"q must have shape [..., H, 1, Dh] (one new token), got {q.shape}")
    k_cache = as_array(k_cache, "k_cache", "[..., K, S_max, Dh]")
    v_cache = as_array(v_cache, "v_cache", "[..., K, S_max, Dh]")
    require(k_cache.shape == v_cache.shape,
            f"k_cache and v_cache must have the same shape, got {k_cache.shape} and {v_cache.shape}")
    length = positive_int(length, "length")
    require(length <= k_cache.shape[-2],
            f"length must be at most the cache size S_max = {k_cache.shape[-2]}, got {length}")
    return grouped_query_attention(q, k_cache[..., :length, :], v_cache[..., :length, :])


def split_heads(x, n_heads):
    r"""Cut the model width into heads (lecture 002; the ``view(...).transpose(1, 2)`` in HF attention).

    .. math::
        X \in \mathbb{R}^{T \times n D_h} \;\mapsto\; (X_{:, h D_h : (h+1) D_h})_{h < n}

    x [..., T, n_heads * Dh] -> [..., n_heads, T, Dh].
    """
    x = as_array(x, "x", "[..., T, n*Dh]")
    n_heads = positive_int(n_heads, "n_heads")
    if x.shape[-1] % n_heads:  # (not require(): its message would be formatted at every call)
        raise ValueError(f"x's last axis ({x.shape[-1]}) must be a multiple of n_heads ({n_heads})")
    return np.swapaxes(x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads), -2, -3)


def merge_heads(x):
    r"""Concatenate the heads back into the model width (lecture 002; inverse of :func:`split_heads`).

    .. math::
        (O_h)_{h < n} \;\mapsto\; [O_0, O_1, \dots, O_{n-1}] \in \mathbb{R}^{T \times n D_h}

    x [..., n, T, Dh] -> [..., T, n * Dh].
    """
    x = as_array(x, "x", "[..., n, T, Dh]")
    n, T, Dh = x.shape[-3:]
    return np.swapaxes(x, -2, -3).reshape(*x.shape[:-3], T, n * Dh)
