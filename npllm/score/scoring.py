"""``npllm.score``: texts in, :class:`~npllm.score.results.TextScore` out, in this process
(:func:`npllm.score.api.iter_scores`) or on the workers of a Dask cluster
(:mod:`npllm.distributed`)."""
from npllm.errors import ScoreError
from npllm.score.api import iter_scores
from npllm.score.batching import DEFAULT_BATCH_SIZE
from npllm.score.windows import normalise_items


def score(model, texts, context=None, *, bos="auto", base="e", window=None, stride=None,
          slide=True, batch_size=DEFAULT_BATCH_SIZE, with_rank=False, with_entropy=False,
          with_greedy=False, progress=False, return_errors=False, split_special_tokens=False,
          client=None):
    r"""Log-probabilities of ``texts`` under ``model``, token by token (lecture 000).

    .. math::
        \log P(\text{text} \mid \text{context}) = \sum_{i} \log P(s_i \mid s_{<i})

    ``texts``: one string (returns one :class:`TextScore`) or a list (returns a list).
    ``context``: None, one string for all texts, or one per text (None allowed): only the text
    after it is scored, conditioned on it. ``context + text`` is tokenized once and split at the
    character boundary; a token straddling it is scored with the text (a note says so).

    ``bos``: ``"auto"`` (default: the model's document-start token, see :func:`resolve_bos`; never
    added twice), ``False``/``"none"`` (the first token is unscored: ``None``, not 0), a token or
    an id. ``base``: ``"e"`` (nats) or ``2`` (bits). ``window``: tokens per forward pass
    (default: the model's ``max_position_embeddings``); longer texts are scored with a sliding
    window advancing ``stride`` tokens (default ``window // 2``), so every token is predicted
    once with at least ``window - stride`` tokens of context; ``slide=False`` makes such texts an
    error instead. ``batch_size``: texts (or windows) per forward pass; padding changes nothing.
    ``with_rank`` (1 = the most likely token), ``with_entropy`` (of the predicted distribution,
    in ``base``), ``with_greedy`` (is the token the argmax) add per-token lists.
    ``split_special_tokens``: a special-token string written in a text (``"<|im_start|>"``) is
    scored as the special token (False, the default: chat transcripts score as the model saw
    them in training) or as plain text, its characters' ordinary tokens (True).

    ``client``: a ``dask.distributed.Client``: the texts are scored on its workers
    (:mod:`npllm.distributed`; each loads the model from its folder once), same results.

    A text that cannot be scored raises :class:`ScoreError` (``index`` says which); with
    ``return_errors=True`` its slot holds the error instead and the others are still scored.

    >>> s = score(model, "He runs fast")                          # doctest: +SKIP
    >>> print(s.explain())                                         # doctest: +SKIP
    P(He runs fast) = P(He) x P( runs | He) x P( fast | He runs)
    """
    if client is not None:  # a dask.distributed Client: scored on its workers, same results
        from npllm import distributed
        return distributed.score(model, texts, context, client=client, bos=bos, base=base,
                                 window=window, stride=stride, slide=slide,
                                 batch_size=batch_size, with_rank=with_rank,
                                 with_entropy=with_entropy, with_greedy=with_greedy,
                                 progress=progress, return_errors=return_errors,
                                 split_special_tokens=split_special_tokens)
    single, items = normalise_items(texts, context)
    results = []
    for _, r in iter_scores(model, items, bos=bos, base=base, window=window, stride=stride,
                            slide=slide, batch_size=batch_size, with_rank=with_rank,
                            with_entropy=with_entropy, with_greedy=with_greedy,
                            progress=progress, split_special_tokens=split_special_tokens):
        if isinstance(r, ScoreError) and not return_errors:
            where = "" if single else f"texts[{r.index}]: "
            raise ScoreError(f"{where}{r}", r.index)
        results.append(r)
    return results[0] if single else results
