"""npllm.score on tiny random models (issue 4): every number against transformers, and the
policies (BOS, context split, sliding windows, batching, errors) as properties.

The reference is transformers' own forward pass on the same checkpoint, fed the same token ids:
log P(s_i | s_<i) = -F.cross_entropy(logits[i - 1], s_i). Tolerance 1e-4 (two float32
implementations summing in different orders); batching and windows compare npllm with itself.
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tiny_models import CORPUS, load_reference, tiny_llama

import npllm
from npllm.score import (CHUNK_CHARACTERS, MAX_BATCH_TOKENS, SORT_BATCHES, ScoreError,
                         TextScore, prepare, batch_plan, chunks, corpus_perplexity, iter_scores,
                         resolve_bos, score)

PIECES = list("abcdefghijklmnopqrstuvwxyz      .,!?'\n0123456789") + [
    "The", " quick", " brown", " fox", "é", "東京", "🙂", "\t", "  "]
TEXTS = st.lists(st.sampled_from(PIECES), min_size=1, max_size=30).map("".join)


@pytest.fixture(scope="module")
def tiny():
    folder = tiny_llama()
    return npllm.load(str(folder)), load_reference(folder)


@pytest.fixture(scope="module")
def tiny_tied_mqa():
    folder = tiny_llama(tie_word_embeddings=True, num_key_value_heads=1)
    return npllm.load(str(folder)), load_reference(folder)


def reference_log_probs(ref, seq):
    """transformers: -cross_entropy of each token given the ones before it (seq[1:])."""
    with torch.no_grad():
        logits = ref(torch.tensor([seq])).logits[0]
    return logits, -F.cross_entropy(logits[:-1], torch.tensor(seq[1:]), reduction="none").numpy()


def corpus_texts(n, seed=0, max_chars=300):
    """n texts of mixed length cut from the tiny models' corpus (deterministic)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = int(rng.integers(0, len(CORPUS) - max_chars))
        out.append(CORPUS[start:start + int(rng.integers(1, max_chars))])
    return out


# -- the numbers against transformers -------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "tiny_tied_mqa"])
@settings(max_examples=25)
@given(text=TEXTS)
def test_token_log_probs_equal_torch_cross_entropy(request, which, text):
    model, ref = request.getfixturevalue(which)
    s = score(model, text, with_rank=True, with_entropy=True, with_greedy=True)
    seq = [s.bos.id] + s.token_ids
    assert s.token_ids == model.tokenizer.encode(text)
    logits, expected = reference_log_probs(ref, seq)
    np.testing.assert_allclose(s.log_probs, expected, atol=1e-4, rtol=0)
    assert s.total == pytest.approx(float(expected.astype(np.float64).sum()), abs=1e-4 * len(seq))
    assert s.context_lengths == list(range(1, len(seq)))
    targets = torch.tensor(seq[1:])
    target_logits = logits[:-1].gather(1, targets[:, None])
    # A rank counts logits above the target's: one within the logits' tolerance (1e-4, as the
    # log-probs) of the target's may fall either side in two float32 forward passes, so the
    # rank lies between the count of those surely above and of those possibly above.
    surely = ((logits[:-1] > target_logits + 1e-4).sum(1) + 1).numpy()
    possibly = ((logits[:-1] >= target_logits - 1e-4).sum(1)).numpy()  # the target included
    ranks = np.array(s.ranks)
    assert np.all((surely <= ranks) & (ranks <= possibly)), (ranks, surely, possibly)
    entropy = torch.distributions.Categorical(logits=logits[:-1]).entropy().numpy()
    np.testing.assert_allclose(s.entropies, entropy, atol=1e-4, rtol=0)
    # Greedy (the target is the argmax): sure when nothing is possibly above, ruled out when
    # something is surely above.
    greedy = np.array(s.is_greedy)
    assert np.all(greedy <= (surely == 1)) and np.all(greedy >= (possibly == 1))


def test_base_2_gives_bits_and_the_same_perplexity(tiny):
    model, _ = tiny
    nats, bits = score(model, "The quick brown fox"), score(model, "The quick brown fox", base=2)
    np.testing.assert_allclose(bits.log_probs, np.array(nats.log_probs) / math.log(2), rtol=1e-12)
    assert bits.total == pytest.approx(nats.total / math.log(2), rel=1e-12)
    assert bits.perplexity == pytest.approx(nats.perplexity, rel=1e-12)
    assert bits.bits_per_byte == pytest.approx(nats.bits_per_byte, rel=1e-12)
    assert (nats.unit, bits.unit) == ("nats", "bits")


