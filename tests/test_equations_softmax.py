"""npllm.equations.softmax against torch.softmax, torch.log_softmax and F.linear."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st

from conftest import assert_close
from tolerances import assert_within_terms, product_terms
from npllm.equations import lm_head, log_softmax, softmax

seeds = st.integers(0, 2**32 - 1)
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(lambda s: (*s[:-1], s[-1] * 7))
scales = st.sampled_from([1e-3, 1.0, 30.0, 1e4])
EXTREMES = np.array([1e4, -1e4, -np.inf, np.finfo(np.float32).min], np.float32)


def logits(seed, shape, scale, extremes, axis=-1):
    """Random logits, some entries replaced by huge / -inf / float32-min values (never a whole row
    of -inf along ``axis``, which has no softmax)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if extremes:
        hit = rng.random(shape) < 0.3
        x[hit] = rng.choice(EXTREMES, size=int(hit.sum()))
        first = np.moveaxis(x, axis, 0)[:1]  # a view into x
        first[np.isneginf(first)] = 0.0
    return x


# One exp per entry, one sum per row: float32 results a few ulp apart; tiny probabilities below
# 1e-6 are judged in absolute terms.
SOFTMAX_TOL = dict(rtol=1e-5, atol=1e-6)


@given(seed=seeds, shape=shapes, scale=scales, extremes=st.booleans(), data=st.data())
@example(seed=1, shape=(2, 7), scale=1e4, extremes=True, data=None)
def test_softmax_matches_torch(seed, shape, scale, extremes, data):
    axis = -1 if data is None else data.draw(st.integers(-len(shape), len(shape) - 1))
    x = logits(seed, shape, scale, extremes, axis)
    p = softmax(x, axis=axis)
    assert_close(p, torch.softmax(torch.from_numpy(x), dim=axis).numpy(), **SOFTMAX_TOL)
    assert not np.isnan(p).any()
    assert_close(p.sum(axis=axis), 1.0, rtol=1e-5)


@given(seed=seeds, shape=shapes, scale=scales, extremes=st.booleans(), data=st.data())
def test_log_softmax_matches_torch(seed, shape, scale, extremes, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = logits(seed, shape, scale, extremes, axis)
    expected = torch.log_softmax(torch.from_numpy(x), dim=axis).numpy()
    actual = log_softmax(x, axis=axis)
    # Relative: log-probabilities of very unlikely tokens are huge (-2e4, -3.4e38) and only
    # float32-precise; they must also agree on -inf (an entry with probability exactly 0).
    assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_log_softmax_keeps_tiny_probabilities():
    """logsumexp form: log(softmax) would give -inf where the probability underflows."""
    x = np.array([0.0, -200.0], np.float32)
    assert_close(log_softmax(x), [0.0, -200.0])
    with np.errstate(divide="ignore"):
        assert np.isneginf(np.log(softmax(x)[1]))


def test_softmax_of_float32_min_row_is_uniform_not_nan():
    x = np.full((2, 5), np.finfo(np.float32).min, np.float32)
    assert_close(softmax(x), torch.softmax(torch.from_numpy(x), -1).numpy())
    assert_close(softmax(x), np.full((2, 5), 0.2, np.float32))


@given(seed=seeds, lead=st.lists(st.integers(1, 4), max_size=2), D=st.integers(1, 48), V=st.integers(1, 80))
def test_lm_head_matches_linear_and_softmax(seed, lead, D, V):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((*lead, D)).astype(np.float32)
    W = rng.standard_normal((V, D)).astype(np.float32)
    expected = F.linear(torch.from_numpy(c).double(), torch.from_numpy(W).double())
    # A dot product over D <= 48 terms of O(1) numbers, which may cancel: at most gamma_D of
    # the terms |c| |W|^T in any order (Higham 3.1), not of the logit; gamma_D < (D + 1) u.
    # (Measured: up to 0.99 of D u, for D = 1: one rounding.)
    terms = product_terms(c, W.T)
    assert_within_terms(lm_head(c, W), expected.numpy(), terms, ulps=D + 1, rtol=0)
    # A logit's absolute error e_v (<= D ulps of its terms) moves p_v by p_v (e_v - sum p e):
    # relative errors of the probabilities, on top of softmax's own few ulp (8 allowed).
    probs = torch.softmax(expected, -1).numpy()
    spread = terms + terms.max(axis=-1, keepdims=True)
    assert_within_terms(softmax(lm_head(c, W)), probs, probs * (D * spread + 8), ulps=1, rtol=0,
                        atol=1e-30)  # below 1e-30 a float32 probability is subnormal


def test_lecture_formula_without_exp_is_not_the_distribution():
    """Lecture 000 writes P = W_v . c / sum W_v' . c: not softmax, and not even a distribution."""
    rng = np.random.default_rng(0)
    c, W = rng.standard_normal(8).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
    scores = W @ c
    lecture = scores / scores.sum()
    assert (lecture < 0).any() or (lecture > 1).any()
    with pytest.raises(AssertionError):
        assert_close(lecture, torch.softmax(torch.from_numpy(scores), -1).numpy())


def test_softmax_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., V\]"):
        softmax(np.float32(1.0))
    with pytest.raises(ValueError, match=r"W must have shape \[V, D\] with D = 4"):
        lm_head(np.ones((2, 4), np.float32), np.ones((10, 5), np.float32))
    with pytest.raises(ValueError, match=r"W must have shape \[V, D\], got shape \(4,\)"):
        lm_head(np.ones((2, 4), np.float32), np.ones(4, np.float32))
