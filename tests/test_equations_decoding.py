"""npllm.equations.decoding against transformers' logits processors (TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper), torch.argmax and torch's inverse-CDF sampling."""
import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, strategies as st
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from conftest import assert_close
from npllm.equations import (apply_temperature, filter_logits, greedy, sample, softmax, top_k_filter,
                             top_p_filter)

seeds = st.integers(0, 2**32 - 1)
top_ps = st.one_of(st.sampled_from([0.9, 0.5, 1.0]), st.floats(0.01, 1.0))
EXTREMES = np.array([1e4, -1e4, -np.inf], np.float32)


def random_logits(seed, B, V, ties, extremes=False):
    """[B, V] logits; with ``ties``, few distinct values (many equal logits); with ``extremes``,
    some 1e4 / -1e4 / -inf entries (never a whole row of -inf)."""
    rng = np.random.default_rng(seed)
    if ties:
        x = (rng.integers(-3, 4, size=(B, V)) * rng.uniform(0.25, 3.0)).astype(np.float32)
    else:
        x = (rng.standard_normal((B, V)) * rng.uniform(0.5, 5.0)).astype(np.float32)
    if extremes:
        hit = rng.random((B, V)) < 0.2
        x[hit] = rng.choice(EXTREMES, size=int(hit.sum()))
        x[:, 0] = np.where(np.isneginf(x[:, 0]), 0.0, x[:, 0])
    return x


def hf(warper, logits):
    return warper(None, torch.from_numpy(logits)).numpy()


def clear_of_the_cut(logits, top_p, margin=1e-6):
    """No sorted cumulative probability within ``margin`` of 1 - top_p: there the last-ulp
    differences between NumPy's and torch's exp may legitimately move the cut (zero
    probabilities, exactly equal on both sides, are fine)."""
    cumulative = torch.sort(torch.from_numpy(logits))[0].softmax(-1).cumsum(-1).numpy()
    near = np.abs(cumulative - np.float32(1 - top_p)) < margin
    return not (near & (cumulative != 0)).any()


# --- greedy, temperature ------------------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 3), V=st.integers(1, 40), ties=st.booleans(), extremes=st.booleans())
def test_greedy_equals_torch_argmax_first_of_ties(seed, B, V, ties, extremes):
    x = random_logits(seed, B, V, ties, extremes)
    np.testing.assert_array_equal(greedy(x), torch.argmax(torch.from_numpy(x), -1).numpy())


@given(seed=seeds, B=st.integers(1, 3), V=st.integers(1, 40), extremes=st.booleans(),
       temperature=st.one_of(st.sampled_from([0.2, 0.7, 1.0, 1.5]), st.floats(1e-3, 100.0)))
def test_temperature_matches_temperature_logits_warper(seed, B, V, extremes, temperature):
    x = random_logits(seed, B, V, False, extremes)
    # One float32 division on both sides (by the temperature rounded to float32): equal to 1 ulp.
    assert_close(apply_temperature(x, temperature), hf(TemperatureLogitsWarper(temperature), x),
                 rtol=1.2e-7, atol=0)


# --- top-k ----------------------------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 3), V=st.integers(1, 40), ties=st.booleans(), extremes=st.booleans(),
       k=st.integers(1, 45))
@example(seed=0, B=1, V=10, ties=True, extremes=False, k=3)
def test_top_k_matches_top_k_logits_warper_ties_included(seed, B, V, ties, extremes, k):
    x = random_logits(seed, B, V, ties, extremes)
    # Only comparisons, no arithmetic: identical, ties (several logits equal to the k-th) included.
    np.testing.assert_array_equal(top_k_filter(x, k), hf(TopKLogitsWarper(k), x))
    np.testing.assert_array_equal(top_k_filter(x, k, filter_value=-1e9),
                                  hf(TopKLogitsWarper(k, filter_value=-1e9), x))


def test_top_k_keeps_every_token_tied_with_the_kth():
    x = np.array([3.0, 1.0, 2.0, 2.0, 2.0, 0.0], np.float32)
    kept = np.isfinite(top_k_filter(x, 2))
    np.testing.assert_array_equal(kept, [True, False, True, True, True, False])


