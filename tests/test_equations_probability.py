"""npllm.equations.probability against F.cross_entropy (the chain rule in log space, lecture 000;
perplexity and bits per byte, lecture 001)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from conftest import assert_close
from npllm.equations import (bits_per_byte, cross_entropy, perplexity, sequence_log_prob,
                             token_log_probs)

seeds = st.integers(0, 2**32 - 1)
scales = st.sampled_from([1e-2, 1.0, 10.0, 1e3])


def case(seed, B, T, V, scale):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((B, T, V)) * scale).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    return logits, targets


def torch_ce(logits, targets, reduction):
    B, T, V = logits.shape
    return F.cross_entropy(torch.from_numpy(logits).reshape(-1, V), torch.from_numpy(targets).reshape(-1),
                           reduction=reduction)


# log-softmax (a few ulp) of logits up to ~4000 in magnitude, then a pick or a sum over T <= 16:
# relative 1e-5, absolute 1e-4 for sums that cancel towards 0.
TOL = dict(rtol=1e-5, atol=1e-4)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 16), V=st.integers(1, 50), scale=scales)
def test_token_log_probs_match_negative_cross_entropy(seed, B, T, V, scale):
    logits, targets = case(seed, B, T, V, scale)
    expected = -torch_ce(logits, targets, "none").reshape(B, T).numpy()
    assert_close(token_log_probs(logits, targets), expected, **TOL)
    assert_close(token_log_probs(logits[0], targets[0]), expected[0], **TOL)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 16), V=st.integers(1, 50), scale=scales)
def test_sequence_log_prob_is_minus_summed_cross_entropy(seed, B, T, V, scale):
    logits, targets = case(seed, B, T, V, scale)
    expected = [-torch_ce(logits[b:b + 1], targets[b:b + 1], "sum").item() for b in range(B)]
    assert_close(sequence_log_prob(logits, targets), expected, **TOL)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 16), V=st.integers(2, 50), scale=scales)
def test_cross_entropy_and_perplexity_match_torch(seed, B, T, V, scale):
    logits, targets = case(seed, B, T, V, scale)
    loss = torch_ce(logits, targets, "mean")
    assert_close(cross_entropy(logits, targets), loss.item(), **TOL)
    # exp multiplies the loss's absolute error into a relative one: loss up to ~4000 would
    # overflow, so compare perplexity only where it is finite in float32.
    if loss.item() < 80:
        assert_close(perplexity(token_log_probs(logits, targets)), torch.exp(loss).item(), rtol=2e-4)


def test_chain_rule_product_of_conditionals():
    """log P(s) = sum log P(s_i | s_<i): the product of the conditionals, in log space."""
    logits, targets = case(0, 1, 5, 7, 1.0)
    p = torch.softmax(torch.from_numpy(logits[0]), -1).numpy()
    product = np.prod(p[np.arange(5), targets[0]])
    assert_close(np.exp(sequence_log_prob(logits[0], targets[0])), product, rtol=1e-5)


def test_uniform_model_has_perplexity_v():
    V = 17
    logits = np.zeros((4, V), np.float32)
    assert_close(perplexity(token_log_probs(logits, np.arange(4))), V, rtol=1e-5)


@given(total=st.floats(-1e6, 0.0), n_bytes=st.integers(1, 10**6))
def test_bits_per_byte_arithmetic(total, n_bytes):
    expected = (-torch.tensor(total, dtype=torch.float64) / (n_bytes * math.log(2))).item()
    # float32 result of a float64 formula: relative 1e-6 (plus the zero case).
    assert_close(bits_per_byte(total, n_bytes), expected, rtol=1e-6, atol=1e-12)


def test_probability_errors_name_the_argument():
    logits = np.zeros((2, 3, 5), np.float32)
    with pytest.raises(ValueError, match=r"targets must have shape \[\.\.\., T\] = \(2, 3\)"):
        token_log_probs(logits, np.zeros((2, 4), int))
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, V\) = \[0, 5\)"):
        token_log_probs(logits, np.full((2, 3), 5))
    with pytest.raises(ValueError, match=r"logits must have shape \[\.\.\., T, V\]"):
        sequence_log_prob(np.zeros(5), np.zeros(1, int))
    with pytest.raises(ValueError, match="n_bytes must be positive"):
        bits_per_byte(-10.0, 0)
    with pytest.raises(ValueError, match="token_log_probs must hold at least one"):
        perplexity(np.zeros(0))
