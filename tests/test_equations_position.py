"""npllm.equations.position against transformers' LlamaRotaryEmbedding, apply_rotary_pos_emb and
rotate_half, llama.cpp's Q/K row permutation, and the sinusoidal formula of lecture 003 in torch."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaRotaryEmbedding, apply_rotary_pos_emb,
                                                      rotate_half as hf_rotate_half)

from conftest import assert_close
from tolerances import assert_within_terms, product_terms
from npllm.equations import (apply_rope, apply_rope_interleaved, interleaved_to_half_rows,
                             rope_cos_sin, rope_inverse_frequencies, rotate_half,
                             sinusoidal_encoding, split_heads)

seeds = st.integers(0, 2**32 - 1)
head_dims = st.integers(1, 64).map(lambda n: 2 * n)
thetas = st.one_of(st.sampled_from([10000.0, 100000.0, 500000.0, 1e6]), st.floats(2.0, 1e7))
# Cosines and sines of the same float32 angles, from two libms: within a couple of ulp of 1.
TRIG_ATOL = 1e-6


def hf_rotary(head_dim, theta):
    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    return LlamaRotaryEmbedding(config)


def hf_cos_sin(positions, head_dim, theta):
    """HF cos, sin [B, T, Dh] for positions [B, T]."""
    rotary = hf_rotary(head_dim, theta)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions))
    return cos.numpy(), sin.numpy()


def randn(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's permute: HF rotate_half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def half_to_interleaved_columns(x):
    """The same permutation applied to the last axis of an activation (one head, width Dh)."""
    return x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2).swapaxes(-1, -2).reshape(x.shape)


# --- inverse frequencies, cos / sin ---------------------------------------------------------------

@given(head_dim=head_dims, theta=thetas)
def test_inverse_frequencies_match_hf_within_two_ulp(head_dim, theta):
    # torch's float32 pow (Sleef, 1 ulp) and our correctly rounded power may differ by 1 ulp;
    # the float32 reciprocal that follows can round that apart to 2 ulp.
    np.testing.assert_array_max_ulp(rope_inverse_frequencies(head_dim, theta),
                                    hf_rotary(head_dim, theta).inv_freq.numpy(), maxulp=2)


@pytest.mark.parametrize("head_dim, theta", [(64, 10000.0), (64, 100000.0), (128, 10000.0),
                                             (128, 500000.0), (64, 500000.0)])
def test_inverse_frequencies_equal_hf_bit_for_bit_for_common_models(head_dim, theta):
    # SmolLM2 (64, 1e5), Llama 2 (128, 1e4), Llama 3 (128, 5e5).
    np.testing.assert_array_equal(rope_inverse_frequencies(head_dim, theta),
                                  hf_rotary(head_dim, theta).inv_freq.numpy())


@given(seed=seeds, B=st.integers(1, 2), T=st.integers(1, 12), head_dim=head_dims, theta=thetas)
def test_cos_sin_match_llama_rotary_embedding(seed, B, T, head_dim, theta):
    positions = np.random.default_rng(seed).integers(0, 4096, size=(B, T))
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(head_dim, theta))
    hf_cos, hf_sin = hf_cos_sin(positions, head_dim, theta)
    # Angles p * omega up to ~4096 rad: a 1-ulp difference in omega moves them by up to
    # 4096 * 2^-24 ~ 2.4e-4 rad, and float32 p * omega itself is only that precise. Same order
    # as transformers' own float32 rounding, hence the looser tolerance here.
    assert_close(cos, hf_cos, rtol=0, atol=5e-4)
    assert_close(sin, hf_sin, rtol=0, atol=5e-4)


@given(seed=seeds, T=st.integers(1, 12), head_dim=head_dims)
def test_cos_sin_with_hf_frequencies_match_to_libm_precision(seed, T, head_dim):
    positions = np.random.default_rng(seed).integers(0, 4096, size=(1, T))
    rotary = hf_rotary(head_dim, 100000.0)
    cos, sin = rope_cos_sin(positions, rotary.inv_freq.numpy())
    hf_cos, hf_sin = hf_cos_sin(positions, head_dim, 100000.0)
    assert_close(cos, hf_cos, rtol=0, atol=TRIG_ATOL)
    assert_close(sin, hf_sin, rtol=0, atol=TRIG_ATOL)


# --- rotate_half, apply_rope (HF layout) ------------------------------------------------------------

@given(seed=seeds, lead=st.lists(st.integers(1, 3), max_size=3), head_dim=head_dims)
def test_rotate_half_equals_hf(seed, lead, head_dim):
    x = randn(seed, (*lead, head_dim))
    np.testing.assert_array_equal(rotate_half(x), hf_rotate_half(torch.from_numpy(x)).numpy())


@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 4), T=st.integers(1, 8), head_dim=head_dims,
       theta=thetas)
def test_apply_rope_equals_apply_rotary_pos_emb(seed, B, H, T, head_dim, theta):
    positions = np.random.default_rng(seed).integers(0, 2048, size=(B, T))
    cos, sin = hf_cos_sin(positions, head_dim, theta)  # same cos/sin on both sides
    q, k = randn(seed, (B, H, T, head_dim)), randn(seed + 1, (B, 1, T, head_dim))
    hf_q, hf_k = apply_rotary_pos_emb(*map(torch.from_numpy, (q, k, cos, sin)))
    # Same elementwise float32 operations in the same order: equal up to (at most) 1 ulp. The
    # two products may cancel, but both sides round the same products and sum (no fused
    # multiply-add in either): no cancellation error of one that the other lacks.
    assert_close(apply_rope(q, cos[:, None], sin[:, None]), hf_q.numpy(), rtol=1e-6, atol=1e-7)
    assert_close(apply_rope(k, cos[:, None], sin[:, None]), hf_k.numpy(), rtol=1e-6, atol=1e-7)


@given(seed=seeds, H=st.integers(1, 4), T=st.integers(1, 8), head_dim=head_dims)
def test_rope_pipeline_matches_hf_pipeline(seed, H, T, head_dim):
    positions = np.arange(T)[None] + np.random.default_rng(seed).integers(0, 100)
    cos, sin = rope_cos_sin(positions[0], rope_inverse_frequencies(head_dim, 100000.0))  # [T, Dh]
    q = randn(seed, (H, T, head_dim))
    hf_cos, hf_sin = hf_cos_sin(positions, head_dim, 100000.0)
    hf_q, _ = apply_rotary_pos_emb(torch.from_numpy(q[None]), torch.from_numpy(q[None]),
                                   torch.from_numpy(hf_cos), torch.from_numpy(hf_sin))
    # omega differs by up to 2 ulp, so angles at positions < 110 by up to ~1.3e-5 rad; times |x|
    # (standard normal, a few units at most) that is a few 1e-5 in the output.
    assert_close(apply_rope(q, cos, sin), hf_q[0].numpy(), rtol=1e-5, atol=1e-4)


def rope_case(seed=0, H=2, T=6, head_dim=8):
    positions = np.arange(T)[None] + 3  # nonzero angles: at position 0 every layout is the identity
    cos, sin = hf_cos_sin(positions, head_dim, 10000.0)
    q = randn(seed, (1, H, T, head_dim))
    hf_q, _ = apply_rotary_pos_emb(*map(torch.from_numpy, (q, q, cos, sin)))
    return q, cos[:, None], sin[:, None], hf_q.numpy()


def test_swapped_halves_do_not_match_hf():
    """Negative control: rotating the other way (halves swapped in rotate_half) is caught."""
    q, cos, sin, hf_q = rope_case()
    x1, x2 = np.split(q, 2, axis=-1)
    wrong = q * cos + np.concatenate([x2, -x1], axis=-1) * sin
    with pytest.raises(AssertionError):
        assert_close(wrong, hf_q, rtol=1e-5, atol=1e-5)


def test_interleaved_layout_on_hf_rows_does_not_match_hf():
    """Negative control (lit-llama's test): the interleaved layout on HF-ordered q is wrong."""
    q, cos, sin, hf_q = rope_case()
    with pytest.raises(AssertionError):
        assert_close(apply_rope_interleaved(q, cos, sin), hf_q, rtol=1e-5, atol=1e-5)


# --- the interleaved layout and llama.cpp's permutation ---------------------------------------------

@given(seed=seeds, H=st.integers(1, 4), T=st.integers(1, 8), head_dim=head_dims)
def test_interleaved_rope_on_interleaved_coordinates_equals_hf(seed, H, T, head_dim):
    positions = np.arange(T)[None] + np.random.default_rng(seed).integers(0, 1000)
    cos, sin = hf_cos_sin(positions, head_dim, 10000.0)
    q = randn(seed, (1, H, T, head_dim))
    hf_q, _ = apply_rotary_pos_emb(*map(torch.from_numpy, (q, q, cos, sin)))
    rotated = apply_rope_interleaved(half_to_interleaved_columns(q), cos[:, None], sin[:, None])
    # Same products and sums as HF, only the coordinates are stored in another order.
    assert_close(rotated, half_to_interleaved_columns(hf_q.numpy()), rtol=1e-6, atol=1e-7)


@given(seed=seeds, K=st.integers(1, 3), ratio=st.sampled_from([1, 3, 9]), head_dim=head_dims,
       D=st.integers(1, 16))
def test_interleaved_to_half_rows_undoes_llama_cpp_permute(seed, K, ratio, head_dim, D):
    H = K * ratio
    w_q, w_k = randn(seed, (H * head_dim, D)), randn(seed + 1, (K * head_dim, D))
    np.testing.assert_array_equal(interleaved_to_half_rows(llama_cpp_permute(w_q, H), H), w_q)
    np.testing.assert_array_equal(interleaved_to_half_rows(llama_cpp_permute(w_k, K), K), w_k)
    bias = randn(seed + 2, (K * head_dim,))
    np.testing.assert_array_equal(interleaved_to_half_rows(llama_cpp_permute(bias, K), K), bias)


@given(seed=seeds, K=st.integers(1, 3), ratio=st.sampled_from([1, 3, 9]), T=st.integers(2, 6),
       head_dim=st.sampled_from([4, 8, 16]))
def test_interleaved_layout_on_permuted_weights_gives_hf_attention_scores(seed, K, ratio, T, head_dim):
    """GGUF path (permuted rows + interleaved RoPE) == HF path (original rows + rotate_half)."""
    H, D = K * ratio, 8
    x = randn(seed, (T, D))
    w_q, w_k = randn(seed + 1, (H * head_dim, D)), randn(seed + 2, (K * head_dim, D))
    cos, sin = rope_cos_sin(np.arange(T) + 5, rope_inverse_frequencies(head_dim, 10000.0))

    def scores(q_rows, k_rows, rope):
        q = rope(split_heads(x @ q_rows.T, H), cos, sin)
        k = rope(split_heads(x @ k_rows.T, K), cos, sin)
        return q @ np.repeat(k, ratio, axis=0).swapaxes(-1, -2)

    hf = scores(w_q, w_k, apply_rope)
    gguf = scores(llama_cpp_permute(w_q, H), llama_cpp_permute(w_k, K), apply_rope_interleaved)
    # Dot products over Dh summed in another coordinate order: float32 reassociation only, but
    # a score may cancel, so its error is relative to its terms: |q| . |k|, each |q| a product
    # over D rotated on absolute values. Each side is within gamma_D + 2u (RoPE) + gamma_Dh of
    # them: 2 (D + Dh + 2) ulps between the two.
    def rotated_terms(x_w, n):
        size = split_heads(product_terms(x, x_w.T), n)
        return size * np.abs(cos) + np.abs(rotate_half(size)) * np.abs(sin)

    terms = rotated_terms(w_q, H) @ np.repeat(rotated_terms(w_k, K), ratio, axis=0).swapaxes(-1, -2)
    assert_within_terms(gguf, hf, terms, ulps=2 * (D + head_dim + 2), rtol=0)
    undone = scores(interleaved_to_half_rows(llama_cpp_permute(w_q, H), H),
                    interleaved_to_half_rows(llama_cpp_permute(w_k, K), K), apply_rope)
    np.testing.assert_array_equal(undone, hf)


def test_undoing_the_permutation_with_the_wrong_head_count_fails():
    """Negative control: attn_k must be un-permuted with K heads, not H (a known llama.cpp pitfall)."""
    H, K, head_dim, D = 9, 3, 8, 8
    w_k = randn(0, (K * head_dim, D))
    permuted = llama_cpp_permute(w_k, K)
    assert not np.array_equal(interleaved_to_half_rows(permuted, 1), w_k)
    with pytest.raises(ValueError, match="n_heads"):  # H = 9 does not even divide 24 rows into even heads
        interleaved_to_half_rows(permuted, H)
    w_q = randn(1, (H * head_dim, D))
    assert not np.array_equal(interleaved_to_half_rows(llama_cpp_permute(w_q, H), K), w_q)


# --- sinusoidal encoding (lecture 003) -------------------------------------------------------------

def torch_sinusoidal(n_positions, d_model, C):
    """Lecture 003's formula written in torch: PE[p, 2k] = sin(p / C^(2k/d)), PE[p, 2k+1] = cos(...)."""
    p = torch.arange(n_positions, dtype=torch.float32)[:, None]
    two_k = (torch.arange(d_model) // 2 * 2).to(torch.float32)
    angles = p / C ** (two_k / d_model)
    pe = torch.empty(n_positions, d_model)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angles[:, 0::2]), torch.cos(angles[:, 1::2])
    return pe.numpy()


@given(n_positions=st.integers(1, 128), d_model=st.integers(1, 96),
       C=st.one_of(st.sampled_from([10000.0, 1.0]), st.floats(1.0, 1e5)))
def test_sinusoidal_encoding_matches_formula_in_torch(n_positions, d_model, C):
    # Angles up to 127 rad; C^(2k/d) in float32 may differ by 1 ulp between libms, which moves
    # an angle by up to 127 * 2^-23 ~ 1.5e-5 rad.
    assert_close(sinusoidal_encoding(n_positions, d_model, C), torch_sinusoidal(n_positions, d_model, C),
                 rtol=0, atol=3e-5)


def test_sinusoidal_encoding_lecture_constants():
    # C = 1: every angle is the position itself (the lecture's choice for short examples).
    pe = sinusoidal_encoding(5, 4, C=1.0)
    p = np.arange(5, dtype=np.float32)
    assert_close(pe, np.stack([np.sin(p), np.cos(p), np.sin(p), np.cos(p)], axis=1))
    # C = 10000 (the paper): the last pair turns slowest, at 10000^(-2/4) = 0.01 rad per position.
    assert_close(sinusoidal_encoding(5, 4)[:, 2], np.sin(p * 0.01))
    assert math.isclose(float(sinusoidal_encoding(1, 6)[0, 1]), 1.0)


# --- invalid input ---------------------------------------------------------------------------------

def test_position_errors_name_the_argument():
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_inverse_frequencies(63, 10000.0)
    with pytest.raises(ValueError, match="theta must be positive"):
        rope_inverse_frequencies(64, 0.0)
    cos, sin = rope_cos_sin(np.arange(4), rope_inverse_frequencies(8, 10000.0))
    with pytest.raises(ValueError, match="x must have an even head width"):
        apply_rope(np.ones((4, 7), np.float32), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match=r"cos and sin must be \[\.\.\., T, Dh\] broadcastable to x"):
        apply_rope(np.ones((2, 5, 8), np.float32), cos, sin)
    with pytest.raises(ValueError, match="cos and sin must have the same shape"):
        apply_rope_interleaved(np.ones((4, 8), np.float32), cos, sin[:3])
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., T, Dh\]"):
        apply_rope(np.ones(8, np.float32), cos, sin)
    with pytest.raises(ValueError, match="x must have an even last axis"):
        rotate_half(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="n_heads must be a positive integer"):
        interleaved_to_half_rows(np.ones((8, 2)), 0)
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        sinusoidal_encoding(4, 0)