# --- top-p ----------------------------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 3), V=st.integers(1, 16), extremes=st.booleans(), top_p=top_ps,
       min_keep=st.integers(1, 4))
def test_top_p_matches_top_p_logits_warper_with_ties_up_to_v16(seed, B, V, extremes, top_p, min_keep):
    """Up to 16 entries torch.sort is a stable insertion sort: ties fall exactly as ours."""
    x = random_logits(seed, B, V, True, extremes)
    assume(clear_of_the_cut(x, top_p))
    np.testing.assert_array_equal(top_p_filter(x, top_p, min_keep),
                                  hf(TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep), x))


@given(seed=seeds, B=st.integers(1, 3), V=st.integers(1, 300), extremes=st.booleans(), top_p=top_ps,
       min_keep=st.integers(1, 4))
@example(seed=3, B=1, V=300, extremes=False, top_p=0.9, min_keep=1)
def test_top_p_matches_top_p_logits_warper_distinct_logits(seed, B, V, extremes, top_p, min_keep):
    x = random_logits(seed, B, V, False, extremes)
    finite = x[np.isfinite(x)]
    assume(len(np.unique(finite)) == len(finite))  # ties are the next test's business
    assume(clear_of_the_cut(x, top_p))
    np.testing.assert_array_equal(top_p_filter(x, top_p, min_keep),
                                  hf(TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep), x))


@given(seed=seeds, B=st.integers(1, 3), V=st.integers(17, 300), top_p=top_ps)
def test_top_p_with_ties_keeps_the_same_logit_values(seed, B, V, top_p):
    """Past 16 entries torch.sort is unstable: which of several tied tokens straddling the cut is
    dropped is unspecified in transformers, but how many, and with which logit, is not."""
    x = random_logits(seed, B, V, True)
    assume(clear_of_the_cut(x, top_p))
    ours, theirs = top_p_filter(x, top_p), hf(TopPLogitsWarper(top_p), x)
    for row_ours, row_theirs in zip(ours, theirs):
        np.testing.assert_array_equal(np.sort(row_ours), np.sort(row_theirs))


def test_top_p_keeps_at_least_top_p_of_the_mass():
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    np.testing.assert_array_equal(np.isfinite(top_p_filter(x, 0.8)), [True, True, False, False])
    np.testing.assert_array_equal(np.isfinite(top_p_filter(x, 0.81)), [True, True, True, False])
    np.testing.assert_array_equal(np.isfinite(top_p_filter(x, 0.1, min_tokens_to_keep=2)),
                                  [True, True, False, False])


# --- the chain, as generate() builds it -------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 2), V=st.integers(1, 100), top_p=top_ps,
       temperature=st.sampled_from([0.2, 0.7, 1.0, 1.3]), top_k=st.sampled_from([0, 1, 5, 50]))
