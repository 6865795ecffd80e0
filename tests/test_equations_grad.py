"""npllm.equations.grad against torch autograd: every backward function equals the gradient torch
computes (float64) through the same forward equation, over hypothesis-drawn shapes; and a wrong
variant of each (a dropped term, a wrong transpose) fails the same comparison.

The forward references are transformers' own pieces where they exist (``LlamaRMSNorm``,
``apply_rotary_pos_emb``, ``repeat_kv``, ``eager_attention_forward``'s formula) and torch's
functional ops otherwise. Inputs are float32 (what npllm computes in), promoted to float64 for
torch, so the reference is exact to ~1e-16 and the comparison measures npllm's float32 rounding.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

from npllm.equations import (apply_rope, apply_rope_backward, attention_pattern, causal_mask,
                             cross_entropy_backward, embedding_backward,
                             grouped_query_attention_backward, linear_backward, lm_head_backward,
                             repeat_kv, repeat_kv_backward, residual_backward, rms_norm_backward,
                             rope_cos_sin, rope_inverse_frequencies, rotate_half, silu,
                             silu_backward, softmax, softmax_backward, swiglu_backward)
from tolerances import U32, assert_within_terms, silu_derivative_terms

seeds = st.integers(0, 2**32 - 1)


def draw(seed, *shapes, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]


def torch_grads(f, *arrays, d_out):
    """The gradients of sum(f(*arrays) * d_out) with respect to each array, in float64."""
    xs = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    out = f(*xs)
    out.backward(torch.tensor(d_out, dtype=torch.float64))
    return [x.grad.numpy() for x in xs]


def term_sizes(f, *arrays, d_out):
    """For f linear in each input (a matrix product, a sum, a lookup), the gradients of
    sum(f(|arrays|) * |d_out|): each entry is the sum of the sizes of the terms that make that
    entry of the true gradient, the scale of its float32 rounding whatever cancels."""
    return torch_grads(f, *(np.abs(a) for a in arrays), d_out=np.abs(d_out))


def assert_grad_close(actual, expected, tol=1e-5, scale=None):
    """float32 against float64: each gradient entry is a sum of float32 products, whose rounding
    error is relative to the largest terms, not to the (possibly cancelling) sum; so the error
    allowed is tol times ``scale`` (the size of the terms; by default the largest entry of the
    exact gradient), plus tol relative. Measured errors are ~1e-7 to 1e-6 of that scale; a
    dropped term or a wrong transpose is off by order 1e-1 to 1 of it."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if scale is None:
        scale = np.max(np.abs(expected), initial=0.0)
    assert_within_terms(actual, expected, max(scale, 1e-30), ulps=tol / U32, rtol=tol)


# ---- cross-entropy through log-softmax and the LM head ----------------------------------------

@given(seed=seeds, T=st.integers(1, 12), V=st.integers(2, 50), scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_cross_entropy_backward_matches_autograd(seed, T, V, scale):
    (logits,) = draw(seed, (T, V), scale=scale)
    targets = np.random.default_rng(seed).integers(0, V, T)
    (expected,) = torch_grads(lambda z: F.cross_entropy(z, torch.from_numpy(targets)), logits,
                              d_out=np.float64(1.0))
    # softmax - one_hot: for a confident right answer, p - 1 cancels (p = 0.99995 in float32
    # is 1 - 5e-5 to within 6e-8): the error is relative to the terms, of size 1/N.
    assert_grad_close(cross_entropy_backward(logits, targets), expected, scale=1 / T)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 8), D=st.integers(1, 24), V=st.integers(2, 40))
def test_lm_head_backward_matches_autograd(seed, B, T, D, V):
    c, W, d_logits = draw(seed, (B, T, D), (V, D), (B, T, V))
    expected = torch_grads(lambda c, W: c @ W.T, c, W, d_out=d_logits)
    sizes = term_sizes(lambda c, W: c @ W.T, c, W, d_out=d_logits)
    for actual, exp, size in zip(lm_head_backward(d_logits, c, W), expected, sizes):
        assert_grad_close(actual, exp, scale=size.max())


@given(seed=seeds, lead=st.lists(st.integers(1, 4), min_size=1, max_size=2),
       n_in=st.integers(1, 32), n_out=st.integers(1, 32))
def test_linear_backward_matches_autograd(seed, lead, n_in, n_out):
    x, W, d_y = draw(seed, (*lead, n_in), (n_out, n_in), (*lead, n_out))
    expected = torch_grads(lambda x, W: F.linear(x, W), x, W, d_out=d_y)
    sizes = term_sizes(lambda x, W: F.linear(x, W), x, W, d_out=d_y)
    for actual, exp, size in zip(linear_backward(d_y, x, W), expected, sizes):
        assert_grad_close(actual, exp, scale=size.max())


