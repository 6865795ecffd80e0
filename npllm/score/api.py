"""The entry points: :func:`score` (one text or a list) and :func:`iter_scores` (results as
they come, in input order, resumable)."""
from npllm.errors import ScoreError
from npllm.score.batching import DEFAULT_BATCH_SIZE, run_rows
from npllm.score.bos import resolve_bos, tokenizer_of
from npllm.score.windows import (as_list, assemble, check_settings, chunks, normalise_items,
                                 prepare)

# Progress bars count texts in tenths: a long text moves the bar window by window.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}]"


def iter_scores(model, items, *, bos="auto", base="e", window=None, stride=None, slide=True,
                batch_size=DEFAULT_BATCH_SIZE, with_rank=False, with_entropy=False,
                with_greedy=False, skip=(), progress=False, split_special_tokens=False,
                on_progress=None):
    """Score ``items`` (texts, or ``(text, context)`` pairs) and yield ``(index, result)`` in
    input order, one chunk of items at a time (:func:`chunks`: up to ``SORT_BATCHES``
    batches' worth). ``result`` is a :class:`TextScore` or the :class:`ScoreError` that the
    item raised.

    A chunk's texts are sorted by length and cut into batches of ``batch_size``, so that little
    is padded. Chunks are cut at fixed positions of the input, so an item's numbers do not
    depend on where a run started: ``skip`` (indices already done, e.g. by an interrupted run)
    leaves them out of the output, and the rest come out bit for bit as in one uninterrupted
    run. ``split_special_tokens`` as in :func:`score`.

    ``on_progress`` (if given) is called with a fraction of an item whenever part of one is
    done: a text cut into k sliding windows reports 1/k per window, so that a progress bar
    moves during a long text; the fractions of an item add up to 1 by the time it is yielded.
    """
    tok = tokenizer_of(model)
    bos_choice = resolve_bos(model, bos)
    base, window, stride, batch_size = check_settings(model, base, window, stride, batch_size)
    items = [tuple(it) if isinstance(it, (tuple, list)) and len(it) == 2 else (it, None)
             for it in as_list(items, "items")]
    skip = set(skip)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items) - len(skip & set(range(len(items)))), unit="text",
                   desc="scoring", disable=None, bar_format=BAR_FORMAT)
    try:
        for chunk in chunks(items, batch_size):
            if all(i in skip for i in chunk):
                continue
            prepared, results = {}, {}
            for i in chunk:
                text, context = items[i]
                try:
                    prepared[i] = prepare(i, text, context, tok, bos_choice, window, stride,
                                           slide, split_special_tokens)
                except ScoreError as e:
                    e.index = i
                    results[i] = e
            rows = [row for p in prepared.values() for row in p.rows]
            share = {i: 1 / len(p.rows) for i, p in prepared.items()}
            report = None
            if on_progress is not None or bar is not None:
                def report(done):
                    part = sum(share[row.item] for row in done)
                    if on_progress is not None:
                        on_progress(part)
                    if bar is not None:
                        bar.update(part)
            outs = run_rows(model, rows, batch_size, with_rank, with_entropy, with_greedy,
                             report)
            k = 0
            for i, p in prepared.items():
                mine = outs[k:k + len(p.rows)]
                k += len(p.rows)
                results[i] = assemble(p, mine, tok, bos_choice, base, window, stride,
                                       with_rank, with_entropy, with_greedy)
            for i in chunk:
                if i not in skip:
                    if i not in prepared:  # an error: nothing was run for it
                        if on_progress is not None:
                            on_progress(1.0)
                        if bar is not None:
                            bar.update(1)
                    yield i, results[i]
    finally:
        if bar is not None:
            bar.close()


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
