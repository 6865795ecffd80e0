r"""Byte-pair encoding: learning merges and applying them (lecture 001, "Tokenization"; 004).

Lecture 001: "each word is first a sequence of characters; the most frequent pair of adjacent
units is merged into a new unit; repeat until the vocabulary has the wanted size". This module
is that loop, written to give exactly the merges and tokens of Hugging Face ``tokenizers``
(``BpeTrainer`` + the ``BPE`` model) in the byte-level configuration SmolLM2's tokenizer uses:

- **pre-tokenisation** (:func:`pre_tokenize`): every digit alone (``Digits(individual_digits=
  True)``), then GPT-2's pattern (a word with its leading space, a number, punctuation, spaces),
  then each UTF-8 byte mapped to one printable character (``ByteLevel``: a space is ``Ġ``).
  Merges never cross the pieces;
- **the alphabet**: all 256 byte characters, ids 0..255 in code-point order
  (``initial_alphabet=ByteLevel.alphabet()``); each merge adds the next id;
- **counting** (:func:`count_pairs`): every adjacent pair of every piece, weighted by how often
  the piece occurs, overlapping pairs included (``"aaa"`` counts ``(a, a)`` twice);
- **ties** (:func:`most_frequent_pair`): among pairs with the highest count, the one with the
  smallest (left id, right id);
- **merging in a piece** (:func:`merge_pair`): left to right, non-overlapping;
- **encoding** (:func:`apply_merges`): the adjacent pair with the earliest-learnt merge first,
  its leftmost occurrence, until no learnt merge applies.

The pattern is written with Python's ``re``: ``[^\W\d_]`` for the letters and ``\d`` for the
numbers that ``tokenizers`` matches with ``\p{L}`` and ``\p{N}``; the two agree on ASCII text
and on most letters of other scripts (they part on rare characters such as combining marks).
Tests: ``tests/test_equations_bpe.py`` (against ``BpeTrainer`` on hypothesis corpora, and against
SmolLM2's own tokenizer with its 48,900 merges).
"""
import re
from collections import Counter
from functools import lru_cache

# GPT-2's pre-tokenisation pattern, as tokenizers' ByteLevel(use_regex=True) has it.
_GPT2_PATTERN = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