# ---- embedding and residual ------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 16), V=st.integers(1, 10), D=st.integers(1, 16),
       pad=st.sampled_from([None, 0]))
def test_embedding_backward_matches_autograd(seed, B, T, V, D, pad):
    E, d_x = draw(seed, (V, D), (B, T, D))
    ids = np.random.default_rng(seed).integers(0, V, (B, T))  # small V: tokens repeat
    lookup = lambda E: F.embedding(torch.from_numpy(ids), E, padding_idx=pad)  # noqa: E731
    (expected,) = torch_grads(lookup, E, d_out=d_x)
    (size,) = term_sizes(lookup, E, d_out=d_x)  # a repeated token's positions may cancel
    assert_grad_close(embedding_backward(d_x, ids, V, padding_idx=pad), expected, scale=size.max())


@given(seed=seeds, T=st.integers(1, 8), D=st.integers(1, 16))
@example(seed=221808, T=2, D=1)
def test_residual_backward_matches_autograd(seed, T, D):
    x, W, d_out = draw(seed, (T, D), (D, D), (T, D))
    # x_out = x + f(x), f(x) = x W^T: d_x is d_out straight through plus d_out through f.
    W_t = torch.tensor(W, dtype=torch.float64)
    (expected,) = torch_grads(lambda x: x + x @ W_t.T, x, d_out=d_out)
    # The two paths may cancel (the dev profile found T = 2, D = 1: -6.1e-4 from terms of 0.5).
    size = np.abs(d_out) + np.abs(d_out) @ np.abs(W)
    d_x, d_f = residual_backward(d_out)
    assert_grad_close(d_x + linear_backward(d_f, x, W)[0], expected, scale=size.max())


# ---- RMSNorm -------------------------------------------------------------------------------

@given(seed=seeds, lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), D=st.integers(1, 64),
       scale=st.sampled_from([1e-3, 1.0, 1e2]), eps=st.sampled_from([1e-5, 1e-6]))
@example(seed=874, lead=[4], D=1, scale=0.001, eps=1e-06)
def test_rms_norm_backward_matches_autograd(seed, lead, D, scale, eps):
    x, w, d_y = draw(seed, (*lead, D), (D,), (*lead, D))
    x = x * np.float32(scale)
    expected = torch_grads(lambda x, w: rms_norm_torch(x, w, eps), x, w, d_out=d_y)
    d_x, d_w = rms_norm_backward(d_y, x, w, eps)
    # d_x is a difference of two terms of size r |d_y w| that cancel when d_y w is parallel to
    # x (always when D = 1): its rounding error is relative to those terms.
    r = 1 / np.sqrt(np.mean(np.float64(x) ** 2, -1, keepdims=True) + eps)
    assert_grad_close(d_x, expected[0], scale=np.max(np.abs(r * d_y * w)))
    # d_w sums d_y x_hat over the positions, which may cancel (the dev profile found 4
    # positions, D = 1: -2.5e-3 from terms of 1.7).
    terms = np.abs(d_y * r * x).reshape(-1, D).sum(axis=0)
    assert_grad_close(d_w, expected[1], scale=terms.max())


def rms_norm_torch(x, w, eps):
    """transformers' LlamaRMSNorm with the weight as a differentiable input."""
    module = LlamaRMSNorm(x.shape[-1], eps=eps).double()
    module.weight = torch.nn.Parameter(torch.ones_like(w))  # then scaled by w below
    return module(x) * w


# ---- RoPE ----------------------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 10),
       half=st.integers(1, 8), theta=st.sampled_from([10000.0, 100000.0]))
def test_apply_rope_backward_matches_autograd(seed, B, H, T, half, theta):
    Dh = 2 * half
    x, d_y = draw(seed, (B, H, T, Dh), (B, H, T, Dh))
    cos, sin = rope_cos_sin(np.arange(T)[None].repeat(B, 0), rope_inverse_frequencies(Dh, theta))
    cos_t, sin_t = torch.tensor(cos, dtype=torch.float64), torch.tensor(sin, dtype=torch.float64)
    (expected,) = torch_grads(lambda x: apply_rotary_pos_emb(x, x, cos_t, sin_t)[0], x, d_out=d_y)
    # d_y cos - rotate_half(d_y sin): the two terms may cancel.
    size = np.abs(d_y * cos[:, None]) + np.abs(rotate_half(d_y * sin[:, None]))
    assert_grad_close(apply_rope_backward(d_y, cos[:, None], sin[:, None]), expected, scale=size.max())


# ---- SiLU / SwiGLU -------------------------------------------------------------------------

