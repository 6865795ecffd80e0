"""The training engine's kernels (npllm.kernels.training) against the equations they twin, on
hypothesis-drawn shapes and values, each run on two row ranges (as the engine's threads split
them), with a negative control: a kernel compared with a wrong variant of its equation fails.

Tolerances, float32: the kernels do the equations' float32 operations in the same order except
that row sums are kept in float64 and e^x is ``_math.exp32`` (1 ulp) where NumPy's is 2 ulp, so
single results agree to a few ulp (rtol 1e-5); a gradient whose entries are differences of
nearly equal terms (softmax - one_hot, d_x_hat - x_hat mean) is compared with an absolute
tolerance on the scale of its terms (atol 1e-6 x the largest term).
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npllm import equations as E
from npllm.kernels import training as KT
from tolerances import assert_within_terms, silu_derivative_terms

RTOL = 1e-5


def rand(seed, *shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def in_two(N, cut, fn):
    """Call fn(a, b) on rows [0, cut) and [cut, N), as two threads would."""
    cut = min(cut, N)
    fn(0, cut)
    fn(cut, N)


seeds = st.integers(0, 2**32 - 1)


@given(seed=seeds, N=st.integers(1, 12), D=st.integers(1, 40), cut=st.integers(0, 12))
def test_rms_norm_rows_equals_rms_norm(seed, N, D, cut):
    x, w = rand(seed, N, D, scale=3.0), rand(seed + 1, D)
    out = np.empty_like(x)
    in_two(N, cut, lambda a, b: KT.rms_norm_rows(x, w, np.float32(1e-6), out, a, b))
    # A sum of squares (nothing cancels) then products: relative errors, rtol.
    np.testing.assert_allclose(out, E.rms_norm(x, w, 1e-6), rtol=RTOL, atol=1e-6)


@given(seed=seeds, N=st.integers(1, 12), F=st.integers(1, 40), cut=st.integers(0, 12))
def test_swiglu_rows_equals_swiglu(seed, N, F, cut):
    gate_up = rand(seed, N, 2 * F, scale=4.0)
    out = np.empty((N, F), np.float32)
    in_two(N, cut, lambda a, b: KT.swiglu_rows(gate_up, out, a, b))
    # Products, no sum: relative errors only (atol for SiLU's underflow to 0 below g = -88).
    np.testing.assert_allclose(out, E.swiglu(gate_up[:, :F], gate_up[:, F:]), rtol=RTOL, atol=1e-6)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 9), H=st.integers(1, 3),
       K=st.integers(1, 2), half=st.integers(1, 8), cut=st.integers(0, 27),
       theta=st.sampled_from([10000.0, 500000.0]))
def test_rope_rows_equals_apply_rope_and_its_backward(seed, B, T, H, K, half, cut, theta):
    Dh = 2 * half
    y = rand(seed, B * T, (H + 2 * K) * Dh)
    cos, sin = E.rope_cos_sin(np.arange(T)[None], E.rope_inverse_frequencies(Dh, theta))
    cos, sin = np.ascontiguousarray(cos[0]), np.ascontiguousarray(sin[0])

    def heads(a, n, first):  # rows [N, width] -> [B, n, T, Dh] of the heads from `first`
        return a[:, first * Dh:(first + n) * Dh].reshape(B, T, n, Dh).transpose(0, 2, 1, 3)
    for sign, equation in ((1, E.apply_rope), (-1, lambda x, c, s: E.apply_rope_backward(x, c, s))):
        out = y.copy()
        in_two(B * T, cut, lambda a, b: KT.rope_rows(out, cos, sign * sin, H + K, Dh, T, a, b))
        for first, n in ((0, H), (H, K)):  # the query heads, the key heads: rotated
            # The same products and sums as the equation: equal, not merely close.
            np.testing.assert_array_equal(heads(out, n, first), equation(heads(y, n, first), cos, sin))
        np.testing.assert_array_equal(out[:, (H + K) * Dh:], y[:, (H + K) * Dh:])  # v: untouched


@given(seed=seeds, T=st.integers(1, 20), Dh=st.integers(1, 16), cut=st.integers(0, 20),
       scale=st.sampled_from([1.0, 10.0]))
def test_causal_softmax_rows_equals_attention_pattern(seed, T, Dh, cut, scale):
    q, k = rand(seed, T, Dh, scale=scale), rand(seed + 1, T, Dh, scale=scale)
    scores = q @ k.T
    in_two(T, cut, lambda a, b: KT.causal_softmax_rows(scores, np.float32(Dh ** -0.5), a, b))
    expected = E.attention_pattern(q, k, E.causal_mask(T))
    # Both take the same float32 q k^T and scale it alike: only the exp and the row sum of
    # positive terms differ, relative errors of each probability (a cancelling score is shared).
    np.testing.assert_allclose(scores, expected, rtol=RTOL, atol=1e-7)


@given(seed=seeds, T=st.integers(1, 20), cut=st.integers(0, 20))
def test_softmax_backward_rows_equals_softmax_backward(seed, T, cut):
    q, k = rand(seed, T, 8), rand(seed + 1, T, 8)
    pattern = E.attention_pattern(q, k, E.causal_mask(T))
    d_pattern = rand(seed + 2, T, T)
    scale = np.float32(8 ** -0.5)
    expected = E.softmax_backward(d_pattern, pattern) * scale
    out = d_pattern.copy()
    in_two(T, cut, lambda a, b: KT.softmax_backward_rows(out, pattern, scale, a, b))
    # A difference of two terms of the size of d_pattern * pattern: absolute on that scale.
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-6 * np.abs(d_pattern).max())


@given(seed=seeds, N=st.integers(1, 10), V=st.integers(2, 300), cut=st.integers(0, 10),
       scale=st.sampled_from([1.0, 30.0]))
def test_cross_entropy_rows_equals_log_probs_and_cross_entropy_backward(seed, N, V, cut, scale):
    logits = rand(seed, N, V, scale=scale)
    targets = np.random.default_rng(seed).integers(0, V, N)
    d_logits, log_probs = logits.copy(), np.empty(N, np.float32)
    in_two(N, cut, lambda a, b: KT.cross_entropy_rows(d_logits, targets, N, log_probs, a, b))
    np.testing.assert_allclose(log_probs, E.token_log_probs(logits, targets), rtol=RTOL,
                               atol=1e-5)  # log P near 0: absolute, float32 eps of the logsumexp
    # softmax - one_hot: differences next to 1 at the target; each term within 1e-5 relative.
    np.testing.assert_allclose(d_logits, E.cross_entropy_backward(logits, targets), rtol=RTOL,
                               atol=1e-6 / N)


@given(seed=seeds, N=st.integers(1, 10), F=st.integers(1, 40), cut=st.integers(0, 10))
def test_swiglu_backward_rows_equals_swiglu_backward(seed, N, F, cut):
    gate_up, d_out = rand(seed, N, 2 * F, scale=4.0), rand(seed + 1, N, F)
    d_gate, d_up = E.swiglu_backward(d_out, gate_up[:, :F], gate_up[:, F:])
    out = gate_up.copy()
    in_two(N, cut, lambda a, b: KT.swiglu_backward_rows(d_out, out, a, b))
    # SiLU' cancels near g = -1.278, where sigma's two evaluations (exp32, NumPy's exp: <= 3 ulp
    # apart) and the bracket's roundings differ by a few ulp of the terms, not of the result:
    # ~10 ulps of the terms at worst, 16 allowed. d_up = d g sigma is a product: no cancellation.
    assert_within_terms(out[:, :F], d_gate, silu_derivative_terms(d_out * gate_up[:, F:],
                                                                  gate_up[:, :F]), ulps=16, rtol=RTOL)
    np.testing.assert_allclose(out[:, F:], d_up, rtol=RTOL, atol=1e-6)


@given(seed=seeds, N=st.integers(1, 10), D=st.integers(1, 40), cut=st.integers(0, 10))
def test_rms_norm_backward_rows_equals_rms_norm_backward(seed, N, D, cut):
    x, w, d_y = rand(seed, N, D, scale=3.0), rand(seed + 1, D), rand(seed + 2, N, D)
    running = rand(seed + 3, N, D)  # the residual stream's gradient, which d_x is added to
    d_x, d_w = E.rms_norm_backward(d_y, x, w, 1e-6)
    out, partial = running.copy(), np.zeros((2, D), np.float32)
    parts = iter(partial)
    in_two(N, cut, lambda a, b: KT.rms_norm_backward_rows(d_y, x, w, np.float32(1e-6), out,
                                                           next(parts), a, b))
    # d_x is r (d_x_hat - x_hat mean): a difference of terms of size |d_y w| r.
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    term = np.abs(d_y * w).max() * r.max()
    np.testing.assert_allclose(out, running + d_x, rtol=RTOL, atol=1e-6 * term)
    # d_w sums N products: float32 sums in another order than NumPy's pairwise one.
    np.testing.assert_allclose(partial.sum(axis=0), d_w, rtol=RTOL,
                               atol=1e-6 * N * np.abs(d_y * x * r).max())


def test_a_dropped_term_is_caught():
    """Negative control: RMSNorm's backward without the path through r (d_x = r w d_y) and
    SwiGLU's without SiLU's derivative differ from the kernels by far more than the tolerances."""
    x, w, d_y = rand(0, 6, 16, scale=3.0), rand(1, 16), rand(2, 6, 16)
    out, partial = np.zeros_like(x), np.zeros(16, np.float32)
    KT.rms_norm_backward_rows(d_y, x, w, np.float32(1e-6), out, partial, 0, 6)
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(out, r * d_y * w, rtol=RTOL, atol=1e-6)
    gate_up, d_out = rand(3, 4, 32, scale=4.0), rand(4, 4, 16)
    out = gate_up.copy()
    KT.swiglu_backward_rows(d_out, out, 0, 4)
    wrong = d_out * gate_up[:, 16:] * E.silu(gate_up[:, :16]) / gate_up[:, :16]  # sigma only
    terms = silu_derivative_terms(d_out * gate_up[:, 16:], gate_up[:, :16])
    with pytest.raises(AssertionError):
        assert_within_terms(out[:, :16], wrong, terms, ulps=16, rtol=RTOL)
    with pytest.raises(AssertionError):  # by a wide margin: 100 times the bound
        assert_within_terms(out[:, :16], wrong, terms, ulps=1600, rtol=100 * RTOL)
