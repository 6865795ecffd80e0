"""npllm.equations.attention against F.scaled_dot_product_attention (is_causal, enable_gqa) and
transformers' repeat_kv and eager_attention_forward."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv as hf_repeat_kv

from conftest import assert_close
from tolerances import assert_within_terms, attention_terms, within_terms
from npllm.equations import (attention_pattern, causal_mask, decode_attention, grouped_query_attention,
                             merge_heads, repeat_kv, scaled_dot_product_attention, split_heads)

seeds = st.integers(0, 2**32 - 1)
ratios = st.sampled_from([1, 3, 9])  # H / K: multi-head, SmolLM2 (9 / 3), multi-query-like
head_dims = st.sampled_from([1, 4, 8, 16, 64])
lengths = st.integers(1, 12)
# Scores are dot products over Dh <= 64 of O(1) numbers, softmax-weighted sums of O(1) values:
# a handful of float32 roundings in orders that differ between BLAS libraries.
ATTN_TOL = dict(rtol=1e-4, atol=1e-5)
# Against float64 torch, at the size of the terms (tolerances.attention_terms): a score's error is
# relative to |q|.|k|, not to the score, and an output, a sum of P_j v_j, may cancel. Measured:
# at most 4.5 ulps of the terms over 3,000 draws of these tests' inputs; 16 allowed. Below 1e-30
# a probability is a float32 subnormal and has no relative precision left.
ATTN_ULPS = dict(ulps=16, rtol=0.0, atol=1e-30)


def t64(x):
    return t(x).double()


def randn(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def bottom_right_causal(T, S):
    """Boolean mask for torch: query i is position S - T + i (torch's is_causal aligns top-left)."""
    return torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)


# --- mask -------------------------------------------------------------------------------------------

@given(T=lengths, extra=st.integers(0, 6))
def test_causal_mask_matches_torch_tril(T, extra):
    S = T + extra
    mask = causal_mask(T, S)
    assert mask.dtype == np.float32 and mask.shape == (T, S)
    np.testing.assert_array_equal(mask == 0, bottom_right_causal(T, S).numpy())
    assert (mask[mask != 0] == np.finfo(np.float32).min).all()
    np.testing.assert_array_equal(causal_mask(T), causal_mask(T, T))


# --- single-head attention ----------------------------------------------------------------------------

@given(seed=seeds, lead=st.lists(st.integers(1, 3), max_size=2), T=lengths, extra=st.integers(0, 5),
       Dh=head_dims, scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_attention_pattern_matches_torch_softmax(seed, lead, T, extra, Dh, scale):
    S = T + extra
    q, k = randn(seed, (*lead, T, Dh), scale), randn(seed + 1, (*lead, S, Dh), scale)
    mask = causal_mask(T, S)
    expected = torch.softmax(t64(q) @ t64(k).transpose(-1, -2) * Dh ** -0.5 + t64(mask), dim=-1)
    # Scores up to ~100 * sqrt(Dh) at scale 10: a score's absolute error, a few ulp of its terms
    # |q|.|k|, is a relative error of the probabilities: the bound scales with those terms.
    pattern, _ = attention_terms(q, k, v=k, mask=mask)
    assert_within_terms(attention_pattern(q, k, mask), expected.numpy(), pattern, **ATTN_ULPS)


def test_attention_bound_rejects_a_wrong_scale():
    """Negative control: the bound above tells 1/sqrt(Dh) from 1/Dh, and a wrong mask."""
    q, k, v = randn(0, (2, 5, 16)), randn(1, (2, 7, 16)), randn(2, (2, 7, 16))
    mask = causal_mask(5, 7)
    pattern, output = attention_terms(q, k, v, mask)
    exact = torch.softmax(t64(q) @ t64(k).transpose(-1, -2) * 16 ** -0.5 + t64(mask), -1).numpy()
    wrong = attention_pattern(q * np.float32(16 ** -0.5), k, mask)  # scaled twice: 1/Dh
    assert within_terms(attention_pattern(q, k, mask), exact, pattern, **ATTN_ULPS).all()
    assert within_terms(wrong, exact, pattern, ulps=1000 * ATTN_ULPS["ulps"], rtol=0).mean() < 0.5
    ahead = scaled_dot_product_attention(q, k, v, causal_mask(5, 7)[::-1])
    assert within_terms(ahead, exact @ v, output, ulps=1000 * ATTN_ULPS["ulps"], rtol=0).mean() < 0.5


@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 3), T=lengths, Dh=head_dims)
def test_sdpa_matches_torch_is_causal(seed, B, H, T, Dh):
    q, k, v = (randn(seed + i, (B, H, T, Dh)) for i in range(3))
    expected = F.scaled_dot_product_attention(t64(q), t64(k), t64(v), is_causal=True)
    _, output = attention_terms(q, k, v, causal_mask(T))  # a sum of P_j v_j may cancel
    assert_within_terms(scaled_dot_product_attention(q, k, v, causal_mask(T)), expected.numpy(),
                        output, **ATTN_ULPS)


