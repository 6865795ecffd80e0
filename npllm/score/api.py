"""The entry points: :func:`score` (one text or a list) and :func:`iter_scores` (results as
they come, in input order, resumable)."""
from npllm.errors import ScoreError
from npllm.score.batching import DEFAULT_BATCH_SIZE, run_rows
from npllm.score.bos import resolve_bos, tokenizer_of
from npllm.score.windows import (as_list, assemble, check_settings, chunks, prepare)

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
            # Skipped items of a chunk are computed again (their batches make the others'
            # numbers) but were counted by the run that wrote them.
            share = {i: 0.0 if i in skip else 1 / len(p.rows) for i, p in prepared.items()}
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