@lru_cache(maxsize=1)
def bytes_to_unicode():
    """GPT-2's table from the 256 byte values to 256 printable characters (``ByteLevel``).

    Printable Latin-1 bytes stand for themselves; the others (controls, space) are shifted to
    code points from 256 on, so a space becomes ``Ġ`` (U+0120) and a newline ``Ċ``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def pre_tokenize(text):
    r"""Cut text into the pieces BPE merges within, in byte-level characters (lecture 001).

    ``tokenizers``' ``Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=
    False)])``, SmolLM2's pre-tokenizer: ``"Hello 2024!"`` -> ``["Hello", "Ġ", "2", "0", "2",
    "4", "!"]``.
    """
    table = bytes_to_unicode()
    pieces = []
    for part in re.split(r"(\d)", text):
        for match in _GPT2_PATTERN.finditer(part):
            pieces.append("".join(table[b] for b in match.group().encode("utf-8")))
    return pieces


def count_words(texts):
    """How often each pre-tokenised piece occurs in ``texts`` (``BpeTrainer.feed``)."""
    return Counter(piece for text in texts for piece in pre_tokenize(text))


def count_pairs(words):
    r"""Count adjacent pairs over a corpus of split words (lecture 001: "the most frequent pair").

    .. math::
        \mathrm{count}(a, b) = \sum_{w} n_w \,\bigl|\{\, i : w_i = a,\ w_{i+1} = b \,\}\bigr|

    ``words`` maps each word, a tuple of its current units, to its count :math:`n_w`.
    Overlapping pairs count: ``("a", "a", "a")`` holds ``("a", "a")`` twice
    (``tokenizers``' ``BpeTrainer.count_pairs``).
    """
    counts = Counter()
    for word, n in words.items():
        for pair in zip(word, word[1:]):
            counts[pair] += n
    return counts


def most_frequent_pair(counts, ids):
    r"""The pair to merge next: the highest count, ties to the smallest pair of ids.

    .. math::
        (a^*, b^*) = \arg\max_{(a, b)} \bigl(\mathrm{count}(a, b),\ -\mathrm{id}(a),\ -\mathrm{id}(b)\bigr)

    ``ids`` maps each unit to its vocabulary id. ``BpeTrainer``'s priority queue orders pairs
    this way (``Merge::cmp``: count, then the pair of ids in ascending order). None when no
    pair is left.
    """
    if not counts:
        return None
    return max(counts, key=lambda pair: (counts[pair], -ids[pair[0]], -ids[pair[1]]))


def merge_pair(word, pair):
    r"""Replace each occurrence of ``pair`` in ``word`` by the merged unit, left to right.

    .. math::
        (\ldots, a, b, \ldots) \;\to\; (\ldots, ab, \ldots)

    Non-overlapping, from the left: merging ``(a, a)`` in ``a a a`` gives ``aa a``
    (``tokenizers``' ``Word::merge``).
    """
    a, b = pair
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(texts, vocab_size):
    r"""Learn BPE merges from a corpus until the vocabulary has ``vocab_size`` entries (lecture 001).

    Split every piece into bytes, then repeat: count the pairs, merge the most frequent one
    everywhere, give the merged unit the next id. ``tokenizers.trainers.BpeTrainer(vocab_size=
    ..., initial_alphabet=pre_tokenizers.ByteLevel.alphabet())`` with :func:`pre_tokenize`'s
    pre-tokenizer. Returns ``(vocab, merges)``: ``vocab`` maps each unit to its id (the 256
    bytes, then one per merge in order), ``merges`` is the list of merged pairs in the order
    learnt (the ``merges`` of a ``tokenizer.json``).

    When a merge gives a unit that already exists (``ab + c`` after ``a + bc``), the unit keeps
    its id and the vocabulary does not grow, as in ``BpeTrainer``. Every step recounts every
    pair, the loop as the lecture states it; ``BpeTrainer`` updates the counts of the pairs a
    merge touched instead (a priority queue), which gives the same merges much faster.
    """
    vocab = {ch: i for i, ch in enumerate(sorted(bytes_to_unicode().values()))}
    words = Counter()
    for piece, n in count_words(texts).items():
        words[tuple(piece)] += n
    merges = []
    while len(vocab) < vocab_size:
        pair = most_frequent_pair(count_pairs(words), vocab)
        if pair is None:
            break
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        words = Counter({merge_pair(w, pair): n for w, n in words.items()})
    return vocab, merges


def apply_merges(word, ranks):
    r"""Encode one pre-tokenised piece with learnt merges (``tokenizers``' ``BPE`` model).

    .. math::
        \text{repeat: } (a, b) = \arg\min_{\text{adjacent pairs}} \mathrm{rank}(a, b),\ \text{leftmost};
        \quad (\ldots, a, b, \ldots) \to (\ldots, ab, \ldots)

    ``word`` is a piece from :func:`pre_tokenize`, ``ranks`` maps each merged pair to its
    position in the merge list. Merges apply in the order they were learnt, not by frequency
    in this text. Returns the tokens (strings).
    """
    units = list(word)
    while len(units) > 1:
        candidates = [(ranks[p], i) for i, p in enumerate(zip(units, units[1:])) if p in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        units[i:i + 2] = [units[i] + units[i + 1]]
    return units


def bpe_encode(text, vocab, merges):
    """Text -> token ids with a learnt vocabulary and merge list (``Tokenizer.encode``).

    :func:`pre_tokenize`, then :func:`apply_merges` on each piece, then each token's id.
    """
    ranks = {tuple(pair): r for r, pair in enumerate(merges)}
    return [vocab[t] for piece in pre_tokenize(text) for t in apply_merges(piece, ranks)]