@given(seed=seeds, H=st.integers(1, 3), T=lengths, extra=st.integers(1, 6), Dh=head_dims)
def test_sdpa_with_cached_keys_matches_torch_bottom_right_mask(seed, H, T, extra, Dh):
    S = T + extra
    q, k, v = randn(seed, (H, T, Dh)), randn(seed + 1, (H, S, Dh)), randn(seed + 2, (H, S, Dh))
    expected = F.scaled_dot_product_attention(t64(q), t64(k), t64(v), attn_mask=bottom_right_causal(T, S))
    _, output = attention_terms(q, k, v, causal_mask(T, S))  # a sum of P_j v_j may cancel
    assert_within_terms(scaled_dot_product_attention(q, k, v, causal_mask(T, S)), expected.numpy(),
                        output, **ATTN_ULPS)


def test_fully_masked_row_gives_no_nan():
    """float32 min (not -inf): a row with nothing visible averages the values instead of NaN."""
    q, k, v = randn(0, (1, 3, 4)), randn(1, (1, 5, 4)), randn(2, (1, 5, 4))
    mask = np.zeros((3, 5), np.float32)
    mask[1] = np.finfo(np.float32).min
    out = scaled_dot_product_attention(q, k, v, mask)
    assert not np.isnan(out).any()
    assert_close(out[0, 1], v[0].mean(axis=0), rtol=1e-5, atol=1e-6)
    # torch's eager path (what transformers does) agrees; with -inf it would be NaN.
    module = SimpleNamespace(num_key_value_groups=1, training=False)
    hf_out, _ = eager_attention_forward(module, t(q[None]), t(k[None]), t(v[None]), t(mask), scaling=0.5)
    assert_close(out, hf_out[0].transpose(0, 1).numpy(), **ATTN_TOL)


def test_extreme_scores_stay_finite():
    q = np.full((1, 2, 4), 100.0, np.float32)
    k = np.stack([np.full((2, 4), 100.0), np.full((2, 4), -100.0)], axis=1).astype(np.float32)
    k = k.reshape(1, 4, 4)
    v = randn(0, (1, 4, 4))
    out = scaled_dot_product_attention(q, k, v, causal_mask(2, 4))
    expected = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=bottom_right_causal(2, 4))
    assert np.isfinite(out).all()
    assert_close(out, expected.numpy(), **ATTN_TOL)


# --- heads ------------------------------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 2), K=st.integers(1, 3), n_rep=ratios, S=lengths, Dh=head_dims)
def test_repeat_kv_equals_hf(seed, B, K, n_rep, S, Dh):
    x = randn(seed, (B, K, S, Dh))
    np.testing.assert_array_equal(repeat_kv(x, n_rep), hf_repeat_kv(t(x), n_rep).numpy())
    np.testing.assert_array_equal(repeat_kv(x[0], n_rep), hf_repeat_kv(t(x), n_rep)[0].numpy())


@given(seed=seeds, B=st.integers(1, 2), K=st.integers(1, 3), ratio=ratios, T=lengths, Dh=head_dims)
def test_gqa_matches_torch_enable_gqa(seed, B, K, ratio, T, Dh):
    H = K * ratio
    q, k, v = randn(seed, (B, H, T, Dh)), randn(seed + 1, (B, K, T, Dh)), randn(seed + 2, (B, K, T, Dh))
    expected = F.scaled_dot_product_attention(t64(q), t64(k), t64(v), is_causal=True, enable_gqa=True)
    _, output = attention_terms(q, repeat_kv(k, ratio), repeat_kv(v, ratio), causal_mask(T))
    assert_within_terms(grouped_query_attention(q, k, v, causal_mask(T)), expected.numpy(), output,
                        **ATTN_ULPS)  # a sum of P_j v_j may cancel


@given(seed=seeds, K=st.integers(1, 3), ratio=ratios, T=lengths, extra=st.integers(0, 4), Dh=head_dims)
def test_gqa_matches_hf_eager_attention(seed, K, ratio, T, extra, Dh):
    H, S = K * ratio, T + extra
    q, k, v = randn(seed, (1, H, T, Dh)), randn(seed + 1, (1, K, S, Dh)), randn(seed + 2, (1, K, S, Dh))
    mask = causal_mask(T, S)
    module = SimpleNamespace(num_key_value_groups=ratio, training=False)
    hf_out, hf_weights = eager_attention_forward(module, t64(q), t64(k), t64(v), t64(mask)[None, None],
                                                 scaling=Dh ** -0.5)
    # Scores' errors are relative to |q|.|k|, and outputs (sums of P_j v_j) may cancel.
    pattern, output = attention_terms(q, repeat_kv(k, ratio), repeat_kv(v, ratio), mask)
    assert_within_terms(grouped_query_attention(q, k, v, mask), hf_out.transpose(1, 2).numpy(),
                        output, **ATTN_ULPS)
    assert_within_terms(attention_pattern(q, repeat_kv(k, ratio), mask), hf_weights.numpy(), pattern,
                        **ATTN_ULPS)