@given(text=TEXTS)
@settings(max_examples=15)
def test_perplexity_and_bits_per_byte_formulas(tiny, text):
    model, _ = tiny
    s = score(model, text)
    lp = np.array(s.log_probs)
    assert s.mean == pytest.approx(lp.mean(), rel=1e-9)
    assert s.perplexity == pytest.approx(math.exp(-lp.mean()), rel=1e-9)
    assert s.n_bytes == len(text.encode("utf-8"))  # BOS on: every byte of the text is scored
    assert s.bits_per_byte == pytest.approx(-lp.sum() / math.log(2) / s.n_bytes, rel=1e-9)


# -- the BOS policy -------------------------------------------------------------------------------

def test_bos_auto_is_the_document_separator_for_a_smollm2_like_tokenizer(tiny):
    model, _ = tiny
    bos = resolve_bos(model, "auto")
    assert (bos.id, bos.token, bos.every_window) == (0, "<|endoftext|>", False)
    assert resolve_bos(model, True) == bos
    s = score(model, "He runs fast")
    assert s.bos == bos and s.bos_added and s.to_dict()["bos"] == "<|endoftext|>"
    assert "<|endoftext|> (id 0, prepended)" in s.explain()


def test_bos_auto_follows_add_bos_token(tmp_path):
    folder = tmp_path / "with_bos"
    shutil.copytree(tiny_llama(), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model = npllm.load(str(folder))
    bos = resolve_bos(model, "auto")
    assert (bos.id, bos.token, bos.every_window) == (1, "<|im_start|>", True)
    s = score(model, "He runs fast")
    assert s.token_ids[0] != 1 and s.bos_added  # prepended once, not by the tokenizer as well
    long = score(model, CORPUS[:400], window=32, stride=16)
    assert long.slid
    prep = prepare(0, CORPUS[:400], None, model.tokenizer, bos, 32, 16, True)
    assert all(row.ids[0] == 1 for row in prep.rows)  # every window starts with the BOS
    assert max(long.context_lengths) <= 32


def test_bos_explicit_choices_and_errors(tiny):
    model, _ = tiny
    assert resolve_bos(model, "<|im_start|>").id == 1
    assert resolve_bos(model, 2).token == "<|im_end|>"
    assert resolve_bos(model, "none").id is None and resolve_bos(model, False).id is None
    with pytest.raises(ScoreError, match="'<s>' is not a token of this model's vocabulary"):
        resolve_bos(model, "<s>")
    with pytest.raises(ScoreError, match=r"bos id must be in \[0, "):
        resolve_bos(model, 10**6)


def test_bos_off_reports_the_first_token_unscored_not_zero(tiny):
    model, ref = tiny
    s = score(model, "He runs fast", bos=False, with_rank=True)
    assert s.log_probs[0] is None and s.context_lengths[0] is None and s.ranks[0] is None
    assert all(lp is not None and lp < 0 for lp in s.log_probs[1:])
    _, expected = reference_log_probs(ref, s.token_ids)
    np.testing.assert_allclose(s.log_probs[1:], expected, atol=1e-4, rtol=0)
    assert s.n_scored == s.n_tokens - 1
    assert s.total == pytest.approx(sum(s.log_probs[1:]))
    first_end = s.offsets[0][1]
    assert s.n_bytes == len("He runs fast"[first_end:].encode())
    record = json.loads(json.dumps(s.to_dict()))
    assert record["log_probs"][0] is None and record["bos"] is None
    assert "unscored" in s.explain() and any("no context" in n for n in s.notes)


def test_bos_is_never_added_twice(tiny):
    model, _ = tiny
    plain = score(model, "He runs fast")
    marked = score(model, "<|endoftext|>He runs fast")
    assert marked.token_ids[0] == 0 and not marked.bos_added
    assert marked.log_probs[0] is None  # the BOS itself has no context
    np.testing.assert_allclose(marked.log_probs[1:], plain.log_probs, atol=1e-6, rtol=0)
    assert any("already starts with <|endoftext|>" in n for n in marked.notes)


def test_a_single_token_without_bos_is_an_error(tiny):
    model, _ = tiny
    with pytest.raises(ScoreError, match="nothing to score: the text is a single token"):
        score(model, "a", bos=False)
    assert score(model, "a").n_scored == 1


# -- context and continuation ---------------------------------------------------------------------

@settings(max_examples=30)
@given(text=TEXTS.filter(lambda t: len(t) > 1), cut=st.integers(1, 1000))
def test_chain_rule_context_plus_continuation(tiny, text, cut):
    """log P(context) + log P(continuation | context) = log P(context + continuation) when the
    boundary falls between tokens (and the context alone tokenizes as it does in the whole)."""
    model, _ = tiny
    ids, offsets = model.tokenizer.encode_with_offsets(text)
    assume(len(ids) > 1)
    k = 1 + cut % (len(ids) - 1)
    b = offsets[k][0]
    assume(0 < b < len(text) and offsets[k - 1][1] == b)  # a clean boundary between tokens
    context, continuation = text[:b], text[b:]
    assume(model.tokenizer.encode(context) == ids[:k])
    whole, first = score(model, text), score(model, context)
    rest = score(model, continuation, context=context)
    assert not any("straddles" in n for n in rest.notes)
    assert rest.n_context_tokens == k and rest.token_ids == ids[k:]
    assert first.total + rest.total == pytest.approx(whole.total, abs=1e-4)
    np.testing.assert_allclose(rest.log_probs, whole.log_probs[k:], atol=1e-5, rtol=0)
    assert rest.context_lengths == whole.context_lengths[k:]


def test_chain_rule_he_runs_fast(tiny):
    model, _ = tiny
    whole = score(model, "He runs fast")
    parts = score(model, "He") .total + score(model, " runs", context="He").total \
        + score(model, " fast", context="He runs").total
    assert parts == pytest.approx(whole.total, abs=1e-4)


def test_a_token_straddling_the_boundary_is_reported_and_scored_with_the_text(tiny):
    model, _ = tiny
    whole = score(model, "He runs fast")
    s = score(model, "fast", context="He runs ")  # " f..." starts with the context's space
    (note,) = [n for n in s.notes if "straddles" in n]
    assert "boundary at 8" in note
    assert s.offsets[0][0] < 8 <= s.offsets[0][1]
    k = s.n_context_tokens
    assert s.token_ids == whole.token_ids[k:]
    np.testing.assert_allclose(s.log_probs, whole.log_probs[k:], atol=1e-5, rtol=0)
    assert s.n_bytes == len(" fast")  # the scored tokens spell the space too
    assert [w.word for w in s.words] == ["fast"]
    assert s.words[0].log_prob == pytest.approx(s.total)


def test_contexts_per_text_and_their_errors(tiny):
    model, _ = tiny
    out = score(model, [" Paris", "", " Lyon"], context=["The capital is", "The capital is",
                                                         None], return_errors=True)
    assert isinstance(out[0], TextScore) and isinstance(out[2], TextScore)
    assert isinstance(out[1], ScoreError) and out[1].index == 1
    assert "has no continuation" in str(out[1])
    assert out[2].context is None
    with pytest.raises(ScoreError, match="one per text"):
        score(model, ["a", "b"], context=["x"])


# -- errors: the message, and the rest is still scored --------------------------------------------

def test_errors_name_the_problem_and_the_rest_is_scored(tiny):
    model, _ = tiny
    texts = ["He runs fast", "", "", "x" * 2000, "The quick brown fox"]
    contexts = [None, None, "The context ", None, None]  # texts[2]: a context, no continuation
    out = score(model, texts, context=contexts, window=64, slide=False, return_errors=True)
    assert [type(r).__name__ for r in out] == ["TextScore", "ScoreError", "ScoreError",
                                               "ScoreError", "TextScore"]
    assert str(out[1]) == "the text is empty: there is nothing to score"
    assert "has no continuation: give the text to score after it" in str(out[2])
    assert "more than the window of 64" in str(out[3]) and "slide" in str(out[3])
    alone = score(model, ["He runs fast", "The quick brown fox"])
    assert out[0].log_probs == alone[0].log_probs and out[4].log_probs == alone[1].log_probs
    with pytest.raises(ScoreError, match=r"^texts\[1\]: the text is empty"):
        score(model, texts, window=64, slide=False)


def test_settings_are_checked(tiny):
    model, _ = tiny
    with pytest.raises(ScoreError, match="longer than the model's context of 256"):
        score(model, "a b", window=1000)
    with pytest.raises(ScoreError, match=r"stride must be .* \[1, 15\]"):
        score(model, "a b", window=16, stride=16)
    with pytest.raises(ScoreError, match="base must be 'e'"):
        score(model, "a b", base=10)


# -- batching -------------------------------------------------------------------------------------

def test_batch_invariance_50_texts_batches_of_1_7_32(tiny):
    model, _ = tiny
    texts = corpus_texts(50)
    contexts = [None if i % 3 else "Numbers and words: " for i in range(50)]
    runs = {bs: score(model, texts, context=contexts, batch_size=bs) for bs in (1, 7, 32)}
    lengths = [r.n_tokens for r in runs[1]]
    assert min(lengths) < 5 and max(lengths) > 50  # mixed lengths, real padding
    for bs in (7, 32):
        for a, b in zip(runs[1], runs[bs]):
            assert a.token_ids == b.token_ids
            np.testing.assert_allclose(b.log_probs, a.log_probs, atol=1e-5, rtol=0)


def forward_shapes(model, monkeypatch):
    """The [B, T] of every forward pass of ``model`` from now on (until monkeypatch undoes it)."""
    calls = []
    real = type(model).forward

    def spy(self, ids, *args, **kwargs):
        calls.append(np.asarray(ids).shape)
        return real(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    monkeypatch.setattr(type(model), "__call__", spy)
    return calls


def test_batches_are_cut_by_token_budget(tiny, monkeypatch):
    """A long row is not padded together with short ones (a pass of its own is cheaper), and no
    batch exceeds the token budget."""
    model, _ = tiny
    calls = forward_shapes(model, monkeypatch)
    score(model, ["a b", CORPUS[:600], "c d e", "f"], batch_size=4)
    assert all(b * t <= MAX_BATCH_TOKENS or b == 1 for b, t in calls)
    assert any(b == 1 and t > 100 for b, t in calls)  # the long text went alone


def test_texts_are_sorted_by_length_within_fixed_chunks(tiny, monkeypatch):
    """Short and long texts in alternation are batched short with short and long with long
    (within a chunk of SORT_BATCHES batches), so that little is padded; results come back in
    input order."""
    model, _ = tiny
    short, long = corpus_texts(24, seed=7, max_chars=20), corpus_texts(24, seed=8, max_chars=300)
    long = [t + " " + CORPUS[:200] for t in long]
    texts = [t for pair in zip(short, long) for t in pair]
    calls = forward_shapes(model, monkeypatch)
    scores = score(model, texts, batch_size=4)
    lengths = [s.n_tokens + 1 for s in scores]  # + the BOS: the rows' lengths
    padded = sum(b * t for b, t in calls)
    # In input order every batch of 4 would hold 2 short and 2 long texts: padded together, or
    # (more than PASS_COST_TOKENS apart, as here) in 2 passes each, 24 in all.
    assert padded < 1.15 * sum(lengths) and len(calls) <= len(texts) // 4 + 2, calls
    monkeypatch.undo()
    for i in (0, 1, 46, 47):  # in input order, and as each text alone
        assert scores[i].log_probs == pytest.approx(score(model, texts[i]).log_probs, abs=1e-5)


def test_chunks_are_cut_by_count_and_characters():
    items = [("a" * 10, None)] * 100 + [("b" * 30000, "c" * 10000)] * 5 + [(None, None)] * 3
    cut = chunks(items, 4)
    assert [len(c) for c in cut[:3]] == [4 * SORT_BATCHES] * 3  # 96 short texts
    assert cut[0].start == 0 and all(a.stop == b.start for a, b in zip(cut, cut[1:]))
    assert cut[-1].stop == len(items)
    for c in cut:  # a chunk passes CHUNK_CHARACTERS only with a single item
        size = sum(len(t or "") + len(x or "") for t, x in items[c.start:c.stop])
        assert size <= CHUNK_CHARACTERS or len(c) == 1
    assert chunks(items, 4) == cut  # from the items alone


def test_batch_plan_sorts_longest_first_and_keeps_ties_in_order():
    assert batch_plan([3, 9, 3, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert batch_plan([], 4) == []
    assert batch_plan([100, 10], 4) == [[0], [1]]  # 90 positions of padding: a pass of its own


def test_log_probs_alone_equal_log_probs_from_the_logits(tiny):
    """Asking only for log-probabilities takes the fused path (forward(..., targets=)); asking
    for ranks too takes the logits, then log-softmax. Same numbers up to float32 rounding of a
    log-softmax over V (1e-5)."""
    model, _ = tiny
    texts = corpus_texts(12, seed=5)
    fused = score(model, texts, batch_size=5)
    from_logits = score(model, texts, batch_size=5, with_rank=True)
    for a, b in zip(fused, from_logits):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-5, rtol=0)


def test_skip_gives_bit_identical_results(tiny):
    """What --resume relies on: skipping done items does not change the others' numbers."""
    model, _ = tiny
    texts = corpus_texts(20, seed=3)
    full = dict(iter_scores(model, texts, batch_size=6))
    resumed = dict(iter_scores(model, texts, batch_size=6, skip=range(9)))
    assert sorted(resumed) == list(range(9, 20))
    for i, r in resumed.items():
        assert r.log_probs == full[i].log_probs


# -- sliding windows ------------------------------------------------------------------------------

def test_window_invariance_for_a_text_that_fits(tiny):
    model, _ = tiny
    text = CORPUS[:300]
    plain = score(model, text)
    n_inputs = plain.n_tokens  # with the BOS: n_tokens + 1 ids, n_tokens model inputs
    for window in (n_inputs, n_inputs + 7, None):
        s = score(model, text, window=window, slide=False)
        assert not s.slid and s.log_probs == plain.log_probs
    assert score(model, text, window=n_inputs - 1).slid


@settings(max_examples=15)
@given(window=st.integers(2, 24), stride_frac=st.floats(0, 1), start=st.integers(0, 500),
       bos=st.booleans())
def test_sliding_window_predicts_each_token_once_with_the_reported_context(tiny, window,
                                                                         stride_frac, start,
                                                                         bos):
    model, ref = tiny
    stride = 1 + int(stride_frac * (window - 2))
    text = CORPUS[start:start + 120]
    choice = resolve_bos(model, "auto" if bos else "none")
    prep = prepare(0, text, None, model.tokenizer, choice, window, stride, True)
    predicted = np.concatenate([row.token_index for row in prep.rows])
    first_scored = 0 if bos else 1
    assert sorted(predicted) == list(range(first_scored, len(prep.ids)))  # each exactly once
    assert all(len(row.ids) <= window for row in prep.rows)

    s = score(model, text, bos="auto" if bos else "none", window=window, stride=stride)
    seq = ([choice.id] if bos else []) + s.token_ids
    o = 1 if bos else 0
    by_start = {}  # tokens predicted from the same first context token: one reference pass
    for i, (lp, c) in enumerate(zip(s.log_probs, s.context_lengths)):
        if lp is None:
            assert i == 0 and not bos
            continue
        p = i + o  # position in seq
        assert c == p or c >= window - stride + 1  # whole prefix, or at least window - stride
        assert c <= window
        by_start.setdefault(p - c, []).append((p, lp))
    for a, tokens in by_start.items():
        end = max(p for p, _ in tokens)
        _, expected = reference_log_probs(ref, seq[a:end + 1])  # expected[j]: position a + 1 + j
        for p, lp in tokens:
            assert lp == pytest.approx(float(expected[p - a - 1]), abs=1e-4)


def test_long_texts_slide_by_default_and_say_so(tiny):
    model, _ = tiny
    text = CORPUS * 2  # longer than the tiny model's 256 positions
    s = score(model, text)
    assert s.slid and s.n_tokens > 256 and all(lp is not None for lp in s.log_probs)
    assert (s.window, s.stride) == (256, 128)
    assert max(s.context_lengths) == 256 and min(s.context_lengths[256:]) >= 129
    assert any("sliding window" in n for n in s.notes)


# -- words and the factors view -------------------------------------------------------------------

@settings(max_examples=20)
@given(text=TEXTS, bos=st.booleans())
def test_word_scores_add_up_to_the_total(tiny, text, bos):
    model, _ = tiny
    s = score(model, text, bos=bos) if bos or len(model.tokenizer.encode(text)) > 1 else None
    assume(s is not None)
    words = s.words
    assert [w.word for w in words] == text.split()
    assert sum(w.n_tokens for w in words) == (s.n_tokens if words else 0)
    if words and all(w.log_prob is not None for w in words):
        assert math.fsum(w.log_prob for w in words) == pytest.approx(s.total, abs=1e-9)
    for w in words:
        assert s.full_text[w.start:w.end] == w.word


def test_factors_and_explain_write_the_chain_rule_out(tiny):
    model, _ = tiny
    s = score(model, "He runs fast", base=2)
    factors = s.factors()
    assert [f.token for f in factors] == s.tokens
    assert [f.given for f in factors] == ["He runs fast"[:a] for a, _ in s.offsets]
    assert math.prod(f.prob for f in factors) == pytest.approx(2 ** s.total, rel=1e-9)
    text = s.explain()
    first = text.splitlines()[0]
    assert first.startswith("P(He runs fast) = P(") and " x P(" in first
    assert f"= {s.total:.4f} bits" in text and "log2 P(He runs fast)" in text
    assert str(s) == text


# -- corpus perplexity ----------------------------------------------------------------------------

def test_corpus_perplexity_is_token_weighted_with_a_document_standard_error(tiny):
    model, _ = tiny
    docs = corpus_texts(30, seed=5, max_chars=200) + [""]
    result = corpus_perplexity(model, docs)
    scores = score(model, docs[:-1])
    n = sum(s.n_scored for s in scores)
    nll = -sum(s.total for s in scores) / n
    assert result.n_tokens == n and result.n_documents == 30 and result.n_failed == 1
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-12)
    assert result.bits_per_byte == pytest.approx(
        -sum(s.total for s in scores) / math.log(2) / sum(s.n_bytes for s in scores))
    assert result.stderr_method == "documents"
    # An independent estimate of the same quantity: the jackknife over documents.
    totals = np.array([-s.total for s in scores])
    counts = np.array([s.n_scored for s in scores])
    loo = (totals.sum() - totals) / (counts.sum() - counts)
    jackknife = math.sqrt((len(loo) - 1) / len(loo) * ((loo - loo.mean()) ** 2).sum())
    assert result.stderr / result.perplexity == pytest.approx(jackknife, rel=0.15)
    lo, hi = result.ci95
    assert lo < result.perplexity < hi
    assert "standard error over documents" in str(result)
    assert json.loads(json.dumps(result.to_dict()))["n_failed"] == 1


def test_corpus_perplexity_of_one_document_uses_tokens(tiny):
    model, _ = tiny
    result = corpus_perplexity(model, [CORPUS[:500]])
    assert result.stderr_method.startswith("tokens") and result.stderr == result.stderr_tokens
    with pytest.raises(ScoreError, match="no document could be scored"):
        corpus_perplexity(model, ["", ""])


def test_batches_several_at_a_time_give_the_numbers_of_one_after_another(tiny, monkeypatch):
    """On an engine with three threads, a chunk's batches run several at a time (the engine's
    ``map``). Each batch is the same forward pass on any thread (BLAS on one thread in both,
    in this session), so every text gets bit for bit the numbers of batches run one after
    another: a result put in another text's place would differ. With logits asked for
    (ranks), only as many batches at once as fit in MAX_BATCH_TOKENS positions together."""
    from npllm.engine import NumbaEngine
    from npllm.model import Model

    model, _ = tiny
    one = Model(model.config, model.weights, model.tokenizer,
                engine=NumbaEngine(model.config, model.weights, threads=1))
    three = Model(model.config, model.weights, model.tokenizer,
                  engine=NumbaEngine(model.config, model.weights, threads=3))
    at_once = []
    real = three.engine.parallel.map
    monkeypatch.setattr(three.engine.parallel, "map",
                        lambda fn, items, n=None: at_once.append(n) or real(fn, items, n))
    texts = corpus_texts(40, seed=11)
    longest = max(s.n_tokens for s in score(model, texts)) + 1  # + the BOS
    for kwargs in ({}, {"with_rank": True}):
        at_once.clear()
        a = score(one, texts, batch_size=4, **kwargs)
        b = score(three, texts, batch_size=4, **kwargs)
        assert [s.log_probs for s in b] == [s.log_probs for s in a]
        assert [s.ranks for s in b] == [s.ranks for s in a]
        if kwargs:  # logits: bounded by what fits, here still several at a time
            assert all(n >= MAX_BATCH_TOKENS // (4 * longest) >= 2 for n in at_once), at_once
        else:  # log-probabilities only: as many as there are threads
            assert at_once and all(n is None for n in at_once)
