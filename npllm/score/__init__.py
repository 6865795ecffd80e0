r"""Sentence log-probabilities: lecture 000's chain rule, computed with a real model.

A decoder-only model gives a text the product of its conditionals,

.. math::
    P(s) = \prod_{i=1}^{|s|} P(s_i \mid s_{<i}), \qquad
    \log P(s) = \sum_{i=1}^{|s|} \log P(s_i \mid s_{<i}),

e.g. ``P(He runs fast) = P(He) x P( runs | He) x P( fast | He runs)``. :func:`score` runs the
model once over the token ids and reads every factor off the logits
(:func:`npllm.equations.token_log_probs`: logits at position t predict token t + 1).

Choices that change the numbers, all visible in each result's metadata:

- **The first token** has no context of its own. By default the model's *document-start* token
  is put before the text (``bos="auto"``; for SmolLM2 that is ``<|endoftext|>``, the token that
  separates documents in its training data), never twice; with ``bos=False`` the first token is
  reported as *unscored* (``None``, never 0) and left out of the total.
- **Context**: ``context + text`` is tokenized once and split at the character boundary, so the
  text's tokens are the ones the model really sees; a token that straddles the boundary (``" fast"``
  when the context ends with a space) is scored as part of the text, and a note says so.
- **Long texts** are scored with a sliding window: each token is predicted exactly once, with at
  least ``window - stride`` tokens of context; ``context_lengths`` says how many tokens each
  prediction saw.
- **Batches** are padded; each text's numbers equal scoring it alone.

Log-probabilities are in nats (``base="e"``) or bits (``base=2``, surprisal in bits).
Perplexity and bits per byte do not depend on the base.

The package's modules, each readable and testable alone: :mod:`~npllm.score.bos` (the BOS
policy), :mod:`~npllm.score.results` (the result classes and their rendering),
:mod:`~npllm.score.windows` (tokenisation, context split, sliding windows, chunks),
:mod:`~npllm.score.batching` (padded batches, run on the model), :mod:`~npllm.score.api`
(:func:`score` and :func:`iter_scores`) and :mod:`~npllm.score.corpus` (corpus perplexity).
"""
from npllm.errors import ScoreError
from npllm.score.api import BAR_FORMAT, iter_scores
from npllm.score.batching import DEFAULT_BATCH_SIZE, MAX_BATCH_TOKENS, batch_plan
from npllm.score.bos import AUTO_BOS_SEPARATOR, Bos, resolve_bos
from npllm.score.corpus import CorpusPerplexity, corpus_perplexity, corpus_stats
from npllm.score.results import BASES, LN2, UNITS, Factor, TextScore, WordScore
from npllm.score.scoring import score
from npllm.score.windows import CHUNK_CHARACTERS, SORT_BATCHES, check_settings, chunks, prepare

__all__ = ["score", "iter_scores", "corpus_perplexity", "resolve_bos", "TextScore", "WordScore",
           "Factor", "Bos", "CorpusPerplexity", "ScoreError", "check_settings", "chunks",
           "batch_plan", "prepare", "corpus_stats", "DEFAULT_BATCH_SIZE", "MAX_BATCH_TOKENS",
           "SORT_BATCHES", "CHUNK_CHARACTERS", "AUTO_BOS_SEPARATOR", "BASES", "UNITS", "LN2",
           "BAR_FORMAT"]