@given(seed=seeds, K=st.integers(1, 3), ratio=ratios, S=st.integers(1, 12), spare=st.integers(0, 4),
       Dh=head_dims)
def test_decode_attention_equals_last_row_of_full_causal_attention(seed, K, ratio, S, spare, Dh):
    H = K * ratio
    q = randn(seed, (H, S, Dh))
    k_cache, v_cache = randn(seed + 1, (K, S + spare, Dh)), randn(seed + 2, (K, S + spare, Dh))
    full = grouped_query_attention(q, k_cache[:, :S], v_cache[:, :S], causal_mask(S))
    # Slots past `length` hold garbage in a real cache: they must not be read.
    k_cache[:, S:], v_cache[:, S:] = np.nan, np.nan
    step = decode_attention(q[:, -1:], k_cache, v_cache, S)
    expected = F.scaled_dot_product_attention(t64(q[:, -1:]), t64(k_cache[:, :S]), t64(v_cache[:, :S]),
                                              enable_gqa=True)
    # Sums of P_j v_j that may cancel: each float32 result within ATTN_ULPS of its terms from the
    # float64 one, so the two float32 ones within twice that of each other.
    _, output = attention_terms(q[:, -1:], repeat_kv(k_cache[:, :S], ratio),
                                repeat_kv(v_cache[:, :S], ratio))
    assert_within_terms(step, expected.numpy(), output, **ATTN_ULPS)
    assert_within_terms(step, full[:, -1:], output, **{**ATTN_ULPS, "ulps": 2 * ATTN_ULPS["ulps"]})


@given(seed=seeds, lead=st.lists(st.integers(1, 3), max_size=2), T=lengths, n=st.integers(1, 9),
       Dh=head_dims)
def test_split_and_merge_heads_match_torch_view_transpose(seed, lead, T, n, Dh):
    x = randn(seed, (*lead, T, n * Dh))
    expected = t(x).view(*lead, T, n, Dh).transpose(-2, -3)
    np.testing.assert_array_equal(split_heads(x, n), expected.numpy())
    np.testing.assert_array_equal(merge_heads(split_heads(x, n)), x)


# --- invalid input ----------------------------------------------------------------------------------

def test_attention_errors_name_the_argument():
    q, k = np.ones((9, 2, 4), np.float32), np.ones((2, 2, 4), np.float32)
    with pytest.raises(ValueError, match="H must be a multiple of the key/value heads K, got H=9, K=2"):
        grouped_query_attention(q, k, k)
    with pytest.raises(ValueError, match="q and k must have the same head width Dh, got 4 and 3"):
        attention_pattern(np.ones((2, 4)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"q must have shape \[\.\.\., T, Dh\]"):
        attention_pattern(np.ones(4), np.ones((2, 4)))
    with pytest.raises(ValueError, match="k and v must have the same key positions S"):
        scaled_dot_product_attention(np.ones((2, 4)), np.ones((2, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"S \(key positions\) must be >= T"):
        causal_mask(4, 3)
    with pytest.raises(ValueError, match="T must be a positive integer"):
        causal_mask(0)
    with pytest.raises(ValueError, match="n_rep must be a positive integer"):
        repeat_kv(np.ones((1, 2, 4)), 0)
    with pytest.raises(ValueError, match=r"q must have shape \[\.\.\., H, 1, Dh\] \(one new token\)"):
        decode_attention(np.ones((3, 2, 4)), np.ones((3, 8, 4)), np.ones((3, 8, 4)), 2)
    with pytest.raises(ValueError, match="length must be at most the cache size S_max = 8"):
        decode_attention(np.ones((3, 1, 4)), np.ones((3, 8, 4)), np.ones((3, 8, 4)), 9)
    with pytest.raises(ValueError, match="k_cache and v_cache must have the same shape"):
        decode_attention(np.ones((3, 1, 4)), np.ones((3, 8, 4)), np.ones((3, 7, 4)), 2)
    with pytest.raises(ValueError, match=r"x's last axis \(10\) must be a multiple of n_heads \(3\)"):
        split_heads(np.ones((2, 10)), 3)