@given(seed=seeds, n=st.integers(1, 64), scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]))
@example(seed=2390512, n=1, scale=1.0)  # x = -1.27975: SiLU' cancels to 1.5e-4 (see silu_terms)
def test_silu_backward_matches_autograd(seed, n, scale):
    x, d_y = draw(seed, (n,), (n,))
    x = x * np.float32(scale)
    (expected,) = torch_grads(F.silu, x, d_out=d_y)
    assert_grad_close(silu_backward(d_y, x), expected, scale=silu_terms(d_y, x))


def silu_terms(d_y, x):
    """The largest of :func:`tolerances.silu_derivative_terms`: the scale of the gradient's
    float32 rounding (the dev profile found x = -1.27975, a gradient of 1.5e-4 from terms of
    0.12)."""
    return np.max(silu_derivative_terms(d_y, x), initial=0.0)


@given(seed=seeds, T=st.integers(1, 8), Fw=st.integers(1, 32))
def test_swiglu_backward_matches_autograd(seed, T, Fw):
    gate, up, d_y = draw(seed, (T, Fw), (T, Fw), (T, Fw))
    expected = torch_grads(lambda g, u: F.silu(g) * u, gate, up, d_out=d_y)  # HF LlamaMLP's middle
    d_gate, d_up = swiglu_backward(d_y, gate, up)
    assert_grad_close(d_gate, expected[0], scale=silu_terms(d_y * up, gate))
    assert_grad_close(d_up, expected[1])


# ---- softmax and causal grouped-query attention --------------------------------------------

@given(seed=seeds, T=st.integers(1, 8), S=st.integers(1, 20))
def test_softmax_backward_matches_autograd(seed, T, S):
    s, d_p = draw(seed, (T, S), (T, S))
    (expected,) = torch_grads(lambda s: torch.softmax(s, -1), s, d_out=d_p)
    p = softmax(s)
    assert_grad_close(softmax_backward(d_p, p), expected, scale=softmax_terms(d_p, p).max())


def softmax_terms(d_p, p):
    """The size of the terms of p (d_p - sum(d_p p)), entry by entry."""
    return p * (np.abs(d_p) + np.sum(np.abs(d_p) * p, axis=-1, keepdims=True))


def hf_attention(q, k, v, mask, n_rep):
    """transformers' eager_attention_forward, the formula: repeat_kv, scores, softmax, @ v."""
    k, v = hf_repeat_kv(k, n_rep), hf_repeat_kv(v, n_rep)
    scores = q @ k.transpose(2, 3) * q.shape[-1] ** -0.5 + mask
    return torch.softmax(scores, dim=-1) @ v


@given(seed=seeds, B=st.integers(1, 2), K=st.integers(1, 3), G=st.integers(1, 3),
       T=st.integers(1, 9), past=st.integers(0, 4), Dh=st.integers(1, 16))
def test_grouped_query_attention_backward_matches_autograd(seed, B, K, G, T, past, Dh):
    S = T + past
    q, k, v, d_out = draw(seed, (B, K * G, T, Dh), (B, K, S, Dh), (B, K, S, Dh), (B, K * G, T, Dh))
    mask = causal_mask(T, S)
    expected = torch_grads(lambda q, k, v: hf_attention(q, k, v, torch.tensor(mask, dtype=torch.float64), G),
                           q, k, v, d_out=d_out)
    A = attention_pattern(q, repeat_kv(k, G), mask)
    sizes = attention_terms(d_out, q, k, v, A, G)
    for actual, exp, size in zip(grouped_query_attention_backward(d_out, q, k, v, A), expected, sizes):
        assert_grad_close(actual, exp, scale=size.max())


def attention_terms(d_out, q, k, v, A, G):
    """The size of the terms of each gradient of attention: the backward pass of
    :func:`~npllm.equations.attention_backward` on absolute values, the softmax's difference
    replaced by the sum of its terms."""
    k, v = np.abs(repeat_kv(k, G)), np.abs(repeat_kv(v, G))
    d_scores = softmax_terms(np.abs(d_out) @ np.swapaxes(v, -1, -2), A) * q.shape[-1] ** -0.5
    d_q = d_scores @ k
    d_k = repeat_kv_backward(np.swapaxes(d_scores, -1, -2) @ np.abs(q), G)
    d_v = repeat_kv_backward(np.swapaxes(A, -1, -2) @ np.abs(d_out), G)
    return d_q, d_k, d_v


@given(seed=seeds, K=st.integers(1, 3), G=st.integers(1, 4), S=st.integers(1, 6), Dh=st.integers(1, 8))
def test_repeat_kv_backward_matches_autograd(seed, K, G, S, Dh):
    x, d_y = draw(seed, (1, K, S, Dh), (1, K * G, S, Dh))
    (expected,) = torch_grads(lambda x: hf_repeat_kv(x, G), x, d_out=d_y)
    (size,) = term_sizes(lambda x: hf_repeat_kv(x, G), x, d_out=d_y)
    assert_grad_close(repeat_kv_backward(d_y, G), expected, scale=size.max())


