"""npllm.equations.bpe against Hugging Face tokenizers (issue 17).

The reference is ``tokenizers`` itself, run at test time: ``BpeTrainer`` learning merges on
hypothesis corpora with SmolLM2's pre-tokenizer and the 256-byte initial alphabet, and the
``BPE`` model encoding with them; and SmolLM2's own tokenizer.json (48,900 merges) encoding text.
Token lists and merge lists are compared exactly (they are strings and integers: no tolerance).
"""
import json
from collections import Counter

import pytest
from hypothesis import example, given, strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from npllm.equations.bpe import (apply_merges, bpe_encode, count_pairs, learn_merges, merge_pair,
                                 most_frequent_pair, pre_tokenize)

# Small alphabets make repeated pairs, ties and runs like "aaaa" (overlapping pairs) common;
# the wider one brings digits, punctuation, underscores, newlines and non-ASCII bytes.
ALPHABETS = ["ab ", "aab c", "abcd  ", "ab12 .'s", "ab\n\t c_!'é語"]
corpora = st.sampled_from(ALPHABETS).flatmap(
    lambda a: st.lists(st.text(alphabet=a, max_size=40), min_size=1, max_size=6))
vocab_sizes = st.integers(256, 330)


def smollm_pre_tokenizer():
    """SmolLM2's pre-tokenizer (tokenizer.json: Sequence[Digits, ByteLevel])."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])


def trained_reference(texts, vocab_size):
    """tokenizers' BpeTrainer in the configuration npllm.equations.bpe documents."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = smollm_pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    return tok, model["vocab"], [tuple(m) for m in model["merges"]]


@given(texts=corpora, vocab_size=vocab_sizes)
@example(texts=["aaaa aaa aa a", "aaaaaaa"], vocab_size=300)  # overlapping pairs (a, a)
@example(texts=["ab ba ab ba"], vocab_size=300)  # a tie between (a, b) and (b, a)
def test_learned_merges_and_encodings_equal_bpe_trainer(texts, vocab_size):
    tok, vocab, merges = trained_reference(texts, vocab_size)
    ours_vocab, ours_merges = learn_merges(texts, vocab_size)
    assert ours_merges == merges
    assert ours_vocab == vocab
    for text in texts + [" ".join(texts)]:
        assert bpe_encode(text, ours_vocab, ours_merges) == tok.encode(text).ids, text


@given(text=st.text(alphabet="ab12 .'s\n\t_!é語", max_size=40))
def test_pre_tokenize_equals_smollm_pre_tokenizer(text):
    expected = [piece for piece, _ in smollm_pre_tokenizer().pre_tokenize_str(text)]
    assert pre_tokenize(text) == expected


@pytest.fixture(scope="module")
def smollm_bpe(default_model):
    # bpe_encode is the BPE model alone. The tokenizer first cuts special-token strings out of a
    # text as single ids ("<|endoftext|>" is id 0), a step before BPE; the reference is
    # therefore the tokenizer with that step off (encode_special_tokens: such strings are text).
    backend = Tokenizer.from_str(default_model.tokenizer.backend.to_str())
    backend.encode_special_tokens = True
    model = json.loads(backend.to_str())["model"]
    return backend, model["vocab"], [tuple(m) for m in model["merges"]]


# Printable ASCII and a few accented letters: the pattern's \p{L} / \p{N} and Python's
# [^\W\d_] / \d agree on them (the module docstring says where they part).
smollm_texts = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("éàü\n"),
                       max_size=60)


@pytest.mark.real_model
@given(text=smollm_texts)
@example(text=" running speakers unbelievable 2 + 2 = 4")
@example(text="<|endoftext|>")  # found by the dev profile: a special token's string, as text
def test_encode_with_smollm2_merges_equals_its_tokenizer(smollm_bpe, text):
    backend, vocab, merges = smollm_bpe
    assert bpe_encode(text, vocab, merges) == backend.encode(text, add_special_tokens=False).ids


def test_each_step_by_hand():
    words = {("l", "o", "w"): 5, ("l", "o", "w", "e", "r"): 2, ("a", "a", "a"): 1}
    counts = count_pairs(words)
    assert counts[("l", "o")] == 7 and counts[("a", "a")] == 2  # overlapping pairs count
    ids = {ch: i for i, ch in enumerate("aelorw")}
    assert most_frequent_pair(counts, ids) == ("l", "o")  # 7 beats (o, w)'s 7 on ids
    assert merge_pair(("a", "a", "a"), ("a", "a")) == ("aa", "a")
    assert apply_merges("lower", {("l", "o"): 0, ("o", "w"): 1, ("lo", "w"): 2}) == ["low", "e", "r"]


def test_a_wrong_tie_break_differs_from_the_trainer():
    """Negative control: (a, b), (Ġ, b) and (b, a) all occur twice in "ab ba ab ba"; breaking
    the tie on the largest ids instead of the smallest picks another first merge."""
    texts = ["ab ba ab ba"]
    _, _, merges = trained_reference(texts, 260)
    counts = count_pairs(Counter(tuple(piece) for piece in pre_tokenize(texts[0])))
    ids = learn_merges([], 256)[0]  # the 256 byte characters only
    wrong = max(counts, key=lambda p: (counts[p], ids[p[0]], ids[p[1]]))
    assert merges[0] == most_frequent_pair(counts, ids) == ("a", "b") != wrong