def test_filter_logits_matches_generate_warper_chain(seed, B, V, top_p, temperature, top_k):
    x = random_logits(seed, B, V, False)
    warpers = LogitsProcessorList(
        ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    before_top_p = x / np.float32(temperature)
    assume(clear_of_the_cut(top_k_filter(before_top_p, top_k) if top_k else before_top_p, top_p))
    # Temperature's single division may differ by 1 ulp; the filters then cut identically.
    assert_close(filter_logits(x, temperature, top_k, top_p), hf(warpers, x), rtol=1.2e-7, atol=0)


# --- sampling -------------------------------------------------------------------------------------

@given(seed=seeds, B=st.integers(1, 3), V=st.integers(1, 60), extremes=st.booleans())
def test_sample_is_torch_inverse_cdf_on_the_same_uniforms(seed, B, V, extremes):
    x = random_logits(seed, B, V, False, extremes)
    u = np.random.default_rng(seed).random(B)
    cdf = torch.softmax(torch.from_numpy(x), -1).to(torch.float64).cumsum(-1)
    threshold = torch.from_numpy(u)[:, None] * cdf[:, -1:]
    # As above: a uniform within float32 noise of a CDF step may fall either side of it.
    assume((cdf - threshold).abs().min() > 1e-5)
    expected = torch.searchsorted(cdf, threshold, right=True)[:, 0].numpy()
    np.testing.assert_array_equal(sample(x, np.random.default_rng(seed)), expected)


@given(seed=seeds, V=st.integers(2, 40), k=st.integers(1, 5))
def test_sample_never_draws_a_filtered_token_and_is_reproducible(seed, V, k):
    x = top_k_filter(random_logits(seed, 1, V, False)[0], k)
    draws = sample(np.broadcast_to(x, (500, V)), np.random.default_rng(seed))
    assert np.isfinite(x[draws]).all()
    np.testing.assert_array_equal(draws, sample(np.broadcast_to(x, (500, V)), np.random.default_rng(seed)))


def test_sample_frequencies_follow_torch_softmax():
    x = np.array([2.0, 1.0, 0.5, -1.0, -np.inf, 0.0], np.float32)
    p = torch.softmax(torch.from_numpy(x), -1).numpy()
    N = 40_000
    counts = np.bincount(sample(np.broadcast_to(x, (N, 6)), np.random.default_rng(0)), minlength=6)
    # 5 standard deviations of a binomial frequency: fails by chance with probability < 1e-5.
    assert (np.abs(counts / N - p) <= 5 * np.sqrt(p * (1 - p) / N)).all()
    assert counts[4] == 0


def test_sample_one_row_gives_a_scalar_and_a_one_hot_row_its_token():
    x = np.full(10, -np.inf, np.float32)
    x[7] = 0.0
    assert int(sample(x, np.random.default_rng(1))) == 7
    assert np.shape(sample(x, np.random.default_rng(1))) == ()


# --- invalid input --------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda x: apply_temperature(x, 0.0), r"temperature must be > 0 \(use greedy\(\) for temperature 0\)"),
    (lambda x: filter_logits(x, temperature=-1.0), "temperature must be > 0"),
    (lambda x: top_k_filter(x, 0), "k must be a positive integer, got 0"),
    (lambda x: filter_logits(x, top_k=-1), "top_k must be a non-negative integer"),
    (lambda x: top_p_filter(x, 0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (lambda x: top_p_filter(x, 1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (lambda x: filter_logits(x, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda x: top_p_filter(x, 0.9, min_tokens_to_keep=0), "min_tokens_to_keep must be a positive integer"),
    (lambda x: sample(x, 42), "rng must be a numpy.random.Generator"),
    (lambda x: greedy(x[0, 0]), r"logits must have shape \[\.\.\., V\]"),
])
def test_decoding_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.zeros((2, 5), np.float32))


def test_top_p_matches_top_p_logits_warper_at_smollm2_vocabulary_size():
    """V = 49152: partial sums are accumulated as torch does (float64, rounded to float32), so
    the cut falls where transformers puts it even within 1e-5 of the threshold."""
    cases = [(seed, top_p) for seed in range(6) for top_p in (0.9, 0.5, 0.99)]
    checked = 0
    for seed, top_p in cases:
        x = random_logits(seed, 2, 49152, False)
        if clear_of_the_cut(x, top_p, margin=1.2e-7):  # 2 ulp: closer, exp's last bit decides
            np.testing.assert_array_equal(top_p_filter(x, top_p), hf(TopPLogitsWarper(top_p), x))
            checked += 1
    assert checked >= len(cases) - 2


def test_top_p_with_a_float32_running_sum_cuts_elsewhere():
    """Negative control for the test above: a float32 cumsum over 49152 entries drifts enough to
    move the cut (here by one token) where the float64 accumulation does not."""
    x = random_logits(1, 2, 49152, False)
    order = np.argsort(x, axis=-1, kind="stable")
    cumulative = np.cumsum(softmax(np.take_along_axis(x, order, -1)), axis=-1)  # float32 sum
    remove_sorted = cumulative <= np.float32(1 - 0.9)
    remove_sorted[:, -1] = False
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, -1)
    expected = np.isneginf(hf(TopPLogitsWarper(0.9), x))
    assert (remove != expected).sum() >= 1
    np.testing.assert_array_equal(np.isneginf(top_p_filter(x, 0.9)), expected)
