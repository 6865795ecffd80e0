"""Tolerances at the size of a float32 result's terms.

Float32 rounds a sum relative to the size of its terms, not to the sum: a dot product of terms
of ~300 that cancel to -0.24 is off by a few ulp of 300, which a fixed ``atol`` or an ``rtol`` of
the result calls a failure. So the comparisons here allow ``ulps`` units of float32 rounding
(``U32``) of the terms' size, computed in float64 on absolute values (``|W| @ |x|`` for ``W @ x``),
plus a small relative tolerance. The worst case for a sum of n terms is gamma_n = n u of the
terms (Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1); errors are usually a few
u, so each caller states the ``ulps`` it allows and why.
"""
import numpy as np

U32 = 2.0**-24  # float32's unit roundoff: the largest relative error of one rounding


def absolute(a):
    """|a| in float64."""
    return np.abs(np.asarray(a, dtype=np.float64))


def product_terms(a, b):
    """|a| @ |b| in float64: for each entry of ``a @ b``, the sum of the sizes of its terms."""
    return absolute(a) @ absolute(b)


def within_terms(actual, expected, terms, ulps, rtol=1e-5, atol=0.0):
    """Entry by entry: is |actual - expected| <= rtol |expected| + ulps U32 terms + atol?"""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    allowed = rtol * np.abs(expected) + ulps * U32 * np.asarray(terms) + atol
    return np.abs(actual - expected) <= allowed


def assert_within_terms(actual, expected, terms, ulps, rtol=1e-5, atol=0.0, err_msg=""):
    """Fail with the worst entry unless every entry is within ``ulps`` of its terms' size."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    ok = within_terms(actual, expected, terms, ulps, rtol, atol)
    if not ok.all():
        terms = np.broadcast_to(np.asarray(terms, np.float64), ok.shape)
        i = np.unravel_index(np.argmin(ok), ok.shape)
        raise AssertionError(
            f"{err_msg} {np.count_nonzero(~ok)} of {ok.size} entries off; at {i}: "
            f"{actual[i]!r} vs {expected[i]!r}, terms {terms[i]:.4g}, error "
            f"{abs(float(actual[i]) - float(expected[i])) / (U32 * max(terms[i], 1e-300)):.3g} "
            f"ulps of the terms (allowed {ulps} + rtol {rtol})")


def silu_derivative_terms(d_y, x):
    r"""The size of the terms of :math:`\bar y\,\sigma(x)\,(1 + x(1 - \sigma(x)))` (SiLU's
    backward), entry by entry: the scale of its float32 rounding. SiLU' crosses zero at
    x = -1.278..., where 1 and x (1 - sigma) cancel: there the gradient is far smaller than its
    terms, and its rounding is relative to the terms, not to the result."""
    x = np.asarray(x, np.float64)
    sigma = 1.0 / (1.0 + np.exp(-x))
    return np.abs(d_y) * sigma * (1.0 + np.abs(x) * (1.0 - sigma))


def attention_terms(q, k, v, mask=None):
    r"""The sizes of the terms of attention's pattern P = softmax(q k^T / \sqrt{Dh} + mask) and
    output P v, as (pattern, output), for q [..., T, Dh], k and v [..., S, Dh] (heads repeated).

    Each score s_j is a dot product with terms of size S_j = |q| . |k_j| / \sqrt{Dh}; an error
    e_j in the scores moves P_j by P_j (e_j - sum_l P_l e_l), so the pattern's error is on the
    scale of P_j (1 + S_j + sum_l P_l S_l) (the 1 for exp, the sum and the division), and the
    output's, a sum of P_j v_j, on the scale of that times |v| summed over j."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5
    scores = q @ np.swapaxes(k, -1, -2) * scale
    if mask is not None:
        scores = scores + np.asarray(mask, np.float64)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    sizes = np.abs(q) @ np.swapaxes(np.abs(k), -1, -2) * scale
    pattern = p * (1.0 + sizes + np.sum(p * sizes, axis=-1, keepdims=True))
    return pattern, pattern @ np.abs(v)


def layer_norm_rounding(x, w, b, eps, y):
    """How far a float32 LayerNorm may be from the exact one, per row. The mean is a float32
    sum of D <= 64 values, off by a few ulp of the largest |x| (pairwise summation: at most
    log2(D) + 1 = 7); x - mean carries that error, which the division by sigma and the
    multiplication by w scale by max|x| / sigma * max|w|; the last multiply-add rounds at the
    size of the output and of b (None: no bias). 8 ulp of that sum: torch's own float32
    layer_norm errs by up to 2 (and npllm's by 2.3) over 3,000 random draws of
    test_equations_norm's inputs, a missing Bessel correction or a misplaced eps by thousands."""
    x = x.astype(np.float64)
    b = 0.0 if b is None else b
    sigma = np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    size = (np.abs(x).max(axis=-1, keepdims=True) / sigma * np.abs(w).max()
            + np.abs(y).max(axis=-1, keepdims=True) + np.abs(b).max())
    return 8 * U32 * size