# ---- negative controls: a wrong gradient fails the same comparison ---------------------------

def _wrong_cross_entropy():
    logits, = draw(1, (6, 9))
    targets = np.arange(6) % 9
    (exp,) = torch_grads(lambda z: F.cross_entropy(z, torch.from_numpy(targets)), logits, d_out=np.float64(1.0))
    return softmax(logits) / 6, exp  # the "- one_hot" term dropped


def _wrong_rms_norm():
    x, w, d_y = draw(2, (5, 16), (16,), (5, 16))
    exp = torch_grads(lambda x, w: rms_norm_torch(x, w, 1e-6), x, w, d_out=d_y)[0]
    r = 1 / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
    return r * d_y * w, exp  # the path through r (the mean term) dropped


def _wrong_rope():
    x, d_y = draw(3, (1, 2, 6, 8), (1, 2, 6, 8))
    cos, sin = rope_cos_sin(np.arange(6)[None], rope_inverse_frequencies(8, 10000.0))
    ct, st_ = torch.tensor(cos, dtype=torch.float64), torch.tensor(sin, dtype=torch.float64)
    (exp,) = torch_grads(lambda x: apply_rotary_pos_emb(x, x, ct, st_)[0], x, d_out=d_y)
    return apply_rope(d_y, cos[:, None], sin[:, None]), exp  # R instead of its transpose


def _wrong_silu():
    x, d_y = draw(4, (32,), (32,))
    (exp,) = torch_grads(F.silu, x * 3, d_out=d_y)
    return d_y / (1 + np.exp(-x * 3)), exp  # sigma alone: the x sigma (1 - sigma) term dropped


def _wrong_attention():
    q, k, v, d_out = draw(5, (1, 4, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 4, 5, 8))
    mask = causal_mask(5)
    exp = torch_grads(lambda q, k, v: hf_attention(q, k, v, torch.tensor(mask, dtype=torch.float64), 2),
                      q, k, v, d_out=d_out)[1]
    A = attention_pattern(q, repeat_kv(k, 2), mask)
    d_scores = softmax_backward(d_out @ np.swapaxes(repeat_kv(v, 2), -1, -2), A) * 8 ** -0.5
    return repeat_kv_backward(d_scores @ q, 2), exp  # d_K = dS Q: the transpose of dS missing


def _wrong_embedding():
    E, d_x = draw(6, (4, 3), (1, 10, 3))
    ids = np.array([[0, 1, 1, 2, 3, 3, 3, 0, 2, 1]])
    (exp,) = torch_grads(lambda E: F.embedding(torch.from_numpy(ids), E), E, d_out=d_x)
    wrong = np.zeros((4, 3), np.float32)
    wrong[ids[0]] = d_x[0]  # assignment: a repeated token keeps only its last position's gradient
    return wrong, exp


def _wrong_linear():
    x, W, d_y = draw(7, (5, 6), (6, 6), (5, 6))
    exp = torch_grads(lambda x, W: F.linear(x, W), x, W, d_out=d_y)[1]
    return x.T @ d_y, exp  # d_W transposed


def _wrong_repeat_kv():
    x, d_y = draw(8, (1, 2, 4, 3), (1, 6, 4, 3))
    (exp,) = torch_grads(lambda x: hf_repeat_kv(x, 3), x, d_out=d_y)
    return d_y[:, ::3], exp  # only the first query head of each group


@pytest.mark.parametrize("wrong", [_wrong_cross_entropy, _wrong_rms_norm, _wrong_rope, _wrong_silu,
                                   _wrong_attention, _wrong_embedding, _wrong_linear,
                                   _wrong_repeat_kv])
def test_a_wrong_gradient_fails(wrong):
    actual, expected = wrong()
    with pytest.raises(AssertionError):
        assert_grad_close(actual, expected)


def test_rotate_half_is_what_rope_backward_undoes():
    """RoPE then its backward is the identity: a rotation's transpose is its inverse."""
    x, = draw(9, (3, 7, 8))
    cos, sin = rope_cos_sin(np.arange(7), rope_inverse_frequencies(8, 10000.0))
    np.testing.assert_allclose(apply_rope_backward(apply_rope(x, cos, sin), cos, sin), x,
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(rotate_half(x), x)


def test_silu_backward_keeps_float32_and_is_finite_far_out():
    x = np.array([-1000.0, -90.0, 0.0, 90.0, 1000.0], np.float32)
    g = silu_backward(np.ones_like(x), x)
    assert g.dtype == np.float32 and np.all(np.isfinite(g))
    assert silu(x).dtype == np.float32
