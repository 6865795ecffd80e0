"""The filter chain generate() samples from, at the edges issue 5 names: ties, -inf entries, and
top_p near 0 and near 1 (tests/test_equations_decoding.py covers each filter on its own and the
chain on distinct finite logits with top_p in [0.01, 1]).

The reference is transformers' own chain, built the way ``generate(do_sample=True)`` builds it:
TemperatureLogitsWarper, then TopKLogitsWarper, then TopPLogitsWarper. At most 16 logits, where
torch.sort is stable like NumPy's, so tied tokens straddling the top-p cut fall the same way.
"""
import numpy as np
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from npllm.equations import filter_logits, softmax
from npllm.generate import decoding_settings, make_step, next_token

top_p_near_0 = st.floats(1e-8, 1e-3)
top_p_near_1 = st.floats(0.999, 1.0, exclude_max=True)


@st.composite
def tied_logits(draw):
    """[V] logits with many ties (few distinct values) and some -inf (never all of them)."""
    V = draw(st.integers(1, 16))
    scale = draw(st.sampled_from([0.25, 1.0, 3.0]))
    levels = draw(st.lists(st.integers(-3, 3), min_size=V, max_size=V))
    x = np.array(levels, np.float32) * np.float32(scale)
    masked = draw(st.lists(st.booleans(), min_size=V, max_size=V))
    x[np.array(masked)] = -np.inf
    if np.isneginf(x).all():
        x[draw(st.integers(0, V - 1))] = 0.0
    return x


def transformers_chain(x, temperature, top_k, top_p):
    warpers = LogitsProcessorList(
        ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        + ([TopKLogitsWarper(top_k)] if top_k else [])
        + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
    return warpers(None, torch.from_numpy(x[None]))[0].numpy()


def clear_of_the_cut(logits, top_p, margin=1e-6):
    """No cumulative probability (ascending order) within ``margin`` of 1 - top_p, where the
    last-ulp difference between NumPy's and torch's exp may legitimately move the cut."""
    cumulative = torch.sort(torch.from_numpy(logits))[0].softmax(-1).cumsum(-1).numpy()
    return not ((np.abs(cumulative - np.float32(1 - top_p)) < margin) & (cumulative != 0)).any()


@given(x=tied_logits(), temperature=st.sampled_from([0.2, 0.7, 1.0, 1.5]),
       top_k=st.integers(0, 18), top_p=st.one_of(top_p_near_0, top_p_near_1, st.just(1.0)))
@example(x=np.array([1.0, 1.0, 1.0, -np.inf], np.float32), temperature=1.0, top_k=0, top_p=1e-8)
@example(x=np.array([2.0, 2.0, 0.0, 0.0, -np.inf], np.float32), temperature=0.2, top_k=3,
         top_p=0.9999)
def test_chain_equals_transformers_with_ties_inf_and_extreme_top_p(x, temperature, top_k, top_p):
    tempered = x / np.float32(temperature)
    assume(clear_of_the_cut(tempered, top_p))
    ours = filter_logits(x, temperature, top_k, top_p)
    theirs = transformers_chain(x, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    # Temperature's one division may differ by an ulp; the filters only compare and mask.
    np.testing.assert_allclose(ours, theirs, rtol=1.2e-7, atol=0)
    # What generate() then samples from: never a filtered token, always a token.
    probs = softmax(ours)
    assert probs.sum() > 0.999 and (probs[np.isneginf(ours)] == 0).all()
    token, filtered = next_token(x, np.random.default_rng(0), True, temperature, top_k, top_p)
    assert np.isfinite(filtered[token]) and probs[token] > 0


@given(x=tied_logits(), top_p=top_p_near_0)
def test_top_p_near_zero_keeps_one_token_so_sampling_is_greedy(x, top_p):
    """With top_p -> 0 only the most likely token survives (min_tokens_to_keep = 1); among tied
    maxima transformers keeps the last in sort order, i.e. the highest id."""
    kept = np.flatnonzero(np.isfinite(filter_logits(x, 1.0, 0, top_p)))
    assert len(kept) == 1 and x[kept[0]] == x.max()
    assert kept[0] == np.flatnonzero(x == x.max())[-1]
    rng = np.random.default_rng(1)
    assert {next_token(x, rng, True, 1.0, 0, top_p)[0] for _ in range(5)} == {kept[0]}


@given(x=tied_logits(), top_p=top_p_near_1)
def test_top_p_near_one_keeps_every_token_with_real_mass(x, top_p):
    """Only tokens whose cumulative tail mass is <= 1 - top_p (< 1e-3) are dropped."""
    filtered = filter_logits(x, 1.0, 0, top_p)
    dropped = np.isneginf(filtered) & ~np.isneginf(x)
    assert softmax(x)[dropped].sum() <= 1 - top_p + 1e-6


def test_greedy_step_takes_the_first_of_tied_maxima():
    x = np.array([0.5, 3.0, -np.inf, 3.0, 3.0], np.float32)
    token, filtered = next_token(x, np.random.default_rng(0), *decoding_settings())
    assert token == 1 and filtered is None  # torch.argmax / generate(do_sample=False) agree
    assert int(torch.argmax(torch.from_numpy(x))) == 1
    step = make_step(token, x, filtered, lambda ids: f"<{ids[0]}>", 3)
    assert [c[0] for c in step.candidates] == [1, 3, 4]  # ties by id, -inf never a candidate
    assert step.prob == step.candidates[0][2] == np.float32(softmax(x)[1])
    assert make_step(token, x, filtered, str, 10).candidates[-1][0] == 0  # 4 finite, not 5
